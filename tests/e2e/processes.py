"""What a daemon under test runs, seen through ``/proc``.

A build a test stops (a timeout, a kill, the daemon stopping) must take its
builder with it: Nix starts each builder in a session of its own under a
``nixbld`` user, so a builder left behind finishes a build nobody waits for and
registers its output in the store every test shares. The tests watch the
daemon's descendants while the build runs, and kill what is left whatever they
assert.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from nixeryd.process import descendants

#: Seconds between looks at the descendants: a builder lives for seconds.
SAMPLE_INTERVAL = 0.02


def command_line(pid: int) -> str:
    """``pid``'s command line, its arguments joined by spaces; "" once it has exited."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def runs(program: str) -> Callable[[str], bool]:
    """Whether a command line runs ``program`` (by name or by path)."""
    return lambda command: Path(command.split(" ", 1)[0]).name == program


class Descendants:
    """The descendants of ``root`` that ``keep`` accepts, sampled in a thread until
    :meth:`stop`, each with the command line it was last seen with (looked up again
    each time: a command may exec another)."""

    def __init__(self, root: int, keep: Callable[[str], bool] = bool) -> None:
        self._root = root
        self._keep = keep
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for pid in descendants(self._root):
                command = command_line(pid)
                if command and self._keep(command):
                    self.seen[pid] = command
            time.sleep(SAMPLE_INTERVAL)

    def wait_for(self, program: str, timeout: float = 60) -> str:
        """The command line of the first ``program`` seen, waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            for command in list(self.seen.values()):
                if runs(program)(command):
                    return command
            assert time.monotonic() < deadline, f"no {program} started; saw {self.seen}"
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def alive(self) -> dict[int, str]:
        """Those seen that still run as what they were (not a new process with a reused id)."""
        return {pid: command for pid, command in self.seen.items() if command_line(pid) == command}

    def left_after(self, settle: float = 0.5) -> dict[int, str]:
        """Stop sampling; those seen that still run ``settle`` seconds later."""
        self.stop()
        time.sleep(settle)
        return self.alive()


def kill(pids: Iterable[int]) -> None:
    """Never leave a builder to finish and register its output in the shared store."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
