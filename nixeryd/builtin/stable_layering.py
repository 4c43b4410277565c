"""Stable layering: layer boundaries that do not depend on what else is in the image.

A client skips a layer it already has, by digest (containerd, current
registries) or only if every layer before it matched too (Docker's ChainID,
moby#38446). Nixery's strategy groups a path with what it dominates *in this
image*, so a library shared by two tools in one image, but used by one tool in
another, lands in different layers; and it merges the layers over the budget
into one layer peculiar to the image. ``benchmarks/layering`` measures what
that costs. This strategy instead:

1. **Groups by global dominance.** Paths are visited referrers first. A path
   joins the group of the paths referencing it when all of them are in one
   group and the image holds *every* path of the package set that references
   it (its popularity count, Nixery's reference count, is at most the number of
   its referrers here); otherwise, and for the image's roots, it heads a group
   of its own. A group is then its head plus what only the head brings in,
   across the whole package set: the same in every image that holds the head
   (unless the other image requested one of its members by name, which makes
   that member a head). Without popularity data every count is 1 and groups
   fall back to what the head dominates in the image.
2. **Keeps the budget by size.** If there are more groups than the budget
   allows, the ``budget - 1`` largest keep a layer each and the small rest share
   one last layer: what is re-downloaded because that layer is peculiar to the
   image is as small as it can be (nixpkgs' auto-layer makes the same bet).
3. **Orders for long common prefixes.** First the layers of the *base*, the
   closure of the roots nearly every image has (the ``shell`` meta-package's
   packages and the ``cacert``/``iana-etc`` nixeryd adds to every image), then
   the others; each part largest first. The base is identical across images,
   so they share it as a prefix; largest-first bounds what follows the first
   layer two images differ in, which Docker re-downloads, to smaller layers.

Ties are broken by store path, so the result depends only on the closure and
the popularity data.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Collection

import networkx as nx

from nixeryd.closure import ClosureGraph, store_path_name
from nixeryd.hookspecs import hookimpl
from nixeryd.layering import Layer, LayeringStrategy
from nixeryd.popularity import Popularity
from nixeryd.runtime import Provider

#: The name under which this strategy is registered.
NAME = "stable"

#: Store path names (without version) of the roots whose closure is the base:
#: what ``shell`` expands to (bashInteractive, coreutils, moreutils, nano) and
#: what nixeryd adds to every image (cacert, iana-etc), as nixpkgs names them.
BASE_PACKAGE_NAMES = (
    "bash-interactive",
    "coreutils",
    "moreutils",
    "nano",
    "nss-cacert",
    "iana-etc",
)


class StableLayering:
    """Groups a closure into layers whose boundaries are the same in every image."""

    def __init__(self, base_names: Collection[str] = BASE_PACKAGE_NAMES) -> None:
        alternatives = "|".join(re.escape(name) for name in sorted(base_names))
        #: A base package's store path name: the name, then a version starting with a digit.
        self._base_name = re.compile(rf"(?:{alternatives})-[0-9]") if base_names else None

    def group(self, closure: ClosureGraph, popularity: Popularity, budget: int) -> list[Layer]:
        if budget < 1:
            raise ValueError(f"layer budget must be at least 1, not {budget}")
        groups = dominance_groups(closure, popularity)
        sizes = {head: closure.total_size(members) for head, members in groups.items()}
        largest_first = sorted(groups, key=lambda head: (-sizes[head], head))
        kept, folded = largest_first[: budget - 1], largest_first[budget - 1 :]
        if len(largest_first) <= budget:
            kept, folded = largest_first, []
        base = self._base(closure)
        layers = [
            Layer(paths=tuple(groups[head]), merge_rating=sizes[head])
            for head in sorted(kept, key=lambda head: (head not in base, -sizes[head], head))
        ]
        if folded:
            rest = [path for head in folded for path in groups[head]]
            layers.append(Layer(paths=tuple(rest), merge_rating=closure.total_size(rest)))
        return layers

    def _base(self, closure: ClosureGraph) -> set[str]:
        """The closure of the image's base roots."""
        base: set[str] = set()
        if self._base_name is None:
            return base
        for root in closure.roots:
            if root not in base and self._base_name.match(store_path_name(root)):
                base |= closure.closure_of(root)
        return base


def dominance_groups(closure: ClosureGraph, popularity: Popularity) -> dict[str, list[str]]:
    """Each group's head with its members (step 1), heads and members in visiting order."""
    graph = closure.graph
    roots = set(closure.roots)
    head_of: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for members in _visiting_order(graph):
        for path in members:
            referrers = [r for r in graph.predecessors(path) if r in head_of]
            heads = {head_of[referrer] for referrer in referrers}
            head = path
            if (
                len(members) == 1
                and path not in roots
                and len(heads) == 1
                and len(referrers) >= popularity.of(path)
            ):
                head = heads.pop()
            head_of[path] = head
            groups.setdefault(head, []).append(path)
    return groups


def _visiting_order(graph: nx.DiGraph) -> list[list[str]]:
    """The paths referrers first, ties by path, each as a unit of its own.

    Kahn's algorithm with a heap, which is networkx's lexicographical topological
    sort at a fraction of its cost (the layering time of closures of thousands of
    paths is mostly this). Nix refuses reference cycles, but a malformed closure
    must still be layered: if there is one, each cycle is visited as one unit
    (its paths heading groups of their own), in the same order over the
    condensation, ties by a unit's smallest path.
    """
    waiting = dict(graph.in_degree())
    ready = [path for path, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order: list[list[str]] = []
    while ready:
        path = heapq.heappop(ready)
        order.append([path])
        for reference in graph.successors(path):
            waiting[reference] -= 1
            if waiting[reference] == 0:
                heapq.heappush(ready, reference)
    if len(order) == len(waiting):
        return order
    components = nx.condensation(graph)
    return [
        sorted(components.nodes[component]["members"])
        for component in nx.lexicographical_topological_sort(
            components, key=lambda c: min(components.nodes[c]["members"])
        )
    ]


@hookimpl
def nixeryd_layering_strategies() -> list[Provider[LayeringStrategy]]:
    return [
        Provider(
            NAME,
            "stable layer boundaries across images: global dominance groups, "
            "base first, largest first",
            lambda runtime: StableLayering(),
        )
    ]
