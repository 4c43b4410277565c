"""Storage on a local directory (Nixery's ``STORAGE_PATH``).

Layout under the root directory::

    blobs/sha256/<hex>       a blob, named by its digest
    blobs/sha256/<hex>.json  its sidecar: {"mediaType": ..., "size": ...}
    records/<name>           a record such as records/builds/<key>
    tmp/                     files being written
    quarantine/<hex>         blobs found damaged, kept for the operator to look at

Media types live in a JSON sidecar rather than in extended attributes, which
tmpfs and some container filesystems refuse.

Never the wrong bytes. A blob's size comes from its sidecar (written when the
blob was committed), not from the file, and a blob is served under its digest
only once its file has been hashed in this process (or written by it): on
the first GET after start (a large layer costs one sequential read, in a
worker thread, shared by concurrent requests), again whenever the file's
size, modification time or inode changed since (one ``stat`` per GET), and on
every :meth:`read_blob` (small blobs: hashing them is cheap). The size
served must also be the recorded one. A blob that does not match (truncated,
a flipped byte) is moved to ``quarantine/`` with a log line naming it (the
operator removes what is there), and is then simply absent: the
request gets ``BLOB_UNKNOWN``, and the builder writes the layer again on the
next pull (see :mod:`nixeryd.manifeststore`). A commit of a digest whose
stored file was not yet verified here replaces that file, so a rebuild
repairs a damaged blob nobody has asked for yet. Bit rot that leaves the
file's metadata alone is found at the next start.

Crash safety: every file is written under ``tmp/`` (the same filesystem, so a
rename is atomic), flushed and fsync'ed, then ``os.replace``'d to its final
name, and the directory is fsync'ed so the rename itself survives a crash. A
blob's sidecar is installed before the blob, so a visible blob always has its
media type; a sidecar without a blob is an interrupted write and is ignored
(the next commit of that digest overwrites it).

Temp files of dead writers. A writer holds an exclusive ``flock`` on its file
under ``tmp/`` from creating it until it is renamed away or removed; the
kernel releases the lock when the process dies, however it dies. So a file
whose lock can be taken has no writer left, whatever its age, and is removed
at start and every :data:`TEMP_SWEEP_SECONDS` after, safely with other
processes sharing the directory (locks are per open file, so this process's
own writers are safe from its sweep too). On a filesystem without ``flock``
a file is removed once untouched for a day.

Storage faults (a full disk, a read-only remount, a permission denied) are
raised as :class:`nixeryd.errors.StorageFailed` registry errors naming the
cause, never as bare OSErrors.

Digests and record names are validated before they become paths, so no
request can read or write outside the root.

Blocking work (fsync of a freshly written layer can take seconds) goes through
the ``run_in_thread`` constructor argument; a server passes its thread pool
runner (``Runtime.run_in_thread``). Without one it runs inline, which suits
tests and tools.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from stat import S_ISREG
from typing import IO, Any, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import IResource

from nixeryd.blobserving import FileBlobResource
from nixeryd.errors import DigestInvalid, RegistryError, storage_failure
from nixeryd.hookspecs import hookimpl
from nixeryd.runtime import Provider, ThreadRunner
from nixeryd.singleflight import SingleFlight
from nixeryd.storage import (
    Blob,
    BlobAnswer,
    BlobInfo,
    RecordInfo,
    Storage,
    digest_hex,
    record_parts,
)

NAME = "filesystem"

#: Seconds between sweeps of ``tmp/`` for the files of dead writers.
TEMP_SWEEP_SECONDS = 10 * 60

_T = TypeVar("_T")

# Without flock, a staging file untouched for this long has no writer left.
_STALE_TMP_SECONDS = 24 * 60 * 60
# mkstemp creates 0600 files; stored files get the mode a umask of 022 would give.
_FILE_MODE = 0o644
_HASH_CHUNK = 1024 * 1024

_log = Logger()


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


#: A file's size, modification time and inode: what changes when it is rewritten.
_Fingerprint = tuple[int, int, int]


def _fingerprint(stat: os.stat_result) -> _Fingerprint:
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def _file_digest(path: Path) -> tuple[str, int, _Fingerprint]:
    """The sha256 hex and size of the file at ``path``, read once, and its fingerprint."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        fingerprint = _fingerprint(os.fstat(file.fileno()))
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size, fingerprint


class FilesystemStorage:
    """A :class:`nixeryd.storage.Storage` over a local directory.

    ``clock`` (the reactor) runs the periodic sweep of ``tmp/``; without one
    only :meth:`start` sweeps.
    """

    def __init__(
        self, root: Path, *, run_in_thread: ThreadRunner = _run_inline, clock: Any = None
    ) -> None:
        self._blobs = root / "blobs" / "sha256"
        self._records = root / "records"
        self._tmp = root / "tmp"
        self._quarantine = root / "quarantine"
        self._run = run_in_thread
        self._clock = clock
        self._sweeper: LoopingCall | None = None
        #: Hex digest -> the fingerprint of its file when this process hashed it and
        #: found it right, or wrote it itself; a file with another fingerprint is hashed again.
        self._verified: dict[str, _Fingerprint] = {}
        self._verifying: SingleFlight[bool] = SingleFlight()
        try:
            for directory in (self._blobs, self._records, self._tmp):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise storage_failure(error, f"creating the storage directories under {root}") from None

    def start(self) -> Deferred[None]:
        started = self._io(self.remove_dead_temps, "removing temp files of dead writers")
        if self._clock is not None:
            self._sweeper = LoopingCall(self._sweep)
            self._sweeper.clock = self._clock
            self._sweeper.start(TEMP_SWEEP_SECONDS, now=False)
        return started.addCallback(lambda _: None)

    def stop(self) -> Deferred[None]:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        return succeed(None)

    def _sweep(self) -> Deferred[int]:
        def failed(failure: Any) -> int:
            _log.error("sweeping {tmp}: {reason}", tmp=self._tmp, reason=failure.getErrorMessage())
            return 0

        return self._io(self.remove_dead_temps, "removing temp files").addErrback(failed)

    def remove_dead_temps(self) -> int:
        """Remove the files under ``tmp/`` that no live writer holds; how many went."""
        removed = 0
        for entry in os.scandir(self._tmp):
            # Another process sharing the directory may clean up the same file.
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False) and self._writer_is_dead(Path(entry.path)):
                    removed += 1
        if removed:
            _log.info(
                "removed {count} temp files of dead writers from {tmp}",
                count=removed,
                tmp=self._tmp,
            )
        return removed

    def _writer_is_dead(self, path: Path) -> bool:
        """Remove ``path`` if its writer's lock is free (the writer died); True if removed."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live writer holds it
            except OSError:
                # No flock here (some network filesystems): fall back to the file's age.
                if os.fstat(fd).st_mtime > time.time() - _STALE_TMP_SECONDS:
                    return False
            # The name may have been renamed away and reused since it was opened.
            if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                return False
            path.unlink()
            return True
        finally:
            os.close(fd)

    def _io(self, work: Callable[[], _T], doing: str) -> Deferred[_T]:
        """``work`` run through ``run_in_thread``, with OSErrors as StorageFailed."""

        def translated() -> _T:
            try:
                return work()
            except OSError as error:
                raise storage_failure(error, doing) from None

        return self._run(translated)

    # Blobs

    def stage_blob(self) -> FilesystemStagedBlob:
        try:
            fd, path = self._locked_temp()
        except OSError as error:
            raise storage_failure(error, "creating a blob file") from None
        return FilesystemStagedBlob(self, _StagingFile(io.FileIO(fd, "wb")), path)

    def put_blob(self, data: bytes, media_type: str) -> Deferred[BlobInfo]:
        def work() -> BlobInfo:
            hex_digest = hashlib.sha256(data).hexdigest()
            existing = self._blob_info(hex_digest)
            if existing is not None and self._is_verified(hex_digest):
                return existing
            with self._temp_file() as (file, tmp):
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
                return self._install_blob(tmp, hex_digest, media_type)

        return self._io(work, "writing a blob")

    def stat_blob(self, digest: str) -> Deferred[BlobInfo | None]:
        try:
            hex_digest = digest_hex(digest)
        except DigestInvalid:
            return fail()
        return self._io(lambda: self._blob_info(hex_digest), f"reading blob {digest}")

    def read_blob(self, digest: str) -> Deferred[Blob | None]:
        try:
            hex_digest = digest_hex(digest)
        except DigestInvalid:
            return fail()

        def work() -> Blob | None:
            info = self._blob_info(hex_digest)
            if info is None:
                return None
            try:
                with self._blob_path(hex_digest).open("rb") as file:
                    data = file.read()
                    fingerprint = _fingerprint(os.fstat(file.fileno()))
            except FileNotFoundError:
                return None
            if hashlib.sha256(data).hexdigest() != hex_digest or len(data) != info.size:
                self._quarantine_blob(hex_digest, f"{len(data)} bytes that do not hash to it")
                return None
            self._verified[hex_digest] = fingerprint
            return Blob(info, data)

        return self._io(work, f"reading blob {digest}")

    def serve_blob(self, info: BlobInfo) -> BlobAnswer:
        """Serve the blob from disk once verified; DigestInvalid for a malformed ``info.digest``."""
        hex_digest = digest_hex(info.digest)
        path = self._blob_path(hex_digest)
        resource = FileBlobResource(
            lambda: path.open("rb"), info, verify=lambda: self._verify(hex_digest, info.size)
        )
        # IResource(...) is zope's adaptation: it returns the resource itself,
        # typed as the interface.
        return IResource(resource)

    def _verify(self, hex_digest: str, size: int) -> Deferred[bool]:
        """True once the blob's file hashes to its digest; False (and quarantined) if not."""
        try:
            if self._is_verified(hex_digest, size):
                return succeed(True)
        except FileNotFoundError:
            return succeed(False)
        return self._verifying.run(hex_digest, lambda: self._hash_blob(hex_digest, size))

    def _hash_blob(self, hex_digest: str, size: int) -> Deferred[bool]:
        def work() -> bool:
            try:
                actual, actual_size, fingerprint = _file_digest(self._blob_path(hex_digest))
            except FileNotFoundError:
                return False
            if actual != hex_digest or actual_size != size:
                self._quarantine_blob(
                    hex_digest, f"{actual_size} bytes hashing to sha256:{actual}, not {size} bytes"
                )
                return False
            self._verified[hex_digest] = fingerprint
            return True

        return self._io(work, f"verifying blob sha256:{hex_digest}")

    def _quarantine_blob(self, hex_digest: str, found: str) -> None:
        """Take a damaged blob out of service, keeping its bytes for the operator."""
        self._verified.pop(hex_digest, None)
        self._quarantine.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self._blob_path(hex_digest), self._quarantine / hex_digest)
        self._sidecar_path(hex_digest).unlink(missing_ok=True)
        _fsync_dir(self._blobs)
        _log.error(
            "blob sha256:{digest} is damaged ({found}): moved to {quarantine}; "
            "it will be written again when an image needs it",
            digest=hex_digest,
            found=found,
            quarantine=self._quarantine / hex_digest,
        )

    def list_blobs(self) -> Deferred[list[BlobInfo]]:
        def work() -> list[BlobInfo]:
            found = []
            for entry in os.scandir(self._blobs):
                if len(entry.name) != 64 or "." in entry.name:
                    continue
                info = self._blob_info(entry.name)
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    if info is not None:
                        found.append(replace(info, modified=entry.stat().st_mtime))
            return found

        return self._io(work, "listing blobs")

    def delete_blob(self, digest: str) -> Deferred[None]:
        try:
            hex_digest = digest_hex(digest)
        except DigestInvalid:
            return fail()

        def work() -> None:
            # The blob first: a sidecar without its blob is an interrupted write, harmless.
            self._verified.pop(hex_digest, None)
            self._blob_path(hex_digest).unlink(missing_ok=True)
            self._sidecar_path(hex_digest).unlink(missing_ok=True)
            _fsync_dir(self._blobs)

        return self._io(work, f"deleting blob {digest}")

    def _is_verified(self, hex_digest: str, size: int | None = None) -> bool:
        """Whether the blob's file is the one found right here (FileNotFoundError if none)."""
        fingerprint = _fingerprint(self._blob_path(hex_digest).stat())
        if self._verified.get(hex_digest) == fingerprint and size in (None, fingerprint[0]):
            return True
        self._verified.pop(hex_digest, None)
        return False

    def _blob_path(self, hex_digest: str) -> Path:
        return self._blobs / hex_digest

    def _sidecar_path(self, hex_digest: str) -> Path:
        return self._blobs / f"{hex_digest}.json"

    def _blob_info(self, hex_digest: str) -> BlobInfo | None:
        """The stored blob's info, or None unless both the blob and a readable sidecar exist.

        The size is the sidecar's, recorded at commit; a file of another size
        is damaged and quarantined (a sidecar without a size, from an older
        nixeryd, gives the file's). A damaged sidecar counts as absent so
        that the next commit of the digest repairs it.
        """
        try:
            file_size = self._blob_path(hex_digest).stat().st_size
            sidecar = json.loads(self._sidecar_path(hex_digest).read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(sidecar, dict) or not isinstance(sidecar.get("mediaType"), str):
            return None
        size = sidecar.get("size", file_size)
        if not isinstance(size, int) or size != file_size:
            self._quarantine_blob(hex_digest, f"{file_size} bytes where its record says {size}")
            return None
        return BlobInfo(f"sha256:{hex_digest}", size, sidecar["mediaType"])

    def _install_blob(self, tmp: Path, hex_digest: str, media_type: str) -> BlobInfo:
        """Move the complete, fsync'ed ``tmp`` under its digest, after its sidecar.

        If the digest is stored and verified here, the existing blob wins:
        content addressing makes the two equal. An unverified one is
        replaced, as it may be damaged and ``tmp``'s digest was computed
        while it was written. ``tmp`` never outlives this call.
        """
        try:
            existing = self._blob_info(hex_digest)
            if existing is not None and self._is_verified(hex_digest):
                return existing
            size = tmp.stat().st_size
            sidecar = json.dumps({"mediaType": media_type, "size": size}).encode()
            self._write_atomically(self._sidecar_path(hex_digest), sidecar)
            os.replace(tmp, self._blob_path(hex_digest))
            _fsync_dir(self._blobs)
            self._verified[hex_digest] = _fingerprint(self._blob_path(hex_digest).stat())
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

        return self._io(work, f"reading record {name}")

    def put_record(self, name: str, data: bytes) -> Deferred[None]:
        try:
            path = self._record_path(name)
        except ValueError:
            return fail()

        def work() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_atomically(path, data)

        return self._io(work, f"writing record {name}")

    def list_records(self, prefix: str) -> Deferred[list[RecordInfo]]:
        def work() -> list[RecordInfo]:
            found = []
            for path in self._records.rglob("*"):
                name = path.relative_to(self._records).as_posix()
                if not name.startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    stat = path.stat()
                    if S_ISREG(stat.st_mode):
                        found.append(RecordInfo(name, stat.st_mtime))
            return sorted(found, key=lambda record: record.name)

        return self._io(work, "listing records")

    def delete_record(self, name: str) -> Deferred[None]:
        try:
            path = self._record_path(name)
        except ValueError:
            return fail()

        def work() -> None:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
                path.unlink()

        return self._io(work, f"deleting record {name}")

    def _record_path(self, name: str) -> Path:
        return self._records.joinpath(*record_parts(name))

    # Writing

    def _locked_temp(self) -> tuple[int, Path]:
        """A new file under ``tmp/``, open and flock'ed: a sweep leaves it alone until closed."""
        while True:
            fd, name = tempfile.mkstemp(dir=self._tmp)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A sweep may have taken the lock first and removed the name: start again.
                if os.stat(name).st_ino == os.fstat(fd).st_ino:
                    os.fchmod(fd, _FILE_MODE)
                    return fd, Path(name)
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                Path(name).unlink(missing_ok=True)
                raise
            os.close(fd)

    @contextlib.contextmanager
    def _temp_file(self) -> Iterator[tuple[IO[bytes], Path]]:
        """A locked file under ``tmp/``, held open (so locked) until the block ends;
        the block renames it away or it is removed."""
        fd, path = self._locked_temp()
        with os.fdopen(fd, "wb") as file:
            try:
                yield file, path
            finally:
                path.unlink(missing_ok=True)

    def _write_atomically(self, final: Path, data: bytes) -> None:
        """Replace ``final`` with ``data``: readers see the old or the new file, never a part."""
        with self._temp_file() as (file, tmp):
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
            os.replace(tmp, final)
        _fsync_dir(final.parent)


class _StagingFile(io.BufferedWriter):
    """A staged blob's file: a write that fails names the storage fault, so that a full
    disk during a layer write is told apart from an error reading the Nix store."""

    def write(self, data: Any) -> int:
        try:
            return super().write(data)
        except OSError as error:
            raise storage_failure(error, "writing a layer") from None


class FilesystemStagedBlob:
    """A blob being written to a locked file under ``tmp/``; invisible until committed.

    A failed commit discards the file too, and ``discard`` after a commit or
    discard does nothing, so a caller may always discard in its error path.
    The digest given to ``commit`` is trusted: the writer computed it while
    writing, and hashing a large layer again would double the I/O. The file
    stays open (its lock held) until it is installed or removed.
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
                self.file.flush()
                os.fsync(self.file.fileno())
                return self._storage._install_blob(self._path, hex_digest, media_type)
            except RegistryError:
                raise
            except OSError as error:
                raise storage_failure(error, f"writing blob {digest}") from None
            finally:
                # Closing flushes again, and fails again on a full disk: the fd is closed.
                with contextlib.suppress(OSError, RegistryError):
                    self.file.close()
                self._path.unlink(missing_ok=True)

        return self._storage._run(work)

    def discard(self) -> None:
        if self._finished:
            return
        self._finished = True
        # Closing flushes; a full disk must not stop us throwing the data away.
        with contextlib.suppress(OSError, RegistryError):
            self.file.close()
        self._path.unlink(missing_ok=True)


@hookimpl
def nixeryd_storage_backends() -> list[Provider[Storage]]:
    return [
        Provider(
            NAME,
            "blobs and records in a local directory (STORAGE_PATH)",
            lambda runtime: FilesystemStorage(
                Path(runtime.config.storage_path),
                run_in_thread=runtime.run_in_thread,
                clock=runtime.reactor,
            ),
        )
    ]
