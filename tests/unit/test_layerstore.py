"""The layer store: a layer is staged and written in a write thread, never on the reactor's."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from nixeryd.builtin.filesystem import FilesystemStagedBlob, FilesystemStorage
from nixeryd.compression import Compression
from nixeryd.layering import Layer
from nixeryd.layerstore import LayerStore
from nixeryd.metrics import Metrics


class ThreadNotingStorage(FilesystemStorage):
    """Filesystem storage that notes the thread each blob is staged on."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.staged_on: list[threading.Thread] = []

    def stage_blob(self) -> FilesystemStagedBlob:
        self.staged_on.append(threading.current_thread())
        return super().stage_blob()


def in_thread(work: Any) -> Deferred[Any]:
    return deferToThread(work)


@pytest.fixture
def storage(tmp_path: Path) -> ThreadNotingStorage:
    return ThreadNotingStorage(tmp_path / "storage")


@pytest_twisted.inlineCallbacks
def test_a_layer_is_staged_in_the_thread_that_writes_it(storage: ThreadNotingStorage) -> Any:
    yield storage.start()
    layers = LayerStore(storage, Compression("zlib", 6), in_thread, Metrics())
    descriptor = yield layers.symlink_forest([])
    assert storage.staged_on and threading.main_thread() not in storage.staged_on
    assert (yield storage.stat_blob(descriptor.digest)).size == descriptor.size


@pytest_twisted.inlineCallbacks
def test_a_failed_write_leaves_no_staged_file(storage: ThreadNotingStorage, tmp_path: Path) -> Any:
    yield storage.start()
    layers = LayerStore(storage, Compression("zlib", 6), in_thread, Metrics())
    vanished = str(tmp_path / "nix" / "store" / "0000-vanished")
    with pytest.raises(OSError):
        yield layers.store_paths(Layer(paths=(vanished,), merge_rating=1))
    assert storage.staged_on
    assert list((tmp_path / "storage" / "tmp").iterdir()) == []
