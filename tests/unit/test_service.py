"""The service tree: storage starts before the listeners, and a failed start stops the daemon."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed

from nixeryd.service import StorageFirst


class FakeStorage:
    def __init__(self, started: Deferred[None]) -> None:
        self.started = started
        self.stops = 0

    def start(self) -> Deferred[None]:
        return self.started

    def stop(self) -> Deferred[None]:
        self.stops += 1
        return succeed(None)


class FakeReactor:
    def __init__(self) -> None:
        self.stopped = False

    def callWhenRunning(self, call: Callable[[], Any]) -> None:
        call()

    def stop(self) -> None:
        self.stopped = True


def tree(storage: FakeStorage, reactor: FakeReactor) -> tuple[StorageFirst, Service]:
    root = StorageFirst(storage, reactor)  # type: ignore[arg-type]
    listener = Service()
    listener.setServiceParent(root)
    return root, listener


def test_listeners_start_once_storage_has_started_and_storage_stops_last() -> None:
    started: Deferred[None] = Deferred()
    storage, reactor = FakeStorage(started), FakeReactor()
    root, listener = tree(storage, reactor)
    root.startService()
    assert not listener.running
    started.callback(None)
    assert listener.running
    root.stopService()
    assert not listener.running
    assert storage.stops == 1
    assert root.storage_failure is None


def test_storage_that_cannot_start_stops_the_daemon_without_serving() -> None:
    storage, reactor = (
        FakeStorage(fail(ConnectionRefusedError("bucket unreachable"))),
        FakeReactor(),
    )
    root, listener = tree(storage, reactor)
    root.startService()
    assert reactor.stopped
    assert not listener.running
    assert root.storage_failure is not None
    assert "bucket unreachable" in root.storage_failure.getErrorMessage()
    root.stopService()  # the listener never started: nothing to stop, no error
    assert storage.stops == 0
