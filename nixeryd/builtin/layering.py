"""Nixery's popularity layering: group a closure so that layers recur across images.

A registry serving images built on demand only saves storage and bandwidth if
different images contain *the same layers*, byte for byte: a layer is cached by
the hash of its store paths (:attr:`nixeryd.layering.Layer.key`), and clients
skip layers they already have. So the grouping must not depend on the image as
a whole, but on structure that is the same wherever a path appears.

The strategy (Nixery's ``layers`` package, kept faithfully):

1. Graph: a synthetic image root with an edge to each requested top-level store
   path, and an edge from each store path to each path it references.
2. A path whose closure (itself and everything it references transitively) is
   over :data:`BIG_CLOSURE_BYTES` of nar size, or whose popularity is at least
   :data:`POPULAR_COUNT`, gets an extra edge from the root. Popular paths
   (glibc, openssl, cacert) are in many images, and big closures are expensive
   to download twice, so both are worth a layer of their own.
3. Dominator tree from the root. Each direct child of the root heads a layer of
   itself and every path it dominates, i.e. every path that is only reachable
   through it. A dominated path can only be in the image because its head is,
   so head and dominated paths travel together in every image containing the
   head, and the layer comes out identical each time. Paths reachable along two
   independent routes (a library two packages share) are dominated by the root
   and so become layers of their own, shareable between images.
4. Merge rating of a layer = popularity of its head * total nar size of the
   layer: how much is lost (in reuse and in bytes) if the layer is not kept
   separate.
5. While there are more layers than the budget, the lowest-rated layers are
   merged. Exactly as Nixery does it, the ratings are sorted once, ascending,
   and each merge combines the running merged layer with the next-lowest
   original layer; the merged layer's rating is the sum of its parts. This
   folds the ``len - budget + 1`` lowest-rated layers into one and keeps the
   ``budget - 1`` highest-rated layers intact. Re-ranking the merged layer by
   its summed rating (a heap of pairwise merges) would not buy anything: a
   merged layer is a combination peculiar to this image and unlikely to recur,
   so letting it outrank and absorb an intact, shareable layer only loses reuse.
6. Layers are returned by merge rating, highest first, so images share a long
   common prefix of layers (Docker reuses layers by chain, moby#38446).

Nixery breaks ties by Go's unstable sort; here every tie (equal ratings while
merging, equal ratings in the result) is broken by the layer's sorted paths, so
the result depends only on the closure, never on dict or set iteration order.
Nixery sums the *closure* sizes of a layer's members when rating it, counting
shared dependencies many times over; here a layer's size is the sum of its
members' own nar sizes, which is the size of the layer's content.
"""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx

from nixeryd.closure import ClosureGraph
from nixeryd.hookspecs import hookimpl
from nixeryd.layering import Layer, LayeringStrategy
from nixeryd.popularity import Popularity
from nixeryd.runtime import Provider

#: The name under which this strategy is registered.
NAME = "popularity"

#: A closure of more nar bytes than this heads its own layer. 100 MB in SI
#: units (100 * 1000 * 1000 bytes), Nixery's ``100 * 1000000``.
BIG_CLOSURE_BYTES = 100 * 1000 * 1000

#: A path at least this popular heads its own layer (Nixery's threshold).
POPULAR_COUNT = 100

#: The synthetic image root. Not a string, so it can never collide with a path.
_ROOT = object()


class PopularityLayering:
    """Groups a closure into layers by dominator tree and popularity, as Nixery does."""

    def group(self, closure: ClosureGraph, popularity: Popularity, budget: int) -> list[Layer]:
        if budget < 1:
            raise ValueError(f"layer budget must be at least 1, not {budget}")
        popularities = {path: popularity.of(path) for path in closure.paths}
        closure_sizes, unreached = _closure_sizes_and_unreached(closure)
        heads = [
            *closure.roots,
            # Only a malformed closure has paths its roots do not reach; they
            # still have to go somewhere, so they hang off the image root too.
            *unreached,
            *(
                path
                for path, size in closure_sizes.items()
                if size > BIG_CLOSURE_BYTES or popularities[path] >= POPULAR_COUNT
            ),
        ]
        layers = [
            Layer(
                paths=tuple(members),
                merge_rating=popularities[head] * closure.total_size(members),
            )
            for head, members in _dominated_groups(closure, heads).items()
        ]
        return sorted(_fold_into_budget(layers, budget), key=_highest_rating_first)


def _closure_sizes_and_unreached(closure: ClosureGraph) -> tuple[dict[str, int], list[str]]:
    """The nar size of each path's closure, and one path of each part no root reaches.

    Sizes are exact: a dependency reached along several routes counts once. Each
    closure is kept as a bit mask over the paths (a few hundred bytes for
    thousands of paths), built in one pass over the strongly connected
    components in reverse topological order (components are single paths, as
    Nix refuses reference cycles). A mask's total size is a popcount per bit of
    the nar sizes: sum over k of 2**k * |closure & {paths whose size has bit k}|.
    """
    bit = {path: 1 << index for index, path in enumerate(closure.paths)}
    planes = [0] * max((info.nar_size.bit_length() for info in closure.paths.values()), default=0)
    for path, info in closure.paths.items():
        for k in range(info.nar_size.bit_length()):
            if info.nar_size >> k & 1:
                planes[k] |= bit[path]

    components = nx.condensation(closure.graph)
    roots = set(closure.roots)
    masks: dict[int, int] = {}
    sizes: dict[str, int] = {}
    unreached: list[str] = []
    for component in reversed(list(nx.topological_sort(components))):
        members: set[str] = components.nodes[component]["members"]
        mask = 0
        for path in members:
            mask |= bit[path]
        for successor in components.successors(component):
            mask |= masks[successor]
        masks[component] = mask
        size = sum((mask & plane).bit_count() << k for k, plane in enumerate(planes))
        sizes.update(dict.fromkeys(members, size))
        # Every component is reachable from a component nothing references, and
        # such a component is reachable from the roots only if it holds a root.
        if components.in_degree(component) == 0 and roots.isdisjoint(members):
            unreached.append(min(members))
    return sizes, unreached


def _dominated_groups(closure: ClosureGraph, heads: Iterable[str]) -> dict[str, list[str]]:
    """Each direct child of the image root in the dominator tree, with what it dominates."""
    graph = closure.graph.copy()
    graph.add_node(_ROOT)  # even when there is nothing to hang off it
    graph.add_edges_from((_ROOT, head) for head in heads)
    # Paths the image root immediately dominates head layers and have no parent
    # here (networkx < 3.5 also maps the image root to itself; dropped alike).
    parent: dict[str, str] = {
        node: dominator
        for node, dominator in nx.immediate_dominators(graph, _ROOT).items()
        if dominator is not _ROOT
    }
    head_of: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for path in closure.paths:
        # Climb the dominator tree to the root's child, remembering the way so
        # every path is climbed over once.
        climbed: list[str] = []
        node = path
        while node not in head_of and node in parent:
            climbed.append(node)
            node = parent[node]
        head = head_of.get(node, node)
        head_of.update(dict.fromkeys(climbed, head))
        head_of[node] = head
        groups.setdefault(head, []).append(path)
    return groups


def _fold_into_budget(layers: list[Layer], budget: int) -> list[Layer]:
    """Merge the lowest-rated layers into one until ``budget`` layers remain (see step 5)."""
    if len(layers) <= budget:
        return layers
    ascending = sorted(layers, key=_lowest_rating_first)
    folded = ascending[: len(layers) - budget + 1]
    merged = Layer(
        paths=tuple(path for layer in folded for path in layer.paths),
        merge_rating=sum(layer.merge_rating for layer in folded),
    )
    return [merged, *ascending[len(folded) :]]


def _lowest_rating_first(layer: Layer) -> tuple[int, tuple[str, ...]]:
    return layer.merge_rating, layer.paths


def _highest_rating_first(layer: Layer) -> tuple[int, tuple[str, ...]]:
    return -layer.merge_rating, layer.paths


@hookimpl
def nixeryd_layering_strategies() -> list[Provider[LayeringStrategy]]:
    return [
        Provider(
            NAME,
            "Nixery's strategy: dominator tree, popularity and size thresholds, merge rating",
            lambda runtime: PopularityLayering(),
        )
    ]
