"""FilesystemStorage: round trips, crash safety, name validation and blob serving over HTTP.

Blob serving is tested in memory (StubTreq, where the body goes through
_FileRangeProducer) and on real TCP sockets (where _SocketBody writes it into the socket).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.http import Request as HTTPRequest
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from zope.interface import provider

from nixeryd.answers import Answers
from nixeryd.blobserving import _CHUNK_SIZE, _SEND_PIECE, _FileRangeProducer, _SocketBody
from nixeryd.builtin.filesystem import NAME, FilesystemStorage, _StagingFile
from nixeryd.errors import DigestInvalid, StorageFailed, StorageFull
from nixeryd.metrics import Metrics
from nixeryd.site import RegistrySite
from nixeryd.storage import BlobInfo, Storage
from nixeryd.testing.memoryhttp import MemoryHTTP

T = TypeVar("T")

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"


def watch(d: Deferred[T]) -> list[T | Failure]:
    """A list that receives the Deferred's outcome when it fires."""
    outcome: list[T | Failure] = []
    d.addBoth(outcome.append)
    return outcome


def unwrap(outcome: list[T | Failure]) -> T:
    assert outcome, "Deferred has not fired"
    value = outcome[0]
    if isinstance(value, Failure):
        value.raiseException()
    return value  # type: ignore[return-value]


def result(d: Deferred[T]) -> T:
    """The result of an already fired Deferred (the storage runs inline in these tests)."""
    return unwrap(watch(d))


def failure(d: Deferred[Any], kind: type[BaseException]) -> BaseException:
    with pytest.raises(kind) as caught:
        result(d)
    return caught.value


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture
def storage(tmp_path: Path) -> FilesystemStorage:
    return FilesystemStorage(tmp_path)


def test_is_a_storage_and_creates_its_layout(tmp_path: Path) -> None:
    fs: Storage = FilesystemStorage(tmp_path / "store")
    assert fs is not None
    assert NAME == "filesystem"
    for sub in ("blobs/sha256", "records", "tmp"):
        assert (tmp_path / "store" / sub).is_dir()


# Blobs


def test_put_blob_round_trip_keeps_media_type_in_sidecar(
    storage: FilesystemStorage, tmp_path: Path
) -> None:
    data = b'{"architecture":"amd64"}'
    info = result(storage.put_blob(data, CONFIG))
    assert info == BlobInfo(digest=digest_of(data), size=len(data), media_type=CONFIG)
    assert result(storage.stat_blob(info.digest)) == info
    assert result(storage.read_blob(info.digest)).data == data
    hex_digest = info.digest.removeprefix("sha256:")
    sidecar = json.loads((tmp_path / "blobs/sha256" / f"{hex_digest}.json").read_text())
    assert sidecar == {"mediaType": CONFIG, "size": len(data)}
    assert files_under(tmp_path / "tmp") == []


def test_put_blob_twice_keeps_the_first(storage: FilesystemStorage) -> None:
    first = result(storage.put_blob(b"same", CONFIG))
    assert result(storage.put_blob(b"same", LAYER)) == first


def test_absent_blob_is_none(storage: FilesystemStorage) -> None:
    digest = digest_of(b"never stored")
    assert result(storage.stat_blob(digest)) is None
    assert result(storage.read_blob(digest)) is None


def test_staged_blob_is_invisible_until_commit(storage: FilesystemStorage, tmp_path: Path) -> None:
    data = b"layer bytes" * 1000
    staged = storage.stage_blob()
    staged.file.write(data)
    assert result(storage.stat_blob(digest_of(data))) is None
    assert files_under(tmp_path / "blobs") == []

    info = result(staged.commit(digest_of(data), LAYER))
    assert info == BlobInfo(digest_of(data), len(data), LAYER)
    assert result(storage.stat_blob(info.digest)) == info
    assert result(storage.read_blob(info.digest)).data == data
    assert files_under(tmp_path / "tmp") == []
    staged.discard()  # harmless after a commit
    assert result(storage.read_blob(info.digest)).data == data


def test_discard_after_failing_writer_leaves_nothing(
    storage: FilesystemStorage, tmp_path: Path
) -> None:
    staged = storage.stage_blob()

    def writer() -> None:
        staged.file.write(b"half a layer")
        raise OSError("nix-store died")

    with pytest.raises(OSError):
        writer()
    staged.discard()
    staged.discard()
    assert files_under(tmp_path / "blobs") == []
    assert files_under(tmp_path / "tmp") == []
    failure(staged.commit(digest_of(b"half a layer"), LAYER), ValueError)


def test_commit_of_stored_digest_keeps_existing(storage: FilesystemStorage, tmp_path: Path) -> None:
    existing = result(storage.put_blob(b"content", LAYER))
    staged = storage.stage_blob()
    staged.file.write(b"content")
    assert result(staged.commit(existing.digest, "application/octet-stream")) == existing
    assert files_under(tmp_path / "tmp") == []


def test_commit_validates_digest_and_discards(storage: FilesystemStorage, tmp_path: Path) -> None:
    staged = storage.stage_blob()
    staged.file.write(b"x")
    failure(staged.commit("sha256:" + "A" * 64, LAYER), DigestInvalid)
    assert files_under(tmp_path / "tmp") == []
    assert files_under(tmp_path / "blobs") == []


def test_sidecar_without_blob_is_ignored_and_repaired(
    storage: FilesystemStorage, tmp_path: Path
) -> None:
    data = b"interrupted"
    hex_digest = hashlib.sha256(data).hexdigest()
    sidecar = tmp_path / "blobs/sha256" / f"{hex_digest}.json"
    sidecar.write_text(json.dumps({"mediaType": "stale/type", "size": 1}))
    assert result(storage.stat_blob(digest_of(data))) is None

    staged = storage.stage_blob()
    staged.file.write(data)
    info = result(staged.commit(digest_of(data), LAYER))
    assert info.media_type == LAYER
    assert result(storage.stat_blob(info.digest)) == info


def test_damaged_sidecar_counts_as_absent(storage: FilesystemStorage, tmp_path: Path) -> None:
    info = result(storage.put_blob(b"blob", LAYER))
    hex_digest = info.digest.removeprefix("sha256:")
    (tmp_path / "blobs/sha256" / f"{hex_digest}.json").write_text("{not json")
    assert result(storage.stat_blob(info.digest)) is None
    assert result(storage.put_blob(b"blob", LAYER)) == info


@pytest.mark.parametrize(
    "digest",
    [
        "",
        "sha256:",
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "A" * 64,
        "sha512:" + "a" * 128,
        "sha256:../../../../etc/passwd",
        "sha256:" + "a" * 64 + "\n",
        "a" * 64,
    ],
)
def test_invalid_digest_is_digest_invalid(storage: FilesystemStorage, digest: str) -> None:
    failure(storage.stat_blob(digest), DigestInvalid)
    failure(storage.read_blob(digest), DigestInvalid)
    with pytest.raises(DigestInvalid):
        storage.serve_blob(BlobInfo(digest, 0, LAYER))


def test_temp_files_without_a_live_writer_are_removed_at_start(tmp_path: Path) -> None:
    FilesystemStorage(tmp_path)
    dead = tmp_path / "tmp" / "dead"
    dead.write_bytes(b"left by a writer killed a moment ago")
    live = tmp_path / "tmp" / "live"
    with live.open("wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        storage = FilesystemStorage(tmp_path)
        assert result(storage.start()) is None
        assert not dead.exists()
        assert live.exists()
    assert storage.remove_dead_temps() == 1
    assert not live.exists()


def test_a_sweep_leaves_blobs_being_written_alone(storage: FilesystemStorage) -> None:
    staged = storage.stage_blob()
    staged.file.write(b"layer bytes")
    assert storage.remove_dead_temps() == 0
    info = result(storage.put_blob(b"small", CONFIG))
    assert result(staged.commit(digest_of(b"layer bytes"), LAYER)).size == len(b"layer bytes")
    assert result(storage.read_blob(info.digest)) is not None


def test_blocking_work_goes_through_the_runner(tmp_path: Path) -> None:
    ran: list[str] = []

    def runner(work: Callable[[], T]) -> Deferred[T]:
        ran.append(work.__name__)
        d: Deferred[T] = Deferred()
        d.callback(work())
        return d

    fs = FilesystemStorage(tmp_path, run_in_thread=runner)
    staged = fs.stage_blob()
    staged.file.write(b"layer")
    info = result(staged.commit(digest_of(b"layer"), LAYER))
    result(fs.put_record("builds/k", b"{}"))
    assert result(fs.stat_blob(info.digest)) == info
    assert len(ran) == 3


# Records


def test_record_round_trip_and_overwrite(storage: FilesystemStorage, tmp_path: Path) -> None:
    assert result(storage.get_record("builds/abc")) is None
    assert result(storage.put_record("builds/abc", b"one")) is None
    assert result(storage.get_record("builds/abc")) == b"one"
    result(storage.put_record("builds/abc", b"two"))
    assert result(storage.get_record("builds/abc")) == b"two"
    assert files_under(tmp_path / "records") == ["builds/abc"]
    assert files_under(tmp_path / "tmp") == []


def test_record_name_that_is_a_directory_is_absent(storage: FilesystemStorage) -> None:
    result(storage.put_record("manifests/k.v1", b"{}"))
    assert result(storage.get_record("manifests")) is None
    assert result(storage.get_record("manifests/k.v1/deeper")) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/abs",
        "/etc/passwd",
        "../etc/passwd",
        "a/../b",
        "..",
        ".",
        "a/./b",
        "a//b",
        "a/",
        "a b",
        "a\\b",
        "a\x00b",
        "caf\u00e9",
    ],
)
def test_invalid_record_names_are_refused(
    storage: FilesystemStorage, tmp_path: Path, name: str
) -> None:
    failure(storage.get_record(name), ValueError)
    failure(storage.put_record(name, b"x"), ValueError)
    assert files_under(tmp_path) == []


# Serving


@dataclass(frozen=True)
class Reply:
    code: int
    headers: Headers
    body: bytes
    content_length: int | None

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return None if values is None else values[-1]


class BlobClient:
    """Real HTTP requests for one storage's blobs, through twisted.web and treq, in memory."""

    def __init__(self, storage: FilesystemStorage, monkeypatch: pytest.MonkeyPatch) -> None:
        self._storage = storage
        self._monkeypatch = monkeypatch

    def fetch(
        self, info: BlobInfo, method: str = "GET", headers: dict[str, str] | None = None
    ) -> Reply:
        http = MemoryHTTP(self._storage.serve_blob(info), self._monkeypatch)
        response, body = http.request(method, "http://registry.test/blob", headers=headers or {})
        if method == "HEAD":
            # Twisted's client keeps a HEAD response's Content-Length as a header.
            length = response.headers.getRawHeaders("Content-Length", [None])[0]
            content_length = None if length is None else int(length)
        else:
            # Otherwise it moves Content-Length to .length (UNKNOWN_LENGTH if absent).
            content_length = None if response.length is UNKNOWN_LENGTH else response.length
        return Reply(response.code, response.headers, body, content_length)


DATA = bytes(range(256)) * 4


@pytest.fixture
def http(storage: FilesystemStorage, monkeypatch: pytest.MonkeyPatch) -> BlobClient:
    return BlobClient(storage, monkeypatch)


@pytest.fixture
def info(storage: FilesystemStorage) -> BlobInfo:
    return result(storage.put_blob(DATA, LAYER))


def test_get_serves_blob_with_headers(http: BlobClient, info: BlobInfo) -> None:
    reply = http.fetch(info)
    code, body = reply.code, reply.body
    assert code == 200
    assert body == DATA
    assert reply.content_length == len(DATA)
    assert reply.header("Content-Type") == LAYER
    assert reply.header("Docker-Content-Digest") == info.digest
    assert reply.header("ETag") == f'"{info.digest}"'
    assert reply.header("Accept-Ranges") == "bytes"
    assert reply.header("Content-Range") is None


def test_head_has_headers_and_no_body(http: BlobClient, info: BlobInfo) -> None:
    reply = http.fetch(info, "HEAD")
    code, body = reply.code, reply.body
    assert code == 200
    assert body == b""
    assert reply.content_length == len(DATA)
    assert reply.header("Content-Type") == LAYER
    assert reply.header("Docker-Content-Digest") == info.digest
    assert reply.header("ETag") == f'"{info.digest}"'


@pytest.mark.parametrize(
    ("range_", "start", "end"),
    [
        ("bytes=0-9", 0, 10),
        ("bytes=100-199", 100, 200),
        ("bytes=1000-", 1000, 1024),
        ("bytes=1000-5000", 1000, 1024),
        ("bytes=-24", 1000, 1024),
        ("bytes=-5000", 0, 1024),
        ("bytes=1023-1023", 1023, 1024),
        ("BYTES = 5 - 6", 5, 7),
        # Positions of any length (Python parses at most 4,300 digits): past every end.
        ("bytes=0-" + "9" * 5000, 0, 1024),
        ("bytes=-" + "9" * 5000, 0, 1024),
        ("bytes=" + "0" * 5000 + "5-6", 5, 7),
    ],
)
def test_single_range_is_partial_content(
    http: BlobClient, info: BlobInfo, range_: str, start: int, end: int
) -> None:
    reply = http.fetch(info, headers={"Range": range_})
    code, body = reply.code, reply.body
    assert code == 206
    assert body == DATA[start:end]
    assert reply.header("Content-Range") == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert reply.content_length == end - start
    assert reply.header("Content-Type") == LAYER
    assert reply.header("Docker-Content-Digest") == info.digest


def test_head_with_range(http: BlobClient, info: BlobInfo) -> None:
    reply = http.fetch(info, "HEAD", headers={"Range": "bytes=0-9"})
    code, body = reply.code, reply.body
    assert (code, body) == (206, b"")
    assert reply.content_length == 10
    assert reply.header("Content-Range") == f"bytes 0-9/{len(DATA)}"


@pytest.mark.parametrize(
    "range_",
    [
        "bytes=1024-",
        "bytes=5000-6000",
        "bytes=-0",
        "bytes=" + "9" * 5000 + "-",
        "bytes=" + "9" * 19 + "-",
    ],
)
def test_unsatisfiable_range_is_416(http: BlobClient, info: BlobInfo, range_: str) -> None:
    reply = http.fetch(info, headers={"Range": range_})
    code, body = reply.code, reply.body
    assert code == 416
    assert reply.header("Content-Range") == f"bytes */{len(DATA)}"
    assert reply.header("Content-Type") == "application/json"
    assert json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"


@pytest.mark.parametrize(
    "range_",
    ["bytes=0-1,5-6", "bytes=9-3", "items=0-1", "bytes=", "bytes=-", "bytes=a-b", "nonsense"],
)
def test_ranges_not_honoured_serve_the_whole_blob(
    http: BlobClient, info: BlobInfo, range_: str
) -> None:
    reply = http.fetch(info, headers={"Range": range_})
    code, body = reply.code, reply.body
    assert (code, body) == (200, DATA)
    assert reply.header("Content-Range") is None


def test_if_range_must_match_etag(http: BlobClient, info: BlobInfo) -> None:
    matching = {"Range": "bytes=0-1", "If-Range": f'"{info.digest}"'}
    reply = http.fetch(info, headers=matching)
    assert (reply.code, reply.body) == (206, DATA[:2])
    other = {"Range": "bytes=0-1", "If-Range": '"sha256:other"'}
    reply = http.fetch(info, headers=other)
    assert (reply.code, reply.body) == (200, DATA)


def test_empty_blob(http: BlobClient, storage: FilesystemStorage) -> None:
    empty = result(storage.put_blob(b"", LAYER))
    reply = http.fetch(empty)
    code, body = reply.code, reply.body
    assert (code, body) == (200, b"")
    assert reply.content_length == 0
    reply = http.fetch(empty, headers={"Range": "bytes=-1"})
    code = reply.code
    assert code == 416
    assert reply.header("Content-Range") == "bytes */0"


def test_blob_removed_after_stat_is_blob_unknown(
    http: BlobClient, info: BlobInfo, tmp_path: Path
) -> None:
    (tmp_path / "blobs/sha256" / info.digest.removeprefix("sha256:")).unlink()
    reply = http.fetch(info)
    code, body = reply.code, reply.body
    assert code == 404
    assert reply.header("Content-Type") == "application/json"
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"


def flip_a_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_blob_is_never_served_and_is_quarantined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    info = result(FilesystemStorage(tmp_path).put_blob(DATA, LAYER))
    path = tmp_path / "blobs/sha256" / info.digest.removeprefix("sha256:")
    if damage == "truncated":
        os.truncate(path, len(DATA) - 1)
    else:
        flip_a_byte(path)
    restarted = FilesystemStorage(tmp_path)  # a new process: nothing verified yet
    reply = BlobClient(restarted, monkeypatch).fetch(info)
    assert reply.code == 404
    assert json.loads(reply.body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert not path.exists()
    assert (tmp_path / "quarantine" / path.name).exists()
    assert result(restarted.stat_blob(info.digest)) is None
    # The next write of the digest (a rebuild) stores it again, and it is served.
    assert result(restarted.put_blob(DATA, LAYER)) == info
    assert BlobClient(restarted, monkeypatch).fetch(info).body == DATA


def test_a_size_differing_from_the_record_is_absent(
    storage: FilesystemStorage, tmp_path: Path
) -> None:
    info = result(storage.put_blob(DATA, LAYER))
    path = tmp_path / "blobs/sha256" / info.digest.removeprefix("sha256:")
    with path.open("ab") as file:
        file.write(b"more")
    assert result(storage.stat_blob(info.digest)) is None
    assert (tmp_path / "quarantine" / path.name).exists()


def test_read_blob_hashes_small_blobs(tmp_path: Path) -> None:
    info = result(FilesystemStorage(tmp_path).put_blob(DATA, CONFIG))
    flip_a_byte(tmp_path / "blobs/sha256" / info.digest.removeprefix("sha256:"))
    restarted = FilesystemStorage(tmp_path)
    assert result(restarted.read_blob(info.digest)) is None
    assert result(restarted.stat_blob(info.digest)) is None


def test_a_commit_replaces_an_unverified_stored_blob(tmp_path: Path) -> None:
    info = result(FilesystemStorage(tmp_path).put_blob(DATA, LAYER))
    path = tmp_path / "blobs/sha256" / info.digest.removeprefix("sha256:")
    flip_a_byte(path)
    restarted = FilesystemStorage(tmp_path)
    staged = restarted.stage_blob()
    staged.file.write(DATA)
    assert result(staged.commit(info.digest, LAYER)) == info
    assert path.read_bytes() == DATA


class _FullDisk(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_storage_faults_are_registry_errors_naming_the_cause(
    storage: FilesystemStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = _StagingFile(_FullDisk())
    with pytest.raises(StorageFull) as caught:
        full.write(b"x" * (1 << 20))
    assert caught.value.status == 507
    assert caught.value.code == "UNAVAILABLE"
    assert "storage is full" in caught.value.message

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(StorageFailed) as refused:
        storage.stage_blob()
    assert refused.value.status == 503
    assert "read-only" in refused.value.message
    error = failure(storage.put_record("builds/x", b"{}"), StorageFailed)
    assert "read-only" in str(error)


def test_other_methods_are_refused(http: BlobClient, info: BlobInfo) -> None:
    reply = http.fetch(info, "DELETE")
    assert reply.code == 405
    assert reply.header("Allow") == "GET, HEAD"
    assert json.loads(reply.body)["errors"][0]["code"] == "UNSUPPORTED"


def test_large_blob_streams_whole_and_in_ranges(
    http: BlobClient, storage: FilesystemStorage
) -> None:
    data = os.urandom(5 * 1024 * 1024 + 17)
    staged = storage.stage_blob()
    staged.file.write(data)
    large = result(staged.commit(digest_of(data), LAYER))

    reply = http.fetch(large)
    code, body = reply.code, reply.body
    assert code == 200
    assert reply.content_length == len(data)
    assert hashlib.sha256(body).hexdigest() == large.digest.removeprefix("sha256:")

    start = 3 * 1024 * 1024 + 5
    reply = http.fetch(large, headers={"Range": f"bytes={start}-"})
    code, body = reply.code, reply.body
    assert code == 206
    assert body == data[start:]


class RecordingRequest:
    """Just enough of a request to drive the producer by hand."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.finished = False
        self.lost = False
        self.producer: Any = None

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def finish(self) -> None:
        self.finished = True

    def loseConnection(self) -> None:
        self.lost = True


def pump(request: RecordingRequest, file: io.BytesIO, offset: int, length: int) -> None:
    producer = _FileRangeProducer(request, file, offset, length)  # type: ignore[arg-type]
    request.registerProducer(producer, False)
    while request.producer is not None:
        producer.resumeProducing()


def test_producer_reads_bounded_chunks() -> None:
    data = os.urandom(3 * _CHUNK_SIZE + 1)
    request = RecordingRequest()
    file = io.BytesIO(data)
    pump(request, file, 10, len(data) - 20)
    assert b"".join(request.chunks) == data[10:-10]
    assert max(len(chunk) for chunk in request.chunks) <= _CHUNK_SIZE
    assert request.finished
    assert file.closed


def test_producer_drops_connection_when_file_is_short() -> None:
    request = RecordingRequest()
    file = io.BytesIO(b"short")
    pump(request, file, 0, 100)
    assert b"".join(request.chunks) == b"short"
    assert request.lost
    assert not request.finished
    assert file.closed


def test_in_memory_transport_gets_the_file_range_producer(
    http: BlobClient, storage: FilesystemStorage, pieces: list[int]
) -> None:
    """_SocketBody needs a TCP socket: other transports get the body from _FileRangeProducer."""
    data = os.urandom(3 * _CHUNK_SIZE + 5)
    large = result(storage.put_blob(data, LAYER))
    reply = http.fetch(large)
    assert (reply.code, reply.body) == (200, data)
    assert pieces == []


# Serving on real sockets: _SocketBody


@pytest.fixture
def pieces(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each piece _SocketBody read (os.pread), in order."""
    sizes: list[int] = []
    real = os.pread

    def spy(fd: int, length: int, offset: int) -> bytes:
        data = real(fd, length, offset)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", spy)
    return sizes


@dataclass(frozen=True)
class Logged:
    path: bytes
    code: int
    sent: int


class RecordingSite(RegistrySite):
    """The daemon's site, recording the access log's fields of every finished response."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource, Answers([], Metrics()), Metrics())
        self.logged: list[Logged] = []

    def log(self, request: HTTPRequest) -> None:
        self.logged.append(Logged(request.uri, request.code, request.sentLength))


class BlobServer:
    """Blobs served by the daemon's site on a real TCP port, at ``/<name>``."""

    def __init__(self, storage: FilesystemStorage) -> None:
        self._storage = storage
        self._root = Resource()
        self.site = RecordingSite(self._root)
        self._port: Any = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.port: int = self._port.getHost().port

    def add(self, name: str, info: BlobInfo) -> str:
        self._root.putChild(name.encode(), self._storage.serve_blob(info))
        return f"/{name}"

    def stop(self) -> Deferred[None]:
        return self._port.stopListening()  # type: ignore[no-any-return]


@pytest_twisted.async_yield_fixture
async def server(storage: FilesystemStorage) -> AsyncIterator[BlobServer]:
    instance = BlobServer(storage)
    yield instance
    await instance.stop()


@dataclass(frozen=True)
class Response:
    code: int
    headers: dict[str, str]
    body: bytes


class RawHTTP:
    """A blocking HTTP/1.1 client on one connection; run it in a thread while the reactor serves.

    Raw rather than http.client so that a test can pipeline requests, stop
    reading halfway, or keep its receive window small.
    """

    def __init__(self, port: int, *, receive_buffer: int | None = None) -> None:
        self.socket = socket.socket()
        if receive_buffer is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.socket.settimeout(30)
        self.socket.connect(("127.0.0.1", port))
        self._reader = self.socket.makefile("rb")

    def send(self, path: str, headers: dict[str, str] | None = None) -> None:
        lines = [f"GET {path} HTTP/1.1", "Host: registry.test"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.socket.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def read_head(self) -> tuple[int, dict[str, str]]:
        status = self._reader.readline().split()
        assert status[:1] == [b"HTTP/1.1"], status
        headers: dict[str, str] = {}
        while (line := self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status[1]), headers

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body: fewer only if the server closed the connection."""
        return self._reader.read(size)

    def read_response(self) -> Response:
        code, headers = self.read_head()
        body = self.read(int(headers["content-length"]))
        return Response(code, headers, body)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        self.send(path, headers)
        return self.read_response()

    def close(self) -> None:
        self._reader.close()
        self.socket.close()


def fetch(port: int, path: str, headers: dict[str, str] | None = None) -> Response:
    """One GET on a new connection (blocking)."""
    client = RawHTTP(port)
    try:
        return client.get(path, headers)
    finally:
        client.close()


# Larger than the socket buffers on both sides together, and not a multiple of a piece.
BIG_SIZE = 20 * 1024 * 1024 + 17


@pytest.fixture(scope="module")
def big_data() -> bytes:
    return os.urandom(BIG_SIZE)


@pytest.fixture
def big(storage: FilesystemStorage, big_data: bytes) -> BlobInfo:
    staged = storage.stage_blob()
    staged.file.write(big_data)
    return result(staged.commit(digest_of(big_data), LAYER))


def blob_file(tmp_path: Path, info: BlobInfo) -> Path:
    return (tmp_path / "blobs/sha256" / info.digest.removeprefix("sha256:")).resolve()


def open_descriptors(path: Path) -> int:
    """How many file descriptors of this process are open on ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since the listing
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


async def eventually(condition: Callable[[], bool], seconds: float = 10) -> None:
    """Let the reactor run until ``condition()`` holds."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_socket_body_serves_a_large_blob_whole_and_in_a_range(
    server: BlobServer, big: BlobInfo, big_data: bytes, pieces: list[int]
) -> None:
    path = server.add("big", big)
    whole = await deferToThread(fetch, server.port, path)
    assert whole.code == 200
    assert whole.headers["content-length"] == str(BIG_SIZE)
    assert whole.headers["docker-content-digest"] == big.digest
    assert whole.body == big_data
    # Straight into the socket (a piece the socket takes in part is partly read again).
    assert sum(pieces) >= BIG_SIZE
    assert max(pieces) <= _SEND_PIECE

    start, end = 3 * 1024 * 1024 + 5, 17 * 1024 * 1024
    part = await deferToThread(fetch, server.port, path, {"Range": f"bytes={start}-{end - 1}"})
    assert part.code == 206
    assert part.headers["content-range"] == f"bytes {start}-{end - 1}/{BIG_SIZE}"
    assert part.body == big_data[start:end]
    # The access log reports the body bytes sent.
    assert server.site.logged == [
        Logged(b"/big", 200, BIG_SIZE),
        Logged(b"/big", 206, end - start),
    ]


@pytest_twisted.ensureDeferred
async def test_responses_follow_each_other_on_one_connection(
    server: BlobServer,
    big: BlobInfo,
    big_data: bytes,
    info: BlobInfo,
    pieces: list[int],
) -> None:
    """Headers go out before their body, and each body before the next response."""
    big_path, small_path = server.add("big", big), server.add("small", info)

    def in_turn_then_pipelined() -> list[Response]:
        client = RawHTTP(server.port)
        try:
            responses = [client.get(big_path), client.get(small_path), client.get(big_path)]
            # Pipelined: the second request is read while the first body is being sent.
            client.send(big_path, {"Range": "bytes=-1000"})
            client.send(big_path)
            client.send(small_path)
            responses += [client.read_response() for _ in range(3)]
            return responses
        finally:
            client.close()

    responses = await deferToThread(in_turn_then_pipelined)
    bodies = [big_data, DATA, big_data, big_data[-1000:], big_data, DATA]
    assert [r.code for r in responses] == [200, 200, 200, 206, 200, 200]
    assert [r.body == body for r, body in zip(responses, bodies, strict=True)] == [True] * 6
    assert sum(pieces) >= sum(map(len, bodies))
    assert [logged.sent for logged in server.site.logged] == list(map(len, bodies))


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_download_leaves_the_server_serving(
    server: BlobServer, big: BlobInfo, big_data: bytes, tmp_path: Path, pieces: list[int]
) -> None:
    path = server.add("big", big)

    def leave_after_a_megabyte() -> None:
        # A small receive window: the server cannot have sent it all when the client leaves.
        client = RawHTTP(server.port, receive_buffer=64 * 1024)
        client.send(path)
        code, _ = client.read_head()
        assert code == 200
        assert len(client.read(1024 * 1024)) == 1024 * 1024
        client.close()  # with unread data: the kernel resets the connection

    await deferToThread(leave_after_a_megabyte)
    await eventually(lambda: open_descriptors(blob_file(tmp_path, big)) == 0)
    assert server.site.logged == []  # the response never finished
    assert pieces

    again = await deferToThread(fetch, server.port, path)
    assert (again.code, again.body == big_data) == (200, True)
    await eventually(lambda: open_descriptors(blob_file(tmp_path, big)) == 0)


@pytest_twisted.ensureDeferred
async def test_twenty_concurrent_downloads(
    server: BlobServer, big: BlobInfo, big_data: bytes, tmp_path: Path, pieces: list[int]
) -> None:
    path = server.add("big", big)

    def download(index: int) -> tuple[int, bool]:
        # Every other client asks for a range: several offsets into one file at once.
        start = index * 1000 if index % 2 else 0
        response = fetch(server.port, path, {"Range": f"bytes={start}-"} if start else None)
        return response.code, response.body == big_data[start:]

    def all_at_once() -> list[tuple[int, bool]]:
        with ThreadPoolExecutor(20) as pool:
            return list(pool.map(download, range(20)))

    outcomes = await deferToThread(all_at_once)
    assert outcomes == [(206 if i % 2 else 200, True) for i in range(20)]
    assert sum(pieces) >= sum(BIG_SIZE - (i * 1000 if i % 2 else 0) for i in range(20))
    assert sorted(logged.sent for logged in server.site.logged) == sorted(
        BIG_SIZE - (i * 1000 if i % 2 else 0) for i in range(20)
    )
    await eventually(lambda: open_descriptors(blob_file(tmp_path, big)) == 0)


@pytest.fixture
def log_events() -> Iterator[list[LogEvent]]:
    """The events logged through twisted.logger during the test."""
    events: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_a_blob_file_cut_short_ends_the_connection(
    server: BlobServer,
    big: BlobInfo,
    big_data: bytes,
    tmp_path: Path,
    pieces: list[int],
    log_events: list[LogEvent],
) -> None:
    path = server.add("big", big)
    cut = 10 * 1024 * 1024

    def read_a_damaged_blob() -> tuple[int, bytes]:
        client = RawHTTP(server.port, receive_buffer=64 * 1024)
        try:
            client.send(path)
            code, headers = client.read_head()
            assert headers["content-length"] == str(BIG_SIZE)
            # The server has sent at most its socket buffer (4 MB) and our window.
            os.truncate(blob_file(tmp_path, big), cut)
            return code, client.read(BIG_SIZE)
        finally:
            client.close()

    code, body = await deferToThread(read_a_damaged_blob)
    assert code == 200
    assert body == big_data[:cut]  # then the connection closed
    early = [e for e in log_events if e["log_format"] == "blob file ended {missing} bytes early"]
    assert [event["missing"] for event in early] == [BIG_SIZE - cut]
    assert server.site.logged == []
    await eventually(lambda: open_descriptors(blob_file(tmp_path, big)) == 0)


# _SocketBody driven by hand, over a socket pair


class PairTransport:
    """Just enough of a tcp.Connection, over one end of a socket pair: a write buffer in
    the attributes _unsent reads, and the writing switch the reactor would follow."""

    def __init__(self, end: socket.socket) -> None:
        end.setblocking(False)
        self.socket = end
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.connected = True
        self.disconnecting = False
        self.writing = False

    def getHandle(self) -> socket.socket:
        return self.socket

    def startWriting(self) -> None:
        self.writing = True

    def stopWriting(self) -> None:
        self.writing = False

    def write(self, data: bytes) -> None:
        self.dataBuffer += data
        self.startWriting()

    def doWrite(self) -> None:
        self.offset += self.socket.send(self.dataBuffer[self.offset :])
        if self.offset == len(self.dataBuffer):
            self.dataBuffer, self.offset = b"", 0
            self.stopWriting()


class PairRequest(RecordingRequest):
    """A request whose first write queues its headers on the transport."""

    def __init__(self, transport: PairTransport) -> None:
        super().__init__()
        self.transport = transport
        self.sentLength = 0

    def write(self, data: bytes) -> None:
        assert data == b""
        self.transport.write(b"HEADERS\r\n\r\n")

    def notifyFinish(self) -> Deferred[None]:
        self.finishing: Deferred[None] = Deferred()
        return self.finishing


@pytest.fixture
def pair() -> Iterator[tuple[PairTransport, socket.socket]]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    yield PairTransport(ours), theirs
    ours.close()
    theirs.close()


def drain(end: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            chunk = end.recv(1 << 20)
        except BlockingIOError:
            return received
        if not chunk:
            return received
        received += chunk


def file_with(tmp_path: Path, data: bytes) -> IO[bytes]:
    path = tmp_path / "file"
    path.write_bytes(data)
    return path.open("rb")


def test_socket_body_sends_headers_first_and_waits_while_paused(
    pair: tuple[PairTransport, socket.socket], tmp_path: Path, pieces: list[int]
) -> None:
    transport, peer = pair
    data = os.urandom(3 * 1024 * 1024 + 3)
    request = PairRequest(transport)
    file = file_with(tmp_path, data)
    body = _SocketBody(request, transport, file, 7, len(data) - 7)  # type: ignore[arg-type]
    body.start()
    assert request.producer is body
    assert transport.writing
    assert vars(transport)["doWrite"] == body._do_write

    body.pauseProducing()
    transport.doWrite()  # the headers go; the body waits
    assert drain(peer) == b"HEADERS\r\n\r\n"
    assert pieces == []
    assert not transport.writing
    body.resumeProducing()
    assert transport.writing

    received = b""
    while not request.finished:
        transport.doWrite()
        received += drain(peer)
    received += drain(peer)
    assert received == data[7:]
    assert request.sentLength == len(data) - 7
    assert request.producer is None
    assert "doWrite" not in vars(transport)  # the class's doWrite is back
    assert not transport.writing
    assert file.closed
    body.stopProducing()
    body.resumeProducing()
    assert not transport.writing


def test_socket_body_stopped_lets_go_of_file_and_transport(
    pair: tuple[PairTransport, socket.socket], tmp_path: Path, pieces: list[int]
) -> None:
    transport, peer = pair
    data = os.urandom(8 * 1024 * 1024)
    request = PairRequest(transport)
    file = file_with(tmp_path, data)
    body = _SocketBody(request, transport, file, 0, len(data))  # type: ignore[arg-type]
    body.start()
    transport.doWrite()
    transport.doWrite()
    assert pieces  # some of the body is on its way
    body.stopProducing()  # the connection is lost
    assert file.closed
    assert "doWrite" not in vars(transport)
    body.stopProducing()
    body.pauseProducing()
    body.resumeProducing()
    assert not request.finished
    drain(peer)


def test_socket_body_lets_go_when_the_request_hears_of_a_lost_connection(
    pair: tuple[PairTransport, socket.socket], tmp_path: Path
) -> None:
    """Even if the channel no longer passes stopProducing on, the request is told."""
    transport, _ = pair
    request = PairRequest(transport)
    file = file_with(tmp_path, b"x" * 1024)
    body = _SocketBody(request, transport, file, 0, 1024)  # type: ignore[arg-type]
    body.start()
    request.finishing.errback(Failure(ConnectionLost()))
    assert file.closed
    assert "doWrite" not in vars(transport)


def test_socket_body_loses_the_connection_when_the_file_cannot_be_read(
    pair: tuple[PairTransport, socket.socket],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    log_events: list[LogEvent],
) -> None:
    transport, _ = pair
    request = PairRequest(transport)
    file = file_with(tmp_path, b"x" * 1024)
    body = _SocketBody(request, transport, file, 0, 1024)  # type: ignore[arg-type]
    body.start()

    def failing(fd: int, length: int, offset: int) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pread", failing)
    why = transport.doWrite()
    # The reactor loses the connection with this reason, and the channel stops the body.
    assert isinstance(why, OSError)
    assert why.errno == errno.EIO
    assert [e["log_format"] for e in log_events] == ["reading a blob file failed: {error}"]
    body.stopProducing()
    assert file.closed
    assert not request.finished
