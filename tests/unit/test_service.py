"""The service tree: steps start in order and stop in reverse, each waiting for the one
before; a step that cannot start stops the daemon; requests in flight at shutdown are
answered with a registry error, not reset."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.config import Config
from nixeryd.lifecycle import Drain, Lifecycle, StartFailed
from nixeryd.metrics import Metrics
from nixeryd.plugins import Plugins, builtin_plugins, make_plugin_manager
from nixeryd.service import make_service
from nixeryd.site import RegistryChannel, RegistrySite
from nixeryd.testing.harness import FakeNix, RegistryFactory
from nixeryd.testing.processes import Expect, ExpectingProcessRunner


class FakeReactor:
    def __init__(self) -> None:
        self.stopped = False

    def callWhenRunning(self, call: Callable[[], Any]) -> None:
        call()

    def stop(self) -> None:
        self.stopped = True


class Recorder:
    """Steps that record their starts and stops, each finishing when the test says."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.pending: dict[str, Deferred[None]] = {}

    def action(self, event: str, wait: bool = False) -> Callable[[], Deferred[None]]:
        def act() -> Deferred[None]:
            self.events.append(event)
            if not wait:
                return succeed(None)
            self.pending[event] = Deferred()
            return self.pending[event]

        return act


def test_steps_start_one_after_another_and_stop_in_reverse() -> None:
    recorder = Recorder()
    root = Lifecycle(FakeReactor())
    root.add(
        "storage", recorder.action("start storage", wait=True), recorder.action("stop storage")
    )
    root.add("nix", stop=recorder.action("stop nix", wait=True))
    root.add("listener", recorder.action("listen"), recorder.action("stop listening"))
    root.startService()
    assert recorder.events == ["start storage"]
    recorder.pending["start storage"].callback(None)
    assert recorder.events == ["start storage", "listen"]
    stopped = root.stopService()
    # Nix is being stopped: storage waits for it.
    assert recorder.events[2:] == ["stop listening", "stop nix"]
    recorder.pending["stop nix"].callback(None)
    assert recorder.events[4:] == ["stop storage"]
    assert stopped.called
    assert root.failure is None


def test_a_step_that_cannot_start_stops_the_daemon_and_nothing_after_it_starts() -> None:
    recorder = Recorder()
    reactor = FakeReactor()
    root = Lifecycle(reactor)
    root.add("threads", recorder.action("start threads"), recorder.action("stop threads"))
    root.add(
        "storage backend",
        lambda: fail(ConnectionRefusedError("bucket unreachable")),
        recorder.action("stop storage"),
    )
    root.add("listener", recorder.action("listen"), recorder.action("stop listening"))
    root.startService()
    assert reactor.stopped
    assert root.failed_step == "storage backend"
    assert root.failure is not None
    assert "bucket unreachable" in root.failure.getErrorMessage()
    root.stopService()
    # Only what started is stopped: the storage that failed and the listener are not.
    assert recorder.events == ["start threads", "stop threads"]


def test_a_one_off_command_waits_for_the_start_and_is_told_which_step_failed() -> None:
    reactor = FakeReactor()
    root = Lifecycle(reactor)
    root.add("storage backend", lambda: fail(ConnectionRefusedError("bucket unreachable")))
    failure = SynchronousTestCase().failureResultOf(root.start(), StartFailed)
    assert str(failure.value) == "storage backend did not start: bucket unreachable"
    assert not reactor.stopped  # the command decides what to do


def test_stopping_while_a_step_starts_cancels_its_start() -> None:
    recorder = Recorder()
    root = Lifecycle(FakeReactor())
    root.add("threads", recorder.action("start threads"), recorder.action("stop threads"))
    root.add(
        "storage", recorder.action("start storage", wait=True), recorder.action("stop storage")
    )
    root.add("listener", recorder.action("listen"))
    root.startService()
    root.stopService()
    assert recorder.pending["start storage"].called  # cancelled
    assert recorder.events == ["start threads", "start storage", "stop storage", "stop threads"]
    assert root.failure is None


def test_a_step_that_fails_to_stop_does_not_keep_the_others_running() -> None:
    recorder = Recorder()
    root = Lifecycle(FakeReactor())
    root.add("storage", stop=recorder.action("stop storage"))
    root.add("nix", stop=lambda: fail(OSError("no such process")))
    root.startService()
    assert root.stopService().called
    assert recorder.events == ["stop storage"]


def test_the_daemon_tree_starts_storage_before_nix_and_listeners_last(tmp_path: Path) -> None:
    config = Config(pkgs_path=str(tmp_path), storage_path=str(tmp_path / "s"), listen=("tcp:0",))
    manager = make_plugin_manager(plugins=builtin_plugins(), load_entrypoints=False)
    root = make_service(
        config, Clock(), plugins=Plugins(manager), http=object(), processes=ExpectingProcessRunner()
    )
    assert [step.name for step in root] == [
        "systemd watchdog",
        "nixeryd-io threads",
        "nixeryd-layers threads",
        "compression threads",
        "storage backend",
        "Nix garbage collector roots",
        "Nix evaluators",
        "popularity data",
        "requests in flight",
        "listener tcp:0",
        "systemd notification",
    ]


def _connect(site: RegistrySite) -> tuple[RegistryChannel, StringTransport]:
    channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.7", 5555))
    assert isinstance(channel, RegistryChannel)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def _answer(transport: StringTransport) -> tuple[bytes, bytes, Any]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], head, json.loads(body)


def test_requests_in_flight_at_shutdown_get_a_registry_error_and_later_ones_too(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    failures: list[Any] = []
    observer = lambda event: failures.append(event) if "log_failure" in event else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    building: Deferred[None] = Deferred()
    evaluation = nix.evaluation(gate=building)
    registry = registry_with(evaluation, Expect(["nix-store", "--realise"]), nix.path_info())
    drain = Drain(Clock())
    site = RegistrySite(registry.registry.resource(), registry.registry.answers, Metrics())
    site.requestFactory = drain.request  # type: ignore[assignment]
    channel, transport = _connect(site)
    channel.dataReceived(b"GET /v2/hello/manifests/latest HTTP/1.1\r\nHost: registry\r\n\r\n")
    assert transport.value() == b"" and drain.in_flight == 1
    stopped = drain.stop()
    assert stopped.called
    status, head, body = _answer(transport)
    assert status == b"HTTP/1.1 503 Service Unavailable"
    assert b"connection: close" in head.lower()
    assert b"docker-distribution-api-version: registry/2.0" in head.lower()
    assert body["errors"][0]["code"] == "UNAVAILABLE"
    assert "shutting down" in body["errors"][0]["message"]
    assert transport.disconnecting
    assert drain.in_flight == 0
    # The build it waited for ends after the answer: nothing more is written.
    building.callback(None)
    assert _answer(transport)[2] == body
    later, later_transport = _connect(site)
    later.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: registry\r\n\r\n")
    assert _answer(later_transport)[0] == b"HTTP/1.1 503 Service Unavailable"
    globalLogPublisher.removeObserver(observer)
    assert failures == []
