# Helpers for writing small package sets without nixpkgs: every package is a
# raw `derivation` whose builder is a statically linked busybox taken from the
# host (Debian's busybox-static installs it at /usr/bin/busybox).
#
#   let lib = import ./lib.nix { busyboxPath = /usr/bin/busybox; }; in
#   lib.mkPackage {
#     name = "hello"; version = "2.12.1";
#     bins.hello = ''echo "Hello, world!"'';   # -> $out/bin/hello, #! busybox sh
#     script = ''mkdir -p $out/share; echo hi > $out/share/greeting'';
#   }
#
# Attributes of the result:
#   busyboxStatic   the store directory "…-busybox-static" holding one file, `busybox`
#                   (a directory, so the binary keeps its name: busybox picks the
#                   applet from argv[0], and a bare store file is named "<hash>-busybox")
#   busyboxExe      "${busyboxStatic}/busybox", as a string with context
#   shebang         "#!${busyboxExe} sh": scripts starting with it run anywhere the
#                   store path is present, including `chroot ROOTFS /bin/NAME` in an
#                   unpacked image (the kernel execs busybox with argv "busybox sh FILE")
#   busyboxApplets  the package "busybox-<version>": bin/ holds one symlink per applet,
#                   each pointing at busyboxExe. It is on PATH of every mkPackage build.
#   mkPackage       { name, version ? "1.0", script ? "", bins ? {}, deps ? [], env ? {} }
#                   -> a derivation named "<name>-<version>" (with pname and version
#                   attributes, like nixpkgs). The build runs `busybox sh -e -c SCRIPT`
#                   with $out already created; `bins` (file name -> shell body) are
#                   written to $out/bin with the busybox #! line and mode 0555 before
#                   SCRIPT runs; `deps` put their bin/ on PATH before the busybox applets
#                   (a build-time dependency only). A runtime reference to another
#                   package exists when its store path ends up in the output, e.g. by
#                   interpolating "${pkg}" into a file or a symlink. `env` adds
#                   environment variables (derivation attributes).
#
# System: every derivation is built for builtins.currentSystem, whatever system a
# package set is asked for, because the static busybox is the host's binary. A
# package set built from these helpers accepts a `system` argument (the daemon passes
# one, e.g. "aarch64-linux" for arm64 images) but the bytes it contains are the host's.
{ busyboxPath ? /usr/bin/busybox
, busyboxVersion ? "1.35.0"
}:
let
  inherit (builtins) attrNames baseNameOf concatStringsSep dirOf elemAt genList length
    listToAttrs pathExists readDir;

  where = toString busyboxPath;

  checkedPath =
    if !(pathExists busyboxPath) then
      throw ("nixeryd example packages: no static busybox at ${where}; install one "
        + "(Debian: apt-get install busybox-static) or pass busyboxPath = /path/to/busybox")
    else if baseNameOf where != "busybox" then
      throw "nixeryd example packages: busyboxPath must name a file called 'busybox', not ${where}"
    else if (readDir (dirOf busyboxPath)).busybox != "regular" then
      throw "nixeryd example packages: ${where} is not a regular file (a symlink?); pass the real binary's path"
    else
      busyboxPath;

  busyboxStatic = builtins.path {
    name = "busybox-static";
    path = dirOf checkedPath;
    filter = p: t: baseNameOf p == "busybox";
  };

  busyboxExe = "${busyboxStatic}/busybox";

  shebang = "#!${busyboxExe} sh";

  system = builtins.currentSystem;

  busyboxApplets = derivation {
    name = "busybox-${busyboxVersion}";
    pname = "busybox";
    version = busyboxVersion;
    inherit system;
    builder = busyboxExe;
    args = [ "sh" "-e" "-c" ''
      bb=${busyboxExe}
      $bb mkdir -p "$out/bin"
      for a in $($bb --list); do
        $bb ln -s "$bb" "$out/bin/$a"
      done
    '' ];
  };

  # Runs before every package script: creates $out and writes `bins`. The bodies
  # travel in environment variables (nixerydBin0, nixerydBin1, ...), so they need
  # no quoting, and may use builtins.placeholder "out" to name their own store path.
  prelude = ''
    mkdir -p "$out"
    if [ -n "$nixerydBinNames" ]; then
      mkdir -p "$out/bin"
      i=0
      for n in $nixerydBinNames; do
        eval "body=\"\$nixerydBin$i\""
        printf '%s\n%s\n' "$nixerydShebang" "$body" > "$out/bin/$n"
        chmod 0555 "$out/bin/$n"
        i=$((i + 1))
      done
    fi
  '';

  mkPackage =
    { name
    , version ? "1.0"
    , script ? ""
    , bins ? { }
    , deps ? [ ]
    , env ? { }
    }:
    let
      binNames = attrNames bins;
      binEnv = listToAttrs (genList
        (i: { name = "nixerydBin${toString i}"; value = bins.${elemAt binNames i}; })
        (length binNames));
    in
    derivation (env // binEnv // {
      name = "${name}-${version}";
      pname = name;
      inherit version system;
      builder = busyboxExe;
      args = [ "sh" "-e" "-c" (prelude + script) ];
      PATH = concatStringsSep ":" (map (d: "${d}/bin") deps ++ [ "${busyboxApplets}/bin" ]);
      nixerydBinNames = concatStringsSep " " binNames;
      nixerydShebang = shebang;
    });
in
{
  inherit busyboxStatic busyboxExe shebang busyboxApplets mkPackage;
}
