"""The storage contract: where layer blobs, manifests and cache records live.

Storage backends are plugins (see :mod:`nixeryd.hookspecs`). The builder and
the HTTP layer use only the :class:`Storage` protocol below, so a backend can
keep blobs on a local disk, in S3 or in GCS.

Blobs are content-addressed (``sha256:<hex>``) and immutable. Records are
small named documents (``builds/<key>``, ``manifests/<key>``) that may be
overwritten. A backend must never make a partially written blob visible under
its digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Protocol

from twisted.internet.defer import Deferred
from twisted.web.resource import IResource


@dataclass(frozen=True)
class BlobInfo:
    """What is known of a stored blob without reading it."""

    digest: str
    size: int
    media_type: str


class StagedBlob(Protocol):
    """A blob being written: a file object for a worker thread, then committed under its digest.

    ``file`` is written from a worker thread. ``commit`` is called on the
    reactor thread once the digest is known; ``discard`` when writing failed.
    """

    file: IO[bytes]

    def commit(self, digest: str, media_type: str) -> Deferred[BlobInfo]: ...

    def discard(self) -> None: ...


class Storage(Protocol):
    """A storage backend."""

    def stage_blob(self) -> StagedBlob:
        """Open a new staged blob to be written by a worker thread."""
        ...

    def put_blob(self, data: bytes, media_type: str) -> Deferred[BlobInfo]:
        """Store a small blob (a manifest or config) held in memory."""
        ...

    def stat_blob(self, digest: str) -> Deferred[BlobInfo | None]:
        """Describe a blob, or None if storage does not have it."""
        ...

    def read_blob(self, digest: str) -> Deferred[bytes | None]:
        """Read a small blob (a manifest) whole, or None if absent."""
        ...

    def blob_resource(self, info: BlobInfo) -> IResource:
        """A resource that answers GET/HEAD for the blob (bytes, Range, or a redirect)."""
        ...

    def get_record(self, name: str) -> Deferred[bytes | None]:
        """Read a record such as ``builds/<key>``, or None if absent."""
        ...

    def put_record(self, name: str, data: bytes) -> Deferred[None]:
        """Write a record atomically (readers see the old or the new version, never a part)."""
        ...
