"""``nixeryd popcount`` over the first names of nixpkgs: chunked, bounded, and plain about
counting nothing where nothing is built (as here: no binary cache)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.nixinstalls import NixInstallation

ROOT = Path(__file__).resolve().parent.parent.parent
GOAL_BYTES = 4 * 1024**3


def test_nixpkgs_is_counted_in_bounded_chunks_and_nothing_counted_is_said(
    modern_nix: NixInstallation, nixpkgs: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "NIX_CONFIG": "substituters =",
        "NIXERYD_NIX_BIN_DIR": str(modern_nix.bin_dir),
    }
    argv = [
        sys.executable, "-m", "nixeryd", "popcount", "--pkgs-path", str(nixpkgs),
        "--limit", "200", "--chunk-size", "100", "--timeout", "120",
    ]  # fmt: skip
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err)
        # wait4's ru_maxrss: the largest of the command and every Nix process it waited for.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    stderr = (tmp_path / "err").read_text()
    assert process.returncode == 1, stderr
    assert (tmp_path / "out").read_text() == "", "no popularity data when nothing is counted"
    assert "200 top-level names listed" in stderr
    assert "evaluated 200/200 names (2/2 chunks)" in stderr
    assert "0 of them in the local store" in stderr
    assert "nothing counted" in stderr and "--build" in stderr and "--cache" in stderr
    assert usage.ru_maxrss * 1024 <= GOAL_BYTES, f"peak RSS {usage.ru_maxrss} KiB"
