# The NixOS module: services.nixeryd (docs/nixos.md).
#
#   imports = [ /path/to/nixeryd/nix/module.nix ];
#   services.nixeryd = { enable = true; settings.pkgs_path = pkgs.path; };
#
# nixeryd runs as its own system user and talks to the host's Nix daemon
# (NIX_REMOTE=daemon) as an allowed, not a trusted, user: the daemon builds, nixeryd
# only asks. The unit carries the same hardening as systemd/nixeryd.service, which
# tests/nixpkgs/test_nixos.py compares.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    concatLists
    concatMapStringsSep
    concatStringsSep
    filterAttrs
    filterAttrsRecursive
    literalExpression
    mapAttrsToList
    mkEnableOption
    mkIf
    mkOption
    optional
    types
    ;

  cfg = config.services.nixeryd;
  stateDir = "/var/lib/nixeryd";
  configPath = "nixeryd/nixeryd.toml";
  settingsFormat = pkgs.formats.toml { };

  # A typed option of the configuration file. null (the default) leaves the key out of
  # the file, so that nixeryd's own default applies: the defaults live in one place,
  # nixeryd/config.py, and README.md's configuration reference documents them.
  setting =
    type: description:
    mkOption {
      type = types.nullOr type;
      default = null;
      inherit description;
    };
  seconds = types.numbers.nonnegative;
  # A duration: seconds, or a string such as "90s", "36h", "7d".
  age = types.either seconds types.str;

  # The rendered file. formats.toml's generator is a derivation (a json2x build); this
  # renders at evaluation instead, so the file needs nothing built, and its text can be
  # read and checked from an evaluation alone (tests/nixpkgs/test_nixos.py parses it
  # with nixeryd's own loader). The value type is still formats.toml's.
  #
  # JSON's spelling of strings, numbers and booleans is TOML's, but for DEL, which TOML
  # wants escaped; the top two levels of tables are sections (`[plugin.s3]`), deeper
  # ones inline (`{ env = "VAR" }`), as the configuration reference writes them. Paths
  # are copied to the store.
  tomlString =
    text: builtins.replaceStrings [ (builtins.fromJSON ''"\u007f"'') ] [ "\\u007f" ] (builtins.toJSON text);
  tomlKey = key: if builtins.match "[A-Za-z0-9_-]+" key != null then key else tomlString key;
  isTable = value: builtins.isAttrs value && !lib.isStringLike value;
  tomlValue =
    value:
    if lib.isStringLike value then
      tomlString "${value}"
    else if builtins.isList value then
      "[" + concatMapStringsSep ", " tomlValue value + "]"
    else if value == { } then
      "{ }"
    else if isTable value then
      "{ " + concatStringsSep ", " (mapAttrsToList tomlPair value) + " }"
    else
      builtins.toJSON value;
  tomlPair = key: value: "${tomlKey key} = ${tomlValue value}";
  tomlSection =
    path: table:
    let
      sections = if builtins.length path < 2 then filterAttrs (_: isTable) table else { };
      pairs = removeAttrs table (builtins.attrNames sections);
      header = concatMapStringsSep "." tomlKey path;
    in
    optional (path != [ ] && (pairs != { } || sections == { })) "\n[${header}]"
    ++ mapAttrsToList tomlPair pairs
    ++ concatLists (mapAttrsToList (key: tomlSection (path ++ [ key ])) sections);

  socketEndpoint =
    let
      inherit (cfg.socketActivation) address;
      ipv6 = lib.hasInfix ":" address;
    in
    {
      listenStream = "${if ipv6 then "[${address}]" else address}:${toString cfg.socketActivation.port}";
      # The socket systemd passes by its name (FileDescriptorName=, as in
      # systemd/nixeryd.socket), of the family it was bound in.
      endpoint = "systemd:domain=${if ipv6 then "INET6" else "INET"}:name=nixeryd";
    };

  listen = optional cfg.socketActivation.enable socketEndpoint.endpoint ++ cfg.listen;

  # The file: settings without their unset (null) options and empty plugin tables, and
  # the listeners.
  fileSettings =
    filterAttrs (name: value: name != "plugin" || value != { }) (
      filterAttrsRecursive (_: value: value != null) cfg.settings
    )
    // {
      inherit listen;
    };
  configText = concatStringsSep "\n" (tomlSection [ ] fileSettings) + "\n";

  # TCP ports of the listeners (tcp:PORT..., ssl:PORT..., tcp:...:port=PORT) and the socket.
  endpointPort =
    endpoint:
    let
      positional = builtins.match "(tcp6?|ssl):([0-9]+)(:.*)?" endpoint;
      named = builtins.match "(tcp6?|ssl):(.*:)?port=([0-9]+)(:.*)?" endpoint;
    in
    if positional != null then
      [ (lib.toInt (builtins.elemAt positional 1)) ]
    else if named != null then
      [ (lib.toInt (builtins.elemAt named 2)) ]
    else
      [ ];
  ports =
    optional cfg.socketActivation.enable cfg.socketActivation.port
    ++ concatLists (map endpointPort cfg.listen);

  storagePath = cfg.settings.storage_path;
  # ProtectSystem=strict leaves only the state directory writable: a filesystem storage
  # elsewhere is named writable too.
  storageElsewhere =
    lib.elem cfg.settings.storage_backend [
      null
      "filesystem"
    ]
    && storagePath != null
    && !lib.hasPrefix "${stateDir}/" storagePath;
in
{
  options.services.nixeryd = {
    enable = mkEnableOption "nixeryd, a container registry that builds images on demand with Nix";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The nixeryd package to run.";
    };

    listen = mkOption {
      type = types.listOf types.str;
      default = if cfg.socketActivation.enable then [ ] else [ "tcp:8080" ];
      defaultText = literalExpression ''if socketActivation.enable then [ ] else [ "tcp:8080" ]'';
      example = [
        "tcp:8080:interface=127.0.0.1"
        "ssl:8443:privateKey=/var/lib/nixeryd/key.pem:certKey=/var/lib/nixeryd/cert.pem"
      ];
      description = ''
        Endpoints nixeryd listens on itself, in Twisted's endpoint syntax
        (the configuration file's `listen`). With {option}`socketActivation.enable`,
        these are in addition to the socket systemd passes.
      '';
    };

    socketActivation = {
      enable = mkEnableOption ''
        socket activation: systemd listens (nixeryd.socket) and starts nixeryd on the
        first connection, passing it the socket (`systemd:domain=INET:name=nixeryd`)
      '';
      port = mkOption {
        type = types.port;
        default = 8080;
        description = "TCP port of the socket unit.";
      };
      address = mkOption {
        type = types.str;
        default = "0.0.0.0";
        example = "::";
        description = ''
          Address the socket unit binds, IPv4 or IPv6 (without brackets); `0.0.0.0`
          is every IPv4 address.
        '';
      };
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the TCP ports of the socket unit and of the `tcp:` and `ssl:` endpoints of
        {option}`listen` in the firewall.
      '';
    };

    environmentFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/nixeryd.env";
      description = ''
        A file of environment variables (systemd's `EnvironmentFile=`) for secrets, kept
        out of the world-readable store and /etc: S3's `AWS_SECRET_ACCESS_KEY`, a GCS
        key, values that `[plugin.<name>]` settings name with `{ env = "VAR"; }`.
        Variables override the configuration file (nixeryd reads flags, then the
        environment, then the file).
      '';
    };

    settings = mkOption {
      default = { };
      example = literalExpression ''
        {
          pkgs_path = pkgs.path;
          storage_backend = "s3";
          plugin.s3 = { bucket = "images"; secret_key = { env = "S3_SECRET"; }; };
        }
      '';
      description = ''
        nixeryd's configuration file, /etc/nixeryd/nixeryd.toml, passed with `--config`.
        Every option of the configuration reference (README.md) is declared here; an
        option left null is left out of the file, so that nixeryd's default applies.
        Secrets belong in {option}`environmentFile`: the file is world-readable.
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          pkgs_path = setting (types.either types.path types.str) ''
            Package set in a local directory or `.nix` file, such as `pkgs.path` (this
            system's nixpkgs). With no package set option, nixeryd serves its example set,
            which needs a static busybox at /usr/bin/busybox.
          '';
          pkgs_repo = setting types.str "Package set in a git repository (URL).";
          channel = setting types.str "nixpkgs channel name or commit.";
          channel_url = setting types.str ''
            URL template for channel tarballs, with `{channel}` (a local mirror).
          '';
          accept_any_tag = setting types.bool ''
            Answer any tag of a path or channel source with its one image, as Nixery did.
          '';
          package_source = setting types.str ''
            Package source plugin by name (default: from the package set option set).
          '';
          storage_backend = setting types.str ''
            Storage plugin by name: `filesystem` (default), `s3` or `gcs` (docs/storage.md).
          '';
          storage_path = mkOption {
            type = types.nullOr types.str;
            default = "${stateDir}/storage";
            description = ''
              Directory of the filesystem storage. A directory outside ${stateDir} is made
              writable for the service (ReadWritePaths=).
            '';
          };
          nix_timeout = setting types.numbers.positive ''
            Seconds each Nix builder may run, and may print nothing (default 60).
          '';
          build_timeout = setting types.numbers.positive ''
            Seconds one image may take in all: evaluation, builds, closure query, layers
            (default 3600).
          '';
          failure_ttl = setting seconds ''
            Seconds a failed image of a moving source is answered again without running
            Nix (default 60; 0: never).
          '';
          nix_jobs = setting types.ints.unsigned ''
            Nix commands run at once (default 0: one per core).
          '';
          nix_queue = setting types.ints.unsigned ''
            Nix commands that may wait for a free one before new images get 429
            (default 64).
          '';
          max_closure_size = setting types.ints.unsigned ''
            MiB (NAR bytes) an image's closure may have (default 0: no limit).
          '';
          max_layer_size = setting types.ints.unsigned ''
            MiB (NAR bytes) one layer may hold (default 0: no limit).
          '';
          evaluators = setting types.ints.unsigned ''
            Long-running Nix evaluators kept, one per package set pin and system
            (default 4; 0: a nix-instantiate per image).
          '';
          evaluator_memory = setting types.ints.positive ''
            Resident MiB past which an evaluator is restarted (default 2048).
          '';
          evaluator_idle = setting types.numbers.positive ''
            Seconds an evaluator waits for another image before it stops (default 600).
          '';
          evaluator_unpinned_ttl = setting seconds ''
            Seconds an evaluator of an unpinned source (a local path) is reused
            (default 60; 0: never).
          '';
          git_refs_ttl = setting seconds ''
            Seconds a git source's ref listing is reused (default 30; 0: never).
          '';
          popularity_url = setting types.str ''
            Popularity data: `http(s)://`, `file://` or a path.
          '';
          layering_strategy = setting types.str ''
            Layering plugin by name: `stable` (default) or `popularity`.
          '';
          layer_budget = setting (types.ints.between 1 125) ''
            Most layers per image, the symlink layer included (default 94).
          '';
          platforms = setting (types.nonEmptyListOf types.str) ''
            Platforms to build each image for, such as `[ "linux/amd64" "linux/arm64" ]`;
            the first is the default (default: this machine's).
          '';
          nix_bin_dir = setting (types.either types.path types.str) ''
            Directory of nix-instantiate, nix-store and nix (default: PATH, which holds
            `nix.package`).
          '';
          gc_roots = setting types.str ''
            Where each daemon keeps the Nix GC roots of its builds in progress (default:
            `$STATE_DIRECTORY/gcroots`; the unit sets `NIXERYD_GC_ROOTS` to it, which
            takes precedence over this file).
          '';
          gc_interval = setting age ''
            Run garbage collection of storage in the daemon this often (`"1d"`; seconds
            as a number), with the `gc_*` settings below (docs/gc.md; default: never).
          '';
          gc_max_age = setting age ''
            Garbage collection: image records not used for this long (`"30d"`) go,
            unless kept (default: never by age).
          '';
          gc_grace = setting age ''
            Garbage collection: nothing younger goes; longer than `build_timeout`
            (default `"1h"`).
          '';
          gc_keep = setting (types.either types.path types.str) ''
            Garbage collection: a file of images kept whatever their age, one
            `NAME[:TAG]` a line, as pulled.
          '';
          nixpkgs_config_file = setting types.path ''
            A Nix file of nixpkgs configuration (a `config.nix`).
          '';
          allow_unfree = setting types.bool "nixpkgs `allowUnfree`.";
          allow_broken = setting types.bool "nixpkgs `allowBroken`.";
          allow_insecure = setting types.bool ''
            Allow every package marked insecure (as `NIXPKGS_ALLOW_INSECURE=1`).
          '';
          permitted_insecure_packages = setting (types.listOf types.str) ''
            `name-version`s of insecure packages to allow (nixpkgs
            `permittedInsecurePackages`).
          '';
          nixpkgs_overlays = setting (types.listOf types.path) ''
            Nix files of overlays (each an overlay or a list of them).
          '';
          auth = setting types.str ''
            Authentication provider: `htpasswd`, `token` or `jwks`, its settings in
            `plugin.<name>` (docs/auth.md; default: none).
          '';
          auth_policy = setting (types.enum [
            "everything"
            "builds"
          ]) "What needs credentials with `auth` set (default `everything`).";
          log_format = setting (types.enum [
            "text"
            "json"
          ]) "Log format (default `text`).";
          log_level = setting (types.enum [
            "debug"
            "info"
            "warn"
            "error"
          ]) "Least level logged (default `info`).";
          access_log = setting types.bool ''
            Log a line per request, in `log_format` (default true; docs/metrics.md).
          '';
          metrics = setting types.bool ''
            Serve Prometheus metrics at `/metrics` (default true; docs/metrics.md).
          '';
          metrics_listen = setting (types.listOf types.str) ''
            Endpoints serving `/metrics` alone, without authentication, such as
            `[ "tcp:9090:interface=127.0.0.1" ]` (default: `/metrics` on the registry's
            listeners, behind its authentication). Not opened in the firewall.
          '';
          layer_compressor = setting (types.enum [
            "isal"
            "zlib"
            "zstd"
          ]) "Layer compressor (default `isal`).";
          layer_compression_level = setting types.int ''
            Compression level: isal 0-3 (default 2), zlib 0-9 (6), zstd 1-19 (3).
          '';
          layer_workers = setting types.ints.unsigned ''
            Layers written at once (default 0: one per core).
          '';
          plugin = mkOption {
            type = types.attrsOf settingsFormat.type;
            default = { };
            example = literalExpression ''{ s3.bucket = "images"; s3.secret_key.env = "S3_SECRET"; }'';
            description = ''
              `[plugin.<name>]` tables: the settings of the storage backend, package
              source, layering strategy or authentication provider named `<name>`; a
              value may be `{ env = "VAR"; }` or `{ file = "/run/secrets/x"; }`.
            '';
          };
        };
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = !(cfg.settings ? listen);
        message = "services.nixeryd: set listen endpoints with services.nixeryd.listen, not settings.listen.";
      }
      {
        assertion = listen != [ ];
        message = "services.nixeryd: no listener: set services.nixeryd.listen or socketActivation.enable.";
      }
      {
        assertion = config.nix.enable;
        message = "services.nixeryd: nixeryd builds through the Nix daemon, which needs nix.enable.";
      }
    ];

    warnings =
      lib.optional
        (lib.all (key: cfg.settings.${key} == null) [
          "pkgs_path"
          "pkgs_repo"
          "channel"
          "package_source"
        ])
        ''
          services.nixeryd: no package set (settings.pkgs_path, pkgs_repo or channel): nixeryd
          serves its example set, whose programs are a /usr/bin/busybox that NixOS does not have.
        '';

    environment.etc.${configPath}.text = configText;

    users.users.nixeryd = {
      isSystemUser = true;
      group = "nixeryd";
      home = stateDir;
      description = "nixeryd container registry";
    };
    users.groups.nixeryd = { };

    # Allowed to ask the daemon for builds, not trusted with its settings or the store.
    # extra-, as nix-serve does: setting allowed-users itself would replace its default
    # ("*") and lock every other user out of the daemon.
    nix.settings.extra-allowed-users = [ "nixeryd" ];

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall ports;

    systemd.sockets.nixeryd = mkIf cfg.socketActivation.enable {
      description = "nixeryd container registry socket";
      wantedBy = [ "sockets.target" ];
      listenStreams = [ socketEndpoint.listenStream ];
      socketConfig.FileDescriptorName = "nixeryd";
    };

    systemd.services.nixeryd = {
      description = "nixeryd container registry building images with Nix";
      documentation = [ "https://github.com/nixeryd/nixeryd" ];
      # Socket-activated, it starts on the first connection.
      wantedBy = mkIf (!cfg.socketActivation.enable) [ "multi-user.target" ];
      requires = optional cfg.socketActivation.enable "nixeryd.socket";
      after = [
        "network-online.target"
        "nix-daemon.socket"
      ]
      ++ optional cfg.socketActivation.enable "nixeryd.socket";
      wants = [
        "network-online.target"
        "nix-daemon.socket"
      ];
      # The daemon's own Nix: its client speaks the daemon's protocol version.
      path = [ config.nix.package ];
      restartTriggers = [ config.environment.etc.${configPath}.source ];
      environment = {
        NIX_REMOTE = "daemon";
        HOME = stateDir;
        NIXERYD_GC_ROOTS = "${stateDir}/gcroots";
      };
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        WatchdogSec = "30s";
        ExecStart = "${cfg.package}/bin/nixeryd serve --config /etc/${configPath}";
        EnvironmentFile = mkIf (cfg.environmentFile != null) cfg.environmentFile;
        User = "nixeryd";
        Group = "nixeryd";
        StateDirectory = "nixeryd";
        StateDirectoryMode = "0750";
        ReadWritePaths = mkIf storageElsewhere [ storagePath ];
        # One descriptor per client connection (and per blob file being sent).
        LimitNOFILE = 65536;
        Restart = "on-failure";
        RestartSec = "2s";
        # SIGTERM to nixeryd alone, which ends the Nix commands it runs (and their
        # builders) itself; what is left when it has exited is killed.
        KillMode = "mixed";
        TimeoutStopSec = "30s";
        UMask = "0027";

        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" ];
        SystemCallErrorNumber = "EPERM";
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
      };
    };
  };
}
