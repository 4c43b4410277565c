"""A nixeryd plugin: the ``single-layer`` layering strategy.

Every store path in one layer: images share nothing, but each is one
download. A baseline for layering benchmarks and the smallest example of a
strategy plugin; like every plugin, it imports only :mod:`nixeryd.plugin`.
"""

from __future__ import annotations

from nixeryd.plugin import ClosureGraph, Layer, LayeringStrategy, Popularity, Provider, hookimpl

NAME = "single-layer"


class SingleLayer:
    """A :class:`~nixeryd.plugin.LayeringStrategy`: pure and synchronous, as the contract asks."""

    def group(self, closure: ClosureGraph, popularity: Popularity, budget: int) -> list[Layer]:
        if budget < 1:
            raise ValueError("the layer budget must be at least 1")
        paths = tuple(closure.paths)
        return [Layer(paths, merge_rating=closure.total_size(paths))] if paths else []


@hookimpl
def nixeryd_layering_strategies() -> list[Provider[LayeringStrategy]]:
    return [Provider(NAME, "the whole closure in one layer", lambda runtime: SingleLayer())]
