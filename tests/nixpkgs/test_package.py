"""The Nix package, ``nix/package.nix``, evaluated with the nixpkgs snapshot.

It cannot be built offline (its dependencies' sources are not in the store): its
derivation instantiates, and its dependencies are setup.cfg's ``install_requires``, so
that a requirement added to one is not forgotten in the other.
"""

from __future__ import annotations

import configparser
import json
import re
import subprocess
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.nixinstalls import NixInstallation

ROOT = Path(__file__).resolve().parents[2]


def instantiate(nix: NixInstallation, *argv: str) -> str:
    """What ``nix-instantiate`` prints, failing the test with its error if it fails."""
    result = subprocess.run(
        [str(nix.bin_dir / "nix-instantiate"), *argv],
        capture_output=True, text=True, env=nix.env(), timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_package_instantiates(modern_nix: NixInstallation, nixpkgs: Path) -> None:
    output = instantiate(
        modern_nix, str(ROOT / "default.nix"), "--arg", "pkgs", f"import {nixpkgs} {{ }}"
    )
    assert re.fullmatch(r"/nix/store/[a-z0-9]{32}-nixeryd-[0-9.]+\.drv\n", output), output


def test_its_dependencies_are_install_requires(modern_nix: NixInstallation, nixpkgs: Path) -> None:
    """The same names (with those of extras, ``pyjwt[crypto]``), and nixpkgs' versions
    satisfy setup.cfg's bounds."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    requirements = [
        Requirement(line)
        for line in setup["options"]["install_requires"].splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    extras = [{"name": r.name, "extra": extra} for r in requirements for extra in r.extras]
    expression = f"""
      {{ extras }}:
      let
        pkgs = import {nixpkgs} {{ }};
        package = import {ROOT / "default.nix"} {{ inherit pkgs; }};
        versions = map (p: {{ name = p.pname; inherit (p) version; }});
        extra = e: versions pkgs.python3Packages.${{e.name}}.optional-dependencies.${{e.extra}};
      in {{
        inherit (package) version;
        dependencies = versions package.dependencies;
        extras = map extra (builtins.fromJSON extras);
      }}
    """
    argv = ["--eval", "--strict", "--json", "-E", expression, "--argstr", "extras"]
    evaluated = json.loads(instantiate(modern_nix, *argv, json.dumps(extras)))
    assert evaluated["version"] == setup["metadata"]["version"]
    packaged = {
        canonicalize_name(p["name"]): Version(p["version"]) for p in evaluated["dependencies"]
    }
    wanted = {canonicalize_name(r.name) for r in requirements}
    for dependencies in evaluated["extras"]:
        wanted |= {canonicalize_name(p["name"]) for p in dependencies}
    assert sorted(packaged) == sorted(wanted)
    for requirement in requirements:
        version = packaged[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version), (requirement, version)
