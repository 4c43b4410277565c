"""The long-running evaluators, over a scripted repl and a memory clock."""

from __future__ import annotations

import os

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.evaluator import Evaluator, EvaluatorLimits, EvaluatorPool, Repl, resident_memory
from nixeryd.process import ProcessResult, ProcessTimedOut
from nixeryd.testing.processes import ExpectingProcessRunner, ReplReply, ReplScript

LIMITS = EvaluatorLimits(capacity=2, memory=100 * 2**20, idle=600.0, request_timeout=30.0)
ARGV = ("nix", "--extra-experimental-features", "nix-command", "repl")

_case = SynchronousTestCase()
result_of = _case.successResultOf
failure_of = _case.failureResultOf


def evaluator_with(
    *replies: ReplReply,
    memory: dict[int, int] | None = None,
    max_age: float | None = None,
    limits: EvaluatorLimits = LIMITS,
) -> tuple[Evaluator, ReplScript, Clock]:
    script = ReplScript(*replies)
    clock = Clock()
    repl = Repl(
        ExpectingProcessRunner(repl=script),
        clock,
        ARGV,
        limits,
        read_memory=lambda pid: (memory or {}).get(pid),
    )
    evaluator = Evaluator(
        repl,
        setup='nixeryd = import ./nixeryd.nix { srcType = "path"; }',
        name="test",
        max_age=max_age,
    )
    return evaluator, script, clock


def test_one_repl_answers_every_request_over_its_setup() -> None:
    evaluator, script, _ = evaluator_with(ReplReply(answer='{"a":1}'), ReplReply(answer='"b"'))
    lines: list[str] = []
    first: ProcessResult = result_of(evaluator.evaluate("builtins.toJSON 1", lines.append))
    second: ProcessResult = result_of(evaluator.evaluate("x", lines.append))
    assert (first.exit_code, first.stdout) == (0, b'{"a":1}')
    assert second.stdout == b'"b"'
    assert len(script.processes) == 1
    repl = script.processes[0]
    assert repl.argv == tuple(ARGV)
    assert repl.setup == ['nixeryd = import ./nixeryd.nix { srcType = "path"; }']
    assert repl.expressions == ["builtins.toJSON 1", "x"]
    assert lines == [], "the repl's greeting belongs to no request"
    counted = evaluator._repl.metrics.registry.get_sample_value
    assert counted("nixeryd_cache_misses_total", {"level": "evaluator"}) == 1  # started
    assert counted("nixeryd_cache_hits_total", {"level": "evaluator"}) == 1  # reused


def test_a_failing_evaluation_reports_nix_error_and_the_repl_stays() -> None:
    error = ["error:", "       … while calling the 'throw' builtin", "       error: boom"]
    evaluator, script, _ = evaluator_with(ReplReply(stderr=error), ReplReply(answer="ok"))
    lines: list[str] = []
    failed: ProcessResult = result_of(evaluator.evaluate("throw", lines.append))
    assert failed.exit_code == 1
    assert failed.stderr_tail == tuple(error)
    assert lines == error
    assert result_of(evaluator.evaluate("good", lines.append)).stdout == b"ok"
    assert len(script.processes) == 1


def test_requests_wait_for_each_other() -> None:
    gate: Deferred[None] = Deferred()
    evaluator, script, _ = evaluator_with(ReplReply(answer="1", gate=gate), ReplReply(answer="2"))
    first = evaluator.evaluate("one", lambda line: None)
    second = evaluator.evaluate("two", lambda line: None)
    assert script.expressions == ["one"], "the second waits for the first's answer"
    gate.callback(None)
    assert result_of(first).stdout == b"1"
    assert result_of(second).stdout == b"2"


def test_a_request_that_runs_too_long_kills_the_repl_and_the_next_starts_one() -> None:
    evaluator, script, clock = evaluator_with(
        ReplReply(answer="late", gate=Deferred()), ReplReply(answer="next")
    )
    slow = evaluator.evaluate("slow", lambda line: None)
    clock.advance(LIMITS.request_timeout)
    failure_of(slow, ProcessTimedOut)
    assert script.processes[0].killed
    assert result_of(evaluator.evaluate("next", lambda line: None)).stdout == b"next"
    assert len(script.processes) == 2


def test_cancelling_a_request_kills_the_repl() -> None:
    evaluator, script, _ = evaluator_with(ReplReply(answer="x", gate=Deferred()))
    running = evaluator.evaluate("slow", lambda line: None)
    running.cancel()
    failure_of(running, CancelledError)
    assert script.processes[0].killed
    assert not evaluator.running


def test_a_waiting_request_can_be_cancelled_alone() -> None:
    gate: Deferred[None] = Deferred()
    evaluator, script, _ = evaluator_with(ReplReply(answer="1", gate=gate), ReplReply(answer="2"))
    first = evaluator.evaluate("one", lambda line: None)
    waiting = evaluator.evaluate("two", lambda line: None)
    waiting.cancel()
    failure_of(waiting, CancelledError)
    gate.callback(None)
    assert result_of(first).stdout == b"1"
    assert not script.processes[0].killed
    assert script.expressions == ["one"]


def test_a_repl_that_dies_fails_its_request_with_a_reason() -> None:
    evaluator, script, _ = evaluator_with(ReplReply(dies=137), ReplReply(answer="again"))
    died: ProcessResult = result_of(evaluator.evaluate("big", lambda line: None))
    assert died.exit_code == 137
    assert "ended with status 137" in died.stderr_tail[-1]
    assert result_of(evaluator.evaluate("next", lambda line: None)).stdout == b"again"
    assert len(script.processes) == 2


def test_a_repl_over_its_memory_bound_is_restarted_after_its_answer() -> None:
    evaluator, script, _ = evaluator_with(
        ReplReply(answer="1"), ReplReply(answer="2"), memory={1000: LIMITS.memory + 1}
    )
    assert result_of(evaluator.evaluate("one", lambda line: None)).stdout == b"1"
    assert script.processes[0].killed
    assert result_of(evaluator.evaluate("two", lambda line: None)).stdout == b"2"
    assert [process.killed for process in script.processes] == [True, False]


def test_an_idle_repl_stops() -> None:
    evaluator, script, clock = evaluator_with(ReplReply(answer="1"))
    result_of(evaluator.evaluate("one", lambda line: None))
    clock.advance(LIMITS.idle - 1)
    assert evaluator.running
    clock.advance(1)
    assert not evaluator.running
    assert script.processes[0].killed


def test_a_repl_older_than_its_max_age_is_replaced() -> None:
    evaluator, script, clock = evaluator_with(
        ReplReply(answer="1"), ReplReply(answer="2"), ReplReply(answer="3"), max_age=60
    )
    result_of(evaluator.evaluate("one", lambda line: None))
    clock.advance(59)
    result_of(evaluator.evaluate("two", lambda line: None))
    assert len(script.processes) == 1
    clock.advance(1)
    result_of(evaluator.evaluate("three", lambda line: None))
    assert len(script.processes) == 2
    assert script.processes[0].killed


def test_the_pool_keeps_one_evaluator_per_key_and_retires_the_least_recently_used() -> None:
    script = ReplScript(*(ReplReply(answer=str(n)) for n in range(4)))
    pool = EvaluatorPool(Repl(ExpectingProcessRunner(repl=script), Clock(), ARGV, LIMITS))
    a = pool.evaluator("a", setup="a", name="a")
    assert pool.evaluator("a", setup="a", name="a") is a
    b = pool.evaluator("b", setup="b", name="b")
    result_of(a.evaluate("1", lambda line: None))
    result_of(b.evaluate("2", lambda line: None))
    pool.evaluator("a", setup="a", name="a")  # now b is the least recently used
    pool.evaluator("c", setup="c", name="c")
    assert a.running and not b.running
    assert pool.evaluator("b", setup="b", name="b") is not b
    pool.stop()
    assert not a.running
    assert all(process.killed for process in script.processes)


def test_a_retired_evaluator_answers_what_waits_then_stops() -> None:
    gate: Deferred[None] = Deferred()
    script = ReplScript(ReplReply(answer="1", gate=gate), ReplReply(answer="2"))
    pool = EvaluatorPool(Repl(ExpectingProcessRunner(repl=script), Clock(), ARGV, LIMITS))
    evaluator = pool.evaluator("a", setup="a", name="a")
    first = evaluator.evaluate("one", lambda line: None)
    second = evaluator.evaluate("two", lambda line: None)
    pool.discard("a")
    assert evaluator.running
    gate.callback(None)
    assert [result_of(first).stdout, result_of(second).stdout] == [b"1", b"2"]
    assert not evaluator.running
    assert len(script.processes) == 1


def test_resident_memory_is_read_from_proc() -> None:
    own = resident_memory(os.getpid())
    assert own is not None and own > 1024 * 1024
    assert resident_memory(2**22 + 12345) is None


def test_a_replaced_repl_that_ends_late_leaves_its_successors_request_alone() -> None:
    """A killed repl's end is reported once the reactor reaps it, which may be after its
    successor took the next request: that request is not the dead repl's to fail."""
    answered: Deferred[None] = Deferred()
    evaluator, script, clock = evaluator_with(
        ReplReply(answer="1"), ReplReply(answer="2", gate=answered), max_age=60
    )
    result_of(evaluator.evaluate("one", lambda line: None))
    old = script.processes[0]
    old.kill = lambda: setattr(old, "killed", True)  # type: ignore[method-assign]
    clock.advance(61)
    second = evaluator.evaluate("two", lambda line: None)
    assert old.killed and len(script.processes) == 2
    old.end(137)
    answered.callback(None)
    assert result_of(second).stdout == b"2"
