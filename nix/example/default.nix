# The example package set nixeryd serves when no package source is configured, so
# that a new user can, offline and without nixpkgs:
#
#   docker pull localhost:8080/shell/hello && docker run --rm localhost:8080/shell/hello hello
#
# Every program here is the host's static busybox (see lib.nix): symlinks to it, or
# small shell scripts whose #! line is the busybox in the Nix store. `nano` and the
# `moreutils` tools are tiny placeholders, not the real programs; `cacert` holds a
# placeholder bundle with no certificates. Real sites point NIXERY_PKGS_PATH at a
# nixpkgs checkout (or use NIXERY_CHANNEL / NIXERY_PKGS_REPO) instead; see README.md.
#
# `system` is accepted (nixeryd passes it) but the packages always contain the host's
# busybox, built for builtins.currentSystem.
{ system ? builtins.currentSystem
, busyboxPath ? /usr/bin/busybox
, ...
}:
let
  lib = import ./lib.nix { inherit busyboxPath; };
  inherit (lib) mkPackage busyboxExe;

  # bin/NAME -> the store busybox, for each applet NAME.
  appletLinks = names: ''
    mkdir -p "$out/bin"
    for a in ${builtins.concatStringsSep " " names}; do
      ln -s ${busyboxExe} "$out/bin/$a"
    done
  '';
in
{
  # bin/ with one symlink per busybox applet.
  busybox = lib.busyboxApplets;

  coreutils = mkPackage {
    name = "coreutils";
    version = "9.1";
    script = appletLinks [
      "basename" "cat" "chgrp" "chmod" "chown" "cp" "cut" "date" "dd" "df" "dirname"
      "du" "echo" "env" "expr" "false" "head" "id" "install" "ln" "ls" "md5sum" "mkdir"
      "mktemp" "mv" "nproc" "printf" "pwd" "readlink" "realpath" "rm" "rmdir" "seq"
      "sha1sum" "sha256sum" "sleep" "sort" "stat" "tail" "tee" "test" "touch" "tr"
      "true" "uname" "uniq" "wc" "whoami" "yes"
    ];
  };

  # bin/sh is busybox itself; bin/bash is a script running busybox sh (busybox has
  # no applet called "bash"). nixeryd sets Cmd = ["bash"] when this is in an image.
  bashInteractive = mkPackage {
    name = "bash-interactive";
    version = "5.2-p15";
    bins.bash = ''exec ${busyboxExe} sh "$@"'';
    script = ''ln -s ${busyboxExe} "$out/bin/sh"'';
  };

  # Placeholders for two moreutils tools, good enough for pipelines.
  moreutils = mkPackage {
    name = "moreutils";
    version = "0.67";
    bins.sponge = ''
      # sponge [FILE]: soak up standard input, then write it to FILE (or stdout).
      tmp=$(${busyboxExe} mktemp) || exit 1
      ${busyboxExe} cat > "$tmp"
      if [ -n "$1" ]; then ${busyboxExe} cat "$tmp" > "$1"; else ${busyboxExe} cat "$tmp"; fi
      st=$?
      ${busyboxExe} rm -f "$tmp"
      exit $st
    '';
    bins.ts = ''
      # ts: prefix each line of standard input with a timestamp.
      while IFS= read -r line; do
        printf '%s %s\n' "$(${busyboxExe} date '+%b %d %H:%M:%S')" "$line"
      done
    '';
  };

  # A placeholder: runs busybox vi.
  nano = mkPackage {
    name = "nano";
    version = "7.2";
    bins.nano = ''
      echo "nano (nixeryd example placeholder): starting busybox vi" >&2
      exec ${busyboxExe} vi "$@"
    '';
  };

  hello = mkPackage {
    name = "hello";
    version = "2.12.1";
    bins.hello = ''echo "Hello, world!"'';
  };

  # A placeholder CA bundle (no certificates), where nixpkgs' cacert puts it;
  # nixeryd points SSL_CERT_FILE at /etc/ssl/certs/ca-bundle.crt.
  cacert = mkPackage {
    name = "nss-cacert";
    version = "3.92";
    script = ''
      mkdir -p "$out/etc/ssl/certs"
      cat > "$out/etc/ssl/certs/ca-bundle.crt" <<'EOF'
      ##
      ## Placeholder CA bundle of the nixeryd example package set.
      ## It holds no certificates: serve a real package set (nixpkgs) for TLS.
      ##
      EOF
      ln -s ca-bundle.crt "$out/etc/ssl/certs/ca-certificates.crt"
    '';
  };

  iana-etc = mkPackage {
    name = "iana-etc";
    version = "20230316";
    script = ''
      mkdir -p "$out/etc"
      cat > "$out/etc/services" <<'EOF'
      ftp             21/tcp
      ssh             22/tcp
      telnet          23/tcp
      smtp            25/tcp          mail
      domain          53/tcp
      domain          53/udp
      http            80/tcp          www
      ntp             123/udp
      https           443/tcp
      https           443/udp
      EOF
      cat > "$out/etc/protocols" <<'EOF'
      ip      0       IP
      icmp    1       ICMP
      tcp     6       TCP
      udp     17      UDP
      ipv6    41      IPv6
      ipv6-icmp 58    IPv6-ICMP
      EOF
    '';
  };
}
