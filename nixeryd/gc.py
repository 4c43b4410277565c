"""Garbage collection of storage: what ``nixeryd gc`` removes, and why that is safe.

Storage grows with every image built; nothing in it expires by itself. A run
keeps the image records an operator wants, and removes every record and blob
nothing kept names (see docs/gc.md for the operator's view):

1. **List** the image records (``manifests/``, ``indexes/``), the layer records
   (``builds/``) and the blobs, with their times (:mod:`nixeryd.storage`).
2. **Keep** the image records that are younger than ``grace``, younger than
   ``max_age``, or the newest of a keep-listed image and tag (:class:`KeepList`).
   An index record is kept when it is young, or when every manifest it lists
   is named by a kept image record.
3. **Mark** the blobs the kept records name: their manifests or indexes, and
   the configs and layers those name. A layer record is kept when it names a
   marked blob or is younger than ``grace``; its blob is then kept too.
4. **Delete** the image and layer records not kept.
5. **Check again**: list the records once more, and keep the blobs named by
   any record written since the first listing (a build that finished
   meanwhile).
6. **Sweep** the blobs older than ``grace`` that nothing keeps, but only
   those that were unreferenced for at least ``grace`` already, by the
   marks the previous runs left in the ``gc/marks`` record. The others are
   marked now and swept by a later run if still unreferenced then.

Why a daemon building on the same storage loses nothing, provided ``grace``
is longer than a build may take (``build_timeout``): a build writes each layer
blob, then its layer record, and only at the end the image record naming them.
A new blob is younger than ``grace``, and its layer record too, until the image
record names it. A build reusing a layer writes that layer record again first
(:mod:`nixeryd.layerstore`), then checks that the blob exists. So whatever a
build relies on is, at every listing, young, or named by a record it wrote.
A run that deletes a layer record a build has just refreshed (steps 1 and 4
race with it) only marks that record's blob: by the next run, at least
``grace`` later, the build has written its image record, which keeps the blob.
What remains is a build that writes a layer byte for byte equal to a blob
unreferenced for ``grace``, in the seconds between a run's step 5 and its
sweep: then the image names a blob that is gone, and the registry's heal path
(:mod:`nixeryd.manifeststore`: a blob found missing makes it forget the image
and build it again at the next pull) is the last resort.

Times come from the storage (a file's mtime, an object's LastModified or
``updated``) and are compared with this host's clock, so keep the clocks in
step (NTP); ``grace`` absorbs small differences. Run one collector at a time
per storage: two would share the marks record, last writer wins.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredSemaphore,
    ensureDeferred,
    gatherResults,
    succeed,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from nixeryd.config import Config
from nixeryd.errors import NameInvalid, first_failure
from nixeryd.imagename import ImageName, is_valid_tag, parse_image_name
from nixeryd.manifeststore import ImageRecord
from nixeryd.plugins import Plugins
from nixeryd.storage import BlobInfo, RecordInfo, Storage

#: The record in which a run leaves the blobs it found unreferenced, for the next run.
MARKS_RECORD = "gc/marks"

#: Records and blobs read at once.
CONCURRENCY = 16

_log = Logger()
_T = TypeVar("_T")


class KeepListError(ValueError):
    """A keep-list entry is not an image name with an optional tag."""


@dataclass(frozen=True)
class KeepEntry:
    """An image name as pulled (``shell/hello``, ``arm64/hello:v1``), tag optional."""

    name: ImageName
    #: None: every tag of the image.
    tag: str | None

    def matches(self, record: ImageRecord) -> bool:
        """Whether ``record`` was written for this image (on any platform,
        unless the name chose one) and tag."""
        if record.image is None or (self.tag is not None and record.tag != self.tag):
            return False
        platform, _, packages = record.image.partition(":")
        if self.name.platform is not None and platform != self.name.platform.name:
            return False
        return packages == "/".join(self.name.packages)


def parse_keep_entry(text: str) -> KeepEntry:
    """``name[:tag]`` by the registry's rules (:func:`nixeryd.imagename.parse_image_name`);
    KeepListError saying what is wrong otherwise."""
    name, _, tag = text.strip().partition(":")
    if tag and not is_valid_tag(tag):
        raise KeepListError(f"{text!r}: invalid tag {tag!r}")
    try:
        return KeepEntry(parse_image_name(name), tag or None)
    except NameInvalid as error:
        raise KeepListError(f"{text!r}: {error.message}") from None


def read_keep_file(text: str, origin: str) -> list[KeepEntry]:
    """A keep file: one ``name[:tag]`` a line; blank lines and ``#`` comments ignored."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                entries.append(parse_keep_entry(line))
            except KeepListError as error:
                raise KeepListError(f"{origin}:{number}: {error}") from None
    return entries


class KeepList:
    """The image records an operator keeps whatever their age: for each entry, the
    newest record of each image, tag and kind (``pin``, ``eval``) it matches, i.e. what
    the registry serves for that tag now. Older versions of a moving tag (a branch, a
    local package set that changed) are left to the age rule."""

    def __init__(self, entries: Sequence[KeepEntry]) -> None:
        self._entries = tuple(entries)

    def kept(self, records: Iterable[tuple[RecordInfo, ImageRecord]]) -> set[str]:
        """The names of the kept records among ``records``."""
        newest: dict[tuple[str | None, str | None, str | None], RecordInfo] = {}
        for info, record in records:
            if any(entry.matches(record) for entry in self._entries):
                group = (record.image, record.tag, record.kind)
                if group not in newest or newest[group].modified < info.modified:
                    newest[group] = info
        return {info.name for info in newest.values()}


@dataclass(frozen=True)
class GcPolicy:
    """What a run keeps. ``max_age`` None: image records never expire by age."""

    grace: float = 3600.0
    max_age: float | None = None
    keep: KeepList = field(default_factory=lambda: KeepList(()))


def policy_for(
    config: Config,
    *,
    max_age: float | None = None,
    grace: float | None = None,
    keep_files: Sequence[str] = (),
    keep_images: Sequence[str] = (),
) -> GcPolicy:
    """The policy of the configuration's ``gc_*`` options, with ``max_age`` and ``grace``
    instead where given, and the images of ``keep_files`` and ``keep_images`` kept
    besides ``gc_keep``'s. Reads the files: KeepListError or OSError naming the file."""
    entries = [parse_keep_entry(name) for name in keep_images]
    for path in [*([config.gc_keep] if config.gc_keep else []), *keep_files]:
        entries += read_keep_file(Path(path).read_text(), path)
    return GcPolicy(
        grace=config.gc_grace if grace is None else grace,
        max_age=config.gc_max_age if max_age is None else max_age,
        keep=KeepList(entries),
    )


@dataclass
class GcReport:
    """What a run removed (or, dry, would remove), and what it left for a later run."""

    dry_run: bool
    #: Record kind (``manifests``, ``indexes``, ``builds``) -> records deleted.
    records_deleted: dict[str, int] = field(default_factory=dict)
    records_kept: int = 0
    blobs_deleted: int = 0
    bytes_deleted: int = 0
    #: Unreferenced blobs marked, to be swept by a later run if still unreferenced.
    blobs_marked: int = 0
    bytes_marked: int = 0
    blobs_kept: int = 0
    bytes_kept: int = 0
    seconds: float = 0.0
    #: Nix GC roots directories of stopped daemons removed (:mod:`nixeryd.gcroots`).
    stale_roots: int = 0

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        records = ", ".join(
            f"{count} {kind}" for kind, count in sorted(self.records_deleted.items()) if count
        )
        return (
            f"{verb} {sum(self.records_deleted.values())} records ({records or 'none'}) and "
            f"{self.blobs_deleted} blobs ({_size(self.bytes_deleted)}); "
            f"{'would mark' if self.dry_run else 'marked'} {self.blobs_marked} unreferenced "
            f"blobs ({_size(self.bytes_marked)}) for a later run; kept {self.records_kept} "
            f"records and {self.blobs_kept} blobs ({_size(self.bytes_kept)}) "
            f"in {self.seconds:.1f}s"
            + (
                f"; {'would remove' if self.dry_run else 'removed'} the Nix GC roots of "
                f"{self.stale_roots} stopped daemons"
                if self.stale_roots
                else ""
            )
        )


#: Called once a run ends: ``"completed"``, ``"dry_run"`` or ``"failed"``, and the report
#: (None when it failed). For a "GC runs by result" counter, or an audit log.
GcObserver = Callable[[str, "GcReport | None"], None]


class GarbageCollector:
    """Runs the mark and sweep of this module's docstring over one storage."""

    def __init__(
        self,
        storage: Storage,
        policy: GcPolicy,
        *,
        clock: Callable[[], float] = time.time,
        on_finished: GcObserver = lambda *_: None,
    ) -> None:
        self._storage = storage
        self._policy = policy
        self._clock = clock
        self._on_finished = on_finished
        self._limit = DeferredSemaphore(CONCURRENCY)

    def run(self, *, dry_run: bool = False) -> Deferred[GcReport]:
        """One run; ``dry_run`` reads everything, deletes nothing and writes no marks."""

        def finished(report: GcReport) -> GcReport:
            self._on_finished("dry_run" if dry_run else "completed", report)
            return report

        def failed(failure: Any) -> Any:
            self._on_finished("failed", None)
            return failure

        return Deferred.fromCoroutine(self._run(dry_run)).addCallbacks(finished, failed)

    async def _run(self, dry_run: bool) -> GcReport:
        started = self._clock()
        policy = self._policy
        report = GcReport(dry_run)
        young = started - policy.grace
        expired = started - policy.max_age if policy.max_age is not None else None
        listed = await self._storage.list_records("")
        blobs: list[BlobInfo] = await self._storage.list_blobs()
        marks = await self._marks()

        images = [info for info in listed if info.name.startswith("manifests/")]
        indexes = [info for info in listed if info.name.startswith("indexes/")]
        layers = [info for info in listed if info.name.startswith("builds/")]
        records = await self._image_records(images)
        kept = policy.keep.kept((info, records[info.name]) for info in images)
        kept |= {
            info.name
            for info in images
            if info.modified > young or expired is None or info.modified > expired
        }
        kept_manifests = {digest for name in kept for digest in records[name].manifests.values()}
        live = await self._reachable(kept_manifests)
        for info, (index_blobs, listing) in zip(
            indexes,
            await self._each(indexes, lambda info: self._index_manifests(info.name)),
            strict=True,
        ):
            # An index goes with its images: kept while every platform's image is.
            if info.modified > young or (listing and listing <= kept_manifests):
                kept.add(info.name)
                live |= await self._reachable(index_blobs)
        for info, digest in zip(
            layers,
            await self._each(layers, lambda info: self._layer_digest(info.name)),
            strict=True,
        ):
            if info.modified > young or digest in live:
                kept.add(info.name)
                if digest is not None:
                    live.add(digest)

        doomed = [info for info in [*images, *indexes, *layers] if info.name not in kept]
        report.records_kept = len(kept)
        for info in doomed:
            kind = info.name.partition("/")[0]
            report.records_deleted[kind] = report.records_deleted.get(kind, 0) + 1
        if not dry_run:
            await self._each(doomed, lambda info: self._storage.delete_record(info.name))

        # A build that finished meanwhile wrote records the first listing did not see.
        seen = {(info.name, info.modified) for info in listed}
        fresh = [
            info
            for info in await self._storage.list_records("")
            if (info.name, info.modified) not in seen
        ]
        for named in await self._each(fresh, lambda info: self._named_by_record(info.name)):
            live |= named

        swept = []
        marked = {}
        for blob in blobs:
            modified = blob.modified if blob.modified is not None else float("inf")
            if blob.digest in live or modified > young:
                report.blobs_kept += 1
                report.bytes_kept += blob.size
            elif marks.get(blob.digest, started) <= young:
                swept.append(blob.digest)
                report.blobs_deleted += 1
                report.bytes_deleted += blob.size
            else:
                marked[blob.digest] = marks.get(blob.digest, started)
                report.blobs_marked += 1
                report.bytes_marked += blob.size
        if not dry_run:
            await self._each(swept, self._storage.delete_blob)
            await self._storage.put_record(MARKS_RECORD, json.dumps(marked).encode())
        report.seconds = self._clock() - started
        _log.info("gc: {summary}", summary=report.summary())
        return report

    async def _marks(self) -> dict[str, float]:
        """Blob digest -> when a run first found it unreferenced (the last run's marks)."""
        data = await self._storage.get_record(MARKS_RECORD)
        if data is None:
            return {}
        try:
            marks = json.loads(data)
            return {str(digest): float(when) for digest, when in marks.items()}
        except (ValueError, AttributeError, TypeError):
            _log.warn("gc: {record} is unreadable; marking afresh", record=MARKS_RECORD)
            return {}

    async def _image_records(self, images: Sequence[RecordInfo]) -> dict[str, ImageRecord]:
        """Each image record, parsed; an unreadable one as naming nothing."""
        records = {}
        for info, data in zip(images, await self._each(images, self._read_record), strict=True):
            try:
                records[info.name] = ImageRecord.decode(data or b"{}")
            except ValueError:
                _log.warn("gc: image record {name} is unreadable", name=info.name)
                records[info.name] = ImageRecord({})
        return records

    def _read_record(self, info: RecordInfo) -> Deferred[bytes | None]:
        return self._storage.get_record(info.name)

    async def _reachable(self, digests: Iterable[str]) -> set[str]:
        """``digests`` (of manifests or indexes) and the blobs they name: an index's
        manifests, and those's configs and layers (which are not read)."""
        found = set(digests)
        pending = list(found)
        while pending:
            named = await self._each(pending, self._names)
            pending = []
            for children, leaves in named:
                found.update(leaves)
                pending += [digest for digest in children if digest not in found]
                found.update(children)
        return found

    async def _names(self, digest: str) -> tuple[list[str], list[str]]:
        """What a manifest or index names: (manifests to read in turn, configs and
        layers); nothing for a blob that is absent or no manifest."""
        blob = await self._storage.read_blob(digest)
        if blob is None:
            return [], []
        try:
            document = json.loads(blob.data)
            children = [entry["digest"] for entry in document.get("manifests", [])]
            leaves = [
                entry["digest"]
                for entry in [document.get("config"), *document.get("layers", [])]
                if entry
            ]
        except (ValueError, AttributeError, TypeError, KeyError):
            return [], []
        return children, leaves

    async def _index_manifests(self, name: str) -> tuple[list[str], set[str]]:
        """An index record's index blobs, and the platform manifests they list."""
        data = await self._storage.get_record(name)
        try:
            digests = list(ImageRecord.decode(data or b"{}").manifests.values())
        except ValueError:
            return [], set()
        named = await self._each(digests, self._names)
        return digests, {digest for children, _ in named for digest in children}

    async def _layer_digest(self, name: str) -> str | None:
        data = await self._storage.get_record(name)
        try:
            digest = json.loads(data or b"{}").get("digest")
        except (ValueError, AttributeError):
            return None
        return digest if isinstance(digest, str) else None

    async def _named_by_record(self, name: str) -> set[str]:
        """The blobs a record written during this run names, to keep them."""
        kind = name.partition("/")[0]
        if kind == "builds":
            digest = await self._layer_digest(name)
            return {digest} if digest is not None else set()
        if kind in ("manifests", "indexes"):
            data = await self._storage.get_record(name)
            try:
                digests = ImageRecord.decode(data or b"{}").manifests.values()
            except ValueError:
                return set()
            return await self._reachable(digests)
        return set()

    async def _each(self, items: Iterable[_T], work: Callable[[_T], Any]) -> list[Any]:
        """``work`` (a coroutine or Deferred) of each item, :data:`CONCURRENCY` at a time."""

        def one(item: _T) -> Deferred[Any]:
            return ensureDeferred(work(item))

        return await gatherResults(
            [self._limit.run(one, item) for item in items], consumeErrors=True
        ).addErrback(first_failure)


def telling(plugins: Plugins) -> GcObserver:
    """An observer passing each run's result on to plugins (``nixeryd_gc_finished``)."""

    def tell(result: str, report: GcReport | None) -> None:
        done = report or GcReport(dry_run=result == "dry_run")
        plugins.gc_finished(result, done.blobs_deleted, done.bytes_deleted, done.seconds)

    return tell


class PeriodicCollection(Service):
    """The daemon's own garbage collection: a run every ``gc_interval`` seconds (the
    first one interval after start), with the ``gc_*`` options, the keep-list file read
    again each time; also removes stopped daemons' Nix GC roots. A run that fails is
    logged and the next one comes on time. At shutdown a run in flight is abandoned,
    which is safe: every step of a run can be cut short (what it has not deleted
    yet waits for the next run)."""

    def __init__(
        self, config: Config, storage: Storage, clock: Any, on_finished: GcObserver
    ) -> None:
        self._config = config
        self._storage = storage
        self._on_finished = on_finished
        self._loop = LoopingCall(self._run)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._config.gc_interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _run(self) -> Deferred[None]:
        from nixeryd.gcroots import remove_stale_roots

        try:
            policy = policy_for(self._config)
            remove_stale_roots(self._config.gc_roots_dir)
        except (ValueError, OSError) as error:  # a keep file missing, malformed, not text
            _log.error("gc: not run: {error}", error=error)
            self._on_finished("failed", None)
            return succeed(None)
        collector = GarbageCollector(self._storage, policy, on_finished=self._on_finished)

        def failed(failure: Failure) -> None:
            _log.error("gc: run failed: {reason}", reason=failure.getErrorMessage())

        return collector.run().addCallbacks(lambda _: None, failed)


async def collect(
    config: Config, reactor: Any, policy: GcPolicy, *, dry_run: bool = False
) -> GcReport:
    """What ``nixeryd gc`` does: remove stopped daemons' Nix GC roots, then run the
    collector over the storage ``config`` selects (any backend, a plugin's too),
    telling plugins how it went (:func:`nixeryd.hookspecs.nixeryd_gc_finished`)."""
    from treq.client import HTTPClient
    from twisted.internet.threads import deferToThread
    from twisted.web.client import Agent

    from nixeryd.gcroots import remove_stale_roots
    from nixeryd.plugins import make_plugin_manager
    from nixeryd.process import ReactorProcessRunner
    from nixeryd.runtime import Runtime

    stale_roots = remove_stale_roots(config.gc_roots_dir, dry_run=dry_run)
    plugins = Plugins(make_plugin_manager())
    runtime = Runtime(
        config=config,
        reactor=reactor,
        http=HTTPClient(Agent(reactor)),  # type: ignore[arg-type]
        processes=ReactorProcessRunner(reactor),
        run_in_thread=deferToThread,
    )
    storage = plugins.storage_backend(config.storage_backend).create_with(runtime)

    await storage.start()
    try:
        collector = GarbageCollector(storage, policy, on_finished=telling(plugins))
        report = await collector.run(dry_run=dry_run)
    finally:
        await storage.stop()
    report.stale_roots = stale_roots
    return report


def _size(size: int) -> str:
    """Bytes in the largest binary unit that keeps a whole part: ``812 B``, ``1.1 MiB``."""
    amount, unit = float(size), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if amount < 1024:
            break
        amount, unit = amount / 1024, larger
    return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
