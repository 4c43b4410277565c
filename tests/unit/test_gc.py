"""Garbage collection's mark and sweep on the memory backend, with a clock the tests move."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock as TaskClock

from nixeryd.compression import Compression
from nixeryd.config import Config, parse_age
from nixeryd.gc import (
    MARKS_RECORD,
    GarbageCollector,
    GcPolicy,
    KeepList,
    KeepListError,
    PeriodicCollection,
    parse_keep_entry,
    read_keep_file,
)
from nixeryd.images import BuiltImage
from nixeryd.manifest import LayerDescriptor
from nixeryd.manifeststore import RECORD_REFRESH_INTERVAL, ImageRecord, ManifestStore
from nixeryd.metrics import Metrics
from nixeryd.platform import AMD64, ARM64
from nixeryd_memory_storage import MemoryStorage

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
COMPRESSION = Compression.default("zlib")
HOUR = 3600.0
#: What the builder looks an image up for.
FOR = {"image": "linux/amd64:bash/hello", "tag": "latest", "kind": "eval"}


def result(d: Deferred[Any]) -> Any:
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "Deferred has not fired"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Store:
    """Memory storage with images written as the builder writes them."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.storage = MemoryStorage(run_in_thread=maybeDeferred, clock=self.clock)
        self.manifests = ManifestStore(self.storage, COMPRESSION, Metrics(), clock=self.clock)

    def layer(self, content: bytes) -> LayerDescriptor:
        info = result(self.storage.put_blob(content, LAYER))
        descriptor = LayerDescriptor(info.digest, info.size, info.digest)
        key = hashlib.sha256(content).hexdigest()
        record = json.dumps(descriptor.__dict__).encode()
        result(self.storage.put_record(f"builds/{key}.{COMPRESSION.key}", record))
        return descriptor

    def image(
        self, packages: str, layers: list[bytes], tag: str = "latest", platform: Any = None
    ) -> BuiltImage:
        platform = platform or AMD64
        descriptors = [self.layer(content) for content in layers]
        built = result(self.manifests.write(platform, descriptors, packages.split("/")))
        canonical = f"{platform.name}:{packages}"
        key = hashlib.sha256(f"{canonical}:{tag}:{layers}".encode()).hexdigest()
        result(self.manifests.remember(key, built, image=canonical, tag=tag, kind="eval"))
        return built

    def gc(self, *, dry_run: bool = False, **policy: Any) -> Any:
        collector = GarbageCollector(self.storage, GcPolicy(**policy), clock=self.clock)
        return result(collector.run(dry_run=dry_run))

    def blobs(self) -> set[str]:
        return {info.digest for info in result(self.storage.list_blobs())}

    def records(self, prefix: str = "") -> set[str]:
        return {info.name for info in result(self.storage.list_records(prefix))}


def named(built: BuiltImage) -> set[str]:
    """Every blob an image's manifests name, and the manifests."""
    digests = set()
    for manifest in built.manifests.values():
        digests.add(manifest.digest)
        document = json.loads(manifest.data)
        digests.add(document["config"]["digest"])
        digests.update(layer["digest"] for layer in document["layers"])
    return digests


def keep(*names: str) -> KeepList:
    return KeepList([parse_keep_entry(name) for name in names])


def three_images(store: Store) -> tuple[BuiltImage, BuiltImage, BuiltImage]:
    a = store.image("bash/hello", [b"shared", b"hello"])
    b = store.image("bash/git", [b"shared", b"git"])
    c = store.image("bash/htop", [b"shared", b"htop"])
    store.clock.now += 2 * HOUR
    return a, b, c


def test_an_image_left_off_the_keep_list_loses_only_its_unshared_blobs() -> None:
    store = Store()
    a, b, c = three_images(store)
    before = store.blobs()
    report = store.gc(grace=0, max_age=0, keep=keep("bash/hello", "bash/git:latest"))
    only_c = named(c) - named(a) - named(b)
    assert store.blobs() == before - only_c
    assert named(a) | named(b) <= store.blobs()
    assert report.records_deleted == {"manifests": 1, "builds": 1}
    assert report.blobs_deleted == len(only_c) == 4  # 2 manifests, the config, one layer
    assert report.bytes_deleted > 0
    assert len(store.records("manifests/")) == 2
    assert len(store.records("builds/")) == 3  # shared, hello, git


def test_a_dry_run_removes_nothing_and_says_what_would_go() -> None:
    store = Store()
    three_images(store)
    before = (store.blobs(), store.records())
    dry = store.gc(dry_run=True, grace=0, max_age=0, keep=keep("bash/hello", "bash/git"))
    assert (store.blobs(), store.records()) == before
    assert MARKS_RECORD not in store.records()
    real = store.gc(grace=0, max_age=0, keep=keep("bash/hello", "bash/git"))
    assert (dry.records_deleted, dry.blobs_deleted, dry.bytes_deleted) == (
        real.records_deleted,
        real.blobs_deleted,
        real.bytes_deleted,
    )
    assert "would delete 2 records (1 builds, 1 manifests) and 4 blobs (" in dry.summary()
    assert " B)" in dry.summary()  # a few bytes: said in bytes


def test_without_max_age_only_what_no_record_names_goes() -> None:
    store = Store()
    a, b, c = three_images(store)
    orphan = result(store.storage.put_blob(b"an interrupted build's layer", LAYER))
    absent = json.dumps({"digest": "sha256:" + "0" * 64}).encode()
    result(store.storage.put_record("builds/orphan.zlib-6", absent))
    store.clock.now += 2 * HOUR
    report = store.gc(grace=0)
    assert orphan.digest not in store.blobs()
    assert named(a) | named(b) | named(c) <= store.blobs()
    assert report.records_deleted == {"builds": 1}


def test_records_and_blobs_younger_than_the_grace_period_stay() -> None:
    store = Store()
    store.image("bash/hello", [b"hello"])
    store.clock.now += 10
    result(store.storage.put_blob(b"a layer of a build in progress", LAYER))
    before = (store.blobs(), store.records())
    report = store.gc(grace=HOUR, max_age=0)
    assert (store.blobs(), store.records() - {MARKS_RECORD}) == before
    assert report.blobs_deleted == report.blobs_marked == 0


def test_a_blob_goes_only_once_it_was_unreferenced_for_the_grace_period() -> None:
    """A layer record a build refreshed while a run deleted it names its blob again only
    in the image record the build writes later: a run marks such a blob, and a later
    run deletes it if it is still unreferenced a grace period after."""
    store = Store()
    a, b, c = three_images(store)
    only_c = named(c) - named(a) - named(b)
    kept = keep("bash/hello", "bash/git")
    first = store.gc(grace=HOUR, max_age=0, keep=kept)
    assert first.records_deleted == {"manifests": 1, "builds": 1}
    assert (first.blobs_deleted, first.blobs_marked) == (0, len(only_c))
    assert only_c <= store.blobs()
    store.clock.now += HOUR / 2
    assert store.gc(grace=HOUR, max_age=0, keep=kept).blobs_deleted == 0
    store.clock.now += HOUR / 2
    last = store.gc(grace=HOUR, max_age=0, keep=kept)
    assert (last.blobs_deleted, last.blobs_marked) == (len(only_c), 0)
    assert not only_c & store.blobs()
    assert named(a) | named(b) <= store.blobs()


def test_a_marked_blob_named_again_is_unmarked() -> None:
    store = Store()
    store.image("bash/htop", [b"htop"])
    store.clock.now += 2 * HOUR
    assert store.gc(grace=HOUR, max_age=0).blobs_marked == 4
    again = store.image("bash/htop", [b"htop"], tag="v2")  # the same bytes, built again
    store.clock.now += 2 * HOUR
    report = store.gc(grace=HOUR, max_age=3 * HOUR)
    assert report.blobs_deleted == 0
    assert named(again) <= store.blobs()
    assert json.loads(result(store.storage.get_record(MARKS_RECORD))) == {}


class BuildsDuringSweep(MemoryStorage):
    """A storage where a build finishes while the collector deletes records."""

    finishing: Any = None

    def delete_record(self, name: str) -> Deferred[None]:
        if self.finishing is not None:
            finish, self.finishing = self.finishing, None
            finish()
        return super().delete_record(name)


def test_a_record_written_during_the_run_keeps_what_it_names() -> None:
    store = Store()
    storage = BuildsDuringSweep(run_in_thread=maybeDeferred, clock=store.clock)
    store.storage, store.manifests = (
        storage,
        ManifestStore(storage, COMPRESSION, Metrics(), store.clock),
    )
    old = store.image("bash/htop", [b"htop"])
    store.clock.now += 2 * HOUR
    # Another image's build reuses htop's layer and finishes while the run deletes.
    finished: list[BuiltImage] = []
    storage.finishing = lambda: finished.append(store.image("bash/top", [b"htop"]))
    store.gc(grace=0, max_age=0)
    [top] = finished
    assert named(top) == named(old) <= store.blobs()  # the same layers: the same manifests
    assert len(store.records("manifests/")) == 1  # top's; htop's went


def test_the_keep_list_keeps_the_newest_record_of_each_tag() -> None:
    store = Store()
    old = store.image("bash/hello", [b"hello 1"])
    store.clock.now += 10
    new = store.image("bash/hello", [b"hello 2"])
    store.clock.now += 10
    pinned = store.image("bash/hello", [b"hello 3"], tag="v1")
    store.clock.now += 2 * HOUR
    store.gc(grace=0, max_age=0, keep=keep("bash/hello"))
    assert named(new) | named(pinned) <= store.blobs()
    assert not (named(old) - named(new)) & store.blobs()
    store.gc(grace=0, max_age=0, keep=keep("bash/hello:v1"))
    assert named(pinned) <= store.blobs()
    assert not (named(new) - named(pinned)) & store.blobs()


def test_a_name_with_arm64_keeps_only_that_platform() -> None:
    store = Store()
    native = store.image("hello", [b"native"])
    arm = store.image("hello", [b"arm"], platform=ARM64)
    store.clock.now += 2 * HOUR
    store.gc(grace=0, max_age=0, keep=keep("arm64/hello"))
    assert named(arm) <= store.blobs()
    assert not named(native) & store.blobs()


def test_an_index_goes_with_its_images() -> None:
    store = Store()
    a = store.image("hello", [b"a"])
    b = store.image("hello", [b"b"], platform=ARM64)
    indexes = result(store.manifests.indexes([a, b]))
    index_digests = {index.digest for index in indexes.values()}
    store.clock.now += 2 * HOUR
    store.gc(grace=0, max_age=0, keep=keep("hello"))
    assert index_digests <= store.blobs()
    assert len(store.records("indexes/")) == 1
    store.gc(grace=0, max_age=0, keep=keep("arm64/hello"))
    assert not index_digests & store.blobs()
    assert store.records("indexes/") == set()
    assert named(b) <= store.blobs()


def test_keep_entries_are_image_names_as_pulled() -> None:
    entry = parse_keep_entry("shell/hello:v1.2")
    assert entry.tag == "v1.2"
    assert "bashInteractive" in entry.name.packages
    assert parse_keep_entry("hello").tag is None
    with pytest.raises(KeepListError, match="invalid repository name"):
        parse_keep_entry("Hello!")
    with pytest.raises(KeepListError, match="invalid tag"):
        parse_keep_entry("hello:-x")
    entries = read_keep_file("# kept for good\nshell/hello\n\n  git:main  # pinned\n", "keep")
    assert [e.tag for e in entries] == [None, "main"]
    with pytest.raises(KeepListError, match=r"^keep:2: "):
        read_keep_file("hello\nHELLO\n", "keep")


def test_ages() -> None:
    assert parse_age("0") == 0
    assert parse_age("90s") == 90
    assert parse_age("1h30m") == 5400
    assert parse_age("7d") == 7 * 86400
    for bad in ("", "1w", "-1", "1 h"):
        with pytest.raises(ValueError):
            parse_age(bad)


def test_an_image_record_says_what_it_was_written_for() -> None:
    record = ImageRecord(
        {"docker": "sha256:a", "oci": "sha256:b"}, "linux/amd64:hello", "v1", "pin"
    )
    assert ImageRecord.decode(record.encode()) == record
    # Written before image records said so: manifests only.
    assert ImageRecord.decode(b'{"docker": "sha256:a"}') == ImageRecord({"docker": "sha256:a"})


def test_an_image_in_use_has_its_record_refreshed() -> None:
    store = Store()
    built = store.image("bash/hello", [b"hello"])
    [key] = [
        info.name.partition("/")[2] for info in result(store.storage.list_records("manifests/"))
    ]

    def written() -> float:
        [info] = result(store.storage.list_records("manifests/"))
        return float(info.modified)

    first = written()
    store.clock.now += 10
    assert result(store.manifests.cached(key, built.platform, **FOR)) is not None
    assert written() == first  # in memory, refreshed a moment ago
    store.clock.now += RECORD_REFRESH_INTERVAL
    result(store.manifests.cached(key, built.platform, **FOR))
    assert written() == store.clock.now
    store.clock.now += 10
    restarted = ManifestStore(store.storage, COMPRESSION, Metrics(), clock=store.clock)
    result(restarted.cached(key, built.platform, **FOR))  # loaded from storage: refreshed
    assert written() == store.clock.now


def test_a_record_from_before_records_named_their_image_is_named_when_refreshed() -> None:
    store = Store()
    built = store.image("bash/hello", [b"hello"])
    [info] = result(store.storage.list_records("manifests/"))
    record = ImageRecord.decode(result(store.storage.get_record(info.name)))
    result(store.storage.put_record(info.name, ImageRecord(record.manifests).encode()))
    restarted = ManifestStore(store.storage, COMPRESSION, Metrics(), clock=store.clock)
    key = info.name.partition("/")[2]
    assert result(restarted.cached(key, built.platform, **FOR)) is not None
    assert ImageRecord.decode(result(store.storage.get_record(info.name))) == record


def test_the_daemon_collects_every_interval_and_reports_each_run(tmp_path: Path) -> None:
    store = Store()
    store.storage = MemoryStorage(run_in_thread=maybeDeferred)  # the real clock: records are new
    store.manifests = ManifestStore(store.storage, COMPRESSION, Metrics())
    store.image("bash/hello", [b"hello"])
    keep_file = tmp_path / "keep"
    config = Config(
        gc_interval=60.0,
        gc_max_age=0.0,
        gc_grace=0.0,
        gc_keep=str(keep_file),
        gc_roots=str(tmp_path / "roots"),
    )
    clock = TaskClock()
    runs: list[tuple[str, Any]] = []
    service = PeriodicCollection(config, store.storage, clock, lambda *run: runs.append(run))
    service.startService()
    assert runs == []  # the first run comes one interval after start
    clock.advance(60)
    assert [result for result, _ in runs] == ["failed"]  # no keep file yet: nothing removed
    assert store.blobs()
    keep_file.write_text("bash/git\n")
    clock.advance(60)
    assert [result for result, _ in runs] == ["failed", "completed"]
    assert runs[-1][1].blobs_deleted == 4
    assert store.blobs() == set()
    service.stopService()
    clock.advance(60)
    assert len(runs) == 2
