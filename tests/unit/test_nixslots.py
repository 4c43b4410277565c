"""The bound on concurrent Nix commands and its queue."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred

from nixeryd.errors import TooManyRequests
from nixeryd.nixslots import NixSlots


class _Commands:
    """Started commands as Deferreds the test fires; ``cancelled`` counts kills."""

    def __init__(self) -> None:
        self.started: list[Deferred[str]] = []
        self.cancelled = 0

    def start(self) -> Deferred[str]:
        def cancel(_: Deferred[str]) -> None:
            self.cancelled += 1

        command: Deferred[str] = Deferred(canceller=cancel)
        self.started.append(command)
        return command


def test_no_more_than_jobs_run_and_the_rest_start_in_order() -> None:
    slots = NixSlots(jobs=2, queue=10)
    commands = _Commands()
    results: list[str] = []
    for _ in range(5):
        slots.run(commands.start, may_refuse=True).addCallback(results.append)
    assert (len(commands.started), slots.running, slots.waiting) == (2, 2, 3)
    commands.started[0].callback("first")
    assert results == ["first"]
    assert (len(commands.started), slots.running, slots.waiting) == (3, 2, 2)
    for index in range(1, 5):
        commands.started[index].callback(f"command {index}")
    assert results == ["first", "command 1", "command 2", "command 3", "command 4"]
    assert (slots.running, slots.waiting, slots.most_running) == (0, 0, 2)


def test_a_full_queue_refuses_new_images_with_retry_after() -> None:
    slots = NixSlots(jobs=1, queue=1, retry_after=7)
    commands = _Commands()
    slots.run(commands.start, may_refuse=True)
    slots.run(commands.start, may_refuse=True)
    with pytest.raises(TooManyRequests) as refused:
        slots.run(commands.start, may_refuse=True)
    assert refused.value.status == 429
    assert refused.value.as_json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert refused.value.retry_after == 7
    assert "NIXERYD_NIX_QUEUE" in refused.value.message
    # An image already admitted (its realisation) waits instead of being refused.
    slots.run(commands.start, may_refuse=False)
    assert slots.waiting == 2


def test_a_failure_frees_its_slot() -> None:
    slots = NixSlots(jobs=1, queue=5)
    commands = _Commands()
    failures: list[Any] = []
    slots.run(commands.start, may_refuse=True).addErrback(failures.append)
    slots.run(commands.start, may_refuse=True)
    commands.started[0].errback(RuntimeError("nix failed"))
    assert len(failures) == 1
    assert (len(commands.started), slots.running) == (2, 1)


def test_cancelling_a_waiting_command_leaves_the_queue_and_a_running_one_is_killed() -> None:
    slots = NixSlots(jobs=1, queue=5)
    commands = _Commands()
    running = slots.run(commands.start, may_refuse=True)
    waiting = slots.run(commands.start, may_refuse=True)
    outcomes: list[Any] = []
    waiting.addErrback(lambda failure: outcomes.append(failure.check(CancelledError)))
    waiting.cancel()
    assert outcomes == [CancelledError]
    assert slots.waiting == 0
    running.addErrback(lambda failure: outcomes.append(failure.check(CancelledError)))
    running.cancel()
    assert commands.cancelled == 1
    assert outcomes == [CancelledError, CancelledError]
    assert slots.running == 0
    assert len(commands.started) == 1
