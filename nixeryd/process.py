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

A command is started in a worker thread, not on the reactor thread: a spawn
returns only once the child has exec'd, and on two busy cores the child may
wait milliseconds for a CPU first. Spawned by the reactor, each of an image's
three Nix commands stopped every cached answer for that long (1-6 ms each, 150
of them in a flood of 50 new images: the cached p99 went to 4-25x of idle).
The thread hands the child's pid and pipes to the reactor, which reads and
reaps it as twisted.web's own processes (:class:`_SpawnedProcess`). The thread
spawns with :class:`subprocess.Popen`, which lets go of the GIL while the
child execs; ``os.posix_spawn`` holds it throughout, and stopped the reactor
thread for a millisecond or more about a dozen times a second in that flood.
The command is exec'd directly, a session leader, and its CPU priority
lowered by pid once it runs: a Python wrapper that did both in the child cost
each command a Python start-up at full priority, on the cores the daemon
answers from.

A process group is not enough: Nix starts each builder in a session of its
own (under a ``nixbld`` user), so killing nix-store's group left the builder
running, reparented to init, finishing a build nobody waits for and
registering its output. :func:`kill_tree` stops every descendant first, found
by their parent ids in ``/proc`` across sessions, then kills them all.
A nix-store that dies some other way (the out-of-memory killer, an operator's
``kill -9``) orphans its builders before anything can look for them. So the
daemon makes itself their reaper (:meth:`ReactorProcessRunner.adopt_orphans`,
Linux's ``PR_SET_CHILD_SUBREAPER``): an orphaned descendant is reparented to
the daemon rather than to init, and the daemon kills and reaps every child
it did not start itself, right after a command is killed from outside and
every :data:`ORPHAN_SWEEP_INTERVAL` seconds. The reactor reaps only the
children it spawned, by pid; adopted ones are reaped by pid as well, so
neither takes the other's.

:meth:`ReactorProcessRunner.start` runs a long-lived interactive command the
same way (its own process group, stderr streamed by line), for a caller that
writes requests to its stdin and reads the answers from stderr: the Nix
evaluator of :mod:`nixeryd.evaluator`. Tests substitute expectation fakes with
the same :class:`ProcessRunner` interface.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import process as twisted_process
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

# ANSI control sequences (cursor moves, erasing, colours).
_TERMINAL_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

#: Lines of stderr kept for error messages; the log has them all.
STDERR_TAIL_LINES = 200

#: How much lower than the daemon's the commands' CPU priority is: the daemon answers
#: cached pulls in milliseconds, and builds on every core must not delay them.
NICENESS = 10

#: Seconds between looks for orphaned descendants the daemon adopted, besides the look
#: right after a command is killed by someone else.
ORPHAN_SWEEP_INTERVAL = 30.0

#: Seconds an adopted orphan may take to die once killed, before the next sweep reaps it.
_ORPHAN_REAP_WAIT = 2.0

#: prctl(2) option: orphaned descendants are reparented to this process (Linux 3.4+).
_PR_SET_CHILD_SUBREAPER = 36


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


class _Command(ProcessProtocol):
    """A command the runner started; ``exited`` fires once its process is gone, however
    the Deferred its caller holds ended (a cancelled one fires at once), or once it is
    known it never started."""

    def __init__(self) -> None:
        self.exited: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.gone()

    def gone(self) -> None:
        if not self.exited.called:
            self.exited.callback(None)

    def stop(self) -> None:
        """End the command for a stopping daemon: kill its process tree."""
        _kill(self.transport)


class _StreamingProtocol(_Command):
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
        #: Set by a kill; a command spawned after it is killed at once.
        self.killed = False
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
        """Kill the command's tree; one still being spawned is killed once it has a pid."""
        self.killed = True
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
            return  # cancelled: the caller has its CancelledError already
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


class _InteractiveProtocol(_Command):
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


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` now, by the parent ids in ``/proc``."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and _parent(entry.path) == pid:
                found.add(int(entry.name))
    return found


def _reap(orphans: set[int]) -> list[tuple[int, str]]:
    """Kill each adopted orphan with its tree and reap it, by pid; in a thread. The
    orphans reaped, with their command lines as they were."""
    commands = {pid: _command_line(pid) for pid in orphans}
    for pid in orphans:
        kill_tree(pid)
    pending = set(orphans)
    deadline = time.monotonic() + _ORPHAN_REAP_WAIT
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                reaped = pid
            if reaped:
                pending.discard(pid)
        if pending:
            time.sleep(0.02)
    return [(pid, commands[pid]) for pid in sorted(orphans - pending)]


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


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


@dataclass(frozen=True)
class _Child:
    """A command spawned in a worker thread: its pid and the parent's ends of its pipes."""

    pid: int
    stdin: int
    stdout: int
    stderr: int


def _spawn_child(argv: Sequence[str], env: Mapping[str, str]) -> _Child:
    """Start ``argv`` as the leader of a new session, its stdio on new pipes.

    The session makes the command and everything it starts one process group,
    killed as a whole. The program is looked up on ``env``'s ``PATH``, as the
    child's own exec would. The child gets its three pipes and no other
    descriptor, and SIGPIPE (which the daemon ignores) at its default, as
    twisted's spawnProcess does. Raises OSError when the program cannot be run.
    """
    program = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if program is None:
        raise FileNotFoundError(
            errno.ENOENT, f"not found on PATH ({env.get('PATH', os.defpath)})", argv[0]
        )
    ends: list[int] = []
    try:
        stdin_read, stdin_write = _pipe(ends)
        stdout_read, stdout_write = _pipe(ends)
        stderr_read, stderr_write = _pipe(ends)
        child = subprocess.Popen(
            list(argv),
            executable=program,
            env=env,
            stdin=stdin_read,
            stdout=stdout_write,
            stderr=stderr_write,
            start_new_session=True,
        )
    except BaseException:
        for end in ends:
            os.close(end)
        raise
    _leave_to_reactor(child)
    for end in (stdin_read, stdout_write, stderr_write):
        os.close(end)
    _lower_priority(child.pid)
    return _Child(child.pid, stdin_write, stdout_read, stderr_read)


def _leave_to_reactor(child: subprocess.Popen[bytes]) -> None:
    """Keep :mod:`subprocess` from ever waiting for ``child``: the reactor reaps it, by
    pid. A Popen whose exit status is unknown polls for it with ``waitpid`` when it is
    collected, and again from every later Popen, and would take the status the reactor
    is waiting for; one that holds a status never polls. The status it holds is never
    read: the reactor's is the command's."""
    child.returncode = 0


def _lower_priority(pid: int) -> None:
    """Make ``pid`` :data:`NICENESS` nicer than the daemon, right after it exec'd: what
    it starts later (builders, a build hook) inherits it. It may have exited already; a
    sandbox that forbids it costs the priority, not the command.

    Where the kernel groups tasks by session (``CONFIG_SCHED_AUTOGROUP``, on outside a
    CPU-controlled cgroup), a task's nice weighs only against its own session's, and
    each session shares the CPU equally: the command, a session leader, would take as
    much as the whole daemon. Its session's nice is raised too; in a systemd service's
    cgroup the kernel ignores it, and an unprivileged daemon may be refused (the kernel
    allows ten changes a second), which only costs the priority."""
    target = min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICENESS)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.setpriority(os.PRIO_PROCESS, pid, target)
    with contextlib.suppress(OSError):
        # Written only for a session of the command's own: the daemon's must keep its nice.
        if os.getsid(pid) == pid:
            with open(f"/proc/{pid}/autogroup", "w") as autogroup:
                autogroup.write(str(target))


def _pipe(opened: list[int]) -> tuple[int, int]:
    """A close-on-exec pipe, both ends above the standard descriptors (a daemon started
    with a closed stdin would get fd 0, which the child's dup2 would leave close-on-exec)."""
    ends = []
    for end in os.pipe():
        if end <= 2:
            moved = fcntl.fcntl(end, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(end)
            end = moved
        opened.append(end)
        ends.append(end)
    return ends[0], ends[1]


class _SpawnedProcess(twisted_process.Process):
    """twisted's process transport for a child spawned elsewhere (:func:`_spawn_child`).

    twisted's ``Process`` creates the pipes and spawns in its constructor, on
    the reactor thread; this one takes both, and does the rest as it does:
    readers and a writer on the pipes, the protocol connected, the pid reaped
    by the reactor's SIGCHLD handling (at once, if it has exited already).
    """

    def __init__(self, reactor: Any, child: _Child, protocol: ProcessProtocol) -> None:
        self._reactor = reactor
        twisted_process._BaseProcess.__init__(self, protocol)  # type: ignore[arg-type]
        self.pid = child.pid
        self.proto = protocol  # type: ignore[assignment]
        pipes: dict[int, Any] = {
            0: self.processWriterFactory(reactor, self, 0, child.stdin, forceReadHack=True),
            1: self.processReaderFactory(reactor, self, 1, child.stdout),
            2: self.processReaderFactory(reactor, self, 2, child.stderr),
        }
        self.pipes = pipes
        protocol.makeConnection(self)
        twisted_process.registerReapProcessHandler(self.pid, self)


class ReactorProcessRunner:
    """Runs commands through the reactor, each in its own process group.

    ``pool`` is the thread pool commands are spawned in (the reactor's by
    default); the reactor reads their output and reaps them.
    """

    log = Logger()

    def __init__(self, reactor: Any, pool: Any = None) -> None:
        self._reactor = reactor
        self._pool = pool if pool is not None else reactor.getThreadPool()
        #: What is running now, so that :meth:`stop` leaves no command behind.
        self._running: set[_Command] = set()
        #: Set by :meth:`stop`: no command starts after it, and one whose spawn finishes
        #: after it is killed at once.
        self._stopping = False
        #: Pids spawned in a thread and not yet handed to the reactor, under the lock
        #: a sweep for orphans holds while it lists this process's children.
        self._spawn_lock = threading.Lock()
        self._handing_over: set[int] = set()
        self._sweeps: LoopingCall | None = None
        self._sweeping = False

    def adopt_orphans(self) -> bool:
        """Become the reaper of orphaned descendants, and kill and reap them from now on.

        False (and nothing changes) where the kernel offers no subreaper: an
        orphan is then init's, as before.
        """
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            adopted = bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
        except (OSError, AttributeError):
            adopted = False
        if adopted:
            self._sweeps = LoopingCall(self._sweep_orphans)
            self._sweeps.clock = self._reactor
            self._sweeps.start(ORPHAN_SWEEP_INTERVAL, now=False)
        return adopted

    def _sweep_orphans(self) -> Deferred[None] | None:
        """Kill and reap the children this process did not start (adopted orphans)."""
        if self._sweeping or self._stopping:
            return None
        self._sweeping = True

        def confirmed(candidates: set[int]) -> set[int]:
            # On the reactor thread, where the reactor registers what it spawns itself.
            return candidates - set(twisted_process.reapProcessHandlers)

        def done(orphans: list[tuple[int, str]]) -> None:
            if orphans:
                # Their own children, killed with them, are this process's to reap now.
                self._reactor.callLater(0.5, self._sweep_orphans)
            for pid, command in orphans:
                self.log.warn(
                    "killed and reaped process {pid} ({command}): a command nixeryd ran died "
                    "and left it behind",
                    pid=pid,
                    command=command,
                )

        def failed(failure: Failure) -> None:
            self.log.failure("looking for orphaned processes failed", failure)

        def finished(result: Any) -> None:
            self._sweeping = False

        sweep = deferToThreadPool(self._reactor, self._pool, self._unregistered_children)
        sweep.addCallback(confirmed)
        sweep.addCallback(lambda pids: deferToThreadPool(self._reactor, self._pool, _reap, pids))
        return sweep.addCallbacks(done, failed).addBoth(finished)

    def _unregistered_children(self) -> set[int]:
        """This process's children but those being handed to the reactor; in a thread."""
        with self._spawn_lock:
            return _children(os.getpid()) - self._handing_over

    @property
    def running(self) -> int:
        """How many commands run now."""
        return len(self._running)

    def stop(self) -> Deferred[Any]:
        """Kill every command still running, with its process tree, and start no more: the
        daemon is stopping, and a build nobody waits for would still fill the Nix store.
        Fires once every one has exited."""
        self._stopping = True
        if self._sweeps is not None and self._sweeps.running:
            self._sweeps.stop()
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
        if self._stopping:
            return fail(OSError(errno.ESHUTDOWN, "nixeryd is stopping"))
        protocol = _StreamingProtocol(argv, timeout, on_stderr_line)
        self._track(protocol)
        environment = dict(os.environ if env is None else env)

        def spawn() -> _Child:
            with self._spawn_lock:
                child = _spawn_child(argv, environment)
                self._handing_over.add(child.pid)
            if self._stopping:  # the reactor may not run the callback below any more
                kill_tree(child.pid)
            return child

        def spawned(child: _Child) -> None:
            transport = _SpawnedProcess(self._reactor, child, protocol)
            with self._spawn_lock:
                self._handing_over.discard(child.pid)
            transport.closeStdin()
            if protocol.killed or self._stopping:
                protocol.kill_group()

        def not_spawned(failure: Failure) -> None:
            protocol.gone()
            if not protocol.done.called:
                protocol.done.errback(failure)

        deferToThreadPool(self._reactor, self._pool, spawn).addCallback(spawned).addErrback(
            not_spawned
        )
        timer = self._reactor.callLater(timeout, protocol.time_out)

        def cancel_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if self._sweeps is not None and isinstance(result, ProcessResult) and result.signal:
                # Killed by someone else: what it started is orphaned now.
                self._sweep_orphans()
            return result

        return protocol.done.addBoth(cancel_timer)

    def start(
        self,
        argv: Sequence[str],
        *,
        on_stderr_line: Callable[[str], None],
        env: Mapping[str, str] | None = None,
    ) -> InteractiveProcess:
        if self._stopping:
            raise OSError(errno.ESHUTDOWN, "nixeryd is stopping")
        protocol = _InteractiveProtocol(on_stderr_line)
        self._spawn(protocol, argv, env)
        return protocol

    def _track(self, protocol: _Command) -> None:
        """Count ``protocol`` as running until its process is gone."""
        self._running.add(protocol)
        protocol.exited.addCallback(lambda _: self._running.discard(protocol))

    def _spawn(self, protocol: _Command, argv: Sequence[str], env: Mapping[str, str] | None) -> Any:
        """Start ``argv`` as the leader of a new session, on the reactor thread (a
        long-lived command, started rarely); its transport."""
        child = _spawn_child(argv, dict(os.environ if env is None else env))
        transport = _SpawnedProcess(self._reactor, child, protocol)
        self._track(protocol)
        return transport
