"""Pulls of nixpkgs images through the real daemon on a current Nix: each answer names
its real cause.

Nothing can be built here (no binary cache, no network), so every image that
evaluates fails on its first download; what is checked is that the client is told
that, or why nixpkgs refused the package, in the message's first lines.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemon
from tests.nixinstalls import NixInstallation

DOWNLOAD = "error: unable to download"

#: Image name -> what the message's first two lines must say.
CAUSES = {
    "hello": DOWNLOAD,
    "shell/git/htop": DOWNLOAD,
    "python3packages.numpy": DOWNLOAD,
    "xorg.xev": DOWNLOAD,
    "7zz": DOWNLOAD,
    "arm64/hello": DOWNLOAD,
    "unrar": "because it has an unfree license",
    "openexr_2": "because it is marked as insecure",
    "1password": "'_1password' has been renamed to/replaced by '_1password-cli'",
    "nosuchpackage": "package not found in the package set: nosuchpackage",
}


@pytest.fixture(scope="module")
def nixpkgs_daemon(
    tmp_path_factory: pytest.TempPathFactory, modern_nix: NixInstallation, nixpkgs: Path
) -> Iterator[Daemon]:
    daemon = Daemon(
        tmp_path_factory.mktemp("nixpkgs"),
        NIXERY_PKGS_PATH=str(nixpkgs),
        NIXERYD_NIX_BIN_DIR=str(modern_nix.bin_dir),
    )
    yield daemon
    daemon.stop()


def error_message(daemon: Daemon, image: str) -> str:
    try:
        urllib.request.urlopen(f"{daemon.url}/v2/{image}/manifests/latest", timeout=300)
    except urllib.error.HTTPError as error:
        assert error.code == 404
        body = json.loads(error.read())["errors"][0]
        assert body["code"] == "MANIFEST_UNKNOWN"
        return str(body["message"])
    raise AssertionError(f"{image} was built, though nothing can be built here")


@pytest.mark.parametrize("image", sorted(CAUSES))
def test_the_message_starts_with_the_cause(nixpkgs_daemon: Daemon, image: str) -> None:
    message = error_message(nixpkgs_daemon, image)
    assert CAUSES[image] in "\n".join(message.splitlines()[:2]), message


def test_a_broken_package_is_refused_as_broken(nixpkgs_daemon: Daemon) -> None:
    message = error_message(nixpkgs_daemon, "hdfview")
    assert "Refusing to evaluate package 'hdfview-" in message.splitlines()[1]
    assert "- broken: This package is broken." in message, message
