"""The HTTP server around the registry routes: what every connection gets before routing.

Clients told to skip TLS verification for a registry (``--tls-verify=false``,
Docker's insecure registries) still try HTTPS first and fall back to plain
HTTP only when the TLS handshake fails. A plain HTTP server that waits for a
request line in a TLS ClientHello makes each of them wait out its handshake
timeout (10 s for podman, skopeo and Docker) on every pull. Go's HTTP server
answers such a probe at once; so does this one: a connection whose first byte
is a TLS handshake record gets a 400 and is closed, and the client falls back
immediately.

Answers that cannot change (:mod:`nixeryd.answers`) are written by the
channel itself: a GET or HEAD that arrives whole on an idle keep-alive
connection and asks for nothing that needs twisted.web (no body, no range,
no ``Connection`` change) is looked up by path and ``Accept`` lines and
answered with pre-rendered bytes. Building a twisted.web ``Request``,
parsing its headers into ``Headers`` and rendering the response was three
fifths of a cached answer's cost (about 30 of 50 us here). Every other
request takes the usual way, and both ways give the same bytes, so
behaviour does not depend on which path answered.

A pull-only registry on an untrusted network bounds what a connection may
cost before any request is routed, and answers every refusal from the
headers, with a registry error and ``Connection: close``:

* a request must arrive whole (request line, headers and any body) within
  :data:`REQUEST_READ_DEADLINE` seconds of its first byte; trickling bytes
  does not extend it (408). An idle keep-alive connection is closed after
  :data:`IDLE_TIMEOUT` seconds;
* a request line and headers of more than ``totalHeadersSize`` bytes, any
  one line longer than that, or more than ``maxHeaders`` headers: 431;
* a body announced on a method other than GET and HEAD: 405, before a byte
  of it is read (nothing here accepts an upload); a GET or HEAD body (which
  means nothing to a registry) over :data:`MAX_BODY_SIZE` bytes, by its
  ``Content-Length`` or as chunks arrive: 413.
"""

from __future__ import annotations

import json
import re
from time import perf_counter
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.base import DelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from nixeryd.accesslog import AccessLog
from nixeryd.answers import SERVER, Answers
from nixeryd.auth import Gate, Identity
from nixeryd.errors import RegistryError, Unsupported
from nixeryd.metrics import Metrics, route_of

#: The content type of a TLS handshake record (RFC 8446, section 5.1).
_TLS_HANDSHAKE_RECORD = 0x16

_TLS_ON_PLAIN_HTTP = (
    b"HTTP/1.0 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"Client sent an HTTPS request to an HTTP server: this registry speaks plain HTTP "
    b"here; configure it as an insecure registry.\n"
)


#: Seconds from a request's first byte until it must be whole, headers and body: Go's
#: clients send a pull's request in one packet, and a slow link still sends a few KiB in
#: well under this. A deadline rather than an idle timeout, which each byte would reset.
REQUEST_READ_DEADLINE = 10.0
#: Seconds an idle keep-alive connection stays open (clients reopen at no cost).
IDLE_TIMEOUT = 60
#: The largest request body accepted, on GET and HEAD only; a registry's pull needs none.
MAX_BODY_SIZE = 4096


class RequestTimeout(RegistryError):
    code = "UNSUPPORTED"
    status = 408


class HeadersTooLarge(RegistryError):
    code = "UNSUPPORTED"
    status = 431


class BodyTooLarge(RegistryError):
    code = "SIZE_INVALID"
    status = 413


_REASONS = {
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
}


def refusal(error: RegistryError, *extra: tuple[bytes, bytes]) -> bytes:
    """The whole response refusing a request before it is routed; the connection closes."""
    body = json.dumps(error.as_json()).encode()
    head = [
        b"HTTP/1.1 %d %s" % (error.status, _REASONS[error.status]),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
        b"Server: " + SERVER,
        b"Docker-Distribution-API-Version: registry/2.0",
        *(name + b": " + value for name, value in extra),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


#: Request headers that need twisted.web's handling: a body, a range, a change of
#: connection or protocol. A request carrying any of them is never answered from memory.
_NEEDS_TWISTED = frozenset(
    (
        b"content-length",
        b"transfer-encoding",
        b"range",
        b"if-range",
        b"connection",
        b"expect",
        b"upgrade",
    )
)

#: A header name (RFC 9110's token) and a request target (printable ASCII), as twisted.web
#: accepts them: a request that breaks either is left to twisted.web's 400.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")


class RegistryChannel(HTTPChannel):
    """An HTTP/1.1 channel that turns away TLS handshakes at once and writes remembered
    answers itself."""

    site: RegistrySite
    _first_data = True
    _refused = False
    #: Fires when the request being read is not whole in time; None between requests.
    _read_deadline: DelayedCall | None = None
    #: Bytes of a chunked body read so far (its length is not known from the headers).
    _chunked_bytes = 0

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._first_data and data:
            self._first_data = False
            if data[0] == _TLS_HANDSHAKE_RECORD:
                transport: Any = self.transport
                transport.write(_TLS_ON_PLAIN_HTTP)
                transport.loseConnection()
                self.site.metrics.refused(400)
                return
        if self._idle() and self._answer_from_memory(data):
            self.resetTimeout()
            return
        if data:
            self._start_deadline()
        super().dataReceived(data)

    def _start_deadline(self) -> None:
        """Start the clock on the request being read, unless it is running or a request is
        being answered (bytes that arrive meanwhile wait in a buffer)."""
        if self._read_deadline is None and not self._handlingRequest:
            self._read_deadline = self.callLater(REQUEST_READ_DEADLINE, self._too_slow)

    def requestDone(self, request: HTTPRequest) -> None:
        super().requestDone(request)
        if self.persistent and self._buffer:
            # Part of a pipelined request that arrived with the one just answered.
            self._start_deadline()

    def _too_slow(self) -> None:
        self._read_deadline = None
        self._refuse(
            RequestTimeout(
                f"the request was not whole {REQUEST_READ_DEADLINE:g} s after its first byte"
            )
        )

    def _refuse(self, error: RegistryError, *extra: tuple[bytes, bytes]) -> None:
        """Answer ``error`` and close, reading nothing more of this connection.

        Only while a request is being read: the requests before it have all
        been answered (twisted.web reads the next one only then), so this
        answer is in order.
        """
        self._refused = True
        self._cancel_deadline()
        transport: Any = self.transport
        transport.write(refusal(error, *extra))
        transport.loseConnection()
        self.site.metrics.refused(error.status)

    def _cancel_deadline(self) -> None:
        if self._read_deadline is not None:
            if self._read_deadline.active():
                self._read_deadline.cancel()
            self._read_deadline = None

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse(self._too_large())
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(self._too_large())

    def _too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(
            f"the request line and headers exceed {self.totalHeadersSize} bytes "
            f"or {self.maxHeaders} headers"
        )

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self._refuse(self._too_large())
            return False
        accepted: bool = super().headerReceived(line)
        return accepted

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        """Refuse a body from its headers: twisted.web would read and spool it first."""
        announced = header == b"Transfer-Encoding" or (
            header == b"Content-Length" and data.strip(b"0") != b""
        )
        if announced and self._command not in (b"GET", b"HEAD"):
            method = self._command.decode("latin-1")
            self._refuse(
                Unsupported(
                    "nixeryd builds images on demand from Nix packages: it serves pulls "
                    f"only ({method} with a body is not supported)"
                ),
                (b"Allow", b"GET, HEAD"),
            )
            return False
        if header == b"Content-Length" and data.isdigit() and self._body_too_large(len(data), data):
            return False
        self._chunked_bytes = 0
        accepted: bool = super()._maybeChooseTransferDecoder(header, data)
        return accepted

    def _body_too_large(self, digits: int, length: bytes) -> bool:
        """True (and refused) for a Content-Length over MAX_BODY_SIZE; the digit count is
        checked first, as Python refuses to parse over 4,300 digits."""
        if digits <= 20 and int(length) <= MAX_BODY_SIZE:
            return False
        self._refuse(BodyTooLarge(f"a request body may be at most {MAX_BODY_SIZE} bytes"))
        return True

    def rawDataReceived(self, data: bytes) -> None:
        if not self._handlingRequest and self.length is None:  # a chunked body
            self._chunked_bytes += len(data)
            if self._chunked_bytes > MAX_BODY_SIZE + 1024:  # the chunks' framing besides
                self._refuse(BodyTooLarge(f"a request body may be at most {MAX_BODY_SIZE} bytes"))
                return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def _idle(self) -> bool:
        """True between requests: nothing in progress, buffered or half-parsed.

        Only then may a response be written without going through the channel,
        which would otherwise answer pipelined requests out of order. The
        request-line state is HTTPChannel's private attribute; if a Twisted
        release renames it, this is False and every request takes the usual way.
        """
        return (
            not self.requests
            and not self._handlingRequest
            and not self._waitingForTransport
            and bool(self.persistent)
            and bool(self.line_mode)
            and not self._buffer
            and getattr(self, "_HTTPChannel__first_line", None) == 1
        )

    def _answer_from_memory(self, data: bytes) -> bool:
        """Write the remembered response to ``data`` if it is one whole, plain GET or HEAD."""
        started = perf_counter()
        end = data.find(b"\r\n\r\n")
        if end < 0 or end + 4 != len(data) or end > self.totalHeadersSize:
            return False
        head = data[:end]
        lines = head.split(b"\r\n")
        if len(lines) > self.maxHeaders + 1:
            return False
        # CR, LF and NUL only as line ends: anything else twisted.web refuses with a 400.
        if len(head.translate(None, b"\x00\r\n")) != len(head) - 2 * (len(lines) - 1):
            return False
        request_line = lines[0].split(b" ")
        if len(request_line) != 3 or request_line[2] != b"HTTP/1.1":
            return False
        method, uri, _ = request_line
        if (method != b"GET" and method != b"HEAD") or _TARGET.fullmatch(uri) is None:
            return False
        accept: list[bytes] = []
        headers: dict[bytes, bytes] = {}
        authorizations = 0
        authorization = b""
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or _TOKEN.fullmatch(name) is None:
                return False  # folded, malformed or padded: twisted.web refuses it
            name = name.lower()
            if name in _NEEDS_TWISTED:
                return False
            value = value.strip(b" \t")
            if name == b"accept":
                accept.append(value)
            elif name == b"authorization":
                authorizations += 1
                authorization = value
            else:
                headers.setdefault(name, value)
        path = uri.partition(b"?")[0]
        gate = self.site.gate
        if gate is not None and (
            authorizations > 1
            or not gate.permits_remembered(path, authorization if authorizations else None)
        ):
            return False  # twisted.web's way, where the gate verifies the credentials
        answer = self.site.answers.response(method, path, accept)
        if answer is None:
            return False
        response, code, body_length = answer
        transport: Any = self.transport
        transport.write(response)
        user = None
        if authorizations and gate is not None and self.site.access_log is not None:
            user = gate.subject_of(authorization)
        self.site.answered(
            self,
            started,
            method,
            uri,
            path,
            code,
            body_length,
            headers.get(b"user-agent"),
            headers.get(b"referer"),
            user,
        )
        return True


class RegistryRequest(Request):
    """twisted.web's request, knowing when its first line arrived: for its latency."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = perf_counter()


class RegistrySite(Site):
    """The site serving the registry resource; a client never sees a traceback.

    ``answers`` are the remembered responses its channels write themselves,
    each only once ``gate`` (the authentication policy) has said yes. Every
    answered request, whichever way it went, is counted in ``metrics`` and
    written to ``access_log`` (None: no access log). The access log's line
    costs a cached answer about a tenth of its rate (``benchmarks/accesslog``);
    through twisted.web's own writer it cost two thirds.
    """

    protocol = RegistryChannel  # type: ignore[assignment]
    requestFactory = RegistryRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        answers: Answers,
        metrics: Metrics,
        *,
        access_log: AccessLog | None = None,
        gate: Gate | None = None,
    ) -> None:
        super().__init__(resource, timeout=IDLE_TIMEOUT)
        self.answers = answers
        self.metrics = metrics
        self.access_log = access_log
        #: The authentication policy (:mod:`nixeryd.auth`), asked before a remembered
        #: answer is written; None: no authentication.
        self.gate = gate

    def log(self, request: HTTPRequest) -> None:
        """twisted.web's hook, called as each routed request finishes."""
        identity: Identity | None = getattr(request, "identity", None)
        self.answered(
            request.channel,
            request.started if isinstance(request, RegistryRequest) else perf_counter(),
            request.method,
            request.uri,
            request.path,
            request.code,
            request.sentLength,
            request.getHeader(b"user-agent"),
            request.getHeader(b"referer"),
            None if identity is None else identity.subject,
            request.clientproto,
        )

    def answered(
        self,
        channel: HTTPChannel,
        started: float,
        method: bytes,
        target: bytes,
        path: bytes,
        code: int,
        sent: int,
        user_agent: bytes | None,
        referer: bytes | None,
        user: str | None,
        protocol: bytes = b"HTTP/1.1",
    ) -> None:
        """Count a request answered, in memory or routed, and log it."""
        seconds = perf_counter() - started
        self.metrics.request(route_of(path), method, code, seconds)
        if self.access_log is None:
            return
        peer = channel.getPeer()
        self.access_log.request(
            remote=peer.host if isinstance(peer, IPv4Address | IPv6Address) else "-",
            method=method,
            target=target,
            protocol=protocol,
            status=code,
            sent=sent,
            seconds=seconds,
            user_agent=user_agent,
            referer=referer,
            user=user,
        )

    def stopFactory(self) -> None:
        if self.access_log is not None:
            self.access_log.flush()
        super().stopFactory()
