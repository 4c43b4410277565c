"""Nix garbage collector roots of the builds in progress: one directory per daemon.

A build registers the outputs it realised as indirect Nix GC roots
(``nix-store --realise --add-root <dir>/result --indirect``) until its layers
are written, so that a ``nix-collect-garbage`` meanwhile cannot delete the
store paths being archived (:meth:`nixeryd.nixbuild.Nix.realise`). A daemon
that dies without dropping them (``kill -9``, a crash, the OOM killer) would
keep those paths alive for good.

So each daemon keeps its builds' roots in a directory of its own under the
``gc_roots`` directory (``NIXERYD_GC_ROOTS``; by default
``$STATE_DIRECTORY/gcroots`` under systemd, which ``PrivateTmp=`` leaves
alone, else ``<tmp>/nixeryd-gcroots``), and holds an exclusive ``flock`` on its
``lock`` file for as long as it lives (the lock goes with the process, however
it ends; the file descriptor is close-on-exec, so no Nix child inherits it), and
removes the directory when it stops in order.
:func:`remove_stale_roots` removes the directories whose lock nobody holds:
at every daemon start and in every ``nixeryd gc``. A live daemon's lock cannot
be taken, so its roots are never touched. An entry without a lock file (a
daemon's directory in the instant before it locks it, or the per-build
directory of an older nixeryd) is removed only once it is older than
:data:`UNLOCKED_AGE`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from twisted.logger import Logger

#: Seconds after which a roots directory without a lock file is stale.
UNLOCKED_AGE = 24 * 3600.0
#: Seconds a new lock file is left alone: its daemon may not have locked it yet.
CLAIM_AGE = 60.0

LOCK_FILE = "lock"

_log = Logger()


def default_gc_roots(environ: Mapping[str, str]) -> Path:
    """``$STATE_DIRECTORY/gcroots`` (the first of systemd's ``StateDirectory=``
    directories) when set, else ``<tmp>/nixeryd-gcroots``."""
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / "gcroots"
    return Path(tempfile.gettempdir()) / "nixeryd-gcroots"


class ProcessRoots:
    """This process's directory of GC roots under ``base``, created and locked at first use."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._own: Path | None = None
        self._lock: int | None = None

    def build_dir(self) -> Path:
        """A new directory for one build's roots; drop it with :func:`shutil.rmtree`."""
        return Path(tempfile.mkdtemp(prefix="build-", dir=self._claimed()))

    def drop(self) -> None:
        """Remove this process's directory, at shutdown once its builds are stopped."""
        if self._own is not None:
            shutil.rmtree(self._own, ignore_errors=True)
            self._own = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _claimed(self) -> Path:
        if self._own is None or not self._own.is_dir():
            self.base.mkdir(parents=True, exist_ok=True)
            own = Path(tempfile.mkdtemp(prefix=f"daemon-{os.getpid()}-", dir=self.base))
            lock = os.open(own / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._lock is not None:
                os.close(self._lock)
            self._own, self._lock = own, lock
        return self._own


def remove_stale_roots(base: Path, now: float | None = None, *, dry_run: bool = False) -> int:
    """Remove the roots directories under ``base`` of daemons no longer running; how many
    (with ``dry_run``, how many would go, removing nothing)."""
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(os.scandir(base))
    except FileNotFoundError:
        return 0
    for entry in entries:
        path = Path(entry.path)
        if _is_stale(path, now) and dry_run:
            removed += 1
        elif _is_stale(path, now):
            shutil.rmtree(path, ignore_errors=True)
            if entry.is_symlink() or entry.is_file():
                path.unlink(missing_ok=True)
            removed += 1
    if removed and not dry_run:
        _log.info(
            "removed the Nix GC roots of {count} stopped daemons from {base}",
            count=removed,
            base=base,
        )
    return removed


def _is_stale(path: Path, now: float) -> bool:
    try:
        lock = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        with contextlib.suppress(FileNotFoundError):
            return now - path.lstat().st_mtime > UNLOCKED_AGE
        return False
    try:
        if now - os.fstat(lock).st_mtime <= CLAIM_AGE:
            return False
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live daemon's
    finally:
        # Closing drops the lock taken, if any: the directory is removed right after, and
        # a daemon locks its directory only once, when it creates it.
        os.close(lock)
    return True
