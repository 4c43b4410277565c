"""Child processes behind one seam: run a command, stream its stderr line by line.

Nix is the only program nixeryd runs, and it runs long: builds print their
logs as they go. :class:`ReactorProcessRunner` spawns the command through the
reactor (never blocking it), hands each stderr line to a callback the moment
it is complete, collects stdout, and on timeout kills the command's whole
process group, so builders Nix started die with it; cancelling the Deferred
kills it the same way, so a caller's own deadline (a whole image's build)
stops the command it is waiting for. Tests substitute an expectation fake
with the same :class:`ProcessRunner` interface.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

#: Lines of stderr kept for error messages; the log has them all.
STDERR_TAIL_LINES = 200

# Runs the command as the leader of a new session, so that its process group
# (the command and everything it starts) can be killed as a whole.
_SESSION_LEADER = "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"


@dataclass(frozen=True)
class ProcessResult:
    """How a command ended: its exit code, stdout, and the last lines of stderr."""

    argv: tuple[str, ...]
    exit_code: int
    stdout: bytes
    stderr_tail: tuple[str, ...]


class ProcessTimedOut(Exception):
    """The command ran longer than its timeout and was killed with its process group."""

    def __init__(self, argv: Sequence[str], timeout: float, stderr_tail: Sequence[str]) -> None:
        super().__init__(f"{argv[0]} ran longer than {timeout:g} s")
        self.argv = tuple(argv)
        self.timeout = timeout
        self.stderr_tail = tuple(stderr_tail)


class ProcessRunner(Protocol):
    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        on_stderr_line: Callable[[str], None],
        env: Mapping[str, str] | None = None,
    ) -> Deferred[ProcessResult]:
        """Run ``argv``; fire with its result (any exit code), or fail with
        :class:`ProcessTimedOut`. ``on_stderr_line`` sees each line as it arrives.
        Cancelling the Deferred kills the command and its process group."""
        ...


class _StreamingProtocol(ProcessProtocol):
    def __init__(
        self,
        argv: Sequence[str],
        timeout: float,
        on_stderr_line: Callable[[str], None],
    ) -> None:
        self.argv = tuple(argv)
        self.timeout = timeout
        self.on_stderr_line = on_stderr_line
        self.done: Deferred[ProcessResult] = Deferred(canceller=lambda _: self.kill_group())
        self.timed_out = False
        self._stdout: list[bytes] = []
        self._partial = b""
        self._tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._stdout.append(data)
        elif childFD == 2:
            *lines, self._partial = (self._partial + data).split(b"\n")
            for line in lines:
                self._emit(line)

    def _emit(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        self._tail.append(text)
        self.on_stderr_line(text)

    def time_out(self) -> None:
        self.timed_out = True
        self.kill_group()

    def kill_group(self) -> None:
        pid = self.transport.pid if self.transport is not None else None
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""
        if self.timed_out:
            self.done.errback(ProcessTimedOut(self.argv, self.timeout, tuple(self._tail)))
            return
        if reason.check(ProcessDone):
            exit_code = 0
        elif reason.check(ProcessTerminated):
            value: Any = reason.value
            exit_code = value.exitCode if value.exitCode is not None else 128 + (value.signal or 0)
        else:
            self.done.errback(reason)
            return
        self.done.callback(
            ProcessResult(self.argv, exit_code, b"".join(self._stdout), tuple(self._tail))
        )


class ReactorProcessRunner:
    """Runs commands with ``reactor.spawnProcess``, each in its own process group."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        on_stderr_line: Callable[[str], None],
        env: Mapping[str, str] | None = None,
    ) -> Deferred[ProcessResult]:
        protocol = _StreamingProtocol(argv, timeout, on_stderr_line)
        wrapped = [sys.executable, "-S", "-c", _SESSION_LEADER, *argv]
        transport: Any = self._reactor.spawnProcess(
            protocol,
            sys.executable,
            wrapped,
            env=dict(os.environ if env is None else env),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        transport.closeStdin()
        timer = self._reactor.callLater(timeout, protocol.time_out)

        def cancel_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return protocol.done.addBoth(cancel_timer)
