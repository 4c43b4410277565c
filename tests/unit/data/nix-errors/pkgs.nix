# Failures the test package set has no need for, for capture.sh: each attribute
# fails the way a real package set's might.
{ ... }:
let
  tests = import ../../../pkgs { };
in
{
  # A package referring to an attribute its set does not have.
  missingAttr = tests.libgreet.noSuchAttribute;
  # A fixed-output download from a URL that does not exist (fails at realise).
  downloadFailure = import <nix/fetchurl.nix> {
    url = "file:///nonexistent/nixeryd-test/source.tar.gz";
    sha256 = "0000000000000000000000000000000000000000000000000000";
  };
}
