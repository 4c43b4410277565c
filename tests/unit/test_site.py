"""The HTTP channel: remembered answers written without twisted.web's Request, the same
bytes either way, and every request it cannot answer whole left to twisted.web."""

from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from nixeryd.accesslog import AccessLog
from nixeryd.site import REQUEST_READ_DEADLINE, RegistryChannel, RegistryRequest, RegistrySite
from nixeryd.testing.harness import FakeNix, Harness, RegistryFactory, building


class Server:
    """A RegistrySite over a harness's registry, spoken to one connection at a time."""

    def __init__(self, registry: Harness, *, access_log: str | None = None) -> None:
        self.log = io.StringIO()
        self.access_log = None if access_log is None else AccessLog(self.log, access_log, Clock())
        self.metrics = registry.registry.metrics
        self.site = RegistrySite(
            registry.registry.resource(),
            registry.registry.answers,
            self.metrics,
            access_log=self.access_log,
        )
        self.site.startFactory()
        self.requests = 0
        self.site.requestFactory = self._counting  # type: ignore[assignment]

    def _counting(self, *args: Any) -> RegistryRequest:
        self.requests += 1
        return RegistryRequest(*args)

    def logged(self) -> list[str]:
        """The access log's lines so far."""
        assert self.access_log is not None
        self.access_log.flush()
        return self.log.getvalue().splitlines()

    def connect(self) -> tuple[RegistryChannel, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.7", 5555))
        assert isinstance(channel, RegistryChannel)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.7", 5555))
        channel.makeConnection(transport)
        return channel, transport

    def exchange(self, *pieces: bytes) -> bytes:
        channel, transport = self.connect()
        for piece in pieces:
            channel.dataReceived(piece)
        response = transport.value()
        channel.connectionLost(None)  # type: ignore[arg-type]
        return response


def parse(response: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Status line, headers (lower-cased names, Date left out) and body of one response."""
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b": ")
        if name.lower() != b"date":
            headers[name.lower()] = value
    return status, headers, body


@pytest.fixture
def served(registry_with: RegistryFactory, nix: FakeNix) -> tuple[Harness, list[str]]:
    """A registry that has served a manifest by digest and its config blob once, so both
    are remembered; and their paths."""
    registry = registry_with(*building(nix))
    _, body = registry.get("/v2/hello/manifests/latest")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    paths = [
        f"/v2/hello/manifests/{digest}",
        f"/v2/hello/blobs/{json.loads(body)['config']['digest']}",
    ]
    for path in paths:
        assert registry.get(path)[0].code == 200
    return registry, paths


def get(path: str, *headers: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}", "Host: registry", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_remembered_answer_is_written_without_a_request_and_as_twisted_web_would(
    served: tuple[Harness, list[str]], method: str
) -> None:
    registry, paths = served
    server = Server(registry)
    for path in paths:
        raw = get(path, "User-Agent: test", method=method)
        fast = server.exchange(raw)
        assert server.requests == 0
        # The same request in two pieces is not whole when it arrives: twisted.web answers.
        usual = server.exchange(raw[:10], raw[10:])
        assert server.requests == 1
        server.requests = 0
        assert parse(fast) == parse(usual)
        status, headers, body = parse(fast)
        assert status == b"HTTP/1.1 200 OK"
        assert headers[b"server"] == b"nixeryd"
        assert headers[b"docker-distribution-api-version"] == b"registry/2.0"
        assert len(body) == (0 if method == "HEAD" else int(headers[b"content-length"]))
        assert b"Date: " in fast


@pytest.mark.parametrize(
    "headers, version",
    [
        (["Range: bytes=0-1"], "HTTP/1.1"),
        (["Connection: close"], "HTTP/1.1"),
        (["Content-Length: 0"], "HTTP/1.1"),
        (["Transfer-Encoding: chunked"], "HTTP/1.1"),
        (["Expect: 100-continue"], "HTTP/1.1"),
        (["X-Folded: a", " b"], "HTTP/1.1"),
        (["Bad : padded"], "HTTP/1.1"),
        (["no colon"], "HTTP/1.1"),
        (["Bad/Name: x"], "HTTP/1.1"),
        (["X-Nul: a\x00b"], "HTTP/1.1"),
        (["X-Bare-LF: a\nContent-Length: 5"], "HTTP/1.1"),
        (["X-Bare-CR: a\rb"], "HTTP/1.1"),
        ([], "HTTP/1.0"),
    ],
)
def test_requests_that_need_twisted_web_are_left_to_it(
    served: tuple[Harness, list[str]], headers: list[str], version: str
) -> None:
    registry, paths = served
    server = Server(registry)
    raw = get(paths[0], *headers, version=version)
    if "Transfer-Encoding: chunked" in headers:
        raw += b"0\r\n\r\n"
    server.exchange(raw)
    assert server.requests == 1


def test_a_target_twisted_web_refuses_is_left_to_it(served: tuple[Harness, list[str]]) -> None:
    registry, paths = served
    server = Server(registry)
    response = server.exchange(get(paths[0] + "?\x01"))
    assert server.requests == 1
    assert parse(response)[0] == b"HTTP/1.1 400 Bad Request"


def test_methods_other_than_get_and_head_and_unknown_paths_are_left_to_twisted_web(
    served: tuple[Harness, list[str]],
) -> None:
    registry, paths = served
    server = Server(registry)
    assert parse(server.exchange(get(paths[0], method="DELETE")))[0].startswith(b"HTTP/1.1 405")
    unknown = get("/v2/hello/manifests/sha256:" + "0" * 64)
    assert parse(server.exchange(unknown))[0] == b"HTTP/1.1 404 Not Found"
    assert server.requests == 2


def test_pipelined_requests_are_answered_in_order(served: tuple[Harness, list[str]]) -> None:
    registry, paths = served
    server = Server(registry)
    unknown = "/v2/hello/blobs/sha256:" + "1" * 64
    response = server.exchange(get(paths[0]) + get(unknown) + get(paths[1]))
    statuses = re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", response)
    assert statuses == [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 200 OK"]


def test_keep_alive_requests_after_a_usual_one_are_answered_from_memory(
    served: tuple[Harness, list[str]],
) -> None:
    registry, paths = served
    server = Server(registry)
    channel, transport = server.connect()
    channel.dataReceived(get("/v2/"))
    channel.dataReceived(get(paths[0]))
    channel.dataReceived(get(paths[1]))
    assert server.requests == 1
    assert transport.value().count(b"HTTP/1.1 200 OK") == 3
    assert not transport.disconnecting


def test_tls_handshake_is_turned_away(served: tuple[Harness, list[str]]) -> None:
    registry, _ = served
    channel, transport = Server(registry).connect()
    channel.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert transport.value().startswith(b"HTTP/1.0 400 Bad Request")
    assert transport.disconnecting
    assert registry.registry.metrics.registry.get_sample_value(
        "nixeryd_http_refused_total", {"code": "400"}
    )


def test_the_access_log_has_the_same_line_either_way(served: tuple[Harness, list[str]]) -> None:
    registry, paths = served
    server = Server(registry, access_log="text")
    raw = get(paths[0], "User-Agent: docker/20.10", "Referer: http://x/")
    server.exchange(raw)
    server.exchange(raw[:10], raw[10:])
    fast, usual = server.logged()
    # The same but for the milliseconds taken, at the end.
    assert fast.rpartition(" ")[0] == usual.rpartition(" ")[0]
    assert re.fullmatch(r"\S+ \[access\] \"10\.0\.0\.7\" - - \[[^]]+\] .* \d+\.\d{3}ms", fast)
    assert f'"GET {paths[0]} HTTP/1.1" 200 ' in fast
    assert fast.rpartition(" ")[0].endswith('"http://x/" "docker/20.10"')


def test_no_access_log_line_when_it_is_off(served: tuple[Harness, list[str]]) -> None:
    registry, paths = served
    server = Server(registry)
    server.exchange(get(paths[0]))
    server.exchange(get("/v2/"))
    assert server.log.getvalue() == ""


def refused(response: bytes) -> tuple[bytes, str]:
    """The status line and error code of a refusal; it closes the connection."""
    status, headers, body = parse(response)
    assert headers[b"connection"] == b"close"
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body)
    return status, json.loads(body)["errors"][0]["code"]


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
@pytest.mark.parametrize("length", ["Content-Length: 107374182400", "Transfer-Encoding: chunked"])
def test_a_body_on_a_push_method_is_refused_from_the_headers(
    served: tuple[Harness, list[str]], method: str, length: str
) -> None:
    registry, _ = served
    server = Server(registry)
    channel, transport = server.connect()
    channel.dataReceived(get("/v2/hello/blobs/uploads/", length, method=method))
    assert refused(transport.value()) == (b"HTTP/1.1 405 Method Not Allowed", "UNSUPPORTED")
    assert parse(transport.value())[1][b"allow"] == b"GET, HEAD"
    assert transport.disconnecting
    assert server.requests == 1  # the one twisted.web made for the request line, never run


@pytest.mark.parametrize("length", ["107374182400", "9" * 5000, "4097"])
def test_a_large_get_body_is_refused_from_its_length(
    served: tuple[Harness, list[str]], length: str
) -> None:
    registry, _ = served
    channel, transport = Server(registry).connect()
    channel.dataReceived(get("/v2/", f"Content-Length: {length}"))
    assert refused(transport.value()) == (b"HTTP/1.1 413 Content Too Large", "SIZE_INVALID")
    assert transport.disconnecting
    assert registry.registry.metrics.registry.get_sample_value(
        "nixeryd_http_refused_total", {"code": "413"}
    )


def test_a_large_chunked_get_body_is_refused_as_it_arrives(
    served: tuple[Harness, list[str]],
) -> None:
    registry, _ = served
    channel, transport = Server(registry).connect()
    channel.dataReceived(get("/v2/", "Transfer-Encoding: chunked"))
    for _ in range(10):
        channel.dataReceived(b"400\r\n" + b"x" * 1024 + b"\r\n")
    assert refused(transport.value()) == (b"HTTP/1.1 413 Content Too Large", "SIZE_INVALID")


def test_a_small_get_body_is_read_and_answered(served: tuple[Harness, list[str]]) -> None:
    registry, _ = served
    response = Server(registry).exchange(get("/v2/", "Content-Length: 5") + b"hello")
    assert parse(response)[0] == b"HTTP/1.1 200 OK"


@pytest.mark.parametrize(
    "headers",
    [["X-Huge: " + "h" * 70_000], ["X-Big: " + "b" * 9000, "X-Big2: " + "b" * 9000]],
)
def test_headers_over_the_limit_are_431(
    served: tuple[Harness, list[str]], headers: list[str]
) -> None:
    registry, _ = served
    response = Server(registry).exchange(get("/v2/", *headers))
    assert refused(response) == (b"HTTP/1.1 431 Request Header Fields Too Large", "UNSUPPORTED")


def test_too_many_headers_are_431(served: tuple[Harness, list[str]]) -> None:
    registry, _ = served
    many = [f"X-{n}: v" for n in range(600)]
    response = Server(registry).exchange(get("/v2/", *many))
    assert refused(response)[0] == b"HTTP/1.1 431 Request Header Fields Too Large"


def test_a_trickled_request_is_cut_off_at_the_deadline(
    served: tuple[Harness, list[str]],
) -> None:
    registry, _ = served
    clock = Clock()
    channel, transport = Server(registry).connect()
    channel.callLater = clock.callLater  # type: ignore[method-assign]
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\n")
    for _ in range(int(REQUEST_READ_DEADLINE) - 1):
        clock.advance(1)
        channel.dataReceived(b"X-Trickle: a\r\n")  # every byte would reset an idle timeout
    assert transport.value() == b""
    clock.advance(1)
    assert refused(transport.value()) == (b"HTTP/1.1 408 Request Timeout", "UNSUPPORTED")
    assert transport.disconnecting


def test_the_deadline_is_per_request_and_not_for_idle_keep_alive(
    served: tuple[Harness, list[str]],
) -> None:
    registry, _ = served
    clock = Clock()
    channel, transport = Server(registry).connect()
    channel.callLater = clock.callLater  # type: ignore[method-assign]
    channel.dataReceived(get("/v2/", "Connection: keep-alive"))
    clock.advance(REQUEST_READ_DEADLINE * 2)
    channel.dataReceived(get("/v2/", "Connection: keep-alive"))
    assert transport.value().count(b"HTTP/1.1 200 OK") == 2
    assert not transport.disconnecting


def test_the_deadline_covers_a_pipelined_request_left_incomplete(
    served: tuple[Harness, list[str]],
) -> None:
    registry, _ = served
    clock = Clock()
    channel, transport = Server(registry).connect()
    channel.callLater = clock.callLater  # type: ignore[method-assign]
    channel.dataReceived(get("/v2/") + b"GET /v2/ HTTP/1.1\nHost: a\n")  # bare LFs: never whole
    assert transport.value().count(b"HTTP/1.1 200 OK") == 1
    clock.advance(REQUEST_READ_DEADLINE)
    assert refused(transport.value().split(b"}", 1)[1])[0] == b"HTTP/1.1 408 Request Timeout"
