"""Nix GC roots: one locked directory per daemon; only stopped daemons' are removed."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from nixeryd.config import Config
from nixeryd.gcroots import (
    CLAIM_AGE,
    LOCK_FILE,
    UNLOCKED_AGE,
    ProcessRoots,
    default_gc_roots,
    remove_stale_roots,
)


def dead_daemon(base: Path, name: str, age: float) -> Path:
    """A directory as a killed daemon leaves it: a lock file nobody holds, a root link."""
    directory = base / name
    (directory / "build-x").mkdir(parents=True)
    (directory / "build-x" / "result").symlink_to("/nix/store/0000-gone")
    (directory / LOCK_FILE).touch()
    then = time.time() - age
    os.utime(directory / LOCK_FILE, (then, then))
    return directory


def test_a_live_daemons_roots_stay_and_a_stopped_ones_go(tmp_path: Path) -> None:
    live = ProcessRoots(tmp_path)
    build = live.build_dir()
    assert build.parent.parent == tmp_path
    dead = dead_daemon(tmp_path, "daemon-1-dead", age=2 * CLAIM_AGE)
    later = time.time() + 2 * CLAIM_AGE  # the live lock is old enough to be judged too
    assert remove_stale_roots(tmp_path, later, dry_run=True) == 1
    assert dead.exists()
    assert remove_stale_roots(tmp_path, later) == 1
    assert not dead.exists()
    assert build.is_dir() and (build.parent / LOCK_FILE).exists()
    assert live.build_dir().parent == build.parent  # one directory per process


def test_a_daemon_stopping_in_order_removes_its_roots(tmp_path: Path) -> None:
    roots = ProcessRoots(tmp_path)
    build = roots.build_dir()
    roots.drop()
    assert not build.parent.exists()
    roots.drop()  # again: nothing to do
    assert roots.build_dir().parent.parent == tmp_path  # a build after: a new directory


def test_a_lock_just_made_is_left_to_its_daemon(tmp_path: Path) -> None:
    fresh = dead_daemon(tmp_path, "daemon-2-starting", age=0)
    assert remove_stale_roots(tmp_path) == 0
    assert fresh.exists()


def test_an_entry_without_a_lock_goes_once_a_day_old(tmp_path: Path) -> None:
    old = tmp_path / "tmpold"  # an older nixeryd's per-build directory
    old.mkdir()
    (old / "result").symlink_to("/nix/store/0000-gone")
    assert remove_stale_roots(tmp_path) == 0
    assert remove_stale_roots(tmp_path, time.time() + UNLOCKED_AGE + 1) == 1
    assert not old.exists()


def test_no_roots_directory_is_nothing_to_remove(tmp_path: Path) -> None:
    assert remove_stale_roots(tmp_path / "absent") == 0


def test_roots_default_to_systemds_state_directory(tmp_path: Path) -> None:
    state = {"STATE_DIRECTORY": f"{tmp_path}/a:{tmp_path}/b"}
    assert default_gc_roots(state) == tmp_path / "a" / "gcroots"
    assert default_gc_roots({}) == Path(tempfile.gettempdir()) / "nixeryd-gcroots"
    assert Config(environment=state).gc_roots_dir == tmp_path / "a" / "gcroots"
    assert Config(gc_roots="/srv/roots", environment=state).gc_roots_dir == Path("/srv/roots")
