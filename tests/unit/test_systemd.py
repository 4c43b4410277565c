"""systemd notifications: datagrams to a real bound socket, by path and abstract name."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from nixeryd.systemd import Notifier, Watchdog


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket standing for systemd's, and its NOTIFY_SOCKET value."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def received(sock: socket.socket) -> dict[str, str]:
    lines = sock.recv(4096).decode().splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_ready_status_and_stopping_arrive_as_one_datagram_each(
    listener: tuple[str, socket.socket],
) -> None:
    path, sock = listener
    notifier = Notifier(path)
    notifier.ready("serving on 127.0.0.1:8080")
    notifier.status("stopping: 2 builds")
    notifier.stopping("stopping")
    assert received(sock) == {"READY": "1", "STATUS": "serving on 127.0.0.1:8080"}
    assert received(sock) == {"STATUS": "stopping: 2 builds"}
    assert received(sock) == {"STOPPING": "1", "STATUS": "stopping"}
    notifier.close()


def test_an_abstract_address_is_written_with_an_at_sign() -> None:
    name = f"nixeryd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        Notifier("@" + name).ready("up")
        assert received(sock)["READY"] == "1"


def test_without_a_socket_nothing_is_sent_and_a_gone_socket_is_not_an_error(
    tmp_path: Path,
) -> None:
    Notifier(None).ready("up")
    assert not Notifier(None).enabled
    Notifier(str(tmp_path / "gone")).ready("up")  # logged, not raised


def test_the_variables_are_taken_from_the_environment(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environment(environ)
    assert environ == {}
    assert notifier.watchdog_interval == 1.5
    notifier.ready("up")
    assert received(sock)["READY"] == "1"


@pytest.mark.parametrize(
    "watchdog",
    [{"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, {"WATCHDOG_USEC": "x"}, {}],
    ids=["another-process", "not-a-number", "none"],
)
def test_no_watchdog_for_another_process_or_without_an_interval(
    listener: tuple[str, socket.socket], watchdog: dict[str, str]
) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": listener[0], **watchdog})
    assert notifier.watchdog_interval is None


def test_the_watchdog_pings_every_half_interval_from_the_reactor(
    listener: tuple[str, socket.socket],
) -> None:
    path, sock = listener
    clock = Clock()
    watchdog = Watchdog(Notifier(path, watchdog_usec=2_000_000), clock)
    watchdog.start()
    assert received(sock) == {"WATCHDOG": "1"}
    clock.advance(1.0)
    assert received(sock) == {"WATCHDOG": "1"}
    watchdog.stop()
    clock.advance(5.0)
    sock.settimeout(0.1)
    with pytest.raises(TimeoutError):
        sock.recv(4096)
