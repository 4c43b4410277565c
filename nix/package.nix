# nixeryd as a Nix package, built from this source tree:
#
#   pkgs.callPackage ./nix/package.nix { }
#
# (or `nix-build` at the top of the tree, see ../default.nix). The NixOS module
# (module.nix) uses it as `services.nixeryd.package`.
#
# The dependencies are setup.cfg's install_requires under their nixpkgs names;
# tests/nixpkgs/test_nixos.py compares the two, so that a requirement added to one
# cannot be forgotten in the other.
#
# Nix itself is not a dependency: nixeryd must run the Nix of the daemon it talks to
# (on NixOS, config.nix.package, which the module puts on the service's PATH). git is,
# for git package sources (git ls-remote), appended to PATH so that a host's own git
# still comes first.
{
  lib,
  python3Packages,
  git,
}:

let
  # One version, setup.cfg's.
  setupCfg = builtins.readFile ../setup.cfg;
  version = builtins.head (builtins.match ".*\nversion = ([^\n]+)\n.*" setupCfg);
in
python3Packages.buildPythonApplication {
  pname = "nixeryd";
  inherit version;
  pyproject = true;

  # What the wheel is built from, and nothing else: a checkout's .git, .venv, tests,
  # benchmarks and bytecode neither reach the store nor change the package's hash.
  # nixeryd/nixexprs is a symlink to nix/, so the expressions nixeryd runs are named
  # here; the packaging (this file, module.nix) is left out like the rest.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../setup.cfg
      ../pyproject.toml
      ../README.md
      (lib.fileset.difference ../nixeryd (lib.fileset.fileFilter (file: file.hasExt "pyc") ../nixeryd))
      ./nixeryd.nix
      ./popcount.nix
      ./example
    ];
  };

  build-system = with python3Packages; [
    setuptools
    wheel
  ];

  dependencies =
    with python3Packages;
    [
      twisted
      klein
      treq
      pluggy
      networkx
      txaio
      isal
      zstandard
      botocore
      google-auth
      requests
      bcrypt
      pyjwt
      pyopenssl
      service-identity
      prometheus-client
    ]
    # pyjwt[crypto]
    ++ pyjwt.optional-dependencies.crypto;

  makeWrapperArgs = [
    "--suffix"
    "PATH"
    ":"
    (lib.makeBinPath [ git ])
  ];

  pythonImportsCheck = [ "nixeryd" ];

  meta = {
    description = "Container registry that builds images on demand with Nix";
    homepage = "https://github.com/nixeryd/nixeryd";
    license = lib.licenses.asl20;
    mainProgram = "nixeryd";
    platforms = lib.platforms.linux;
  };
}
