"""Long-running Nix evaluators: one ``nix repl`` per package set and system.

Importing a package set is most of what a small image's evaluation costs (for
nixpkgs, a third of ``hello``'s), and a ``nix-instantiate`` per image pays it
again for every image. An :class:`Evaluator` binds the package set once, with a
first repl line such as ``nixeryd = import nix/nixeryd.nix { ... }``, then
answers each image with an expression over that binding: Nix keeps every value
it has evaluated, so a later image evaluates only what earlier ones did not
need (stdenv, the compilers and libraries images share are evaluated once).

Each request is two lines on the repl's stdin::

    builtins.trace ("nixeryd-answer-TOKEN-N " + (EXPRESSION)) null
    builtins.trace "nixeryd-end-TOKEN-N" null

Nix prints a traced string as ``trace: STRING`` on stderr (Nix 2.8 as 2.18). A
failing evaluation prints ``error: ...`` there instead of the answer line, and
the second line runs regardless, so the end line closes every request, answered
or failed; the lines between are the request's Nix output. ``TOKEN`` is random
per evaluator, so no package's own trace can pass for an answer. stdout only
echoes the values (``null``) and is dropped.

An evaluator answers one request at a time. A request that times out or is
cancelled kills the repl, as an evaluation cannot be stopped otherwise; a repl
whose resident memory passes a bound after an answer, or that has been idle,
is stopped too. Each of these starts a fresh one for the next request. The
:class:`EvaluatorPool` keeps a bounded number of them, least recently used
retired first.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.logger import Logger

from nixeryd.metrics import Metrics
from nixeryd.process import (
    STDERR_TAIL_LINES,
    InteractiveProcess,
    ProcessResult,
    ProcessRunner,
    ProcessTimedOut,
)

#: Reads a process's resident memory in bytes by pid, or None when it is gone.
MemoryReader = Callable[[int], "int | None"]


def resident_memory(pid: int) -> int | None:
    """The resident memory (VmRSS) of process ``pid``, in bytes."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


@dataclass(frozen=True)
class EvaluatorLimits:
    """How evaluators are bounded (see the ``evaluator_*`` options)."""

    #: Evaluators kept running at once; the least recently used is retired first.
    capacity: int
    #: Resident bytes past which an evaluator is restarted after its answer.
    memory: int
    #: Seconds an evaluator may wait for a request before it is stopped.
    idle: float
    #: Seconds one evaluation may take before the evaluator is killed.
    request_timeout: float


@dataclass(frozen=True)
class Repl:
    """How evaluators run their repl: the command, through which seam, on which clock
    (the reactor, or a test's), bounded how; shared by every evaluator of a pool."""

    processes: ProcessRunner
    clock: Any
    argv: tuple[str, ...]
    limits: EvaluatorLimits
    env: dict[str, str] | None = None
    read_memory: MemoryReader = resident_memory
    #: Where evaluations answered by a running repl (and those that start one) are counted.
    metrics: Metrics = field(default_factory=Metrics)


class _Request:
    """One expression sent to the repl, and what the repl printed for it."""

    def __init__(
        self,
        token: str,
        number: int,
        on_line: Callable[[str], None],
        cancel: Callable[[], None],
        process: InteractiveProcess,
    ) -> None:
        #: The repl it was sent to: only that one's end can fail it.
        self.process = process
        self.answer_tag = f"nixeryd-answer-{token}-{number}"
        self.end_tag = f"nixeryd-end-{token}-{number}"
        self.on_line = on_line
        self.answer: str | None = None
        self.tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.timed_out = False
        self.done: Deferred[ProcessResult] = Deferred(canceller=lambda _: cancel())

    def lines(self, expression: str) -> bytes:
        return (
            f'builtins.trace ("{self.answer_tag} " + ({expression})) null\n'
            f'builtins.trace "{self.end_tag}" null\n'
        ).encode()


class Evaluator:
    """One repl holding one package set; started on its first request.

    ``max_age``, when set, bounds how long one repl process is reused: for a
    package set whose files may change under the same source (a local path),
    which a running Nix would not notice, as it reads each file once.
    """

    log = Logger()

    def __init__(self, repl: Repl, *, setup: str, name: str, max_age: float | None = None) -> None:
        self._repl = repl
        self._clock = repl.clock
        self._argv = repl.argv
        self._limits = repl.limits
        self._setup = setup
        self._name = name
        self._max_age = max_age
        self._lock = DeferredLock()
        self._process: InteractiveProcess | None = None
        self._started_at = 0.0
        self._current: _Request | None = None
        self._requests = 0
        self._token = secrets.token_hex(8)
        self._idle_timer: Any = None
        self._retired = False
        # Traced once the setup line is read: what the repl prints before (its
        # greeting) belongs to no request.
        self._ready_tag = f"nixeryd-ready-{self._token}"
        self._ready = False
        #: Repl processes started so far: a restart is a new one.
        self.starts = 0

    @property
    def running(self) -> bool:
        return self._process is not None

    def memory(self) -> int | None:
        """The running repl's resident bytes, or None when none runs."""
        process = self._process
        if process is None or process.pid is None:
            return None
        return self._repl.read_memory(process.pid)

    @inlineCallbacks
    def evaluate(self, expression: str, on_line: Callable[[str], None]) -> Any:
        """Evaluate ``expression`` (a Nix string) over the setup's bindings.

        Fires with a :class:`ProcessResult` as a ``nix-instantiate`` run would
        give: exit 0 and the string as stdout, or exit 1 and Nix's error as the
        stderr tail; fails with :class:`ProcessTimedOut`. ``on_line`` sees the
        request's Nix output as it arrives. Cancelling kills the repl.
        """
        yield self._lock.acquire()
        try:
            result = yield self._ask(expression, on_line)
        finally:
            self._lock.release()
            self._after_request()
        return result

    def retire(self) -> None:
        """Stop once the requests already waiting are answered: the pool let go of it."""
        self._retired = True
        if not self._lock.locked:
            self.stop()

    def stop(self) -> None:
        """Kill the repl, if one runs; the next request starts another."""
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        process, self._process = self._process, None
        if process is not None:
            process.kill()

    def _ask(self, expression: str, on_line: Callable[[str], None]) -> Deferred[ProcessResult]:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        if (
            self._process is not None
            and self._max_age is not None
            and self._clock.seconds() - self._started_at >= self._max_age
        ):
            self.log.debug(
                "{name}: evaluator older than {age:g} s", name=self._name, age=self._max_age
            )
            self.stop()
        self._repl.metrics.cache("evaluator", hit=self._process is not None)
        process = self._process or self._start()
        self._requests += 1
        request = _Request(self._token, self._requests, on_line, self._kill_current, process)
        self._current = request
        timer = self._clock.callLater(self._limits.request_timeout, self._time_out, request)

        def stop_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        process.write(request.lines(expression))
        return request.done.addBoth(stop_timer)

    def _start(self) -> InteractiveProcess:
        process = self._repl.processes.start(
            self._argv, on_stderr_line=self._on_line, env=self._repl.env
        )
        self._process = process
        self._started_at = self._clock.seconds()
        self.starts += 1
        process.ended.addCallback(self._ended, process)
        self._ready = False
        process.write(f'{self._setup}\nbuiltins.trace "{self._ready_tag}" null\n'.encode())
        self.log.info("{name}: evaluator started (pid {pid})", name=self._name, pid=process.pid)
        return process

    def _on_line(self, line: str) -> None:
        request = self._current
        if not self._ready or request is None:
            self._ready = self._ready or line == f"trace: {self._ready_tag}"
            self.log.debug("{name}: {line}", name=self._name, line=line)
        elif line == f"trace: {request.end_tag}":
            self._current = None
            code = 0 if request.answer is not None else 1
            answer = (request.answer or "").encode()
            request.done.callback(ProcessResult(self._argv, code, answer, tuple(request.tail)))
        elif line.startswith(f"trace: {request.answer_tag} "):
            request.answer = line[len(f"trace: {request.answer_tag} ") :]
        else:
            request.tail.append(line)
            request.on_line(line)

    def _time_out(self, request: _Request) -> None:
        request.timed_out = True
        self.log.warn(
            "{name}: evaluation ran longer than {timeout:g} s; killing the evaluator",
            name=self._name,
            timeout=self._limits.request_timeout,
        )
        self.stop()

    def _kill_current(self) -> None:
        self._current = None
        self.stop()

    def _ended(self, status: int, process: InteractiveProcess) -> None:
        if self._process is process:
            self._process = None
        request = self._current
        if request is None or request.process is not process:
            # A repl stopped earlier (too old, over its memory bound), reaped only after
            # its successor took this request.
            return
        self._current = None
        if request.done.called:
            return
        if request.timed_out:
            request.done.errback(
                ProcessTimedOut(self._argv, self._limits.request_timeout, tuple(request.tail))
            )
            return
        request.tail.append(
            f"error: the evaluator ({self._argv[0]} repl) ended with status {status} during "
            "the evaluation; the next request starts a new one"
        )
        request.done.callback(ProcessResult(self._argv, status or 1, b"", tuple(request.tail)))

    def _after_request(self) -> None:
        if self._retired:
            if not self._lock.waiting:
                self.stop()
            return
        if self._process is None:
            return
        memory = self.memory()
        if memory is not None:
            self.log.debug(
                "{name}: evaluator at {mib} MiB", name=self._name, mib=_mebibytes(memory)
            )
        if memory is not None and memory > self._limits.memory:
            self.log.info(
                "{name}: evaluator at {mib} MiB, over its bound of {limit} MiB; restarting",
                name=self._name,
                mib=_mebibytes(memory),
                limit=_mebibytes(self._limits.memory),
            )
            self.stop()
        elif not self._lock.locked:
            self._idle_timer = self._clock.callLater(self._limits.idle, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if not self._lock.locked and self._process is not None:
            self.log.info(
                "{name}: evaluator idle for {idle:g} s; stopped",
                name=self._name,
                idle=self._limits.idle,
            )
            self.stop()


class EvaluatorPool:
    """Evaluators by key (a package set and a system), at most ``repl.limits.capacity``."""

    log = Logger()

    def __init__(self, repl: Repl) -> None:
        self._repl = repl
        self._evaluators: OrderedDict[Hashable, Evaluator] = OrderedDict()

    def evaluator(
        self, key: Hashable, *, setup: str, name: str, max_age: float | None = None
    ) -> Evaluator:
        """The evaluator for ``key``, made with ``setup`` if there is none."""
        evaluator = self._evaluators.get(key)
        if evaluator is not None:
            self._evaluators.move_to_end(key)
            return evaluator
        evaluator = Evaluator(self._repl, setup=setup, name=name, max_age=max_age)
        self._evaluators[key] = evaluator
        while len(self._evaluators) > self._repl.limits.capacity:
            _, retired = self._evaluators.popitem(last=False)
            retired.retire()
        return evaluator

    def evaluators(self) -> list[Evaluator]:
        """The evaluators kept, least recently used first."""
        return list(self._evaluators.values())

    def discard(self, key: Hashable) -> None:
        """Retire ``key``'s evaluator: what it holds is no longer valid."""
        evaluator = self._evaluators.pop(key, None)
        if evaluator is not None:
            evaluator.retire()

    def stop(self) -> None:
        """Kill every evaluator: the daemon stops."""
        for evaluator in self._evaluators.values():
            evaluator.stop()
        self._evaluators.clear()


def _mebibytes(size: int) -> int:
    return size // (1024 * 1024)
