"""Prefix layering: the base laid out the same in every image, whatever the budget.

The ``stable`` strategy (:mod:`nixeryd.builtin.stable_layering`) gives every
global dominance group a layer while the budget allows, and over the budget
lets the smallest groups of the *whole image* share its last layer. Which
groups those are depends on everything else in the image, so once images hold
hundreds of store paths (many tools, or tools with big closures) the base's
small groups (libraries of ``shell``'s packages, ``netbase``, ``base-files``)
land in a last layer peculiar to the image, the base's layers differ from
image to image, and both the bytes of that layer and Docker's chain of layers
after the first difference are downloaded again. ``benchmarks/layering``
measures this on workloads of large closures (``benchmarks/README.md``).

This strategy lays the base out on its own, as a fixed prefix:

1. **Groups by global dominance**, as ``stable`` does
   (:func:`~nixeryd.builtin.stable_layering.dominance_groups`): a group is its
   head plus what only the head brings in across the whole package set.
2. **The base in parts, each with a fixed number of layers.** The parts, in
   order: the closure of what nixeryd adds to every image (``cacert``,
   ``iana-etc``), then what the ``shell`` packages add to it. Each part gets
   ``max(1, round(budget / 24))`` layers (4 at Nixery's budget of 94): its
   largest groups a layer each, its other groups one layer. A part's content
   depends only on which base packages the image has, so its layers are the
   same in every image that has them, in small images and large ones alike;
   images without ``shell`` still share the first part's layers. As a prefix
   it is what Docker's chain matching (moby#38446) reuses first.
3. **The rest by size**, on the budget the base leaves: the largest groups a
   layer each, the smallest share the last layer (what is re-downloaded
   because that layer is peculiar to the image is as small as it can be).

Few layers for the base cost little: its parts are pulled whole or not at
all. Taking them out of the competition for the budget leaves the other
layers to what differs between images. Ties are broken by store path, so the
result depends only on the closure and the popularity data.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence

from nixeryd.builtin.stable_layering import dominance_groups
from nixeryd.closure import ClosureGraph, store_path_name
from nixeryd.hookspecs import hookimpl
from nixeryd.layering import Layer, LayeringStrategy
from nixeryd.popularity import Popularity
from nixeryd.runtime import Provider

#: The name under which this strategy is registered.
NAME = "prefix"

#: Store path names (without version) of the base's roots, part by part, in layer
#: order, as nixpkgs names them: what nixeryd adds to every image (cacert,
#: iana-etc), then what ``shell`` expands to (bashInteractive, coreutils,
#: moreutils, nano).
BASE_PARTS = (
    ("nss-cacert", "iana-etc"),
    ("bash-interactive", "coreutils", "moreutils", "nano"),
)

#: One layer per base part for every this many layers of budget.
BUDGET_PER_BASE_LAYER = 24


class PrefixLayering:
    """Groups a closure into layers, the base's the same in every image that has it."""

    def __init__(self, base_parts: Sequence[Collection[str]] = BASE_PARTS) -> None:
        #: Per part, a base package's store path name: a name, then a version from a digit.
        self._parts = [
            re.compile(rf"(?:{'|'.join(re.escape(name) for name in sorted(names))})-[0-9]")
            for names in base_parts
            if names
        ]

    def group(self, closure: ClosureGraph, popularity: Popularity, budget: int) -> list[Layer]:
        if budget < 1:
            raise ValueError(f"layer budget must be at least 1, not {budget}")
        groups = dominance_groups(closure, popularity)
        head_of = {path: head for head, members in groups.items() for path in members}
        per_part = max(1, round(budget / BUDGET_PER_BASE_LAYER))
        layers: list[Layer] = []
        placed: set[str] = set()
        for part in self._base_parts(closure):
            layers += _fold(closure, _split(part - placed, head_of), per_part)
            placed |= part
        rest = _split(set(closure.paths) - placed, head_of)
        layers += _fold(closure, rest, max(1, budget - len(layers)))
        if len(layers) > budget:  # a budget too small for the base's parts
            merged = [path for layer in layers[budget - 1 :] for path in layer.paths]
            layers[budget - 1 :] = [Layer(tuple(merged), closure.total_size(merged))]
        return layers

    def _base_parts(self, closure: ClosureGraph) -> list[set[str]]:
        """Each part's closure: of the image's roots that are that part's packages."""
        parts = []
        for pattern in self._parts:
            part: set[str] = set()
            for root in closure.roots:
                if root not in part and pattern.match(store_path_name(root)):
                    part |= closure.closure_of(root)
            parts.append(part)
        return parts


def _split(paths: set[str], head_of: dict[str, str]) -> list[list[str]]:
    """``paths`` by dominance group, each group's paths sorted."""
    by_head: dict[str, list[str]] = {}
    for path in sorted(paths):
        by_head.setdefault(head_of[path], []).append(path)
    return list(by_head.values())


def _fold(closure: ClosureGraph, groups: Iterable[list[str]], layers: int) -> list[Layer]:
    """The ``layers - 1`` largest groups a layer each, the others one more; largest first."""
    sized = sorted(((closure.total_size(g), g) for g in groups), key=lambda s: (-s[0], s[1]))
    if len(sized) > layers:
        rest = [path for _, group in sized[layers - 1 :] for path in group]
        sized[layers - 1 :] = [(closure.total_size(rest), rest)]
    return [Layer(paths=tuple(group), merge_rating=size) for size, group in sized]


@hookimpl
def nixeryd_layering_strategies() -> list[Provider[LayeringStrategy]]:
    return [
        Provider(
            NAME,
            "global dominance groups, the base a fixed prefix of a few layers, "
            "the rest largest first",
            lambda runtime: PrefixLayering(),
        )
    ]
