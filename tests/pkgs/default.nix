# The package set the test suite builds (NIXERY_PKGS_PATH=tests/pkgs). Raw busybox
# derivations (../../nix/example/lib.nix), no nixpkgs, so it builds offline. It
# exercises what real package sets contain:
#
#   shell's packages      bashInteractive coreutils moreutils nano (from the example set)
#   always-added          cacert iana-etc (from the example set)
#   busybox               bin/ with every applet (from the example set)
#   libgreet              a library: share/greeting, lib/libgreet.sh
#   hello                 bin/hello prints "Hello, world!", read at run time from
#                         libgreet (a runtime reference hello -> libgreet)
#   tools.greeter         nested attribute set; bin/greeter (refers to libgreet)
#   haskellPackages.greeter  the same derivation under a camelCase nested set
#                         ("haskellpackages.greeter" must resolve)
#   helloWorld            camelCase top-level key; bin/hello-world
#   _9lives               digit-leading name ("9lives" in an image name); bin/9lives
#   fancy                 symlinks (relative, absolute into itself, to another store
#                         path), an empty directory, executable and read-only files, a
#                         path > 150 characters, non-ASCII and space-containing names,
#                         a hard link; bin/fancy-check verifies them all from inside an
#                         image and prints "fancy ok" (set FANCY_CHECK_HARDLINK=1 to also
#                         require the two names to be one inode)
#   brokenBuild           the build fails: "nixeryd-test: this build fails on purpose"
#   evalError             throws "nixeryd-test: this package fails to evaluate"
#   slow                  sleeps 30 s. It has no unique input, so it is cached once it
#                         finishes: timeout tests run with a short NIX_TIMEOUT, which kills
#                         the build before that (Nix never registers a killed build).
#   ticker                prints "ticker: tick N" twice a second for 30 s: a build whose log
#                         grows while it runs (the web page tests stop it with a short
#                         NIXERYD_BUILD_TIMEOUT, so it is never registered)
#   big                   share/big/data.bin: 2 MiB of incompressible, deterministic
#                         bytes (awk's seeded rand()); nothing depends on it
#   notAPackage           { foo = 1; }: not a derivation, so "missing"
#   nativeOnly            the one derivation built for the requested `system`: only the
#                         host's system has a builder, so an index over several platforms
#                         must leave the others out; bin/native-only
#
# Every other derivation builds for builtins.currentSystem (`system` is otherwise ignored:
# the busybox is the host's).
{ system ? builtins.currentSystem
, busyboxPath ? /usr/bin/busybox
, ...
}:
let
  lib = import ../../nix/example/lib.nix { inherit busyboxPath; };
  example = import ../../nix/example { inherit system busyboxPath; };
  inherit (lib) mkPackage busyboxExe shebang;
  bb = busyboxExe;

  libgreet = mkPackage {
    name = "libgreet";
    version = "1.0";
    script = ''
      mkdir -p "$out/share" "$out/lib"
      echo "Hello, world!" > "$out/share/greeting"
      cat > "$out/lib/libgreet.sh" <<'EOF'
      greet() { echo "Greetings from $1"; }
      EOF
    '';
  };

  greeter = mkPackage {
    name = "greeter";
    version = "0.3";
    bins.greeter = ''
      . ${libgreet}/lib/libgreet.sh
      greet tools.greeter
    '';
  };

  # fancy's awkward paths, relative to its output.
  longDir = "deep/a-rather-long-directory-name-beyond-ustar-limits-0123456789"
    + "/and-another-long-directory-name-9876543210-abcdefghijklmnopqrstuvwxyz";
  longFile = "${longDir}/a-file-at-the-end-of-a-long-path.txt";
  unicodeName = "ünïcødé-名前.txt";
  spaceName = "name with spaces.txt";

  fancy =
    let out = builtins.placeholder "out"; in
    mkPackage {
      name = "fancy";
      version = "1.0";
      bins.fancy-check = ''
        d=${out}
        bb=${bb}
        fail() { echo "fancy-check: $*" >&2; exit 1; }
        [ -f "$d/data/file.txt" ] && [ "$($bb cat "$d/data/file.txt")" = "fancy data" ] \
          || fail "data/file.txt missing or wrong"
        [ -L "$d/rel-link" ] && [ "$($bb readlink "$d/rel-link")" = "data/file.txt" ] \
          && [ -f "$d/rel-link" ] || fail "rel-link is not a relative symlink to data/file.txt"
        [ -L "$d/abs-link" ] && [ "$($bb readlink "$d/abs-link")" = "$d/data/file.txt" ] \
          && [ -f "$d/abs-link" ] || fail "abs-link is not an absolute symlink to $d/data/file.txt"
        [ -L "$d/greeting-link" ] \
          && [ "$($bb readlink "$d/greeting-link")" = "${libgreet}/share/greeting" ] \
          && [ -f "$d/greeting-link" ] || fail "greeting-link does not reach libgreet"
        [ -d "$d/empty" ] && [ -z "$($bb ls -A "$d/empty")" ] || fail "empty/ missing or not empty"
        [ -f "$d/data/exec.sh" ] && [ -x "$d/data/exec.sh" ] \
          && [ "$($bb stat -c %a "$d/data/exec.sh")" = 555 ] \
          && [ "$("$d/data/exec.sh")" = "exec ok" ] || fail "data/exec.sh is not executable"
        [ -f "$d/data/readonly.txt" ] && [ "$($bb stat -c %a "$d/data/readonly.txt")" = 444 ] \
          || fail "data/readonly.txt is not mode 444"
        [ -f "$d/${longFile}" ] || fail "long path missing"
        [ -f "$d/${unicodeName}" ] || fail "non-ASCII name missing"
        [ -f "$d/${spaceName}" ] || fail "name with spaces missing"
        [ -f "$d/data/hardlink.txt" ] && $bb cmp -s "$d/data/file.txt" "$d/data/hardlink.txt" \
          || fail "data/hardlink.txt missing or different from data/file.txt"
        if [ -n "$FANCY_CHECK_HARDLINK" ]; then
          [ "$d/data/file.txt" -ef "$d/data/hardlink.txt" ] || fail "data/hardlink.txt is a copy, not a hard link"
        fi
        echo "fancy ok"
      '';
      script = ''
        mkdir -p "$out/data" "$out/empty" "$out/${longDir}"
        echo "fancy data" > "$out/data/file.txt"
        ln "$out/data/file.txt" "$out/data/hardlink.txt"
        ln -s data/file.txt "$out/rel-link"
        ln -s "$out/data/file.txt" "$out/abs-link"
        ln -s ${libgreet}/share/greeting "$out/greeting-link"
        printf '%s\n%s\n' '${shebang}' 'echo "exec ok"' > "$out/data/exec.sh"
        chmod 0555 "$out/data/exec.sh"
        echo "read only" > "$out/data/readonly.txt"
        chmod 0444 "$out/data/readonly.txt"
        echo "at the end of a long path" > "$out/${longFile}"
        echo "non-ASCII name" > "$out/${unicodeName}"
        echo "spaces" > "$out/${spaceName}"
      '';
    };
in
{
  inherit (example) busybox coreutils bashInteractive moreutils nano cacert iana-etc;

  inherit libgreet fancy;

  hello = mkPackage {
    name = "hello";
    version = "2.12.1";
    bins.hello = ''
      read -r greeting < ${libgreet}/share/greeting
      echo "$greeting"
    '';
  };

  tools = { inherit greeter; };
  haskellPackages = { inherit greeter; };

  helloWorld = mkPackage {
    name = "hello-world";
    version = "1.0";
    bins.hello-world = ''echo "Hello, world! (helloWorld)"'';
  };

  _9lives = mkPackage {
    name = "9lives";
    version = "9.0";
    bins."9lives" = ''echo "9 lives"'';
  };

  brokenBuild = mkPackage {
    name = "broken-build";
    version = "1.0";
    script = ''
      echo "broken-build: configuring"
      echo "broken-build: compiling"
      echo "nixeryd-test: this build fails on purpose" >&2
      exit 1
    '';
  };

  evalError = throw "nixeryd-test: this package fails to evaluate";

  slow = mkPackage {
    name = "slow";
    version = "1.0";
    script = ''
      echo "slow: sleeping 30 s"
      sleep 30
      echo done > "$out/done"
    '';
  };

  ticker = mkPackage {
    name = "ticker";
    version = "1.0";
    script = ''
      i=0
      while [ $i -lt 60 ]; do
        i=$((i + 1))
        echo "ticker: tick $i"
        sleep 0.5
      done
      echo done > "$out/done"
    '';
  };

  big = mkPackage {
    name = "big";
    version = "1.0";
    script = ''
      mkdir -p "$out/share/big"
      awk 'BEGIN { srand(42); for (i = 0; i < 1048576; i++) printf "%04x", int(rand() * 65536) }' \
        | xxd -r -p > "$out/share/big/data.bin"
    '';
  };

  notAPackage = { foo = 1; };

  nativeOnly = derivation ((mkPackage {
    name = "native-only";
    version = "1.0";
    bins.native-only = ''echo "built for ${system}"'';
  }).drvAttrs // { inherit system; });
}
