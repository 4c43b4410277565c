"""The HTTP server around the registry routes: what every connection gets before routing.

Clients told to skip TLS verification for a registry (``--tls-verify=false``,
Docker's insecure registries) still try HTTPS first and fall back to plain
HTTP only when the TLS handshake fails. A plain HTTP server that waits for a
request line in a TLS ClientHello makes each of them wait out its handshake
timeout (10 s for podman, skopeo and Docker) on every pull. Go's HTTP server
answers such a probe at once; so does this one: a connection whose first byte
is a TLS handshake record gets a 400 and is closed, and the client falls back
immediately.
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import IResource
from twisted.web.server import Site

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


class RegistryChannel(HTTPChannel):
    """An HTTP/1.1 channel that turns away TLS handshakes at once."""

    _first_data = True

    def dataReceived(self, data: bytes) -> None:
        if self._first_data and data:
            self._first_data = False
            if data[0] == _TLS_HANDSHAKE_RECORD:
                transport: Any = self.transport
                transport.write(_TLS_ON_PLAIN_HTTP)
                transport.loseConnection()
                return
        super().dataReceived(data)


class RegistrySite(Site):
    """The site serving the registry resource; a client never sees a traceback.

    Without an access log, a cached answer costs half as much: formatting and
    writing the line through the log system is as much work as the rest of the
    request.
    """

    protocol = RegistryChannel  # type: ignore[assignment]
    displayTracebacks = False

    def __init__(self, resource: IResource, *, access_log: bool = True) -> None:
        super().__init__(resource)
        self._access_log = access_log

    def log(self, request: HTTPRequest) -> None:
        if self._access_log:
            super().log(request)
