"""How much Nix runs at once: a fixed number of slots, and a bounded queue for them.

Every uncached image runs Nix three times (evaluation, realisation, closure
query; :mod:`nixeryd.nixbuild`), and each run may take a core and gigabytes
for minutes. Unbounded, fifty new image names at once were fifty concurrent
realisations, 1.5 GB, and cached answers slowed to 1.5 s as the reactor's
process and the Nix processes fought for the cores. :class:`NixSlots` lets
``jobs`` Nix commands run at once (``NIXERYD_NIX_JOBS``, one per core by
default) and queues the rest in order.

Only a new image's first step, its evaluation, may be refused: once
``queue`` (``NIXERYD_NIX_QUEUE``) commands wait, another new image is
answered ``429 TOOMANYREQUESTS`` with ``Retry-After``, which registry clients
honour. An image already evaluated waits for its realisation and closure
query without being refused, so that no admitted build is thrown away half
done; those waits are bounded by the images admitted.

Cached answers do not come here: a manifest known by its digest, a pinned
tag already built, and the in-memory answers need no Nix at all.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from nixeryd.errors import TooManyRequests

T = TypeVar("T")

#: Seconds a refused client is asked to wait: about one small image's evaluation.
RETRY_AFTER_SECONDS = 10


class _Slot(Generic[T]):
    """One command: waiting for a slot (``running`` None) or running."""

    def __init__(self, start: Callable[[], Deferred[T]]) -> None:
        self.start = start
        self.answer: Deferred[T] = Deferred(canceller=lambda _: self.cancel())
        self.running: Deferred[T] | None = None
        self.on_cancel_waiting: Callable[[], None] = lambda: None

    def cancel(self) -> None:
        if self.running is None:
            self.on_cancel_waiting()
        else:
            # Kills the command; the answer fails with CancelledError meanwhile.
            self.running.cancel()


class NixSlots:
    """Runs at most ``jobs`` Nix commands at once; up to ``queue`` more wait their turn."""

    def __init__(self, jobs: int, queue: int, retry_after: int = RETRY_AFTER_SECONDS) -> None:
        if jobs < 1 or queue < 0:
            raise ValueError(f"NixSlots needs jobs >= 1 and queue >= 0, not {jobs}, {queue}")
        self.jobs = jobs
        self.queue = queue
        self._retry_after = retry_after
        self._waiting: deque[_Slot[Any]] = deque()
        self.running = 0
        #: The most commands that ran at once, for the index page and the flood benchmark.
        self.most_running = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def run(self, start: Callable[[], Deferred[T]], *, may_refuse: bool) -> Deferred[T]:
        """``start()`` once a slot is free; its result. Cancelling a waiting command
        takes it off the queue, a running one is cancelled (and its Nix killed).

        With ``may_refuse`` and the queue full, fails at once with
        :class:`~nixeryd.errors.TooManyRequests`."""
        if self.running >= self.jobs and may_refuse and len(self._waiting) >= self.queue:
            raise TooManyRequests(
                f"the registry is building as many new images as it queues ({self.jobs} "
                f"running, {len(self._waiting)} waiting: NIXERYD_NIX_JOBS, "
                f"NIXERYD_NIX_QUEUE); try again in {self._retry_after} s",
                retry_after=self._retry_after,
                detail={"running": self.running, "waiting": len(self._waiting)},
            )
        slot: _Slot[T] = _Slot(start)
        if self.running < self.jobs:
            self._begin(slot)
        else:
            slot.on_cancel_waiting = lambda: self._waiting.remove(slot)
            self._waiting.append(slot)
        return slot.answer

    def _begin(self, slot: _Slot[Any]) -> None:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        slot.running = maybeDeferred(slot.start)
        slot.running.addBoth(self._finished, slot)

    def _finished(self, result: Any, slot: _Slot[Any]) -> None:
        self.running -= 1
        while self._waiting and self.running < self.jobs:
            self._begin(self._waiting.popleft())
        if slot.answer.called:
            return  # cancelled: the caller has its CancelledError already
        if isinstance(result, Failure):
            slot.answer.errback(result)
        else:
            slot.answer.callback(result)
