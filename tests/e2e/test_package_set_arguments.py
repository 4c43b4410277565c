"""nixeryd's nixpkgs options reach a package set that takes ``config`` and ``overlays``.

The package set here follows nixpkgs' conventions in miniature: ``unfreeHello`` throws
unless ``config.allowUnfree``, and each overlay is applied as ``final: prev: { ... }``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import TEST_PACKAGES, Daemon
from tests.e2e.test_pull import error_of, fetch

pytestmark = pytest.mark.e2e

PACKAGE_SET = """
{ system ? builtins.currentSystem, config ? { }, overlays ? [ ] }:
let
  base = import %(test_packages)s { inherit system; };
  own = base // {
    unfreeHello =
      if config.allowUnfree or false then base.hello
      else throw "Package 'unfree-hello' has an unfree license, refusing to evaluate.";
  };
in
builtins.foldl' (prev: overlay: prev // overlay prev prev) own overlays
"""


@pytest.fixture
def package_set(tmp_path: Path) -> Path:
    path = tmp_path / "pkgs.nix"
    path.write_text(PACKAGE_SET % {"test_packages": TEST_PACKAGES})
    return path


def test_nixpkgs_own_defaults_apply_when_nothing_is_set(package_set: Path, tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "default", NIXERY_PKGS_PATH=str(package_set))
    try:
        status, _, body = fetch(daemon, "/v2/unfreehello/manifests/latest")
        assert status == 404
        assert "unfree license" in error_of(body)["message"]
    finally:
        daemon.stop()


def test_allow_unfree_and_overlays_are_passed(package_set: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.nix"
    overlay.write_text("final: prev: { siteGreeter = prev.tools.greeter; }\n")
    daemon = Daemon(
        tmp_path / "configured",
        NIXERY_PKGS_PATH=str(package_set),
        NIXERYD_ALLOW_UNFREE="true",
        NIXERYD_NIXPKGS_OVERLAYS=str(overlay),
    )
    try:
        for image in ("unfreehello", "sitegreeter"):
            status, _, body = fetch(daemon, f"/v2/{image}/manifests/latest")
            assert status == 200, body
    finally:
        daemon.stop()
