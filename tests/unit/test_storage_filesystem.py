"""FilesystemStorage: round trips, crash safety, name validation and blob serving over HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from nixeryd.builtin.filesystem import (
    _CHUNK_SIZE,
    NAME,
    FilesystemStorage,
    _FileRangeProducer,
)
from nixeryd.errors import DigestInvalid
from nixeryd.storage import BlobInfo, Storage
from tests.memoryhttp import MemoryHTTP

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
    assert result(storage.read_blob(info.digest)) == data
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
    assert result(storage.read_blob(info.digest)) == data
    assert files_under(tmp_path / "tmp") == []
    staged.discard()  # harmless after a commit
    assert result(storage.read_blob(info.digest)) == data


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
        storage.blob_resource(BlobInfo(digest, 0, LAYER))


def test_stale_tmp_files_are_removed_at_startup(tmp_path: Path) -> None:
    FilesystemStorage(tmp_path)
    stale = tmp_path / "tmp" / "stale"
    fresh = tmp_path / "tmp" / "fresh"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"being written by another process")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(stale, (two_days_ago, two_days_ago))
    FilesystemStorage(tmp_path)
    assert not stale.exists()
    assert fresh.exists()


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
        http = MemoryHTTP(self._storage.blob_resource(info), self._monkeypatch)
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


@pytest.mark.parametrize("range_", ["bytes=1024-", "bytes=5000-6000", "bytes=-0"])
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
