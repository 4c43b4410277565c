#!/bin/sh
# Captures the stderr of failing Nix evaluations and builds, as nixeryd runs them
# (nix/nixeryd.nix, then nix-store --realise), into NAME-nix-VERSION.txt next to
# this script: the data the unit tests of nix_error_excerpt read.
#   capture.sh NIX_BIN_DIR VERSION [NIXPKGS_CHECKOUT]
# The nixpkgs cases (unfree, broken, insecure, a removed alias) need Nix >= 2.18.
set -u
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../../.." && pwd)
bin=$1 version=$2 nixpkgs=${3:-}
export NIX_CONFIG="substituters ="

capture() { # NAME PACKAGE-SET-PATH PACKAGE [SRCTYPE SRCARGS]
  name=$1 set=$2 package=$3
  src_type=${4:-path} src_args=${5:-"{\"path\":\"$set\"}"}
  out="$here/$name-nix-$version.txt"
  result=$("$bin/nix-instantiate" --eval --strict --json --read-write-mode \
    "$repo/nix/nixeryd.nix" --argstr srcType "$src_type" --argstr srcArgs "$src_args" \
    --argstr packages "[\"$package\"]" --argstr optionalPackages '[]' \
    --argstr system x86_64-linux 2>"$out")
  if [ $? -eq 0 ]; then
    drv=$(printf '%s' "$result" | sed -n 's/.*"drvPath":"\([^"]*\)".*/\1/p')
    "$bin/nix-store" --realise "$drv" >/dev/null 2>"$out"
  fi
  # The store paths' hashes change with the checkout's location; keep the text.
  sed -i "s|$repo|/src/nixeryd|g" "$out"
}

capture eval-throw "$repo/tests/pkgs" evalError
capture build-failure "$repo/tests/pkgs" brokenBuild
capture missing-attribute "$here/pkgs.nix" missingAttr
capture download-failure "$here/pkgs.nix" downloadFailure
capture unknown-commit "" hello git \
  "{\"url\":\"file://$repo\",\"rev\":\"0123456789abcdef0123456789abcdef01234567\"}"
if [ -n "$nixpkgs" ]; then
  capture unfree "$nixpkgs" unrar
  capture broken "$nixpkgs" libbap
  capture insecure "$nixpkgs" python3Packages.kerberos
  capture removed-alias "$nixpkgs" _0verkill
fi
