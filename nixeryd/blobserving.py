"""Serving a blob's bytes over HTTP: single byte ranges, and a fast path into TCP sockets.

Any storage backend whose blobs can be opened as files uses
:class:`FileBlobResource`; a backend that streams from elsewhere (an object
store proxied through nixeryd) uses :func:`requested_range` and
:func:`error_body` for the same Range and error rules. What the registry
sends to a backend's ``serve_blob`` is described in :mod:`nixeryd.storage`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
from collections.abc import Callable
from typing import IO, Any, Protocol

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from nixeryd.errors import (
    BlobUnknown,
    RangeNotSatisfiable,
    RegistryError,
    Unsupported,
    storage_failure,
)
from nixeryd.storage import BlobInfo

_RANGE = re.compile(rb"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)
#: Positions in a Range with more digits than this are past the end of any blob (10^18
#: bytes is an exabyte), and Python refuses to parse more than 4,300 digits.
_MAX_POSITION_DIGITS = 18
_BEYOND_ANY_BLOB: int = 10**_MAX_POSITION_DIGITS

# How much of a blob is read per pull of the HTTP consumer: memory stays bounded (one
# chunk per response in flight: 25 MB for 100 downloads), while each pull, a Python
# round trip through the reactor, moves enough bytes to keep up with a Go server.
_CHUNK_SIZE = 256 * 1024
# How much of a blob a response on a TCP socket reads and sends per writable event: the
# socket usually takes it all, and the buffer is freed before the next event, so memory
# stays at one piece whatever the number of downloads (see _SocketBody).
_SEND_PIECE = 512 * 1024

_log = Logger()


class Request(Protocol):
    """The part of twisted.web's Request that blob serving uses.

    Twisted leaves these methods unannotated, and mypy --strict refuses to
    call unannotated methods; this typed view of the same object lets it check
    the calls instead.
    """

    method: bytes
    requestHeaders: Headers
    sentLength: int

    def getHeader(self, key: bytes) -> bytes | None: ...

    def setHeader(self, name: bytes, value: bytes) -> None: ...

    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...

    def registerProducer(self, producer: object, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def notifyFinish(self) -> Deferred[None]: ...

    def loseConnection(self) -> None: ...


def blob_headers(info: BlobInfo) -> list[tuple[bytes, bytes]]:
    """The headers of a whole blob's 200 answer (GET or HEAD)."""
    return [
        (b"Content-Type", info.media_type.encode()),
        (b"Content-Length", str(info.size).encode()),
        (b"Docker-Content-Digest", info.digest.encode()),
        (b"ETag", f'"{info.digest}"'.encode()),
        (b"Accept-Ranges", b"bytes"),
    ]


class FileBlobResource(Resource):
    """GET and HEAD of one blob held in a file, with single byte ranges.

    ``open_file`` opens the blob for reading (on the reactor thread: a local
    open is fast) and raises FileNotFoundError if it is gone, which is
    answered ``BLOB_UNKNOWN``; another OSError is a storage fault
    (:func:`nixeryd.errors.storage_failure`). The size is the record's
    (``info.size``): a file of another size is damaged and answered
    ``BLOB_UNKNOWN``, never served under the digest. ``verify``, when given,
    runs first (a backend hashing the file once after start) and fires True
    to serve, False to answer ``BLOB_UNKNOWN``.

    Written here rather than on ``twisted.web.static.File`` so nothing of a
    static file server applies: no content-type guessing, no directory
    listing, no multipart ranges. A request with several ranges is answered
    with the whole blob (200), which RFC 9110 allows and every client handles.
    """

    isLeaf = True

    def __init__(
        self,
        open_file: Callable[[], IO[bytes]],
        info: BlobInfo,
        verify: Callable[[], Deferred[bool]] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._open_file = open_file
        self._info = info
        self._verify = verify

    def render(self, request: Request) -> bytes | int:
        refused = refused_method(request)
        if refused is not None:
            return refused
        if self._verify is None:
            return self._render_file(request)
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))

        def verified(good: bool) -> None:
            if finished:
                return  # the client went away meanwhile
            body = self._render_file(request) if good else self._unknown(request)
            if isinstance(body, bytes):
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            if finished:
                return
            error = failure.value
            if not isinstance(error, RegistryError):
                _log.failure("verifying blob {digest}", failure, digest=self._info.digest)
                error = RegistryError("internal error; the registry's log has the details")
            request.write(error_body(request, error))
            request.finish()

        self._verify().addCallbacks(verified, failed)
        return NOT_DONE_YET

    def _unknown(self, request: Request) -> bytes:
        return error_body(request, BlobUnknown(f"blob {self._info.digest} is not stored"))

    def _render_file(self, request: Request) -> bytes | int:
        try:
            file = self._open_file()
        except FileNotFoundError:
            # Removed (garbage-collected, or found damaged) since its info was read.
            return self._unknown(request)
        except OSError as error:
            failure = storage_failure(error, f"reading blob {self._info.digest}")
            _log.error("{message}", message=failure.message)
            return error_body(request, failure)
        size = os.fstat(file.fileno()).st_size
        if size != self._info.size:
            file.close()
            _log.error(
                "blob {digest} is {size} bytes where its record says {recorded}: not served",
                digest=self._info.digest,
                size=size,
                recorded=self._info.size,
            )
            return self._unknown(request)
        etag = f'"{self._info.digest}"'
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"etag", etag.encode())
        request.setHeader(b"docker-content-digest", self._info.digest.encode())
        try:
            byte_range = requested_range(request, size, etag)
        except RangeNotSatisfiable as error:
            file.close()
            request.setHeader(b"content-range", f"bytes */{size}".encode())
            return error_body(request, error)
        request.setHeader(b"content-type", self._info.media_type.encode())
        if byte_range is None:
            offset, length = 0, size
        else:
            offset, end = byte_range
            length = end - offset
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {offset}-{end - 1}/{size}".encode())
        request.setHeader(b"content-length", str(length).encode())
        if request.method == b"HEAD" or length == 0:
            file.close()
            return b""
        transport = _tcp_transport(request)
        if transport is None:
            request.registerProducer(_FileRangeProducer(request, file, offset, length), False)
        else:
            _SocketBody(request, transport, file, offset, length).start()
        return NOT_DONE_YET


def refused_method(request: Request) -> bytes | None:
    """The error to answer a method other than GET and HEAD with, or None for those two.

    The registry routes only GET and HEAD to a blob, but a resource may be
    mounted elsewhere (a plugin's own site, a test).
    """
    if request.method in (b"GET", b"HEAD"):
        return None
    method = request.method.decode(errors="replace")
    request.setHeader(b"allow", b"GET, HEAD")
    return error_body(request, Unsupported(f"{method} of a blob is not supported"))


def error_body(request: Request, error: RegistryError) -> bytes:
    """Set the status and content type of ``error`` on ``request``; its JSON body."""
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(error.as_json()).encode()


def requested_range(request: Request, size: int, etag: str) -> tuple[int, int] | None:
    """The ``[start, end)`` of a single byte range to serve, or None for the whole blob.

    A Range this server does not honour (several ranges, another unit, bad
    syntax, an ``If-Range`` that is not this blob's ETag) is ignored, as RFC
    9110 section 14.2 asks. Raises RangeNotSatisfiable for a range that starts
    past the end, a zero-length suffix, or any range of an empty blob.
    A position of any length is read: one past every blob's end (say 5,000
    digits) is past this one's, so a start there is unsatisfiable (416) and
    an end or suffix there takes the rest of the blob, as RFC 9110 says of
    any position past the end.
    """
    values = request.requestHeaders.getRawHeaders(b"range")
    if values is None or len(values) != 1:
        return None
    if_range = request.getHeader(b"if-range")
    if if_range is not None and if_range.strip() != etag.encode():
        return None
    match = _RANGE.fullmatch(values[0])
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start = _position(first)
        end = _position(last) + 1 if last else size
        if last and end <= start:
            return None  # last-pos < first-pos: not a valid range-spec
        if start >= size:
            at = "far" if start == _BEYOND_ANY_BLOB else f"at {start},"
            raise RangeNotSatisfiable(f"range starts {at} past the blob's {size} bytes")
        return start, min(end, size)
    if not last:
        return None  # "bytes=-"
    suffix = _position(last)
    if suffix == 0 or size == 0:
        raise RangeNotSatisfiable(f"suffix range of {suffix} bytes of a {size}-byte blob")
    return max(size - suffix, 0), size


def _position(digits: bytes) -> int:
    """A Range position; :data:`_BEYOND_ANY_BLOB` for one with more than 18 digits, which
    Python would refuse to parse from 4,300 on."""
    significant = digits.lstrip(b"0")
    if len(significant) > _MAX_POSITION_DIGITS:
        return _BEYOND_ANY_BLOB
    return int(significant or b"0")


@implementer(IPullProducer)
class _FileRangeProducer:
    """Writes ``length`` bytes of ``file`` from ``offset``, one bounded chunk per pull.

    A pull producer: the HTTP channel asks for the next chunk only once the
    previous one is on its way, so memory stays at one chunk per response.
    ``request.write`` may call ``resumeProducing`` re-entrantly, hence the
    checks that the request is still ours.
    """

    def __init__(self, request: Request, file: IO[bytes], offset: int, length: int) -> None:
        self._request: Request | None = request
        self._file = file
        self._remaining = length
        file.seek(offset)
        # A TCP transport sends at most SEND_LIMIT (128 KiB) per reactor turn; let it
        # send a whole chunk, halving the turns (and buffer copies) per byte served.
        transport = getattr(getattr(request, "channel", None), "transport", None)
        if getattr(transport, "SEND_LIMIT", _CHUNK_SIZE) < _CHUNK_SIZE:
            transport.SEND_LIMIT = _CHUNK_SIZE  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        if self._request is None:
            return
        data = self._file.read(min(_CHUNK_SIZE, self._remaining))
        self._remaining -= len(data)
        if data:
            self._request.write(data)
        request = self._request
        if request is None:
            return
        if self._remaining == 0:
            request.unregisterProducer()
            request.finish()
            self.stopProducing()
        elif not data:
            # Shorter than it was a moment ago: blobs are immutable, so the
            # store is damaged. Content-Length promised more; end the
            # connection so the client does not wait for the rest.
            _log.error("blob file ended {missing} bytes early", missing=self._remaining)
            request.unregisterProducer()
            request.loseConnection()
            self.stopProducing()

    def stopProducing(self) -> None:
        self._file.close()
        self._request = None


def _tcp_transport(request: Request) -> Any | None:
    """The request's transport if :class:`_SocketBody` can write its body, else None.

    It can on a plain TCP connection of the POSIX reactors whose write
    buffer this module can see (:func:`_unsent`). Not with TLS: a TLS
    connection's channel transport is a ``TLSMemoryBIOProtocol``, or, after
    ``startTLS``, a TCP connection with ``TLS`` set; the bytes must go
    through the TLS layer. Not on in-memory transports (tests), nor once
    the connection is going away.
    """
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    if not transport.connected or transport.disconnecting or _unsent(transport) is None:
        return None
    return transport


def _unsent(transport: Any) -> int | None:
    """How many bytes ``transport`` holds that the kernel has not taken yet; None if unknown.

    :class:`_SocketBody` writes to the socket behind the transport's back, so
    it must first let the transport send what it holds (the status line and
    headers). Twisted has no public way to ask how much that is: a
    ``FileDescriptor`` keeps it in ``dataBuffer`` (from ``offset`` on) and in
    ``_tempDataBuffer`` (``_tempDataLen`` bytes). This is the one place that
    reads that private state; should a Twisted release rename it, None makes
    :func:`_tcp_transport` fall back to :class:`_FileRangeProducer`.
    """
    try:
        buffered = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except (AttributeError, TypeError):
        return None
    return buffered if isinstance(buffered, int) else None


@implementer(IPushProducer)
class _SocketBody:
    """Sends ``length`` bytes of ``file`` from ``offset`` straight into a TCP socket.

    :class:`_FileRangeProducer` pays for each chunk with a reactor round
    trip: the transport's buffer must empty, the channel asks for more, the
    chunk is read, copied into the buffer and only sent on the next writable
    event, so the socket often waits for Python. Here each writable event
    reads a piece (``os.pread``) and hands it to the socket at once, and the
    reactor's next event comes as soon as the socket has room again.

    Not sendfile(2), though it would spare this process the copy: in the
    speed benchmark (client and server on one host) it left the client
    about twice the work per byte, copying from page-cache pages no CPU
    cache held, and large blobs went at 0.6-0.75x of docker-registry's rate
    where this copy goes at 1.2-1.4x. docker-registry copies too: it reads
    blobs through a buffered reader, which keeps Go from using sendfile.

    The transport is a ``twisted.internet.tcp.Connection``, which the
    reactor calls ``doWrite()`` on whenever its socket is writable. While
    the body is sent, an instance attribute overrides that method with
    :meth:`_do_write`: it first lets the class's ``doWrite`` send what the
    transport holds (the headers), then sends one piece per writable event.
    A piece the socket takes only in part is read again from the part it
    did not take. Once the body is sent (or stopped) the override is
    removed, so the next response on the connection is written the usual
    way.

    A push producer registered with the request: the channel pauses it when
    the transport's buffer is full and stops it when the connection is lost.
    After the body is sent or stopped, every method is a no-op and the file is
    closed.
    """

    def __init__(
        self, request: Request, transport: Any, file: IO[bytes], offset: int, length: int
    ) -> None:
        self._request: Request | None = request
        self._transport = transport
        self._socket: socket.socket = transport.getHandle()
        self._file = file
        self._offset = offset
        self._remaining = length
        self._paused = False
        self._installed = False

    def start(self) -> None:
        """Queue the status line and headers, then send the body as the socket takes it."""
        request = self._request
        assert request is not None
        request.registerProducer(self, True)
        # The channel stops its producer when the connection is lost, unless it has let go
        # of the transport first; the request is told in any case.
        request.notifyFinish().addErrback(lambda _: self._release())
        request.write(b"")  # the first write of a request sends its headers, here nothing else
        if self._request is None:
            return  # the connection was lost meanwhile
        self._transport.doWrite = self._do_write
        self._installed = True
        self._transport.startWriting()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._request is not None:
            self._transport.startWriting()

    def stopProducing(self) -> None:
        """The connection is gone: let go of the transport and the file."""
        self._release()

    def _do_write(self) -> Exception | None:
        """The transport's ``doWrite`` while the body is being sent.

        Returns None, or an exception to lose the connection with (the
        reactor's contract for ``doWrite``).
        """
        transport = self._transport
        request = self._request
        if request is None:
            # Not reached (_release removes this method first); be the usual doWrite.
            why: Exception | None = type(transport).doWrite(transport)
            return why
        if _unsent(transport):
            why = type(transport).doWrite(transport)
            if why is not None or _unsent(transport) or self._request is None:
                return why
            # All sent: doWrite has stopped writing, as it would with no producer.
            transport.startWriting()
        if self._paused:
            transport.stopWriting()
            return None
        try:
            piece = os.pread(self._file.fileno(), min(self._remaining, _SEND_PIECE), self._offset)
        except OSError as error:
            _log.error("reading a blob file failed: {error}", error=error)
            return error
        if not piece:
            self._cut_short(request)
            return None
        try:
            sent = self._socket.send(piece)
        except BlockingIOError:
            return None  # the socket buffer is full: wait for the next writable event
        except OSError as error:
            if error.errno == errno.ENOBUFS:
                return None  # as Twisted's own socket writes treat it
            return error  # the client is gone
        self._offset += sent
        self._remaining -= sent
        request.sentLength += sent  # what the access log reports
        if self._remaining == 0:
            self._finish(request)
        return None

    def _finish(self, request: Request) -> None:
        """All sent: give the connection back to the channel and end the response."""
        transport = self._transport
        self._release()
        if not _unsent(transport) and not transport.disconnecting:
            transport.stopWriting()
        request.unregisterProducer()
        # May start the next request on this connection, and with it another producer.
        request.finish()

    def _cut_short(self, request: Request) -> None:
        """The file ended early.

        Blobs are immutable, so the store is damaged. Content-Length promised
        more; end the connection so the client does not wait for the rest.
        """
        _log.error("blob file ended {missing} bytes early", missing=self._remaining)
        self._release()
        request.unregisterProducer()
        request.loseConnection()

    def _release(self) -> None:
        """Remove the ``doWrite`` override (once) and close the file; later calls do nothing."""
        if self._request is None:
            return
        self._request = None
        if self._installed:
            self._installed = False
            # Only our own override: abortConnection installs one of its own.
            if vars(self._transport).get("doWrite") == self._do_write:
                del self._transport.doWrite
        self._file.close()
