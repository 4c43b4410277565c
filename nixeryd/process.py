"""Child processes behind one seam: run a command, stream its stderr line by line.

Nix is the only program nixeryd runs, and it runs long: builds print their
logs as they go. :class:`ReactorProcessRunner` spawns the command through the
reactor (never blocking it), hands each stderr line to a callback the moment
it is complete, collects stdout, and on timeout kills the command's whole
process tree (:func:`kill_tree`), so builders Nix started die with it;
cancelling the Deferred kills it the same way, so a caller's own deadline (a
whole image's build) stops the command it is waiting for, and
:meth:`ReactorProcessRunner.stop` kills every command still running when the
daemon stops.

A process group is not enough: Nix starts each builder in a session of its
own (under a ``nixbld`` user), so killing nix-store's group left the builder
running, reparented to init, finishing a build nobody waits for and
registering its output. :func:`kill_tree` stops every descendant first, found
by their parent ids in ``/proc`` across sessions, then kills them all.
What it cannot reach is a builder already orphaned by a nix-store that died
some other way (killed by someone else): by then nothing links it to
nixeryd.

:meth:`ReactorProcessRunner.start` runs a long-lived interactive command the
same way (its own process group, stderr streamed by line), for a caller that
writes requests to its stdin and reads the answers from stderr: the Nix
evaluator of :mod:`nixeryd.evaluator`. Tests substitute expectation fakes with
the same :class:`ProcessRunner` interface.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

# ANSI control sequences (cursor moves, erasing, colours).
_TERMINAL_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

#: Lines of stderr kept for error messages; the log has them all.
STDERR_TAIL_LINES = 200

#: How much lower than the daemon's the commands' CPU priority is: the daemon answers
#: cached pulls in milliseconds, and builds on every core must not delay them.
NICENESS = 10

# Runs the command as the leader of a new session, so that its process group
# (the command and everything it starts) can be killed as a whole, at a lower priority.
_SESSION_LEADER = (
    f"import os, sys; os.setsid(); os.nice({NICENESS}); os.execvp(sys.argv[1], sys.argv[1:])"
)


@dataclass(frozen=True)
class ProcessResult:
    """How a command ended: its exit code, stdout, and the last lines of stderr."""

    argv: tuple[str, ...]
    exit_code: int
    stdout: bytes
    stderr_tail: tuple[str, ...]
    #: The signal that killed the command, when one did (then exit_code is 128 + it).
    signal: int | None = None


class ProcessTimedOut(Exception):
    """The command ran longer than its timeout and was killed with its process tree."""

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
        Cancelling the Deferred kills the command and its process tree."""
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
        """Kill the command's whole process tree; ``ended`` fires once it is gone."""
        ...

    @property
    def ended(self) -> Deferred[int]:
        """Fires with the exit status (128 + signal for a killed command) when it ends."""
        ...


class _Child(ProcessProtocol):
    """A command the runner started; ``exited`` fires once its process is gone, however
    the Deferred its caller holds ended (a cancelled one fires at once)."""

    def __init__(self) -> None:
        self.exited: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.exited.callback(None)

    def stop(self) -> None:
        """End the command for a stopping daemon: kill its process tree."""
        _kill(self.transport)


class _StreamingProtocol(_Child):
    def __init__(
        self,
        argv: Sequence[str],
        timeout: float,
        on_stderr_line: Callable[[str], None],
    ) -> None:
        super().__init__()
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
        _kill(self.transport)

    def stop(self) -> None:
        # As a caller abandoning it: killed, and its caller sees a cancellation rather
        # than a kill by SIGKILL it would log as someone else's doing.
        self.done.cancel()

    def processEnded(self, reason: Failure) -> None:
        super().processEnded(reason)
        for line in self._stderr.rest():
            self._emit(line)
        if self.done.called:
            return  # cancelled: its caller was told so then
        if self.timed_out:
            self.done.errback(ProcessTimedOut(self.argv, self.timeout, tuple(self._tail)))
            return
        exit_code = _exit_status(reason)
        if exit_code is None:
            self.done.errback(reason)
            return
        value: Any = reason.value
        killed_by = getattr(value, "signal", None) if reason.check(ProcessTerminated) else None
        self.done.callback(
            ProcessResult(
                self.argv, exit_code, b"".join(self._stdout), tuple(self._tail), killed_by
            )
        )


class _InteractiveProtocol(_Child):
    """An :class:`InteractiveProcess`: stdin kept open, stderr by line, stdout dropped."""

    def __init__(self, on_stderr_line: Callable[[str], None]) -> None:
        super().__init__()
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
        _kill(self.transport)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            for line in self._stderr.feed(data):
                self.on_stderr_line(line)

    def processEnded(self, reason: Failure) -> None:
        super().processEnded(reason)
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


def _kill(transport: Any) -> None:
    pid = transport.pid if transport is not None else None
    if pid is not None:
        kill_tree(pid)


def kill_tree(pid: int) -> None:
    """Kill ``pid``, its process group, and every process descended from it.

    Each descendant is stopped (SIGSTOP) as it is found, so that none forks a
    child the next look misses; once a look finds no new one, all are killed.
    Descendants are found by parent id, which crosses the sessions Nix starts
    its builders in; they must be found before the command dies, when its
    children would be reparented.
    """
    stopped: set[int] = set()
    while True:
        found = {pid, *descendants(pid)} - stopped
        if not found:
            break
        for process in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process, signal.SIGSTOP)
        stopped |= found
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for process in stopped:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(process, signal.SIGKILL)


def descendants(pid: int) -> set[int]:
    """The processes descended from ``pid`` now, by the parent ids in ``/proc``."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            parent = _parent(entry.path)
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def _parent(proc_dir: str) -> int | None:
    """A process's parent id from ``/proc/<pid>/stat``; None once it is gone."""
    try:
        with open(f"{proc_dir}/stat", "rb") as stat:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]) if len(fields) > 1 else None


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
        #: What is running now, so that :meth:`stop` leaves no command behind.
        self._running: set[_Child] = set()
        self._stopped = False

    @property
    def running(self) -> int:
        """How many commands run now."""
        return len(self._running)

    def stop(self) -> Deferred[Any]:
        """Kill every command still running, with its process tree, and start no more: the
        daemon is stopping, and a build nobody waits for would still fill the Nix store.
        Fires once every one has exited."""
        self._stopped = True
        running = list(self._running)
        for protocol in running:
            protocol.stop()
        return gatherResults([protocol.exited for protocol in running])

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        on_stderr_line: Callable[[str], None],
        env: Mapping[str, str] | None = None,
    ) -> Deferred[ProcessResult]:
        if self._stopped:
            return fail(OSError(errno.ESHUTDOWN, "nixeryd is stopping"))
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
        if self._stopped:
            raise OSError(errno.ESHUTDOWN, "nixeryd is stopping")
        protocol = _InteractiveProtocol(on_stderr_line)
        self._spawn(protocol, argv, env)
        return protocol

    def _spawn(self, protocol: _Child, argv: Sequence[str], env: Mapping[str, str] | None) -> Any:
        """Start ``argv`` as the leader of a new process group; its transport."""
        transport = self._reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-S", "-c", _SESSION_LEADER, *argv],
            env=dict(os.environ if env is None else env),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        self._running.add(protocol)
        protocol.exited.addCallback(lambda _: self._running.discard(protocol))
        return transport
