# NixOS systems with services.nixeryd, evaluated (not built) by test_nixos.py: the
# parts of each system the module makes, as JSON, from one nix-instantiate.
{
  nixpkgs,
  module,
  # A Nix file of nixpkgs configuration, for the sample's nixpkgs_config_file.
  nixpkgsConfig,
  # Where the system `served` listens and what it serves: test_nixos.py runs its
  # socket and its file on this host.
  port,
  storageDir,
  pkgsPath,
}:

let
  lib = import (nixpkgs + "/lib");
  modulesDir = nixpkgs + "/nixos/modules";

  # A slim nixpkgs (the test snapshot) comments modules out of its module list that the
  # modules it keeps still set options of (boot.isContainer, environment.ldso, ...), so
  # that no system evaluates. A real NixOS has them all: the ones commented out are put
  # back. A full nixpkgs has none, and a module listed twice is imported once.
  leftOut =
    let
      lines = lib.splitString "\n" (builtins.readFile (modulesDir + "/module-list.nix"));
      commented = map (builtins.match "[[:space:]]*#[[:space:]]*\\./([^[:space:]]+)[[:space:]]*") lines;
      paths = map (match: modulesDir + "/${builtins.head match}") (lib.filter (m: m != null) commented);
    in
    lib.filter builtins.pathExists paths;

  pkgs = import nixpkgs { system = builtins.currentSystem; };

  evaluate =
    nixeryd:
    (import (nixpkgs + "/nixos/lib/eval-config.nix") {
      inherit pkgs;
      system = null;
      modules = leftOut ++ [
        module
        {
          boot.isContainer = true;
          system.stateVersion = lib.trivial.release;
          services.nixeryd = nixeryd // {
            enable = true;
          };
        }
      ];
    });

  # What a test reads of a system.
  report =
    nixeryd:
    let
      system = evaluate nixeryd;
      inherit (system) config;
      service = config.systemd.services.nixeryd;
      sockets = lib.filterAttrs (name: _: name == "nixeryd") config.systemd.sockets;
    in
    {
      package = config.services.nixeryd.package.outPath;
      nix = config.nix.package.outPath;
      unit = config.systemd.units."nixeryd.service".text;
      socketUnit = config.systemd.units."nixeryd.socket".text or null;
      inherit (service) environment wantedBy requires;
      sockets = lib.mapAttrs (_: socket: { inherit (socket) listenStreams wantedBy; }) sockets;
      toml = config.environment.etc."nixeryd/nixeryd.toml".text;
      user = {
        inherit (config.users.users.nixeryd) isSystemUser group home;
        groupExists = config.users.groups ? nixeryd;
      };
      nixSettings = {
        inherit (config.nix.settings) allowed-users trusted-users extra-allowed-users;
      };
      firewall = config.networking.firewall.allowedTCPPorts;
      warnings = lib.filter (lib.hasPrefix "services.nixeryd") config.warnings;
      failedAssertions = map (assertion: assertion.message) (
        lib.filter (
          assertion: !assertion.assertion && lib.hasPrefix "services.nixeryd" assertion.message
        ) config.assertions
      );
    };

  sample = {
    openFirewall = true;
    listen = [
      "tcp:8080:interface=127.0.0.1"
      "ssl:port=8443:privateKey=/var/lib/nixeryd/key.pem:certKey=/var/lib/nixeryd/cert.pem"
    ];
    environmentFile = "/run/secrets/nixeryd.env";
    settings = {
      pkgs_repo = "https://example.org/pkgs.git";
      nix_timeout = 300;
      failure_ttl = 1.5;
      access_log = false;
      evaluators = 0;
      log_format = "json";
      platforms = [
        "linux/amd64"
        "linux/arm64"
      ];
      permitted_insecure_packages = [ "openssl-1.1.1w" ];
      nixpkgs_config_file = nixpkgsConfig;
      storage_path = "/srv/registry";
      storage_backend = "filesystem";
      auth = "htpasswd";
      plugin.htpasswd.file = "/run/secrets/htpasswd";
      plugin.s3 = {
        bucket = "images";
        secret_key.env = "S3_SECRET";
        "odd key" = "quote \" backslash \\ newline \n end";
      };
      # A table of a provider not in use (nixeryd warns and ignores it), with what TOML
      # spells differently from Nix.
      plugin.other = {
        mixed = [
          1
          2.5
          1.0e20
          true
          "x"
          { inline = 1; }
          [ ]
        ];
        text = "ünïcødé 名前, tab\t, control ${builtins.fromJSON ''"\u0001 \u007f"''}";
        "ключ" = "unicode key";
        nested.deeper.value = 1;
        empty = { };
      };
    };
  };
in
{
  sample = report sample;
  # Socket activation, on the defaults and on an IPv6 address.
  socket = report {
    socketActivation.enable = true;
    openFirewall = true;
  };
  served = report {
    socketActivation = {
      enable = true;
      address = "127.0.0.1";
      port = lib.toInt port;
    };
    settings = {
      pkgs_path = pkgsPath;
      storage_path = storageDir;
    };
  };
  socket6 = report {
    socketActivation = {
      enable = true;
      address = "::1";
      port = 9000;
    };
  };
  # Mistakes the module refuses.
  mistakes = lib.mapAttrs (_: nixeryd: (report nixeryd).failedAssertions) {
    noListener.listen = [ ];
    settingsListen.settings.listen = [ "tcp:1" ];
  };
  # Every option of settings, with its type.
  settingsOptions =
    let
      options = (evaluate { }).options.services.nixeryd.settings.type.getSubOptions [ ];
    in
    lib.mapAttrs (_: option: option.type.description) (
      lib.filterAttrs (name: _: !lib.hasPrefix "_" name) options
    );
}
