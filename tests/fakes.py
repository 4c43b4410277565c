"""Test doubles with the interfaces of the real seams."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail, succeed

from nixeryd.process import ProcessResult, ProcessTimedOut


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
    timed_out: bool = False
    gate: Deferred[None] | None = None
    calls: list[Sequence[str]] = field(default_factory=list)
    cancelled: int = 0


class ExpectingProcessRunner:
    """A ProcessRunner that answers expected commands and fails the test on others."""

    def __init__(self, *expectations: Expect) -> None:
        self.expectations = list(expectations)
        self.unexpected: list[Sequence[str]] = []

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
                ProcessResult(tuple(argv), expect.exit_code, expect.stdout, tuple(expect.stderr))
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
