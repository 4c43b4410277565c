"""The Nix installations the end-to-end tests run on, and the nixpkgs checkout they evaluate.

End-to-end tests run once per installation found: the Nix on ``PATH`` (Debian's
``nix-bin``) and each directory of ``$NIXERYD_TEST_NIX_BIN_DIRS`` (colon-separated;
default ``/opt/nix-2.18/bin`` where it exists, where ``scripts/setup`` installs a
current Nix). nixpkgs tests evaluate ``$NIXERYD_TEST_NIXPKGS`` (a nixpkgs checkout,
default ``/var/tmp/nixeryd-nixpkgs``) with the newest installation, since current
nixpkgs refuses Nix older than 2.18.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DEFAULT_EXTRA_BIN_DIRS = "/opt/nix-2.18/bin"
DEFAULT_NIXPKGS = "/var/tmp/nixeryd-nixpkgs"

#: nixpkgs' own lower bound (lib/minver.nix).
NIXPKGS_MINIMUM_NIX = (2, 18)


@dataclass(frozen=True)
class NixInstallation:
    """One Nix: where its programs are and which version they are."""

    bin_dir: Path
    version: tuple[int, ...]

    @property
    def label(self) -> str:
        return "nix-" + ".".join(map(str, self.version[:2]))

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose PATH finds this Nix first, with no binary cache to wait for."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["NIX_CONFIG"] = (env.get("NIX_CONFIG", "") + "\nsubstituters =").lstrip()
        return env


def _version(bin_dir: Path) -> tuple[int, ...] | None:
    try:
        text = subprocess.run(
            [str(bin_dir / "nix-instantiate"), "--version"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(part) for part in found.groups() if part is not None) if found else None


@cache
def installations() -> tuple[NixInstallation, ...]:
    """Every Nix found, oldest first; the same version found twice counts once."""
    candidates: list[Path] = []
    on_path = shutil.which("nix-instantiate")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    extra = os.environ.get("NIXERYD_TEST_NIX_BIN_DIRS", DEFAULT_EXTRA_BIN_DIRS)
    candidates += [Path(part) for part in extra.split(os.pathsep) if part]
    found: dict[tuple[int, ...], NixInstallation] = {}
    for bin_dir in candidates:
        version = _version(bin_dir)
        if version is not None and version not in found:
            found[version] = NixInstallation(bin_dir, version)
    return tuple(sorted(found.values(), key=lambda installation: installation.version))


def newest() -> NixInstallation | None:
    found = installations()
    return found[-1] if found else None


def nixpkgs_checkout() -> Path | None:
    """The nixpkgs to evaluate, if there is one (a directory with ``default.nix``)."""
    path = Path(os.environ.get("NIXERYD_TEST_NIXPKGS", DEFAULT_NIXPKGS))
    return path if (path / "default.nix").is_file() else None
