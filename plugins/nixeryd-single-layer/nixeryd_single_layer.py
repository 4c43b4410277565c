"""A nixeryd plugin: the ``single-layer`` layering strategy.

Every store path in one layer: images share nothing, but each is one
download. A baseline for layering benchmarks and the smallest example of a
strategy plugin.
"""

from __future__ import annotations

from nixeryd import hookimpl
from nixeryd.closure import ClosureGraph
from nixeryd.layering import Layer, LayeringStrategy
from nixeryd.popularity import Popularity
from nixeryd.runtime import Provider

NAME = "single-layer"


class SingleLayer:
    def group(self, closure: ClosureGraph, popularity: Popularity, budget: int) -> list[Layer]:
        if budget < 1:
            raise ValueError("the layer budget must be at least 1")
        paths = tuple(closure.paths)
        return [Layer(paths, merge_rating=closure.total_size(paths))] if paths else []


@hookimpl
def nixeryd_layering_strategies() -> list[Provider[LayeringStrategy]]:
    return [Provider(NAME, "the whole closure in one layer", lambda runtime: SingleLayer())]
