"""Fixtures for tests that evaluate a real nixpkgs.

Nothing can be built from nixpkgs without a binary cache, so these tests check
evaluation: name resolution, error messages, configuration, timing and memory. They
need a nixpkgs checkout (``$NIXERYD_TEST_NIXPKGS``; ``scripts/setup`` unpacks one
where ``$NIXERYD_NIXPKGS_TARBALL`` is given) and a Nix of at least 2.18, and skip with
the reason where either is missing: a site runs them against its own nixpkgs by
pointing ``NIXERYD_TEST_NIXPKGS`` at it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.nixinstalls import NIXPKGS_MINIMUM_NIX, NixInstallation, newest, nixpkgs_checkout


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/nixpkgs/" in str(item.path):
            item.add_marker(pytest.mark.nixpkgs)


@pytest.fixture(scope="session")
def nixpkgs() -> Path:
    """The nixpkgs checkout under test."""
    checkout = nixpkgs_checkout()
    if checkout is None:
        pytest.skip(
            "no nixpkgs checkout: set NIXERYD_TEST_NIXPKGS to one (scripts/setup unpacks "
            "$NIXERYD_NIXPKGS_TARBALL into /var/tmp/nixeryd-nixpkgs)"
        )
    return checkout


@pytest.fixture(scope="session")
def modern_nix() -> NixInstallation:
    """A Nix that current nixpkgs accepts."""
    installation = newest()
    if installation is None or installation.version[:2] < NIXPKGS_MINIMUM_NIX:
        pytest.skip(
            "nixpkgs needs Nix >= 2.18: set NIXERYD_TEST_NIX_BIN_DIRS to a current Nix's bin "
            "directory (scripts/setup installs one from $NIXERYD_NIX_TARBALL)"
        )
    return installation
