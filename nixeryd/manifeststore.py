"""Configs, manifests and indexes in storage, with the records that find them again.

An image's manifests are recorded under ``manifests/<key>`` (``{form:
digest}``), keyed by what determines them (the pin or the evaluated outputs,
the layering, the compression), so that a restarted daemon, or another
instance on the same bucket, serves the image without building it. Indexes
over several platforms are recorded under ``indexes/<key>``, which also keeps
their blobs from garbage collection. Recently used ones are kept in memory in
front of storage.

An image record also says which image and tag it was written for, and how it is
keyed (``pin`` or ``eval``; see :class:`ImageRecord`), so that ``nixeryd gc``
can keep the images an operator names. Its time in storage says when it was
last used: a daemon writes it again when it loads it from storage and, while it
serves the image from memory, every :data:`RECORD_REFRESH_INTERVAL` seconds
(see :mod:`nixeryd.gc`).

Never a manifest whose blobs are gone. A manifest record read from storage
is answered only once its config and layer blobs are found there (one
``stat_blob`` each, once per record and process: the cheapest rule that
catches blobs deleted or damaged while no daemon held the image in memory);
otherwise the image is built again, which writes the missing layers again.
An image held in memory is trusted until the registry finds one of its blobs
missing or damaged while serving it (:meth:`ManifestStore.forget_blob`): the
pull that finds it gets ``BLOB_UNKNOWN``, the next one rebuilds. A blob
deleted from an object store behind nixeryd's back, which the client fetches
from the store directly, is noticed at the next start.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from nixeryd.compression import Compression
from nixeryd.images import BuiltImage, StoredManifest
from nixeryd.manifest import (
    OCI_CONFIG,
    IndexEntry,
    LayerDescriptor,
    forms_for,
    image_config,
    image_index,
    image_manifest,
    index_forms_for,
)
from nixeryd.metrics import Metrics
from nixeryd.platform import Platform
from nixeryd.storage import Storage

#: Images and indexes kept in memory, in front of storage.
LOCAL_MANIFEST_CACHE_SIZE = 1024

#: Seconds between rewrites of the record of an image served from memory, which tell
#: garbage collection it is in use; ``nixeryd gc --max-age`` must be longer.
RECORD_REFRESH_INTERVAL = 3600.0

#: Keys of an image record that are not forms of manifest.
_RECORD_FIELDS = ("image", "tag", "kind")


@dataclass(frozen=True)
class ImageRecord:
    """What ``manifests/<key>`` holds: ``{form: digest}`` of the image's manifests, and
    the image (its canonical name), tag and kind of key it was written for. Records
    written before nixeryd kept the last three have None there."""

    manifests: Mapping[str, str]
    image: str | None = None
    tag: str | None = None
    kind: str | None = None

    def encode(self) -> bytes:
        fields = {"image": self.image, "tag": self.tag, "kind": self.kind}
        return json.dumps(
            {**self.manifests, **{k: v for k, v in fields.items() if v is not None}}
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> ImageRecord:
        """Parse a record; ValueError if it is not one."""
        document = json.loads(data)
        if not isinstance(document, dict) or not all(
            isinstance(value, str) for value in document.values()
        ):
            raise ValueError("an image record is an object of strings")
        return cls(
            {form: digest for form, digest in document.items() if form not in _RECORD_FIELDS},
            document.get("image"),
            document.get("tag"),
            document.get("kind"),
        )


class ManifestStore:
    """Writes and finds images' manifests and indexes; keeps the recent ones in memory."""

    log = Logger()

    def __init__(
        self,
        storage: Storage,
        compression: Compression,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._storage = storage
        self._metrics = metrics
        self._compression = compression
        self._clock = clock
        self._local: OrderedDict[str, BuiltImage] = OrderedDict()
        #: Key of an image in memory -> its record, and when this process last wrote it.
        self._records: dict[str, tuple[ImageRecord, float]] = {}
        self._indexes: OrderedDict[tuple[str, ...], Mapping[str, StoredManifest]] = OrderedDict()
        #: Blob digest -> the keys of the images in memory whose manifests name it.
        self._naming: dict[str, set[str]] = {}

    @inlineCallbacks
    def write(
        self, platform: Platform, layers: Sequence[LayerDescriptor], packages: Iterable[str]
    ) -> Any:
        """Store the config and every form of manifest of an image of ``layers``."""
        config = image_config(platform, layers, packages)
        config_info = yield self._storage.put_blob(config, OCI_CONFIG)
        manifests = {}
        layer_format = self._compression.format
        for form, (media_type, _, _) in forms_for(layer_format).items():
            data = image_manifest(
                form, config_info.digest, config_info.size, layers, layer_format=layer_format
            )
            info = yield self._storage.put_blob(data, media_type)
            manifests[form] = StoredManifest(media_type, info.digest, data)
        return BuiltImage(platform, manifests)

    @inlineCallbacks
    def cached(self, key: str, platform: Platform, *, image: str, tag: str, kind: str) -> Any:
        """The image recorded under ``key`` (a :class:`BuiltImage`), or None. ``image``,
        ``tag`` and ``kind`` are what it is looked up for: a record written before records
        said so is given them when it is refreshed; one that says so keeps its own."""
        if key in self._local:
            self._local.move_to_end(key)
            self._metrics.cache("manifests", hit=True)
            record, written = self._records[key]
            if self._clock() - written >= RECORD_REFRESH_INTERVAL:
                self._refresh(key, record)
            return self._local[key]
        self._metrics.cache("manifests", hit=False)
        data = yield self._storage.get_record(f"manifests/{key}")
        if data is None:
            self._metrics.cache("manifest_record", hit=False)
            return None
        record = ImageRecord.decode(data)
        if record.image is None:
            record = replace(record, image=image, tag=tag, kind=kind)
        manifests = {}
        forms = forms_for(self._compression.format)
        for form, digest in record.manifests.items():
            blob = yield self._storage.read_blob(digest)
            if blob is None or form not in forms:
                self._metrics.cache("manifest_record", hit=False)
                return None
            manifests[form] = StoredManifest(forms[form][0], digest, blob.data)
        for digest in _blobs_named(manifests.values()):
            if (yield self._storage.stat_blob(digest)) is None:
                self.log.warn(
                    "image record {key} names blob {digest}, which storage lacks: building again",
                    key=key,
                    digest=digest,
                )
                self._metrics.cache("manifest_record", hit=False)
                return None
        self._metrics.cache("manifest_record", hit=True)
        built = BuiltImage(platform, manifests)
        self._keep_local(key, built, record)
        self._refresh(key, record)
        return built

    def _refresh(self, key: str, record: ImageRecord) -> None:
        """Write an image record again, so that its time says the image is in use; a
        failure is logged, not the pull's: the record is still there."""
        self._records[key] = (record, self._clock())

        def failed(failure: Any) -> None:
            self.log.warn(
                "could not refresh image record {key}: {reason}",
                key=key,
                reason=failure.getErrorMessage(),
            )

        self._storage.put_record(f"manifests/{key}", record.encode()).addErrback(failed)

    def forget_blob(self, digest: str) -> bool:
        """Drop the images (and their indexes) naming ``digest`` from memory, so that
        the next request reads their records again and finds the blob gone; whether
        any did. A digest no image names costs a dictionary lookup."""
        keys = self._naming.pop(digest, set())
        gone = set()
        for key in keys:
            built = self._local.pop(key, None)
            if built is not None:
                self._unname(key, built)
                gone.add(built.manifests["docker"].digest)
        for index_key in [key for key in self._indexes if gone.intersection(key)]:
            del self._indexes[index_key]
        return bool(keys)

    @inlineCallbacks
    def remember(self, key: str, built: BuiltImage, *, image: str, tag: str, kind: str) -> Any:
        """Record ``built`` under ``key``, for :meth:`cached` here and on other instances;
        ``image`` (canonical), ``tag`` and ``kind`` are what it was built for."""
        record = ImageRecord(
            {form: manifest.digest for form, manifest in built.manifests.items()},
            image,
            tag,
            kind,
        )
        yield self._storage.put_record(f"manifests/{key}", record.encode())
        self._records[key] = (record, self._clock())
        self._keep_local(key, built, record)

    @inlineCallbacks
    def indexes(self, images: Sequence[BuiltImage]) -> Any:
        """The image indexes over ``images`` (``{form: StoredManifest}``), stored and recorded."""
        key = tuple(image.manifests["docker"].digest for image in images)
        if key in self._indexes:
            self._indexes.move_to_end(key)
            return self._indexes[key]
        indexes = {}
        for form, media_type in index_forms_for(self._compression.format).items():
            entries = [
                IndexEntry(
                    image.platform,
                    image.manifests[form].media_type,
                    image.manifests[form].digest,
                    len(image.manifests[form].data),
                )
                for image in images
            ]
            data = image_index(form, entries, layer_format=self._compression.format)
            info = yield self._storage.put_blob(data, media_type)
            indexes[form] = StoredManifest(media_type, info.digest, data)
        record_key = hashlib.sha256("\n".join(key).encode()).hexdigest()
        record = {form: index.digest for form, index in indexes.items()}
        yield self._storage.put_record(f"indexes/{record_key}", json.dumps(record).encode())
        self._indexes[key] = indexes
        while len(self._indexes) > LOCAL_MANIFEST_CACHE_SIZE:
            self._indexes.popitem(last=False)
        return indexes

    def _keep_local(self, key: str, built: BuiltImage, record: ImageRecord) -> None:
        previous = self._local.pop(key, None)
        if previous is not None:
            self._unname(key, previous)
        self._local[key] = built
        self._records.setdefault(key, (record, self._clock()))
        for digest in _blobs_named(built.manifests.values()):
            self._naming.setdefault(digest, set()).add(key)
        while len(self._local) > LOCAL_MANIFEST_CACHE_SIZE:
            self._unname(*self._local.popitem(last=False))

    def _unname(self, key: str, built: BuiltImage) -> None:
        self._records.pop(key, None)
        for digest in _blobs_named(built.manifests.values()):
            keys = self._naming.get(digest)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._naming[digest]


def _blobs_named(manifests: Iterable[StoredManifest]) -> list[str]:
    """The config and layer digests the manifests name, each once."""
    digests: dict[str, None] = {}
    for manifest in manifests:
        document = json.loads(manifest.data)
        for descriptor in [document.get("config", {}), *document.get("layers", [])]:
            digests[descriptor["digest"]] = None
    return list(digests)
