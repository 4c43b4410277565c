"""Real HTTP requests through twisted.web and treq's client, entirely in memory.

For testing a resource a plugin serves (a storage backend's ``serve_blob``
answer, say) without sockets or a running reactor: wrap it in
:class:`MemoryHTTP` and make requests; each call returns once the response
has been written, however many producer turns that took::

    http = MemoryHTTP(storage.serve_blob(info), monkeypatch)
    response, body = http.request("GET", "http://test/", headers={"Range": "bytes=0-9"})
    assert response.code == 206
"""

from __future__ import annotations

from typing import Any, TypeVar

import pytest
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, Cooperator
from twisted.python.failure import Failure

T = TypeVar("T")

__all__ = ["MemoryHTTP"]


class MemoryHTTP:
    """StubTreq over a resource, with twisted.web's streaming working.

    twisted.web drives a pull producer (a streamed blob) through the global
    Cooperator, which needs a running reactor; here it ticks on a Clock that
    :meth:`settle` advances.
    """

    #: The Clock the Cooperator runs on; :meth:`settle` advances it.
    clock: Clock

    def __init__(self, resource: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """Serve ``resource`` (an IResource); ``monkeypatch`` swaps the global Cooperator
        for one on :attr:`clock` for the test's duration."""
        self.clock = Clock()
        cooperator = Cooperator(scheduler=lambda work: self.clock.callLater(0, work))
        monkeypatch.setattr(task, "_theCooperator", cooperator)
        self.treq: Any = StubTreq(resource)

    def settle(self, deferred: Deferred[T]) -> T:
        """Run the in-memory connection until ``deferred`` fires; return or raise its result."""
        outcome: list[Any] = []
        deferred.addBoth(outcome.append)
        for _ in range(10_000):
            if outcome:
                if isinstance(outcome[0], Failure):
                    outcome[0].raiseException()
                return outcome[0]  # type: ignore[no-any-return]
            self.treq.flush()
            self.clock.advance(0)
        raise AssertionError("the request never completed")

    def request(self, method: str, url: str, **kwargs: Any) -> tuple[Any, bytes]:
        """Make a request with treq's arguments (``headers``, ``data``...); the response
        and its whole body."""
        response = self.settle(self.treq.request(method, url, **kwargs))
        return response, self.settle(response.content())
