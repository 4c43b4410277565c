"""The layering strategies the benchmark compares.

nixeryd's own strategies are used as the daemon runs them. The others are
re-implemented from their published descriptions:

* ``buildLayeredImage``: nixpkgs' ``referencesByPopularity``
  (``pkgs/build-support/references-by-popularity/closure-graph.py``): the
  closure is unrolled into a tree from the paths nothing references; a path's
  popularity is the recursive count described there (each time a subtree is
  merged into its parent, every count in it grows by one); paths are sorted by
  popularity, most popular first, ties by name; ``dockerTools`` gives the first
  ``budget - 1`` paths a layer each and puts the rest in one last layer.
* ``auto-layer``: nixpkgs' 2024 ``auto-layer`` (``pkgs/build-support/docker/
  auto-layer.py``): the largest store paths (by nar size), one at a time, become
  primary paths. Every path belongs to the layer identified by a set of primary
  paths: a new primary path P takes each of its dependencies away from the
  primary paths that depend on P, and adds itself to a dependency's set unless
  that set already holds one of P's dependencies. It stops before the number of
  distinct sets exceeds the limit. Layers are ordered by closure size, smallest
  first.

One more is no strategy a registry can run, but a reference for what one could reach
within the budget: ``workload oracle`` knows the whole workload beforehand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache

import networkx as nx

from benchmarks.layeringbench.corpus import Corpus
from nixeryd.builtin.layering import PopularityLayering
from nixeryd.builtin.prefix_layering import PrefixLayering
from nixeryd.builtin.stable_layering import StableLayering
from nixeryd.closure import ClosureGraph
from nixeryd.layering import Layer, LayeringStrategy
from nixeryd.popularity import Popularity


class SingleLayer:
    """Everything in one layer: nothing is ever shared."""

    def group(self, closure: ClosureGraph, popularity: Popularity, budget: int) -> list[Layer]:
        return [Layer(paths=tuple(closure.paths), merge_rating=0)]


class LayerPerPath:
    """One layer per store path, whatever the budget: the limit of sharing by digest.

    Ordered as ``buildLayeredImage`` orders paths, so that its chain ratio is
    that of a popularity order without a budget.
    """

    def group(self, closure: ClosureGraph, popularity: Popularity, budget: int) -> list[Layer]:
        return [Layer(paths=(path,), merge_rating=0) for path in popularity_contest_order(closure)]


class BuildLayeredImage:
    """nixpkgs' ``dockerTools.buildLayeredImage`` with ``maxLayers = budget``."""

    def group(self, closure: ClosureGraph, popularity: Popularity, budget: int) -> list[Layer]:
        ordered = popularity_contest_order(closure)
        own = ordered[: budget - 1]
        layers = [Layer(paths=(path,), merge_rating=0) for path in own]
        if ordered[budget - 1 :]:
            layers.append(Layer(paths=tuple(ordered[budget - 1 :]), merge_rating=0))
        return layers


def popularity_contest_order(closure: ClosureGraph) -> list[str]:
    """``closure-graph.py``'s order: by its popularity count, most popular first, then name."""
    references: Mapping[str, Sequence[str]] = {
        path: sorted(closure.graph.successors(path)) for path in closure.paths
    }

    @cache
    def contest_below(path: str) -> Mapping[str, int]:
        counts: dict[str, int] = {}
        for child in references[path]:
            counts[child] = counts.get(child, 0) + 1
            for below, count in contest_below(child).items():
                counts[below] = counts.get(below, 0) + count + 1
        return counts

    popularity: dict[str, int] = {}
    for root in (path for path in closure.paths if closure.graph.in_degree(path) == 0):
        popularity[root] = popularity.get(root, 0) + 1
        for below, count in contest_below(root).items():
            popularity[below] = popularity.get(below, 0) + count + 1
    return sorted(closure.paths, key=lambda path: (-popularity.get(path, 0), _package_name(path)))


def _package_name(path: str) -> str:
    """``closure-graph.py``'s tie-break: the path with its hash moved to the end."""
    parts = path.split("-")
    return "-".join([*parts[1:], parts[0]])


class AutoLayer:
    """nixpkgs' ``auto-layer`` with ``layer_limit = budget``."""

    def group(self, closure: ClosureGraph, popularity: Popularity, budget: int) -> list[Layer]:
        graph = closure.graph
        dependencies = {path: frozenset(nx.descendants(graph, path)) for path in closure.paths}
        users = {path: frozenset(nx.ancestors(graph, path)) for path in closure.paths}
        split: dict[str, frozenset[str]] = dict.fromkeys(closure.paths, frozenset())
        by_size = sorted(closure.paths.values(), key=lambda info: info.nar_size)
        while by_size:
            primary = by_size.pop().path
            candidate = dict(split)
            candidate[primary] = frozenset({primary})
            for dependency in dependencies[primary]:
                remaining = candidate[dependency] - users[primary]
                if not remaining & dependencies[primary]:
                    remaining |= {primary}
                candidate[dependency] = remaining
            if len(set(candidate.values())) > budget:
                break
            split = candidate
        members: dict[frozenset[str], list[str]] = {}
        for path, identity in split.items():
            members.setdefault(identity, []).append(path)
        closure_sizes = {
            identity: closure.total_size(set(paths).union(*(dependencies[path] for path in paths)))
            for identity, paths in members.items()
        }
        order = sorted(members, key=lambda identity: (closure_sizes[identity], sorted(identity)))
        return [Layer(paths=tuple(members[identity]), merge_rating=0) for identity in order]


class WorkloadOracle:
    """Layers from the whole workload, known beforehand: a reference, not a strategy.

    Store paths held by exactly the same images of the workload always travel
    together, so each such class can be one layer, downloaded once; a registry
    cannot know the classes, since they depend on the requests still to come.
    Over the budget, as nixeryd's strategies do, the largest classes keep a layer
    each and the smallest share the last one. This is not the optimum (merging
    classes by what later images hold could do better), but what a strategy that
    knew which paths travel together would reach by that simple rule: the gap
    between it and a strategy is what the strategy loses by not knowing.
    """

    def __init__(self, corpus: Corpus, images: Sequence[Sequence[str]]) -> None:
        holders: dict[str, list[int]] = {}
        for index, packages in enumerate(dict.fromkeys(tuple(image) for image in images)):
            for path in corpus.closure(packages).paths:
                holders.setdefault(path, []).append(index)
        self._holders = {path: tuple(indexes) for path, indexes in holders.items()}

    def group(self, closure: ClosureGraph, popularity: Popularity, budget: int) -> list[Layer]:
        classes: dict[tuple[int, ...], list[str]] = {}
        for path in sorted(closure.paths):
            classes.setdefault(self._holders.get(path, ()), []).append(path)
        sized = sorted(classes.values(), key=lambda paths: (-closure.total_size(paths), paths))
        if len(sized) > budget:
            sized[budget - 1 :] = [[path for paths in sized[budget - 1 :] for path in paths]]
        return [Layer(paths=tuple(paths), merge_rating=0) for paths in sized]


#: The strategies of the table, in its order.
STRATEGY_NAMES = (
    "single layer",
    "layer per path (unbounded)",
    "buildLayeredImage",
    "auto-layer",
    "nixery (popularity)",
    "nixeryd (stable)",
    "nixeryd (prefix)",
    "workload oracle",
)


def strategies(corpus: Corpus, images: Sequence[Sequence[str]]) -> dict[str, LayeringStrategy]:
    """The strategies, set up for ``corpus``, and the oracle for the workload ``images``.

    nixeryd's stable and prefix strategies are told the store path names of the
    corpus's shell and implicit packages, as the daemon knows nixpkgs' names for them.
    """
    return {
        "single layer": SingleLayer(),
        "layer per path (unbounded)": LayerPerPath(),
        "buildLayeredImage": BuildLayeredImage(),
        "auto-layer": AutoLayer(),
        "nixery (popularity)": PopularityLayering(),
        "nixeryd (stable)": StableLayering(base_names=corpus.base_names),
        "nixeryd (prefix)": PrefixLayering(base_parts=corpus.base_parts),
        "workload oracle": WorkloadOracle(corpus, images),
    }
