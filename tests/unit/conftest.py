"""Fixtures of the unit tests: an in-memory registry and the fake Nix behind it."""

from __future__ import annotations

from pathlib import Path

import pytest

from nixeryd.testing.harness import FakeNix, Harness, RegistryFactory


@pytest.fixture
def registry_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RegistryFactory:
    """Makes a registry whose Nix answers the given expectations."""
    return lambda *expect, **options: Harness(tmp_path, monkeypatch, *expect, **options)


@pytest.fixture
def nix(tmp_path: Path) -> FakeNix:
    return FakeNix(tmp_path)
