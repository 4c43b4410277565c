"""nixpkgs configuration and overlays reach a real nixpkgs, through ``nix/nixeryd.nix``.

``unrar`` is unfree in nixpkgs: it is refused with nixpkgs' own advice unless the
configuration allows unfree packages, by nixeryd's option, a config file, or
nixpkgs' own ``NIXPKGS_ALLOW_UNFREE=1``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.nixinstalls import NixInstallation

EXPRESSION = Path(__file__).resolve().parents[2] / "nix" / "nixeryd.nix"


def evaluate(
    nix: NixInstallation,
    nixpkgs: Path,
    package: str,
    nixpkgs_config: dict[str, Any] | None = None,
    overlays: list[str] | None = None,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    argv = [
        str(nix.bin_dir / "nix-instantiate"), "--eval", "--strict", "--json", "--read-write-mode",
        str(EXPRESSION),
        "--argstr", "srcType", "path",
        "--argstr", "srcArgs", json.dumps({"path": str(nixpkgs)}),
        "--argstr", "packages", json.dumps([package]),
        "--argstr", "system", "x86_64-linux",
        "--argstr", "nixpkgsConfig", json.dumps(nixpkgs_config),
        "--argstr", "overlays", json.dumps(overlays or []),
    ]  # fmt: skip
    return subprocess.run(
        argv, capture_output=True, text=True, env={**nix.env(), **env}, timeout=120, check=False
    )


def attr_paths(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr[-2000:]
    return [package["attrPath"] for package in json.loads(result.stdout)["packages"]]


def test_an_unfree_package_is_refused_by_default(
    modern_nix: NixInstallation, nixpkgs: Path
) -> None:
    refused = evaluate(modern_nix, nixpkgs, "unrar")
    assert refused.returncode != 0
    assert "has an unfree license" in refused.stderr


def test_allow_unfree_lets_it_evaluate(modern_nix: NixInstallation, nixpkgs: Path) -> None:
    assert attr_paths(evaluate(modern_nix, nixpkgs, "unrar", {"allowUnfree": True})) == ["unrar"]


def test_a_config_file_and_nixpkgs_own_variable_work_too(
    modern_nix: NixInstallation, nixpkgs: Path, tmp_path: Path
) -> None:
    config_file = tmp_path / "config.nix"
    config_file.write_text("{ pkgs, ... }: { allowUnfree = true; }\n")
    assert attr_paths(evaluate(modern_nix, nixpkgs, "unrar", {"configFile": str(config_file)})) == [
        "unrar"
    ]
    assert attr_paths(evaluate(modern_nix, nixpkgs, "unrar", NIXPKGS_ALLOW_UNFREE="1")) == ["unrar"]


def test_an_overlay_adds_packages(
    modern_nix: NixInstallation, nixpkgs: Path, tmp_path: Path
) -> None:
    overlay = tmp_path / "overlay.nix"
    overlay.write_text("[ (final: prev: { siteHello = prev.hello; }) ]\n")
    assert attr_paths(evaluate(modern_nix, nixpkgs, "sitehello", overlays=[str(overlay)])) == [
        "siteHello"
    ]


def test_allow_broken_and_the_insecure_options_let_them_evaluate(
    modern_nix: NixInstallation, nixpkgs: Path
) -> None:
    assert evaluate(modern_nix, nixpkgs, "hdfview").returncode != 0  # marked broken
    assert attr_paths(evaluate(modern_nix, nixpkgs, "hdfview", {"allowBroken": True})) == [
        "hdfview"
    ]
    assert evaluate(modern_nix, nixpkgs, "openexr_2").returncode != 0  # marked insecure
    for config in (
        {"allowInsecure": True},
        {"permittedInsecurePackages": ["openexr-2.5.10", "ilmbase-2.5.10"]},  # and its dependency
    ):
        assert attr_paths(evaluate(modern_nix, nixpkgs, "openexr_2", config)) == ["openexr_2"]
