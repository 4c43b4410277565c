"""Layering: how an image's closure is grouped into layers.

Strategies are plugins (see :mod:`nixeryd.hookspecs`); this module holds what
they share: the :class:`Layer` they return and the :class:`LayeringStrategy`
contract the image builder calls.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from nixeryd.closure import ClosureGraph
from nixeryd.popularity import Popularity

#: Docker refuses more than 125 layers; Nixery keeps room for a few of the user's own.
DEFAULT_LAYER_BUDGET = 94


@dataclass(frozen=True)
class Layer:
    """A group of store paths that become one layer blob.

    ``merge_rating`` orders layers in the manifest (highest first), so that
    images share a long common prefix of layers.
    """

    paths: tuple[str, ...]
    merge_rating: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(sorted(set(self.paths))))

    @property
    def key(self) -> str:
        """The layer cache key: a hash of the sorted store paths (Nixery's ``builds/<key>``)."""
        return hashlib.sha256("\n".join(self.paths).encode()).hexdigest()


class LayeringStrategy(Protocol):
    """Groups a closure into at most ``budget`` layers.

    Every store path of ``closure.paths`` must be in exactly one layer. The
    result is in manifest order. Implementations are pure and synchronous;
    the builder runs them off the reactor thread for large closures.
    """

    def group(self, closure: ClosureGraph, popularity: Popularity, budget: int) -> list[Layer]: ...
