"""The storage contract: where blobs and the records that name them live.

Storage backends are plugins (see :mod:`nixeryd.hookspecs`). The builder and
the HTTP layer use only the :class:`Storage` protocol below, so a backend can
keep blobs on a local disk, in S3 or in GCS. :mod:`nixeryd.testing.conformance`
is this contract as tests: every backend, built-in or a site's, runs it.

Blobs are content-addressed (``sha256:<hex>``) and immutable: once a digest
is visible its bytes never change, so what is known of a blob (its
:class:`BlobInfo`) may be cached for as long as the blob is kept. A backend
must never make a partially written blob visible under its digest, and two
writers of the same digest (two threads, two processes, two hosts on one
bucket) must both succeed, leaving one blob.

Never the wrong bytes. A blob's size and digest come from what was recorded
when it was committed, never from what is found later: a backend must not
answer a GET under a digest with bytes that do not hash to it. The filesystem
backend, whose files an operator or a failing disk can change, hashes a file
before serving it (once per file per process, see
:mod:`nixeryd.builtin.filesystem`) and takes a damaged one away, so that it is
then absent. The object stores cannot hash on serve (a redirect sends the
client to the store), and are trusted to keep what they were given: their
writes are create-only and whole (an object appears only once its upload
completed; S3 checks each request's signed payload hash), and an object cannot
be changed in place. A
blob found absent while it is served (a 404 ``BLOB_UNKNOWN`` from
``serve_blob``'s resource, or ``read_blob`` answering None for a blob just
described) makes the registry forget the images naming it, which are then
built again at the next pull (:mod:`nixeryd.manifeststore`).

Faults. A backend raises a :class:`nixeryd.errors.RegistryError` for storage
that fails (a 5xx naming the cause: the filesystem's
:class:`nixeryd.errors.StorageFailed`, S3's and GCS's 502), never a bare
OSError, which would be answered as an internal error with a traceback.

Records are small named documents that may be overwritten; a reader sees an
old or a new version, never a part. Names are ``/``-separated segments of
``[A-Za-z0-9._-]``. Every stored blob is reachable from a record, which is
what garbage collection walks:

``builds/<key>.<compression>``
    a layer's descriptor (JSON: digest, size, diff_id), for layer blobs;
``manifests/<key>``
    ``{form: digest}`` of one platform's manifests; each manifest names its
    config and layer blobs;
``indexes/<key>``
    ``{form: digest}`` of the image indexes over several platforms.

Times. Listings say when each blob and record was last written
(:attr:`BlobInfo.modified`, :attr:`RecordInfo.modified`: seconds since the
epoch, by the storage's clock), so that garbage collection (:mod:`nixeryd.gc`)
can spare what a build in progress has just written. Writing a record again
refreshes its time; committing a blob that is already stored need not.

Who serves which request. The registry answers a blob's HEAD itself, from
:meth:`Storage.stat_blob` (RFC 9110 defines Range for GET only, and a
presigned URL is signed for one method). It answers a GET of a blob of at
most :data:`SMALL_BLOB_SIZE` bytes without a Range header from
:meth:`Storage.read_blob` and remembers the answer in memory. Every other
GET goes to :meth:`Storage.serve_blob`, which says either "redirect the
client to this URL" (:class:`Redirect`) or "here is a resource that writes
the bytes", honouring a single byte Range as :mod:`nixeryd.blobserving`
does.

Threads. Every method of :class:`Storage` and :class:`StagedBlob` is called
on the reactor thread and must not block it: blocking work goes through
``Runtime.run_in_thread``, network work through ``Runtime.http`` (treq).
Deferreds fire on the reactor thread. The one exception is
``StagedBlob.file``, which a worker thread writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import IO, Protocol, TypeAlias

from twisted.internet.defer import Deferred
from twisted.web.resource import IResource

from nixeryd.errors import DigestInvalid

#: Blobs up to this size are read whole and answered from memory by the registry;
#: :meth:`Storage.serve_blob` sees only larger ones (or any GET with a Range).
SMALL_BLOB_SIZE = 64 * 1024

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_RECORD_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def digest_hex(digest: str) -> str:
    """The hex part of a ``sha256:<64 lowercase hex>`` digest; DigestInvalid otherwise."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise DigestInvalid(f"invalid digest {digest!r}: expected sha256:<64 lowercase hex>")
    return match.group(1)


def record_parts(name: str) -> list[str]:
    """The segments of a record name; ValueError unless every segment is safe as a
    file name or key part (no ``.``, ``..``, empty segment or other character)."""
    parts = name.split("/")
    for part in parts:
        if _RECORD_SEGMENT.fullmatch(part) is None or part in (".", ".."):
            raise ValueError(f"invalid record name {name!r}")
    return parts


@dataclass(frozen=True)
class BlobInfo:
    """What is known of a stored blob without reading it."""

    digest: str
    size: int
    media_type: str
    #: When the blob was written (seconds since the epoch): set by :meth:`Storage.list_blobs`,
    #: None elsewhere. Not part of a blob's identity, so it takes no part in comparisons.
    modified: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RecordInfo:
    """A record's name and when it was last written (seconds since the epoch)."""

    name: str
    modified: float


@dataclass(frozen=True)
class Blob:
    """A small blob read whole, with its info: one round trip rather than stat then read."""

    info: BlobInfo
    data: bytes


@dataclass(frozen=True)
class Redirect:
    """Send the client to ``url`` for the bytes: a presigned object-store URL.

    ``status`` is 307 (the distribution registry's answer) or 303 (Nixery's).
    The registry adds ``Location`` and ``Docker-Content-Digest``. Until the
    wall-clock time ``until`` (well before the URL expires: a client may
    start its download a while after it got the redirect) the registry may
    answer later GETs of the blob with the same redirect from memory; None:
    ask ``serve_blob`` every time.
    """

    url: str
    status: int = 307
    until: float | None = None


#: What :meth:`Storage.serve_blob` answers: a redirect, or a resource writing the bytes.
BlobAnswer: TypeAlias = Redirect | IResource


class StagedBlob(Protocol):
    """A blob being written: a file object for a worker thread, then committed under its digest.

    ``file`` is written from a worker thread; it may be a real file or an
    object that uploads as it is written, but it must not hold the whole blob
    in memory. ``commit`` is called on the reactor thread once the digest is
    known (the writer computed it while writing; a backend may verify it);
    ``discard`` when writing failed. ``discard`` after a commit or a discard
    does nothing, so a caller may always discard in its error path.
    """

    file: IO[bytes]

    def commit(self, digest: str, media_type: str) -> Deferred[BlobInfo]: ...

    def discard(self) -> None: ...


class Storage(Protocol):
    """A storage backend. Digests and record names come from requests: a backend
    validates them (:func:`digest_hex`, :func:`record_parts`) and refuses anything
    that could name a file or key outside its own."""

    def start(self) -> Deferred[None]:
        """Get ready to serve (check the bucket, load credentials); a failure stops start-up."""
        ...

    def stop(self) -> Deferred[None]:
        """Finish or abandon work in flight and let go of connections, at shutdown."""
        ...

    def stage_blob(self) -> StagedBlob:
        """Open a new staged blob. Called in the worker thread that then writes it,
        so it may block (create a file) and must not touch the reactor."""
        ...

    def put_blob(self, data: bytes, media_type: str) -> Deferred[BlobInfo]:
        """Store a small blob (a manifest, index or config) held in memory."""
        ...

    def stat_blob(self, digest: str) -> Deferred[BlobInfo | None]:
        """Describe a blob, or None if storage does not have it."""
        ...

    def read_blob(self, digest: str) -> Deferred[Blob | None]:
        """Read a small blob (a manifest, a config) whole with its info, or None if absent."""
        ...

    def serve_blob(self, info: BlobInfo) -> BlobAnswer:
        """How to answer a GET of a stored blob: a :class:`Redirect` or a resource.

        Called without a round trip to storage having confirmed the blob
        still exists (``info`` may come from a cache), so a resource answers
        ``BLOB_UNKNOWN`` if it is gone. Raises DigestInvalid for a malformed
        digest.
        """
        ...

    def list_blobs(self) -> Deferred[list[BlobInfo]]:
        """Every stored blob with its ``modified`` time, in no particular order (for
        garbage collection)."""
        ...

    def delete_blob(self, digest: str) -> Deferred[None]:
        """Remove a blob; removing one that is absent is not an error."""
        ...

    def get_record(self, name: str) -> Deferred[bytes | None]:
        """Read a record such as ``builds/<key>``, or None if absent."""
        ...

    def put_record(self, name: str, data: bytes) -> Deferred[None]:
        """Write a record atomically (readers see the old or the new version, never a part)."""
        ...

    def list_records(self, prefix: str) -> Deferred[list[RecordInfo]]:
        """The records under ``prefix`` (``"builds/"``; ``""`` for all), sorted by name,
        each with when it was last written."""
        ...

    def delete_record(self, name: str) -> Deferred[None]:
        """Remove a record; removing one that is absent is not an error."""
        ...
