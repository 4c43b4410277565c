"""nixeryd under systemd's protocols: socket activation, notifications, the watchdog, stop.

``nixeryd serve`` runs under ``systemd-socket-activate``, which listens as
``systemd/nixeryd.socket`` does (a bare port, the socket's FileDescriptorName=)
and starts the daemon on the first connection with the unit's ``--listen``
endpoint; a datagram socket this test binds stands for systemd's
``NOTIFY_SOCKET``. A build of the test package ``slow`` is running when the
daemon is told to stop.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import TEST_PACKAGES, free_port, nix_env, require
from tests.e2e.processes import Descendants, command_line, kill
from tests.systemdunits import SOCKET, listen_endpoint, sections

pytestmark = pytest.mark.e2e


class Notifications:
    """A datagram socket standing for systemd's, at an abstract address (``@...``)."""

    def __init__(self) -> None:
        self.address = f"@nixeryd-test-{uuid.uuid4().hex}"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(b"\0" + self.address[1:].encode())
        #: Every message so far, in order, as its fields.
        self.received: list[dict[str, str]] = []

    def _read(self, timeout: float | None) -> bool:
        self._socket.settimeout(timeout)
        try:
            data = self._socket.recv(4096)
        except (TimeoutError, BlockingIOError):
            return False
        self.received.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        return True

    def queued(self) -> list[dict[str, str]]:
        """Read what has arrived, without waiting."""
        while self._read(0):
            pass
        return self.received

    def wait_for(self, key: str, timeout: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            found = [message for message in self.received if key in message]
            if found:
                return found[0]
            left = deadline - time.monotonic()
            assert left > 0, f"no {key} within {timeout:g} s; got {self.received}"
            self._read(left)

    def close(self) -> None:
        self._socket.close()


class Activated:
    """``nixeryd serve`` as nixeryd.socket starts it, not yet started (no connection yet)."""

    def __init__(self, workdir: Path, listen: str, **environment: str) -> None:
        require("systemd-socket-activate")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / "nixeryd.log"
        env = nix_env(
            NIXERY_PKGS_PATH=str(TEST_PACKAGES),
            NIXERY_STORAGE_BACKEND="filesystem",
            STORAGE_PATH=str(workdir / "storage"),
            **environment,
        )
        env.pop("PORT", None)
        name = sections(SOCKET)["Socket"]["FileDescriptorName"][0]
        # As ListenStream=8080: a bare port, every address (an IPv6 socket taking IPv4 too).
        argv = ["systemd-socket-activate", "--listen", str(self.port), f"--fdname={name}"]
        argv += [f"--setenv={key}" for key in env]  # systemd-socket-activate passes only these
        argv += [sys.executable, "-m", "nixeryd", "serve", "--listen", listen]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        self._wait_for_the_socket()

    def _wait_for_the_socket(self) -> None:
        deadline = time.monotonic() + 30
        while "Listening on" not in self.log():
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, f"no socket after 30 s:\n{self.log()}"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 120) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


@pytest.fixture
def notifications() -> Iterator[Notifications]:
    listener = Notifications()
    yield listener
    listener.close()


def _send_request(port: int) -> socket.socket:
    """A connection with a whole request on it, its answer not read."""
    client = socket.create_connection(("127.0.0.1", port), timeout=60)
    client.sendall(b"GET /v2/ HTTP/1.1\r\nHost: registry\r\nConnection: close\r\n\r\n")
    return client


def _read_answer(client: socket.socket) -> bytes:
    chunks = []
    while chunk := client.recv(65536):
        chunks.append(chunk)
    client.close()
    return b"".join(chunks)


def test_ready_comes_once_the_socket_serves_then_the_watchdog_then_stopping(
    tmp_path: Path, notifications: Notifications
) -> None:
    daemon = Activated(
        tmp_path / "activated",
        listen_endpoint(),
        NOTIFY_SOCKET=notifications.address,
        WATCHDOG_USEC="1000000",
    )
    try:
        # The first connection starts the daemon; it waits in the socket's queue meanwhile.
        first = _send_request(daemon.port)
        answer = _read_answer(first)
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer
        # Answered only after READY=1 was sent: READY is already here.
        ready = next(message for message in notifications.queued() if "READY" in message)
        # Sent once the listener listened: its status names the port the socket has.
        assert ready["STATUS"].startswith("serving on ")
        assert ready["STATUS"].endswith(f":{daemon.port}")
        statuses = [message.get("STATUS", "") for message in notifications.received]
        ready_at = notifications.received.index(ready)
        assert "starting: storage backend" in statuses[:ready_at]
        assert any(status.startswith("starting: listener") for status in statuses[:ready_at])
        # A client right after READY is answered at once.
        started = time.monotonic()
        assert daemon.get("/v2/", timeout=5)[0] == 200
        assert time.monotonic() - started < 2
        # WATCHDOG=1 every half WATCHDOG_USEC, from the reactor.
        pings_before = sum("WATCHDOG" in message for message in notifications.queued())
        time.sleep(2.2)
        pings = sum("WATCHDOG" in message for message in notifications.queued()) - pings_before
        assert 3 <= pings <= 6, notifications.received
        daemon.process.send_signal(signal.SIGTERM)
        stopping = notifications.wait_for("STOPPING", timeout=15)
        assert stopping["STOPPING"] == "1"
        assert stopping["STATUS"].startswith("stopping: ")
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.stop()


def test_the_socket_can_be_adopted_by_index_too(tmp_path: Path) -> None:
    daemon = Activated(tmp_path / "by-index", "systemd:domain=INET6:index=0")
    try:
        assert _read_answer(_send_request(daemon.port)).startswith(b"HTTP/1.1 200 OK")
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("listen", "said"),
    [
        (
            "systemd:domain=INET6:name=elsewhere",
            "systemd passed no such socket (sockets passed: nixeryd)",
        ),
        (
            "systemd:domain=INET:name=nixeryd",
            "systemd passed an AF_INET6 socket; write domain=INET6",
        ),
    ],
    ids=["another-name", "another-family"],
)
def test_a_socket_systemd_did_not_pass_is_a_configuration_error(
    tmp_path: Path, listen: str, said: str
) -> None:
    daemon = Activated(tmp_path / "misnamed", listen)
    with contextlib.suppress(OSError):  # the daemon exits with the connection unanswered
        _read_answer(_send_request(daemon.port))
    assert daemon.process.wait(timeout=60) == 2
    assert said in daemon.log()


def _naming(text: str) -> dict[int, str]:
    """Every process whose command line has ``text`` in it."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            command = command_line(int(entry.name))
            if text in command:
                found[int(entry.name)] = command
    return found


def test_sigterm_during_a_build_answers_it_and_leaves_no_nix_builder_or_root(
    tmp_path: Path, notifications: Notifications
) -> None:
    tmp, gc_roots = tmp_path / "tmp", tmp_path / "gcroots"
    tmp.mkdir()
    daemon = Activated(
        tmp_path / "stopping",
        listen_endpoint(),
        NOTIFY_SOCKET=notifications.address,
        NIX_TIMEOUT="60",
        TMPDIR=str(tmp),  # where the roots are without NIXERYD_GC_ROOTS
        NIXERYD_GC_ROOTS=str(gc_roots),
    )
    answered: list[Any] = []

    def pull_slow() -> None:
        try:
            answered.append(daemon.get("/v2/slow/manifests/latest"))
        except (OSError, http.client.HTTPException) as error:  # a reset: what must not happen
            answered.append((error, b""))

    pull = threading.Thread(target=pull_slow)
    pull.start()
    notifications.wait_for("READY")
    processes = Descendants(daemon.process.pid)
    left: dict[int, str] = {}
    roots: list[Path] = []
    try:
        processes.wait_for("sleep", timeout=20)  # the builder of slow runs
        realise = processes.wait_for("nix-store", timeout=5)
        drv = next((word for word in realise.split() if re.search(r"-slow-.*\.drv$", word)), "")
        assert drv, realise
        roots = [path for path in (tmp / "nixeryd-gcroots", gc_roots) if path.exists()]
        assert any(list(path.iterdir()) for path in roots), "the build registered no root"
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=30) == 0, daemon.log()
        pull.join(timeout=30)
        left = {**processes.left_after(), **_naming(drv)}
    finally:
        processes.stop()
        if daemon.process.poll() is None:
            daemon.stop()
        kill(left)
    assert left == {}, f"the stopped daemon left Nix or its builders running: {left}"
    assert [list(path.iterdir()) for path in roots] == [[] for _ in roots]
    status, body = answered[0]
    assert status == 503, f"the request in flight got {status!r}, not a registry error"
    assert json.loads(body)["errors"][0] == {
        "code": "UNAVAILABLE",
        "message": "nixeryd is shutting down; try again",
    }
    stopping = notifications.wait_for("STOPPING")
    assert stopping["STATUS"].startswith("stopping: 1 requests in flight")
