"""Coalescing concurrent work: many callers asking for one key share one run.

Ten clients pulling one uncached image must cause one Nix build, and two
images sharing a layer must write it once. Each caller gets its own Deferred
(so one caller's callbacks or cancellation cannot disturb another's), fired
with the shared result.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Runs ``work()`` once per key at a time; callers during a run share its result."""

    def __init__(self) -> None:
        self._waiters: dict[Hashable, list[Deferred[T]]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._waiters

    def run(self, key: Hashable, work: Callable[[], Deferred[T] | T]) -> Deferred[T]:
        waiter: Deferred[T] = Deferred()
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._waiters[key] = [waiter]

        def deliver(result: Any) -> None:
            for each in self._waiters.pop(key):
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(result)

        maybeDeferred(work).addBoth(deliver)
        return waiter
