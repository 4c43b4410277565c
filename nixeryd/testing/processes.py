"""An expectation fake for the process seam: Nix (or any command) without running it.

:class:`ExpectingProcessRunner` is a :class:`nixeryd.process.ProcessRunner`:
pass it where nixeryd or a plugin takes ``runtime.processes``. Each
:class:`Expect` matches commands by their argv prefix and answers with canned
stdout, stderr lines and exit code, or a timeout; a command nothing expects
raises AssertionError and is recorded in ``unexpected``, so a test states
exactly what may run::

    git = Expect(["git", "ls-remote"], stdout=b"abc123\tHEAD\n")
    processes = ExpectingProcessRunner(git)
    ...  # exercise the code
    assert len(git.calls) == 1 and not processes.unexpected

Interactive commands (:meth:`~nixeryd.process.ProcessRunner.start`: the
evaluator's ``nix repl``) are answered by a :class:`ReplScript`, which
speaks the evaluator's request framing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail, succeed

from nixeryd.process import InteractiveProcess, ProcessResult, ProcessTimedOut

__all__ = ["Expect", "ExpectingProcessRunner", "FakeRepl", "ReplReply", "ReplScript"]


@dataclass
class Expect:
    """One expected command: matched by its argv prefix (and, if given, a run of arguments
    it must contain anywhere), answered with canned output.

    ``gate``, when given, holds the answer back until the test fires it, so a
    test can have many requests arrive while "Nix" is still running; a caller
    that cancels the run meanwhile (killing the real command) is counted in
    ``cancelled``.
    """

    prefix: Sequence[str]
    containing: Sequence[str] = ()
    stdout: bytes = b""
    stderr: Sequence[str] = ()
    exit_code: int = 0
    #: The signal that "killed" the command (then exit_code should be 128 + it).
    signal: int | None = None
    timed_out: bool = False
    gate: Deferred[None] | None = None
    calls: list[Sequence[str]] = field(default_factory=list)
    cancelled: int = 0


class ExpectingProcessRunner:
    """A ProcessRunner that answers expected commands and fails the test on others;
    interactive commands (the evaluator's ``nix repl``) are answered by ``repl``."""

    def __init__(self, *expectations: Expect, repl: ReplScript | None = None) -> None:
        self.expectations = list(expectations)
        self.unexpected: list[Sequence[str]] = []
        self.repl = repl

    def start(
        self,
        argv: Sequence[str],
        *,
        on_stderr_line: Callable[[str], None],
        env: Mapping[str, str] | None = None,
    ) -> InteractiveProcess:
        if self.repl is None:
            self.unexpected.append(argv)
            raise AssertionError(f"unexpected interactive command: {argv}")
        return self.repl.start(argv, on_stderr_line)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        on_stderr_line: Callable[[str], None],
        env: Mapping[str, str] | None = None,
    ) -> Deferred[ProcessResult]:
        for expect in self.expectations:
            if list(argv[: len(expect.prefix)]) == list(expect.prefix) and _contains(
                argv, expect.containing
            ):
                expect.calls.append(argv)
                return self._answer(expect, argv, on_stderr_line)
        self.unexpected.append(argv)
        raise AssertionError(f"unexpected command: {argv}")

    def _answer(
        self, expect: Expect, argv: Sequence[str], on_stderr_line: Callable[[str], None]
    ) -> Deferred[ProcessResult]:
        def finish(_: object = None) -> Deferred[ProcessResult]:
            for line in expect.stderr:
                on_stderr_line(line)
            if expect.timed_out:
                return fail(ProcessTimedOut(argv, 1.0, expect.stderr))
            return succeed(
                ProcessResult(
                    tuple(argv),
                    expect.exit_code,
                    expect.stdout,
                    tuple(expect.stderr),
                    expect.signal,
                )
            )

        if expect.gate is None:
            return finish()

        def cancel(_: Deferred[None]) -> None:
            expect.cancelled += 1

        gate: Deferred[None] = Deferred(canceller=cancel)
        expect.gate.addCallback(lambda _: None if gate.called else gate.callback(None))
        return gate.addCallback(finish)


def _contains(argv: Sequence[str], run: Sequence[str]) -> bool:
    return any(
        list(argv[start : start + len(run)]) == list(run)
        for start in range(len(argv) - len(run) + 1)
    )


@dataclass
class ReplReply:
    """How the fake repl answers one request: with ``answer`` (the string the
    expression evaluates to) or, when None, only ``stderr`` (Nix's error); or
    it ends with status ``dies`` instead. ``gate`` holds the reply back until fired."""

    answer: str | None = None
    stderr: Sequence[str] = ()
    dies: int | None = None
    gate: Deferred[None] | None = None


class ReplScript:
    """Scripted ``nix repl`` processes: each request takes the next reply, from any
    process; what was sent is recorded per process."""

    def __init__(self, *replies: ReplReply) -> None:
        self.replies = list(replies)
        self.processes: list[FakeRepl] = []

    def start(self, argv: Sequence[str], on_stderr_line: Callable[[str], None]) -> FakeRepl:
        process = FakeRepl(self, argv, on_stderr_line, pid=1000 + len(self.processes))
        self.processes.append(process)
        return process

    @property
    def expressions(self) -> list[str]:
        return [expression for process in self.processes for expression in process.expressions]


_REQUEST = re.compile(r'^builtins\.trace \("(nixeryd-answer-\S+) " \+ \((.*)\)\) null$')
_END = re.compile(r'^builtins\.trace "(nixeryd-end-\S+)" null$')
_READY = re.compile(r'^builtins\.trace "(nixeryd-ready-\S+)" null$')


class FakeRepl:
    """One fake repl process (an InteractiveProcess)."""

    def __init__(
        self,
        script: ReplScript,
        argv: Sequence[str],
        on_stderr_line: Callable[[str], None],
        pid: int,
    ) -> None:
        self.script = script
        self.argv = tuple(argv)
        self.on_stderr_line = on_stderr_line
        self._pid: int | None = pid
        self._ended: Deferred[int] = Deferred()
        self.setup: list[str] = []
        self.expressions: list[str] = []
        self.killed = False
        self._answer_tag = ""

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def ended(self) -> Deferred[int]:
        return self._ended

    def write(self, data: bytes) -> None:
        assert not self._ended.called, "written to an ended repl"
        for line in data.decode().splitlines():
            request, end, ready = _REQUEST.match(line), _END.match(line), _READY.match(line)
            if ready:
                self.on_stderr_line("Welcome to Nix 2.18.9. Type :? for help.")
                self.on_stderr_line(f"trace: {ready.group(1)}")
            elif request:
                self._answer_tag = request.group(1)
                self.expressions.append(request.group(2))
            elif end:
                self._reply(self.script.replies.pop(0), end.group(1))
            else:
                self.setup.append(line)

    def _reply(self, reply: ReplReply, end_tag: str) -> None:
        answer_tag = self._answer_tag

        def send(_: object = None) -> None:
            if self._ended.called:
                return
            if reply.dies is not None:
                self.end(reply.dies)
                return
            for line in reply.stderr:
                self.on_stderr_line(line)
            if reply.answer is not None:
                self.on_stderr_line(f"trace: {answer_tag} {reply.answer}")
            self.on_stderr_line(f"trace: {end_tag}")

        if reply.gate is None:
            send()
        else:
            reply.gate.addCallback(send)

    def kill(self) -> None:
        self.killed = True
        self.end(137)

    def end(self, status: int) -> None:
        if not self._ended.called:
            self._pid = None
            self._ended.callback(status)
