"""Layer blobs in storage: each written once, found again by the store paths it holds.

A layer's record (``builds/<key>.<compression>``) maps the key of its
contents to the blob's descriptor, so that images sharing a layer share its
blob, across builds, restarts and instances on one bucket. Concurrent builds
that want one layer wait for one write. A build reusing a layer writes its
record again, which garbage collection reads as "in use" (:mod:`nixeryd.gc`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import IO, Any

from twisted.internet.defer import Deferred, inlineCallbacks

from nixeryd.compression import Compression
from nixeryd.forest import symlink_forest
from nixeryd.layering import Layer
from nixeryd.manifest import LayerDescriptor, layer_media_type
from nixeryd.metrics import Metrics
from nixeryd.runtime import ThreadRunner
from nixeryd.singleflight import SingleFlight
from nixeryd.storage import StagedBlob, Storage
from nixeryd.tarball import LayerDigests, write_store_layer, write_tree_layer


class LayerStore:
    """Writes layers to storage through a staged blob, unless storage has them already.

    ``write_in_thread`` runs the writes: a pool as large as the cores, apart
    from the pool for short blocking calls; ``compress_pool`` compresses
    blocks of one layer in parallel, so that one large layer uses every core.
    """

    def __init__(
        self,
        storage: Storage,
        compression: Compression,
        write_in_thread: ThreadRunner,
        metrics: Metrics,
        compress_pool: Executor | None = None,
    ) -> None:
        self._storage = storage
        self._metrics = metrics
        self._compression = compression
        #: The layers' compressor and level: part of every key of what they make up.
        self.compression = compression
        self._write_in_thread = write_in_thread
        self._compress_pool = compress_pool
        self._layers: SingleFlight[LayerDescriptor] = SingleFlight()

    def store_paths(self, layer: Layer) -> Deferred[LayerDescriptor]:
        """The layer of Nix store paths a layering strategy grouped."""
        paths = layer.paths
        return self._layer(
            layer.key,
            lambda out: write_store_layer(
                paths, out, compression=self._compression, executor=self._compress_pool
            ),
        )

    def symlink_forest(self, roots: Sequence[str]) -> Deferred[LayerDescriptor]:
        """The layer linking the packages' files into ``/bin`` and the rest (see nixeryd.forest)."""
        key = hashlib.sha256(("symlink-forest\n" + "\n".join(roots)).encode()).hexdigest()

        def write(out: IO[bytes]) -> LayerDigests:
            entries = symlink_forest(roots)
            return write_tree_layer(
                entries, out, compression=self._compression, executor=self._compress_pool
            )

        return self._layer(key, write)

    def _layer(
        self, key: str, write: Callable[[IO[bytes]], LayerDigests]
    ) -> Deferred[LayerDescriptor]:
        """A layer from the cache, or written once however many builds want it now."""
        return self._layers.run(key, lambda: self._cached_or_written(key, write))

    @inlineCallbacks
    def _cached_or_written(self, key: str, write: Callable[[IO[bytes]], LayerDigests]) -> Any:
        # Blob bytes depend on the compressor and level, so the record does too.
        record_name = f"builds/{key}.{self._compression.key}"
        record = yield self._storage.get_record(record_name)
        if record is not None:
            # Written again first, so that its time tells garbage collection that a build
            # is about to name its blob (see nixeryd.gc), then the blob is checked.
            yield self._storage.put_record(record_name, record)
            cached = LayerDescriptor(**json.loads(record))
            if (yield self._storage.stat_blob(cached.digest)) is not None:
                self._metrics.cache("layer_record", hit=True)
                return cached
        self._metrics.cache("layer_record", hit=False)
        staged, digests = yield self._staged_and_written(write)
        info = yield staged.commit(digests.digest, layer_media_type(self._compression.format))
        descriptor = LayerDescriptor(digest=info.digest, size=info.size, diff_id=digests.diff_id)
        self._metrics.layer_written(self._compression.compressor, info.size)
        yield self._storage.put_record(record_name, json.dumps(descriptor.__dict__).encode())
        return descriptor

    def _staged_and_written(
        self, write: Callable[[IO[bytes]], LayerDigests]
    ) -> Deferred[tuple[StagedBlob, LayerDigests]]:
        """A new staged blob with the layer written to it, both in a write thread.

        Staging creates a file (or a temporary one, for object storage): on the
        reactor thread, its system calls would each give up the GIL and wait for it
        again while the write threads hold it, delaying the cached answers queued
        behind. Nothing cancels the write (callers wait through :class:`SingleFlight`,
        whose work runs on), so the blob is thrown away only when the write fails."""

        def stage_and_write() -> tuple[StagedBlob, LayerDigests]:
            staged = self._storage.stage_blob()
            try:
                return staged, write(staged.file)
            except BaseException:
                staged.discard()
                raise

        return self._write_in_thread(stage_and_write)
