"""Storage on a local directory (Nixery's ``STORAGE_PATH``).

Layout under the root directory::

    blobs/sha256/<hex>       a blob, named by its digest
    blobs/sha256/<hex>.json  its sidecar: {"mediaType": ..., "size": ...}
    records/<name>           a record such as records/builds/<key>
    tmp/                     files being written

Media types live in a JSON sidecar rather than in extended attributes, which
tmpfs and some container filesystems refuse.

Crash safety: every file is written under ``tmp/`` (the same filesystem, so a
rename is atomic), flushed and fsync'ed, then ``os.replace``'d to its final
name, and the directory is fsync'ed so the rename itself survives a crash. A
blob's sidecar is installed before the blob, so a visible blob always has its
media type; a sidecar without a blob is an interrupted write and is ignored
(the next commit of that digest overwrites it). Files left in ``tmp/`` by a
crash are removed at startup once they are a day old: a younger file may
still be written by another process sharing the directory, and a writer
touches its file continuously.

Digests and record names are validated before they become paths, so no
request can read or write outside the root.

Blocking work (fsync of a freshly written layer can take seconds) goes through
the ``run_in_thread`` constructor argument; a server passes its thread pool
runner (``Runtime.run_in_thread``). Without one it runs inline, which suits
tests and tools.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.web.resource import IResource

from nixeryd.blobserving import FileBlobResource
from nixeryd.errors import DigestInvalid
from nixeryd.hookspecs import hookimpl
from nixeryd.runtime import Provider, ThreadRunner
from nixeryd.storage import Blob, BlobAnswer, BlobInfo, Storage, digest_hex, record_parts

NAME = "filesystem"

_T = TypeVar("_T")

# A staging file untouched for this long has no writer left (see module docstring).
_STALE_TMP_SECONDS = 24 * 60 * 60
# mkstemp creates 0600 files; stored files get the mode a umask of 022 would give.
_FILE_MODE = 0o644


def _run_inline(work: Callable[[], _T]) -> Deferred[_T]:
    """Run ``work`` now; its result or exception arrives through the Deferred."""
    return maybeDeferred(work)


def _fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemStorage:
    """A :class:`nixeryd.storage.Storage` over a local directory."""

    def __init__(self, root: Path, *, run_in_thread: ThreadRunner = _run_inline) -> None:
        self._blobs = root / "blobs" / "sha256"
        self._records = root / "records"
        self._tmp = root / "tmp"
        self._run = run_in_thread
        for directory in (self._blobs, self._records, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - _STALE_TMP_SECONDS
        for entry in self._tmp.iterdir():
            # Another process sharing the directory may clean up the same file.
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    entry.unlink()

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    # Blobs

    def stage_blob(self) -> FilesystemStagedBlob:
        fd, name = self._mkstemp()
        return FilesystemStagedBlob(self, os.fdopen(fd, "wb"), Path(name))

    def put_blob(self, data: bytes, media_type: str) -> Deferred[BlobInfo]:
        def work() -> BlobInfo:
            hex_digest = hashlib.sha256(data).hexdigest()
            existing = self._blob_info(hex_digest)
            if existing is not None:
                return existing
            return self._install_blob(self._write_temp(data), hex_digest, media_type)

        return self._run(work)

    def stat_blob(self, digest: str) -> Deferred[BlobInfo | None]:
        try:
            hex_digest = digest_hex(digest)
        except DigestInvalid:
            return fail()
        return self._run(lambda: self._blob_info(hex_digest))

    def read_blob(self, digest: str) -> Deferred[Blob | None]:
        try:
            hex_digest = digest_hex(digest)
        except DigestInvalid:
            return fail()

        def work() -> Blob | None:
            info = self._blob_info(hex_digest)
            try:
                data = self._blob_path(hex_digest).read_bytes() if info is not None else None
            except FileNotFoundError:
                data = None
            if info is None or data is None:
                return None
            return Blob(BlobInfo(info.digest, len(data), info.media_type), data)

        return self._run(work)

    def serve_blob(self, info: BlobInfo) -> BlobAnswer:
        """Serve the blob from disk; raises DigestInvalid for a malformed ``info.digest``."""
        path = self._blob_path(digest_hex(info.digest))
        # IResource(...) is zope's adaptation: it returns the resource itself,
        # typed as the interface.
        return IResource(FileBlobResource(lambda: path.open("rb"), info))

    def list_blobs(self) -> Deferred[list[BlobInfo]]:
        def work() -> list[BlobInfo]:
            infos = (
                self._blob_info(entry.name)
                for entry in os.scandir(self._blobs)
                if len(entry.name) == 64 and "." not in entry.name
            )
            return [info for info in infos if info is not None]

        return self._run(work)

    def delete_blob(self, digest: str) -> Deferred[None]:
        try:
            hex_digest = digest_hex(digest)
        except DigestInvalid:
            return fail()

        def work() -> None:
            # The blob first: a sidecar without its blob is an interrupted write, harmless.
            self._blob_path(hex_digest).unlink(missing_ok=True)
            self._sidecar_path(hex_digest).unlink(missing_ok=True)
            _fsync_dir(self._blobs)

        return self._run(work)

    def _blob_path(self, hex_digest: str) -> Path:
        return self._blobs / hex_digest

    def _sidecar_path(self, hex_digest: str) -> Path:
        return self._blobs / f"{hex_digest}.json"

    def _blob_info(self, hex_digest: str) -> BlobInfo | None:
        """The stored blob's info, or None unless both the blob and a readable sidecar exist.

        The size comes from the blob file itself; the sidecar is trusted only
        for the media type. A damaged sidecar counts as absent so that the
        next commit of the digest repairs it.
        """
        try:
            size = self._blob_path(hex_digest).stat().st_size
            sidecar = json.loads(self._sidecar_path(hex_digest).read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        media_type = sidecar.get("mediaType") if isinstance(sidecar, dict) else None
        if not isinstance(media_type, str):
            return None
        return BlobInfo(digest=f"sha256:{hex_digest}", size=size, media_type=media_type)

    def _install_blob(self, tmp: Path, hex_digest: str, media_type: str) -> BlobInfo:
        """Move the complete, fsync'ed ``tmp`` under its digest, after its sidecar.

        If the digest is already stored the existing blob wins: content
        addressing makes the two equal. ``tmp`` never outlives this call.
        """
        try:
            existing = self._blob_info(hex_digest)
            if existing is not None:
                return existing
            size = tmp.stat().st_size
            sidecar = json.dumps({"mediaType": media_type, "size": size}).encode()
            self._write_atomically(self._sidecar_path(hex_digest), sidecar)
            os.replace(tmp, self._blob_path(hex_digest))
            _fsync_dir(self._blobs)
            return BlobInfo(digest=f"sha256:{hex_digest}", size=size, media_type=media_type)
        finally:
            tmp.unlink(missing_ok=True)

    # Records

    def get_record(self, name: str) -> Deferred[bytes | None]:
        try:
            path = self._record_path(name)
        except ValueError:
            return fail()

        def work() -> bytes | None:
            try:
                return path.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                # A missing record, or a name that is a prefix of other records.
                return None

        return self._run(work)

    def put_record(self, name: str, data: bytes) -> Deferred[None]:
        try:
            path = self._record_path(name)
        except ValueError:
            return fail()

        def work() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_atomically(path, data)

        return self._run(work)

    def list_records(self, prefix: str) -> Deferred[list[str]]:
        def work() -> list[str]:
            names = (
                path.relative_to(self._records).as_posix()
                for path in self._records.rglob("*")
                if path.is_file()
            )
            return sorted(name for name in names if name.startswith(prefix))

        return self._run(work)

    def delete_record(self, name: str) -> Deferred[None]:
        try:
            path = self._record_path(name)
        except ValueError:
            return fail()

        def work() -> None:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
                path.unlink()

        return self._run(work)

    def _record_path(self, name: str) -> Path:
        return self._records.joinpath(*record_parts(name))

    # Writing

    def _mkstemp(self) -> tuple[int, str]:
        fd, name = tempfile.mkstemp(dir=self._tmp)
        os.fchmod(fd, _FILE_MODE)
        return fd, name

    def _write_temp(self, data: bytes) -> Path:
        """Write ``data`` to a new fsync'ed file under ``tmp/`` and return its path."""
        fd, name = self._mkstemp()
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            os.unlink(name)
            raise
        return Path(name)

    def _write_atomically(self, final: Path, data: bytes) -> None:
        """Replace ``final`` with ``data``: readers see the old or the new file, never a part."""
        tmp = self._write_temp(data)
        try:
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)


class FilesystemStagedBlob:
    """A blob being written to a file under ``tmp/``; invisible until committed.

    A failed commit discards the file too, and ``discard`` after a commit or
    discard does nothing, so a caller may always discard in its error path.
    The digest given to ``commit`` is trusted: the writer computed it while
    writing, and hashing a large layer again would double the I/O.
    """

    file: IO[bytes]

    def __init__(self, storage: FilesystemStorage, file: IO[bytes], path: Path) -> None:
        self.file = file
        self._storage = storage
        self._path = path
        self._finished = False

    def commit(self, digest: str, media_type: str) -> Deferred[BlobInfo]:
        if self._finished:
            return fail(ValueError("staged blob already committed or discarded"))
        try:
            hex_digest = digest_hex(digest)
        except DigestInvalid:
            self.discard()
            return fail()
        self._finished = True

        def work() -> BlobInfo:
            try:
                try:
                    self.file.flush()
                    os.fsync(self.file.fileno())
                finally:
                    self.file.close()
            except BaseException:
                self._path.unlink(missing_ok=True)
                raise
            return self._storage._install_blob(self._path, hex_digest, media_type)

        return self._storage._run(work)

    def discard(self) -> None:
        if self._finished:
            return
        self._finished = True
        # Closing flushes; a full disk must not stop us throwing the data away.
        with contextlib.suppress(OSError):
            self.file.close()
        self._path.unlink(missing_ok=True)


@hookimpl
def nixeryd_storage_backends() -> list[Provider[Storage]]:
    return [
        Provider(
            NAME,
            "blobs and records in a local directory (STORAGE_PATH)",
            lambda runtime: FilesystemStorage(
                Path(runtime.config.storage_path), run_in_thread=runtime.run_in_thread
            ),
        )
    ]
