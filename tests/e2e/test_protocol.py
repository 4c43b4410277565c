"""The protocol on real sockets: what only a real connection shows.

Request bodies must be drained so that the next request on a keep-alive
connection is read from the right place; a TLS handshake on the plain HTTP
port is turned away at once so that clients fall back to HTTP without
waiting out a timeout; a large blob, written straight into the socket,
leaves the connection ready for the next response.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import socket
import ssl
import time
import urllib.request
from pathlib import Path

import pytest

from nixeryd.builtin.filesystem import FilesystemStorage
from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.e2e


def exchange(daemon: Daemon, raw: bytes, responses: int) -> list[bytes]:
    """Send ``raw`` on one connection; the status lines of the first ``responses`` answers."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as connection:
        connection.sendall(raw)
        received = b""
        while received.count(b"HTTP/1.1 ") < responses or not received.endswith(b"}"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
    return re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", received)


def test_a_get_with_a_small_body_keeps_the_connection_in_step(daemon: Daemon) -> None:
    body = b"x" * 1000
    raw = (
        b"GET /v2/ HTTP/1.1\r\nHost: r\r\nContent-Length: %d\r\n\r\n%s"
        b"GET /v2/nope/blobs/sha256:%s HTTP/1.1\r\nHost: r\r\n\r\n"
    ) % (len(body), body, b"0" * 64)
    assert exchange(daemon, raw, 2) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found"]


def test_a_get_with_a_large_body_is_refused_from_its_headers(daemon: Daemon) -> None:
    """A pull-only registry has no use for a body: refused before it is read, and the
    connection closed, since the rest of the stream is that body."""
    body = b"x" * 100_000
    raw = b"GET /v2/ HTTP/1.1\r\nHost: r\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert exchange(daemon, raw, 1) == [b"HTTP/1.1 413 Content Too Large"]


def test_a_chunked_body_keeps_the_connection_in_step(daemon: Daemon) -> None:
    raw = (
        b"GET /v2/ HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
        b"GET /v2/Bad/manifests/latest HTTP/1.1\r\nHost: r\r\n\r\n"
    )
    assert exchange(daemon, raw, 2) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"]


def test_a_tls_handshake_is_refused_at_once(daemon: Daemon) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    started = time.monotonic()
    with (
        socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as connection,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(connection, server_hostname="127.0.0.1")
    assert time.monotonic() - started < 5  # clients time out after 10 s


def test_the_access_log_can_be_turned_off(tmp_path: Path) -> None:
    quiet = Daemon(tmp_path / "quiet", NIXERYD_ACCESS_LOG="false")
    try:
        with urllib.request.urlopen(f"{quiet.url}/v2/", timeout=30) as response:
            assert response.status == 200
    finally:
        quiet.stop()
    assert "GET /v2/ HTTP/1.1" not in quiet.log()


def test_the_access_log_is_on_by_default(daemon: Daemon) -> None:
    urllib.request.urlopen(f"{daemon.url}/v2/?probe=access-log", timeout=30).close()
    deadline = time.monotonic() + 10  # the line is written just after the response
    while "GET /v2/?probe=access-log HTTP/1.1" not in daemon.log():
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.05)


def test_remembered_answers_on_one_keep_alive_connection(daemon: Daemon) -> None:
    """Answers the channel writes itself interleave with twisted.web's on one connection,
    each whole and in order, and each gets its access log line."""
    with urllib.request.urlopen(f"{daemon.url}/v2/hello/manifests/latest", timeout=120) as tagged:
        manifest = tagged.read()
        digest = tagged.headers["Docker-Content-Digest"]
    by_digest = f"/v2/hello/manifests/{digest}".encode()
    request = b"GET %s HTTP/1.1\r\nHost: r\r\nUser-Agent: keep-alive-probe\r\n\r\n"
    head = b"HEAD %s HTTP/1.1\r\nHost: r\r\n\r\n" % by_digest
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as connection:
        replies = [
            _one_response(connection, raw, expect_body=not raw.startswith(b"HEAD"))
            for raw in (request % by_digest, request % b"/v2/", request % by_digest, head)
        ]
    assert [reply[0] for reply in replies] == [b"HTTP/1.1 200 OK"] * 4
    assert replies[0][1] == replies[2][1] == manifest
    assert replies[1][1] == b"{}"
    assert replies[3][1] == b""
    line = f'"GET /v2/hello/manifests/{digest} HTTP/1.1" 200 {len(manifest)}'
    deadline = time.monotonic() + 10
    while daemon.log().count(line) < 2:
        assert time.monotonic() < deadline, "an answer from memory was not logged"
        time.sleep(0.05)


def _one_response(
    connection: socket.socket, raw: bytes, *, expect_body: bool
) -> tuple[bytes, bytes]:
    """Send one request; the status line and the body of its response, read by its length."""
    connection.sendall(raw)
    received = b""
    while b"\r\n\r\n" not in received:
        received += connection.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while expect_body and len(body) < length:
        body += connection.recv(65536)
    return head.split(b"\r\n")[0], body


def test_a_large_blob_from_disk_keeps_the_connection_in_step(tmp_path: Path) -> None:
    data = os.urandom(20 * 1024 * 1024 + 17)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    workdir = tmp_path / "large"
    staged = FilesystemStorage(workdir / "storage").stage_blob()
    staged.file.write(data)
    staged.commit(digest, "application/vnd.oci.image.layer.v1.tar+gzip")
    blob_file = (workdir / "storage/blobs/sha256" / digest.removeprefix("sha256:")).resolve()
    path = f"/v2/nope/blobs/{digest}"
    daemon = Daemon(workdir)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
        bodies = []
        for headers in ({}, {"Range": "bytes=1000-2999999"}, {}):
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            bodies.append((response.status, response.read()))
            assert not response.will_close
        connection.close()
        assert bodies == [(200, data), (206, data[1000:3_000_000]), (200, data)]

        # A client that leaves halfway, with a window too small for the daemon to be done.
        with socket.socket() as leaving:
            leaving.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            leaving.settimeout(30)
            leaving.connect(("127.0.0.1", daemon.port))
            leaving.sendall(f"GET {path} HTTP/1.1\r\nHost: r\r\n\r\n".encode())
            received = 0
            while received < 1024 * 1024:
                received += len(leaving.recv(65536))

        with urllib.request.urlopen(daemon.url + path, timeout=30) as response:
            assert response.read() == data
        deadline = time.monotonic() + 10
        while _descriptors_on(daemon.process.pid, blob_file):
            assert time.monotonic() < deadline, "the daemon keeps the blob file open"
            time.sleep(0.05)
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log()


def _descriptors_on(pid: int, path: Path) -> int:
    """How many file descriptors of process ``pid`` are open on ``path``."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed since the listing
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == str(path)
    return count
