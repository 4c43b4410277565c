"""Responses that cannot change, kept in memory and served before routing.

A manifest by digest and a small blob are content-addressed; a manifest by a
tag the builder reports as pinned (every platform built from a commit) is the
same for the same ``Accept`` lines for as long as the daemon runs. A redirect
of a blob GET to a presigned URL is the same until shortly before the URL
expires, and is kept until then (for GET only: the URL is signed for GET,
and the registry answers a HEAD itself). Each is
kept twice over: as headers and body for twisted.web's ``Request``, and as
the bytes of a whole HTTP/1.1 response less its ``Date`` line, which the HTTP
channel writes straight to the socket (:mod:`nixeryd.site`) without building
a ``Request`` at all.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

from twisted.web.http import RESPONSES, datetimeToString
from twisted.web.server import Request

from nixeryd.metrics import Metrics

#: Sent on every response: twisted.web's default banner names its version.
SERVER = b"nixeryd"

#: How many bytes of remembered answers are kept (least recently used go first).
ANSWERS_BYTES = 32 * 1024 * 1024

Headers = list[tuple[bytes, bytes]]
_Key = tuple[bytes, tuple[bytes, ...] | None]


class _Entry:
    __slots__ = ("body", "code", "head", "headers", "until")

    def __init__(
        self, code: int, headers: Headers, body: bytes, head: bytes, until: float | None
    ) -> None:
        self.code = code
        self.headers = headers
        self.body = body
        self.head = head
        self.until = until


class Answers:
    """Remembered responses, keyed by request path and, for tags, the ``Accept`` lines.

    ``common_headers`` are the ones every response of the site carries (the
    API version); they are part of the pre-rendered response, so that it has
    the status, headers and body twisted.web would have sent (names in the
    case given here, ``Date`` added when sent). A request with a ``Range``
    header is never remembered nor answered from here.
    """

    def __init__(
        self, common_headers: Headers, metrics: Metrics, capacity: int = ANSWERS_BYTES
    ) -> None:
        self._metrics = metrics
        self._common = [*common_headers, (b"Server", SERVER)]
        self._capacity = capacity
        self._size = 0
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._date_second = -1
        self._date = b""

    def remember(
        self,
        request: Request,
        headers: Headers,
        body: bytes,
        *,
        by_accept: bool,
        code: int = 200,
        until: float | None = None,
    ) -> None:
        """Answer later requests for ``request``'s path with this response (``code`` 200,
        or a redirect's 303/307) until the wall-clock time ``until`` (None: for good)."""
        if request.requestHeaders.hasHeader(b"range"):
            return
        key = (request.path, _accept(request) if by_accept else None)
        existing = self._entries.get(key)
        if (existing is not None and not _expired(existing)) or len(body) > self._capacity:
            return
        if existing is not None:
            self._forget(key)
        lines = [b"HTTP/1.1 %d %s\r\n" % (code, RESPONSES.get(code, b"OK"))]
        lines.extend(b"%s: %s\r\n" % header for header in headers + self._common)
        self._entries[key] = _Entry(code, headers, body, b"".join(lines), until)
        self._size += len(body)
        while self._size > self._capacity:
            _, evicted = self._entries.popitem(last=False)
            self._size -= len(evicted.body)

    def clear(self) -> None:
        """Forget every answer: a blob they lead to was lost (see RegistryApp._blob_lost)."""
        self._entries.clear()
        self._size = 0

    def _forget(self, key: _Key) -> None:
        self._size -= len(self._entries.pop(key).body)

    def answer(self, request: Request) -> bytes | None:
        """Set the remembered headers on ``request`` and return what to render, or None."""
        if request.method not in (b"GET", b"HEAD") or request.requestHeaders.hasHeader(b"range"):
            return None
        entry = self._lookup(request.path, _accept(request))
        if entry is None or (entry.code != 200 and request.method == b"HEAD"):
            return None
        self._metrics.cache("answers", hit=True)
        request.setResponseCode(entry.code)
        return render(request, entry.headers, entry.body)

    def response(
        self, method: bytes, path: bytes, accept: Sequence[bytes]
    ) -> tuple[bytes, int, int] | None:
        """The whole HTTP/1.1 response to a GET or HEAD of ``path``, its status code and
        the length of its body, or None.

        The caller has checked that the request is a plain GET or HEAD without
        a ``Range`` header; ``accept`` are its ``Accept`` lines as received.
        """
        entry = self._lookup(path, tuple(accept))
        if entry is None or (entry.code != 200 and method == b"HEAD"):
            return None
        self._metrics.cache("answers", hit=True)
        now = int(time.time())
        if now != self._date_second:
            # Formatted once a second rather than per response.
            self._date_second, self._date = now, datetimeToString(now)
        head = entry.head + b"Date: " + self._date + b"\r\n\r\n"
        if method == b"HEAD":
            return head, entry.code, 0
        return head + entry.body, entry.code, len(entry.body)

    def _lookup(self, path: bytes, accept: tuple[bytes, ...]) -> _Entry | None:
        for key in ((path, None), (path, accept)):
            entry = self._entries.get(key)
            if entry is not None:
                if _expired(entry):
                    self._forget(key)
                    return None
                self._entries.move_to_end(key)
                return entry
        return None


def render(request: Request, headers: Headers, body: bytes) -> bytes:
    """Set ``headers`` and return what to render: no body for HEAD, as twisted.web logs
    every HEAD response that carries one (at the cost of formatting the request)."""
    for name, value in headers:
        request.setHeader(name, value)
    return b"" if request.method == b"HEAD" else body


def _expired(entry: _Entry) -> bool:
    return entry.until is not None and time.time() >= entry.until


def _accept(request: Request) -> tuple[bytes, ...]:
    return tuple(request.requestHeaders.getRawHeaders(b"accept", []))
