# nixeryd's package, for `nix-build` in a checkout or `import ./. { inherit pkgs; }`.
# The NixOS module is nix/module.nix (docs/nixos.md).
{
  pkgs ? import <nixpkgs> { },
}:
pkgs.callPackage ./nix/package.nix { }
