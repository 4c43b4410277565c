"""The storage contract as tests: every backend, built-in or a site's, runs these.

Subclass :class:`StorageConformance` in a test module and give it a
``storage`` fixture that yields a started backend with nothing stored in it
(a fresh directory, bucket or key prefix per test), and stops it afterwards::

    import pytest_twisted
    from nixeryd.testing.conformance import StorageConformance

    class TestMyStorage(StorageConformance):
        @pytest_twisted.async_yield_fixture
        async def storage(self, tmp_path):
            backend = MyStorage(tmp_path)
            await backend.start()
            yield backend
            await backend.stop()

The tests run on the real reactor (pytest-twisted) and fetch what
``serve_blob`` answers over real HTTP: a :class:`~nixeryd.storage.Redirect`'s
URL with treq, a resource through a twisted.web site on a loopback port.
``large_blob_size`` is the size of the blob the staged-write tests use; a
backend that uploads large blobs in parts sets it past its part size so
that the multipart path is exercised too.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, ClassVar

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from nixeryd.errors import DigestInvalid
from nixeryd.storage import Blob, BlobInfo, RecordInfo, Redirect, StagedBlob, Storage

__all__ = ["StorageConformance"]

# The global reactor pytest-twisted runs; its interfaces are not visible to mypy on the module.
reactor: Any = _reactor

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"

#: Digests no backend may accept: each could name something outside its storage.
BAD_DIGESTS = (
    "sha256:../../../../etc/passwd",
    "sha256:" + "A" * 64,
    "sha256:" + "0" * 63,
    "sha512:" + "0" * 128,
    "md5:d41d8cd98f00b204e9800998ecf8427e",
    "",
)
#: Record names no backend may accept.
BAD_RECORD_NAMES = ("../escape", "builds/../../x", "a//b", "/absolute", "", "builds/", "a b")


#: Seconds a listing's times may differ from this machine's clock (a server's own clock).
CLOCK_SLACK = 60.0


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Served:
    """What ``serve_blob`` answered, fetched over HTTP: status, headers and body."""

    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


class StorageConformance:
    """The contract of :mod:`nixeryd.storage`; subclasses provide the ``storage`` fixture."""

    large_blob_size: ClassVar[int] = 3 * 1024 * 1024 + 17

    @pytest.fixture
    def storage(self) -> Storage:
        raise NotImplementedError("a backend's test class provides the storage fixture")

    # Helpers

    async def _staged(self, storage: Storage, data: bytes, media_type: str = LAYER) -> BlobInfo:
        staged = storage.stage_blob()
        await deferToThread(_write, staged, data)
        info: BlobInfo = await staged.commit(_digest(data), media_type)
        return info

    async def _fetch(
        self,
        storage: Storage,
        info: BlobInfo,
        headers: dict[bytes | str, bytes | str] | None = None,
    ) -> _Served:
        """GET what ``serve_blob`` answers, as a client would."""
        answer = storage.serve_blob(info)
        if isinstance(answer, Redirect):
            assert answer.status in (303, 307), answer
            response = await treq.get(answer.url, headers=headers or {})
            return _Served(response.code, response.headers, await treq.content(response))
        assert IResource.providedBy(answer), f"serve_blob answered {answer!r}"
        root = Resource()
        root.putChild(b"blob", answer)
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        try:
            url = f"http://127.0.0.1:{port.getHost().port}/blob"
            response = await treq.get(url, headers=headers or {})
            return _Served(response.code, response.headers, await treq.content(response))
        finally:
            await port.stopListening()

    # Small blobs

    @pytest_twisted.ensureDeferred
    async def test_a_small_blob_round_trips_with_its_media_type(self, storage: Storage) -> None:
        data = b'{"architecture": "amd64"}'
        info = await storage.put_blob(data, CONFIG)
        assert info == BlobInfo(_digest(data), len(data), CONFIG)
        assert await storage.stat_blob(info.digest) == info
        assert await storage.read_blob(info.digest) == Blob(info, data)

    @pytest_twisted.ensureDeferred
    async def test_storing_the_same_bytes_again_is_not_an_error(self, storage: Storage) -> None:
        data = b"the same manifest"
        first = await storage.put_blob(data, MANIFEST)
        again = await storage.put_blob(data, MANIFEST)
        assert first == again
        assert [blob.digest for blob in await storage.list_blobs()] == [first.digest]

    @pytest_twisted.ensureDeferred
    async def test_an_empty_blob_is_a_blob(self, storage: Storage) -> None:
        info = await storage.put_blob(b"", CONFIG)
        assert info.size == 0
        assert await storage.read_blob(info.digest) == Blob(info, b"")

    @pytest_twisted.ensureDeferred
    async def test_absent_blobs_are_none(self, storage: Storage) -> None:
        absent = _digest(b"never stored")
        assert await storage.stat_blob(absent) is None
        assert await storage.read_blob(absent) is None

    @pytest_twisted.ensureDeferred
    async def test_malformed_digests_are_refused(self, storage: Storage) -> None:
        for digest in BAD_DIGESTS:
            for call in (storage.stat_blob, storage.read_blob, storage.delete_blob):
                with pytest.raises(DigestInvalid):
                    await call(digest)
            with pytest.raises(DigestInvalid):
                storage.serve_blob(BlobInfo(digest, 10, LAYER))

    # Staged blobs

    @pytest_twisted.ensureDeferred
    async def test_a_staged_blob_is_invisible_until_committed(self, storage: Storage) -> None:
        data = os.urandom(self.large_blob_size)
        digest = _digest(data)
        staged = storage.stage_blob()
        await deferToThread(_write, staged, data)
        assert await storage.stat_blob(digest) is None
        info = await staged.commit(digest, LAYER)
        assert info == BlobInfo(digest, len(data), LAYER)
        assert await storage.stat_blob(digest) == info
        staged.discard()  # after a commit: does nothing
        assert await storage.stat_blob(digest) == info

    @pytest_twisted.ensureDeferred
    async def test_a_discarded_blob_leaves_nothing(self, storage: Storage) -> None:
        data = os.urandom(4096)
        staged = storage.stage_blob()
        await deferToThread(_write, staged, data)
        staged.discard()
        staged.discard()
        assert await storage.stat_blob(_digest(data)) is None
        assert await storage.list_blobs() == []

    @pytest_twisted.ensureDeferred
    async def test_concurrent_writers_of_one_digest_both_succeed(self, storage: Storage) -> None:
        """Two builders (or two instances on one bucket) writing the same layer."""
        data = os.urandom(self.large_blob_size)
        writers = [Deferred.fromCoroutine(self._staged(storage, data)) for _ in range(2)]
        first, second = await gatherResults(writers)
        assert first == second == BlobInfo(_digest(data), len(data), LAYER)
        assert [blob.digest for blob in await storage.list_blobs()] == [first.digest]
        assert (await self._fetch(storage, first)).body == data

    # Serving

    @pytest_twisted.ensureDeferred
    async def test_a_blob_is_served_whole(self, storage: Storage) -> None:
        data = os.urandom(self.large_blob_size)
        info = await self._staged(storage, data)
        served = await self._fetch(storage, info)
        assert served.code == 200
        assert served.body == data

    @pytest_twisted.ensureDeferred
    async def test_a_single_byte_range_is_honoured(self, storage: Storage) -> None:
        data = os.urandom(256 * 1024)
        info = await self._staged(storage, data)
        middle = await self._fetch(storage, info, {b"Range": b"bytes=1000-66535"})
        assert middle.code == 206
        assert middle.body == data[1000:66536]
        assert middle.header(b"content-range") == f"bytes 1000-66535/{len(data)}".encode()
        tail = await self._fetch(storage, info, {b"Range": b"bytes=-100"})
        assert (tail.code, tail.body) == (206, data[-100:])
        beyond = await self._fetch(storage, info, {b"Range": f"bytes={len(data)}-".encode()})
        assert beyond.code == 416

    @pytest_twisted.ensureDeferred
    async def test_a_deleted_blob_is_gone(self, storage: Storage) -> None:
        kept = await storage.put_blob(b"kept", CONFIG)
        deleted = await self._staged(storage, os.urandom(100_000))
        await storage.delete_blob(deleted.digest)
        await storage.delete_blob(deleted.digest)  # absent: not an error
        assert await storage.stat_blob(deleted.digest) is None
        assert await storage.read_blob(deleted.digest) is None
        assert await storage.list_blobs() == [kept]
        assert (await self._fetch(storage, deleted)).code == 404

    @pytest_twisted.ensureDeferred
    async def test_every_blob_is_listed_with_its_info(self, storage: Storage) -> None:
        infos = [await storage.put_blob(f"blob {n}".encode(), CONFIG) for n in range(5)]
        infos.append(await self._staged(storage, os.urandom(70_000)))
        listed = await storage.list_blobs()
        assert sorted(listed, key=lambda info: info.digest) == sorted(
            infos, key=lambda info: info.digest
        )

    @pytest_twisted.ensureDeferred
    async def test_listed_blobs_say_when_they_were_written(self, storage: Storage) -> None:
        """Garbage collection spares blobs younger than its grace period by these times."""
        before = time.time()
        small = await storage.put_blob(b"a config", CONFIG)
        large = await self._staged(storage, os.urandom(70_000))
        after = time.time()
        listed = {info.digest: info.modified for info in await storage.list_blobs()}
        assert set(listed) == {small.digest, large.digest}
        for modified in listed.values():
            assert modified is not None
            assert before - CLOCK_SLACK <= modified <= after + CLOCK_SLACK

    # Records

    @pytest_twisted.ensureDeferred
    async def test_records_round_trip_and_are_overwritten(self, storage: Storage) -> None:
        assert await storage.get_record("builds/abc.gzip-6") is None
        await storage.put_record("builds/abc.gzip-6", b"first")
        assert await storage.get_record("builds/abc.gzip-6") == b"first"
        await storage.put_record("builds/abc.gzip-6", b"second")
        assert await storage.get_record("builds/abc.gzip-6") == b"second"

    @pytest_twisted.ensureDeferred
    async def test_records_are_listed_by_prefix_and_deleted(self, storage: Storage) -> None:
        names = ["builds/a.gzip-6", "builds/b.zstd-3", "manifests/m1", "indexes/i1"]
        await gatherResults([storage.put_record(name, name.encode()) for name in names])
        assert _names(await storage.list_records("")) == sorted(names)
        assert _names(await storage.list_records("builds/")) == names[:2]
        assert await storage.list_records("nothing/") == []
        await storage.delete_record("builds/a.gzip-6")
        await storage.delete_record("builds/a.gzip-6")  # absent: not an error
        assert await storage.get_record("builds/a.gzip-6") is None
        assert _names(await storage.list_records("builds/")) == ["builds/b.zstd-3"]

    @pytest_twisted.ensureDeferred
    async def test_listed_records_say_when_they_were_last_written(self, storage: Storage) -> None:
        """Writing a record again refreshes its time: a builder reusing a layer record
        keeps it from garbage collection so."""
        before = time.time()
        await storage.put_record("builds/t.gzip-6", b"first")
        [first] = await storage.list_records("builds/")
        assert first.name == "builds/t.gzip-6"
        assert before - CLOCK_SLACK <= first.modified <= time.time() + CLOCK_SLACK
        # Object stores keep times to the second (S3's LastModified, some servers').
        await deferLater(reactor, 1.1, lambda: None)
        await storage.put_record("builds/t.gzip-6", b"second")
        [second] = await storage.list_records("builds/")
        assert second.modified > first.modified

    @pytest_twisted.ensureDeferred
    async def test_a_record_name_that_is_a_prefix_of_others_is_absent(
        self, storage: Storage
    ) -> None:
        await storage.put_record("manifests/pin/abc", b"{}")
        assert await storage.get_record("manifests/pin") is None

    @pytest_twisted.ensureDeferred
    async def test_malformed_record_names_are_refused(self, storage: Storage) -> None:
        for name in BAD_RECORD_NAMES:
            for call in (storage.get_record, storage.delete_record):
                with pytest.raises(ValueError):
                    await call(name)
            with pytest.raises(ValueError):
                await storage.put_record(name, b"x")

    @pytest_twisted.ensureDeferred
    async def test_blobs_and_records_do_not_mix(self, storage: Storage) -> None:
        info = await storage.put_blob(b"a blob", CONFIG)
        await storage.put_record("builds/x", b"a record")
        assert await storage.list_blobs() == [info]
        assert _names(await storage.list_records("")) == ["builds/x"]

    @pytest_twisted.ensureDeferred
    async def test_many_concurrent_calls(self, storage: Storage) -> None:
        """Forty requests at once, as a pull of a large image makes."""
        datas = [os.urandom(1000 + n) for n in range(20)]
        infos = await gatherResults([storage.put_blob(data, LAYER) for data in datas])
        results: list[tuple[bool, Any]] = await DeferredList(
            [storage.read_blob(info.digest) for info in infos]
            + [storage.stat_blob(info.digest) for info in infos],
            consumeErrors=True,
        )
        assert all(ok for ok, _ in results)
        assert [blob.data for _, blob in results[:20]] == datas
        assert [info for _, info in results[20:]] == infos


def _names(records: list[RecordInfo]) -> list[str]:
    """The names of listed records, checking that they came sorted by name."""
    names = [record.name for record in records]
    assert names == sorted(names)
    return names


def _write(staged: StagedBlob, data: bytes) -> None:
    """What a layer writer does on its worker thread: write in pieces, then flush."""
    view = memoryview(data)
    for start in range(0, len(data), 1024 * 1024):
        staged.file.write(view[start : start + 1024 * 1024])
    staged.file.flush()
