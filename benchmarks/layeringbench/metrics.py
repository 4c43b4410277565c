"""What a sequence of pulls costs under a layering strategy.

A client with an initially empty cache pulls the images in order.

* **Pull ratio by digest** (containerd, current registries and Docker with
  the containerd image store): a layer is downloaded unless a layer with the
  same content (here: the same store paths, nixeryd's layer key) was pulled
  before.
* **Pull ratio by chain** (Docker's classic store, moby#38446): a layer counts
  as cached only if its ChainID is known, i.e. a previously pulled image had the
  same layers up to and including this one, in the same order.

Both are bytes downloaded / compressed bytes of the distinct store paths of all
the images (1.0 is the limit). The **storage ratio** is the registry's stored
layer bytes / distinct store path bytes, by uncompressed (nar) size; by
compressed size it equals the digest pull ratio, as the registry stores each
distinct layer once and the client downloads each distinct layer once.

The layering time is measured per image, and separately for the images whose
closure has :data:`LARGE_CLOSURE` store paths or more.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.layeringbench.corpus import Corpus
from nixeryd.closure import ClosureGraph
from nixeryd.layering import Layer, LayeringStrategy

#: Closures of this many store paths or more are timed separately.
LARGE_CLOSURE = 1000


@dataclass(frozen=True)
class Result:
    strategy: str
    digest_pull_ratio: float
    chain_pull_ratio: float
    storage_ratio: float
    max_layers: int
    mean_layers: float
    #: Layering time per image, in milliseconds.
    milliseconds: float
    #: The same for images of :data:`LARGE_CLOSURE` store paths or more (None: no such image).
    large_milliseconds: float | None


def measure(
    name: str,
    strategy: LayeringStrategy,
    corpus: Corpus,
    images: Sequence[Sequence[str]],
    budget: int,
) -> Result:
    """Pull ``images`` in order with layers from ``strategy``.

    As nixeryd does, the strategy gets ``budget - 1`` layers and every image
    gets one more on top, its symlink forest, which is unique to the image and
    a few kilobytes, so it counts as a layer but not in bytes.
    """
    distinct: set[str] = set()
    pulled_layers: set[str] = set()
    pulled_chains: set[str] = set()
    stored_nar = 0
    digest_bytes = 0
    chain_bytes = 0
    layer_counts = []
    seconds = 0.0
    large_seconds: list[float] = []
    for packages in images:
        closure = corpus.closure(packages)
        distinct.update(closure.paths)
        started = time.perf_counter()
        layers = strategy.group(closure, corpus.popularity, budget - 1)
        elapsed = time.perf_counter() - started
        seconds += elapsed
        if len(closure.paths) >= LARGE_CLOSURE:
            large_seconds.append(elapsed)
        _check(name, closure, layers)
        layer_counts.append(len(layers) + 1)
        chain = ""
        for layer in layers:
            size = sum(corpus.compressed[path] for path in layer.paths)
            key = layer.key
            if key not in pulled_layers:
                pulled_layers.add(key)
                digest_bytes += size
                stored_nar += closure.total_size(layer.paths)
            chain = hashlib.sha256(f"{chain} {key}".encode()).hexdigest()
            if chain not in pulled_chains:
                pulled_chains.add(chain)
                chain_bytes += size
    distinct_bytes = sum(corpus.compressed[path] for path in distinct)
    distinct_nar = sum(corpus.paths[path].nar_size for path in distinct)
    return Result(
        strategy=name,
        digest_pull_ratio=digest_bytes / distinct_bytes,
        chain_pull_ratio=chain_bytes / distinct_bytes,
        storage_ratio=stored_nar / distinct_nar,
        max_layers=max(layer_counts),
        mean_layers=sum(layer_counts) / len(layer_counts),
        milliseconds=seconds * 1000 / len(images),
        large_milliseconds=(
            sum(large_seconds) * 1000 / len(large_seconds) if large_seconds else None
        ),
    )


def _check(name: str, closure: ClosureGraph, layers: Sequence[Layer]) -> None:
    """Every strategy must place each store path exactly once (budgets show in the table)."""
    placed = sorted(path for layer in layers for path in layer.paths)
    if placed != sorted(closure.paths):
        raise AssertionError(f"{name} did not place every store path exactly once")
