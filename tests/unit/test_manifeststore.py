"""ManifestStore: an image is answered only while the blobs its manifests name exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from nixeryd.builtin.filesystem import FilesystemStorage
from nixeryd.compression import Compression
from nixeryd.manifest import LayerDescriptor
from nixeryd.manifeststore import ManifestStore
from nixeryd.metrics import Metrics
from nixeryd.platform import host_platform

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
#: What the builder looks an image up for.
FOR = {"image": "linux/amd64:hello", "tag": "latest", "kind": "eval"}


def result(d: Deferred[Any]) -> Any:
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "Deferred has not fired"
    return outcome[0]


def stored_image(storage: FilesystemStorage) -> tuple[ManifestStore, LayerDescriptor]:
    layer = result(storage.put_blob(b"layer bytes", LAYER))
    descriptor = LayerDescriptor(layer.digest, layer.size, layer.digest)
    store = ManifestStore(storage, Compression.default("zlib"), Metrics())
    built = result(store.write(host_platform(), [descriptor], ["hello"]))
    result(store.remember("key", built, **FOR))
    return store, descriptor


def test_a_record_naming_a_missing_layer_is_not_answered(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path)
    _, layer = stored_image(storage)
    restarted = ManifestStore(storage, Compression.default("zlib"), Metrics())
    assert result(restarted.cached("key", host_platform(), **FOR)) is not None
    result(storage.delete_blob(layer.digest))
    again = ManifestStore(storage, Compression.default("zlib"), Metrics())
    assert result(again.cached("key", host_platform(), **FOR)) is None


def test_forgetting_a_blob_drops_the_images_naming_it_from_memory(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path)
    store, layer = stored_image(storage)
    assert result(store.cached("key", host_platform(), **FOR)) is not None
    store.forget_blob("sha256:" + "0" * 64)
    result(storage.delete_blob(layer.digest))
    assert result(store.cached("key", host_platform(), **FOR)) is not None  # held in memory
    store.forget_blob(layer.digest)
    assert result(store.cached("key", host_platform(), **FOR)) is None
