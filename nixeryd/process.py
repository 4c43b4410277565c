"""Child processes behind one seam: run a command, stream its stderr line by line.

Nix is the only program nixeryd runs, and it runs long: builds print their
logs as they go. :class:`ReactorProcessRunner` spawns the command through the
reactor (never blocking it), hands each stderr line to a callback the moment
it is complete, collects stdout, and on timeout kills the command's whole
process group, so builders Nix started die with it; cancelling the Deferred
kills it the same way, so a caller's own deadline (a whole image's build)
stops the command it is waiting for.

:meth:`ReactorProcessRunner.start` runs a long-lived interactive command the
same way (its own process group, stderr streamed by line), for a caller that
writes requests to its stdin and reads the answers from stderr: the Nix
evaluator of :mod:`nixeryd.evaluator`. Tests substitute expectation fakes with
the same :class:`ProcessRunner` interface.
"""

from __future__ import annotations

import contextlib
import os
import re
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

# ANSI control sequences (cursor moves, erasing, colours).
_TERMINAL_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

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

    def start(
        self,
        argv: Sequence[str],
        *,
        on_stderr_line: Callable[[str], None],
        env: Mapping[str, str] | None = None,
    ) -> InteractiveProcess:
        """Start ``argv`` with its stdin open for :meth:`InteractiveProcess.write`;
        ``on_stderr_line`` sees each stderr line as it arrives, stdout is discarded.
        Raises OSError when it cannot be started."""
        ...


class InteractiveProcess(Protocol):
    """A running command that reads requests from stdin; see :meth:`ProcessRunner.start`."""

    @property
    def pid(self) -> int | None:
        """The command's process id while it runs (its resident memory is read by pid)."""
        ...

    def write(self, data: bytes) -> None:
        """Send ``data`` to the command's stdin."""
        ...

    def kill(self) -> None:
        """Kill the command's whole process group; ``ended`` fires once it is gone."""
        ...

    @property
    def ended(self) -> Deferred[int]:
        """Fires with the exit status (128 + signal for a killed command) when it ends."""
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
        self._stderr = _Lines()
        self._tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._stdout.append(data)
        elif childFD == 2:
            for line in self._stderr.feed(data):
                self._emit(line)

    def _emit(self, line: str) -> None:
        self._tail.append(line)
        self.on_stderr_line(line)

    def time_out(self) -> None:
        self.timed_out = True
        self.kill_group()

    def kill_group(self) -> None:
        _kill_group(self.transport)

    def processEnded(self, reason: Failure) -> None:
        for line in self._stderr.rest():
            self._emit(line)
        if self.timed_out:
            self.done.errback(ProcessTimedOut(self.argv, self.timeout, tuple(self._tail)))
            return
        exit_code = _exit_status(reason)
        if exit_code is None:
            self.done.errback(reason)
            return
        self.done.callback(
            ProcessResult(self.argv, exit_code, b"".join(self._stdout), tuple(self._tail))
        )


class _InteractiveProtocol(ProcessProtocol):
    """An :class:`InteractiveProcess`: stdin kept open, stderr by line, stdout dropped."""

    def __init__(self, on_stderr_line: Callable[[str], None]) -> None:
        self.on_stderr_line = on_stderr_line
        self._ended: Deferred[int] = Deferred()
        self._stderr = _Lines()

    @property
    def pid(self) -> int | None:
        return self.transport.pid if self.transport is not None else None

    @property
    def ended(self) -> Deferred[int]:
        return self._ended

    def write(self, data: bytes) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.write(data)

    def kill(self) -> None:
        _kill_group(self.transport)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            for line in self._stderr.feed(data):
                self.on_stderr_line(line)

    def processEnded(self, reason: Failure) -> None:
        for line in self._stderr.rest():
            self.on_stderr_line(line)
        exit_code = _exit_status(reason)
        self._ended.callback(1 if exit_code is None else exit_code)


class _Lines:
    """A stream's bytes as the lines they complete, however the reads split them."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[str]:
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [_decoded(line) for line in lines]

    def rest(self) -> list[str]:
        """The last line, if the stream ended without a newline."""
        partial, self._partial = self._partial, b""
        return [_decoded(partial)] if partial else []


def _decoded(line: bytes) -> str:
    """A line as a terminal would show it: Nix clears its progress line with
    ``\\r\\e[K`` before what it prints next, even when stderr is a pipe."""
    text = line.decode("utf-8", "replace").rstrip("\r").rsplit("\r", 1)[-1]
    return _TERMINAL_CONTROL.sub("", text)


def _kill_group(transport: Any) -> None:
    pid = transport.pid if transport is not None else None
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _exit_status(reason: Failure) -> int | None:
    """The exit status an ended process reports (128 + signal when killed), or None
    when the reactor reports something else."""
    if reason.check(ProcessDone):
        return 0
    if reason.check(ProcessTerminated):
        value: Any = reason.value
        return value.exitCode if value.exitCode is not None else 128 + (value.signal or 0)
    return None


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
        self._spawn(protocol, argv, env).closeStdin()
        timer = self._reactor.callLater(timeout, protocol.time_out)

        def cancel_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return protocol.done.addBoth(cancel_timer)

    def start(
        self,
        argv: Sequence[str],
        *,
        on_stderr_line: Callable[[str], None],
        env: Mapping[str, str] | None = None,
    ) -> InteractiveProcess:
        protocol = _InteractiveProtocol(on_stderr_line)
        self._spawn(protocol, argv, env)
        return protocol

    def _spawn(
        self, protocol: ProcessProtocol, argv: Sequence[str], env: Mapping[str, str] | None
    ) -> Any:
        """Start ``argv`` as the leader of a new process group; its transport."""
        return self._reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-S", "-c", _SESSION_LEADER, *argv],
            env=dict(os.environ if env is None else env),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
