"""A nixeryd plugin: the ``memory`` storage backend, blobs and records in a dict.

Everything is lost when the process stops, so it suits tests, demos and
trying a package set out, and it is the smallest complete storage backend:
the example to copy. It uses only :mod:`nixeryd.plugin`.

What it shows:

- a :class:`~nixeryd.plugin.Provider` with a :class:`~nixeryd.plugin.Setting`
  (``max_size``, from ``[plugin.memory]`` or ``$NIXERYD_MEMORY_MAX_SIZE``),
  resolved by nixeryd into ``runtime.settings``;
- threads: the dicts are touched on the reactor thread only; hashing, the
  one slow step, goes through ``runtime.run_in_thread`` and only reads the
  bytes it is given;
- validation: digests and record names come from requests and are checked
  with :func:`~nixeryd.plugin.digest_hex` and :func:`~nixeryd.plugin.record_parts`;
- serving from somewhere that is not a file: a resource that honours a
  single byte Range with :func:`~nixeryd.plugin.requested_range` and answers
  errors with :func:`~nixeryd.plugin.error_body`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import IO

from twisted.internet.defer import Deferred, fail, succeed
from twisted.web.resource import IResource, Resource

from nixeryd.plugin import (
    Blob,
    BlobAnswer,
    BlobInfo,
    BlobRequest,
    BlobUnknown,
    DigestInvalid,
    Provider,
    RangeNotSatisfiable,
    RecordInfo,
    Runtime,
    Setting,
    Storage,
    ThreadRunner,
    digest_hex,
    error_body,
    hookimpl,
    record_parts,
    refused_method,
    requested_range,
)

NAME = "memory"

_SIZE = re.compile(r"(\d+)\s*(?:([KMG])i?)?B?", re.IGNORECASE)
_SIZE_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``512M``, ``2GiB`` or ``1048576``; ValueError otherwise."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError("must be a size in bytes, such as 1048576, 512M or 2G")
    unit = match.group(2)
    return int(match.group(1)) * (_SIZE_UNITS[unit.upper()] if unit else 1)


SETTINGS = (
    Setting(
        "max_size",
        "most bytes of blobs and records kept in memory (0: no limit)",
        env=("NIXERYD_MEMORY_MAX_SIZE",),
        parse=parse_size,
        default=0,
    ),
)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class _Stored:
    info: BlobInfo
    data: bytes
    modified: float


class MemoryStorage:
    """A :class:`~nixeryd.plugin.Storage` in this process's memory.

    ``run_in_thread`` hashes blobs (a server passes ``runtime.run_in_thread``;
    a test may pass ``maybeDeferred`` to hash inline). ``max_size`` bounds
    what is kept: a write past it fails with ``ENOSPC``, as a full disk
    fails the filesystem backend, and the image being built fails with it.
    ``clock`` gives the times listings report (a test may move it).
    """

    def __init__(
        self,
        *,
        run_in_thread: ThreadRunner,
        max_size: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._run = run_in_thread
        self._max_size = max_size
        self._clock = clock
        self._blobs: dict[str, _Stored] = {}
        #: Record name -> its bytes and when they were written.
        self._records: dict[str, tuple[bytes, float]] = {}
        self._size = 0

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    # Blobs

    def stage_blob(self) -> MemoryStagedBlob:
        return MemoryStagedBlob(self)

    def put_blob(self, data: bytes, media_type: str) -> Deferred[BlobInfo]:
        hashed = self._run(lambda: _sha256_hex(data))
        return hashed.addCallback(lambda hex_digest: self._install(hex_digest, data, media_type))

    def stat_blob(self, digest: str) -> Deferred[BlobInfo | None]:
        try:
            stored = self._blobs.get(digest_hex(digest))
        except DigestInvalid:
            return fail()
        return succeed(stored.info if stored is not None else None)

    def read_blob(self, digest: str) -> Deferred[Blob | None]:
        try:
            stored = self._blobs.get(digest_hex(digest))
        except DigestInvalid:
            return fail()
        return succeed(Blob(stored.info, stored.data) if stored is not None else None)

    def serve_blob(self, info: BlobInfo) -> BlobAnswer:
        hex_digest = digest_hex(info.digest)
        # The blob is looked up when the request is rendered: ``info`` may come from
        # a cache, and the blob may have been deleted since.
        return IResource(_MemoryBlobResource(lambda: self._blobs.get(hex_digest), info))

    def list_blobs(self) -> Deferred[list[BlobInfo]]:
        return succeed(
            [replace(stored.info, modified=stored.modified) for stored in self._blobs.values()]
        )

    def delete_blob(self, digest: str) -> Deferred[None]:
        try:
            stored = self._blobs.pop(digest_hex(digest), None)
        except DigestInvalid:
            return fail()
        if stored is not None:
            self._size -= len(stored.data)
        return succeed(None)

    def _install(self, hex_digest: str, data: bytes, media_type: str) -> BlobInfo:
        """Keep ``data`` under its digest, on the reactor thread; the first writer wins."""
        existing = self._blobs.get(hex_digest)
        if existing is not None:
            return existing.info
        self._reserve(len(data))
        info = BlobInfo(f"sha256:{hex_digest}", len(data), media_type)
        self._blobs[hex_digest] = _Stored(info, data, self._clock())
        return info

    def _reserve(self, size: int) -> None:
        if self._max_size and self._size + size > self._max_size:
            raise OSError(
                errno.ENOSPC,
                f"memory storage is full: {self._size} of {self._max_size} bytes used, "
                f"{size} more asked for (raise max_size in [plugin.{NAME}])",
            )
        self._size += size

    # Records

    def get_record(self, name: str) -> Deferred[bytes | None]:
        try:
            record_parts(name)
        except ValueError:
            return fail()
        stored = self._records.get(name)
        return succeed(stored[0] if stored is not None else None)

    def put_record(self, name: str, data: bytes) -> Deferred[None]:
        try:
            record_parts(name)
            old, _ = self._records.get(name, (b"", 0.0))
            self._reserve(len(data) - len(old))
        except (ValueError, OSError):
            return fail()
        self._records[name] = (data, self._clock())
        return succeed(None)

    def list_records(self, prefix: str) -> Deferred[list[RecordInfo]]:
        return succeed(
            [
                RecordInfo(name, modified)
                for name, (_, modified) in sorted(self._records.items())
                if name.startswith(prefix)
            ]
        )

    def delete_record(self, name: str) -> Deferred[None]:
        try:
            record_parts(name)
        except ValueError:
            return fail()
        self._size -= len(self._records.pop(name, (b"", 0.0))[0])
        return succeed(None)


class MemoryStagedBlob:
    """A blob a worker thread writes into a buffer; kept under its digest on commit.

    The contract asks a staged blob not to hold the whole blob in memory;
    for a backend whose blobs live in memory anyway, holding it is the point.
    The digest given to ``commit`` is checked (hashing memory is cheap, and a
    wrong digest would serve the wrong bytes for good).
    """

    file: IO[bytes]

    def __init__(self, storage: MemoryStorage) -> None:
        self.file = self._buffer = io.BytesIO()
        self._storage = storage
        self._finished = False

    def commit(self, digest: str, media_type: str) -> Deferred[BlobInfo]:
        if self._finished:
            return fail(ValueError("staged blob already committed or discarded"))
        try:
            expected = digest_hex(digest)
        except DigestInvalid:
            self.discard()
            return fail()
        self._finished = True
        data = self._buffer.getvalue()
        self._buffer.close()

        def install(hex_digest: str) -> BlobInfo:
            if hex_digest != expected:
                raise DigestInvalid(f"staged blob is sha256:{hex_digest}, not {digest}")
            return self._storage._install(hex_digest, data, media_type)

        return self._storage._run(lambda: _sha256_hex(data)).addCallback(install)

    def discard(self) -> None:
        if not self._finished:
            self._finished = True
            self._buffer.close()


class _MemoryBlobResource(Resource):
    """GET and HEAD of one blob held in memory, with a single byte Range."""

    isLeaf = True

    def __init__(self, lookup: Callable[[], _Stored | None], info: BlobInfo) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._lookup = lookup
        self._info = info

    def render(self, request: BlobRequest) -> bytes:
        refused = refused_method(request)
        if refused is not None:
            return refused
        stored = self._lookup()
        if stored is None:
            return error_body(request, BlobUnknown(f"blob {self._info.digest} is not stored"))
        data = stored.data
        etag = f'"{self._info.digest}"'
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"etag", etag.encode())
        request.setHeader(b"docker-content-digest", self._info.digest.encode())
        try:
            byte_range = requested_range(request, len(data), etag)
        except RangeNotSatisfiable as error:
            request.setHeader(b"content-range", f"bytes */{len(data)}".encode())
            return error_body(request, error)
        request.setHeader(b"content-type", self._info.media_type.encode())
        start, end = byte_range or (0, len(data))
        if byte_range is not None:
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {start}-{end - 1}/{len(data)}".encode())
        request.setHeader(b"content-length", str(end - start).encode())
        # twisted.web keeps the Content-Length above for a HEAD answered with no body.
        return b"" if request.method == b"HEAD" else data[start:end]


def _create(runtime: Runtime) -> Storage:
    return MemoryStorage(run_in_thread=runtime.run_in_thread, max_size=runtime.settings["max_size"])


@hookimpl
def nixeryd_storage_backends() -> list[Provider[Storage]]:
    return [
        Provider(
            NAME, "blobs and records in memory, lost at exit (tests, demos)", _create, SETTINGS
        )
    ]
