"""Nixery's popularity layering on hand-made closures with known dominator trees."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixeryd.builtin.layering import (
    BIG_CLOSURE_BYTES,
    NAME,
    POPULAR_COUNT,
    PopularityLayering,
)
from nixeryd.closure import ClosureGraph, StorePath
from nixeryd.layering import DEFAULT_LAYER_BUDGET, Layer, LayeringStrategy
from nixeryd.popularity import Popularity

NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
MB = 1000 * 1000

#: A package: its nar size and the names of the packages it references.
Spec = tuple[int, Sequence[str]]


def store_path(name: str) -> str:
    """A well-formed store path for ``name``, its hash derived from the name."""
    digest = hashlib.sha256(name.encode()).digest()
    return "/nix/store/" + "".join(NIX_BASE32[byte % 32] for byte in digest) + f"-{name}-1.0"


def closure_of(roots: Iterable[str], specs: Mapping[str, Spec]) -> ClosureGraph:
    """A closure of packages by name; paths are inserted in ``specs`` order."""
    return ClosureGraph(
        [store_path(root) for root in roots],
        {
            store_path(name): StorePath(
                path=store_path(name),
                nar_size=size,
                references=tuple(store_path(ref) for ref in references),
            )
            for name, (size, references) in specs.items()
        },
    )


def popular(counts: Mapping[str, int]) -> Popularity:
    return Popularity({f"{name}-1.0": count for name, count in counts.items()})


def group(
    closure: ClosureGraph,
    popularity: Popularity | None = None,
    budget: int = DEFAULT_LAYER_BUDGET,
) -> list[Layer]:
    layers = PopularityLayering().group(closure, popularity or Popularity(), budget)
    assert_partition(closure, layers)
    assert len(layers) <= budget
    return layers


def assert_partition(closure: ClosureGraph, layers: Sequence[Layer]) -> None:
    """Every store path of the closure is in exactly one layer, and nothing else is."""
    placed = [path for layer in layers for path in layer.paths]
    assert sorted(placed) == sorted(closure.paths)


def names(layers: Iterable[Layer]) -> list[set[str]]:
    """The layers as sets of package names, in order."""
    return [
        {path.split("-", 1)[1].removesuffix("-1.0") for path in layer.paths} for layer in layers
    ]


def test_the_strategy_satisfies_the_protocol_and_has_a_name() -> None:
    strategy: LayeringStrategy = PopularityLayering()
    assert strategy.group(closure_of(["a"], {"a": (1, [])}), Popularity(), 1)
    assert NAME == "popularity"


def test_a_chain_stays_in_the_one_layer_of_its_root() -> None:
    closure = closure_of(["app"], {"app": (10, ["lib"]), "lib": (20, ["libc"]), "libc": (30, [])})
    layers = group(closure, popular({"app": 7}))
    assert names(layers) == [{"app", "lib", "libc"}]
    assert layers[0].merge_rating == 7 * 60


def test_a_library_two_roots_share_is_dominated_by_the_image_root_and_heads_a_layer() -> None:
    closure = closure_of(
        ["a", "b"],
        {
            "a": (1, ["a-private", "shared"]),
            "a-private": (1, []),
            "b": (1, ["shared"]),
            "shared": (1, ["shared-dep"]),
            "shared-dep": (1, []),
        },
    )
    layers = group(closure)
    assert sorted(map(sorted, names(layers))) == [
        ["a", "a-private"],
        ["b"],
        ["shared", "shared-dep"],
    ]


def test_a_root_another_root_references_heads_its_own_layer() -> None:
    closure = closure_of(["bash", "libc"], {"bash": (1, ["libc"]), "libc": (1, [])})
    assert sorted(map(sorted, names(group(closure)))) == [["bash"], ["libc"]]


def test_popular_paths_head_their_own_layer() -> None:
    closure = closure_of(
        ["app"],
        {
            "app": (1, ["openssl", "helper"]),
            "openssl": (1, ["zlib"]),
            "zlib": (1, []),
            "helper": (1, []),
        },
    )
    at_threshold = group(closure, popular({"openssl": POPULAR_COUNT}))
    assert sorted(map(sorted, names(at_threshold))) == [["app", "helper"], ["openssl", "zlib"]]
    below = group(closure, popular({"openssl": POPULAR_COUNT - 1}))
    assert names(below) == [{"app", "helper", "openssl", "zlib"}]


def test_iana_etc_is_always_popular() -> None:
    closure = closure_of(["app"], {"app": (1, ["iana-etc"]), "iana-etc": (1, [])})
    assert sorted(map(sorted, names(group(closure)))) == [["app"], ["iana-etc"]]


@pytest.mark.parametrize(("extra", "split"), [(0, False), (1, True)])
def test_paths_with_closures_over_100_mb_head_their_own_layer(extra: int, split: bool) -> None:
    # big's closure is a diamond: big -> (left, right) -> base. base counts once,
    # so the closure is exactly the threshold, and one byte more is over it.
    base = BIG_CLOSURE_BYTES - 3
    closure = closure_of(
        ["app"],
        {
            "app": (50 * MB, ["big"]),
            "big": (1 + extra, ["left", "right"]),
            "left": (1, ["base"]),
            "right": (1, ["base"]),
            "base": (base, []),
        },
    )
    expected = (
        [{"app"}, {"big", "left", "right", "base"}]
        if split
        else [{"app", "big", "left", "right", "base"}]
    )
    assert sorted(map(sorted, names(group(closure)))) == sorted(map(sorted, expected))
    assert BIG_CLOSURE_BYTES == 100 * 1000 * 1000


def independent_roots(ratings: Mapping[str, int]) -> tuple[ClosureGraph, Popularity]:
    """Roots without references, each rated by popularity (the nar size is 1)."""
    closure = closure_of(ratings, {name: (1, []) for name in ratings})
    return closure, popular(ratings)


def test_layers_are_ordered_by_merge_rating_highest_first_ties_by_paths() -> None:
    closure, popularity = independent_roots({"a": 5, "b": 50, "c": 5, "d": 20})
    layers = group(closure, popularity)
    assert [layer.merge_rating for layer in layers] == [50, 20, 5, 5]
    assert names(layers)[:2] == [{"b"}, {"d"}]
    assert layers[2].paths < layers[3].paths


def test_the_lowest_rated_layers_are_merged_into_the_budget() -> None:
    closure, popularity = independent_roots({"a": 1, "b": 2, "c": 3, "d": 40, "e": 50})
    layers = group(closure, popularity, budget=3)
    # Two merges fold the three lowest into one layer rated by their sum, even
    # though that sum (6) ranks above c (3) once a and b are merged: the
    # highest-rated layers stay intact, as in Nixery.
    assert names(layers) == [{"e"}, {"d"}, {"a", "b", "c"}]
    assert [layer.merge_rating for layer in layers] == [50, 40, 6]


def test_merged_layers_take_their_place_by_their_summed_rating() -> None:
    closure, popularity = independent_roots({"a": 10, "b": 15, "c": 20})
    layers = group(closure, popularity, budget=2)
    assert names(layers) == [{"a", "b"}, {"c"}]
    assert [layer.merge_rating for layer in layers] == [25, 20]


def test_equal_ratings_merge_in_order_of_their_paths() -> None:
    closure, popularity = independent_roots({"a": 1, "b": 1, "c": 1, "d": 1})
    merged = group(closure, popularity, budget=3)
    lowest_two = sorted(closure.paths)[:2]
    assert next(layer for layer in merged if layer.merge_rating == 2).paths == tuple(lowest_two)


def test_a_budget_of_one_gives_one_layer_of_everything() -> None:
    closure = closure_of(
        ["a", "b"],
        {"a": (3, ["shared"]), "b": (5, ["shared"]), "shared": (7, [])},
    )
    layers = group(closure, popular({"a": 2, "b": 3, "shared": 4}), budget=1)
    assert names(layers) == [{"a", "b", "shared"}]
    assert layers[0].merge_rating == 2 * 3 + 3 * 5 + 4 * 7


@pytest.mark.parametrize("budget", [0, -1])
def test_a_budget_below_one_is_refused(budget: int) -> None:
    with pytest.raises(ValueError, match="budget"):
        PopularityLayering().group(closure_of(["a"], {"a": (1, [])}), Popularity(), budget)


def test_an_empty_closure_has_no_layers() -> None:
    assert group(ClosureGraph([], {})) == []


def test_paths_no_root_reaches_still_get_a_layer() -> None:
    # Not a real Nix closure (Nix refuses reference cycles, and path-info only
    # reports what the roots reach), but every path must still be placed once.
    closure = closure_of(
        ["app"],
        {
            "app": (1, []),
            "orphan": (1, ["orphan-dep"]),
            "orphan-dep": (1, []),
            "cycle-a": (1, ["cycle-b"]),
            "cycle-b": (1, ["cycle-a"]),
        },
    )
    assert sorted(map(sorted, names(group(closure)))) == [
        ["app"],
        ["cycle-a", "cycle-b"],
        ["orphan", "orphan-dep"],
    ]


def test_the_result_does_not_depend_on_insertion_order() -> None:
    specs: dict[str, Spec] = {
        "a": (3, ["x", "shared"]),
        "b": (3, ["y", "shared"]),
        "c": (3, ["shared"]),
        "x": (2, []),
        "y": (2, []),
        "shared": (7, ["z"]),
        "z": (1, []),
    }
    popularity = popular({"a": 2, "b": 2, "c": 2})  # equal ratings: only ties decide
    forward = group(closure_of(["a", "b", "c"], specs), popularity, budget=3)
    backward = group(
        closure_of(["c", "b", "a"], dict(reversed(specs.items()))), popularity, budget=3
    )
    assert forward == backward


def test_thousands_of_paths_are_grouped_quickly() -> None:
    # A nixpkgs-like shape: many packages over a shared base of libraries.
    rng = random.Random(1)
    count = 4000
    specs: dict[str, Spec] = {
        f"p{index}": (
            rng.randrange(1, 5 * MB),
            [f"p{rng.randrange(index + 1, count)}" for _ in range(min(4, count - index - 1))],
        )
        for index in range(count)
    }
    referenced = {ref for _, references in specs.values() for ref in references}
    closure = closure_of([name for name in specs if name not in referenced], specs)
    layers = group(closure, popular({f"p{index}": index for index in range(0, count, 7)}))
    assert len(layers) == DEFAULT_LAYER_BUDGET


# Random closures, checked against dominators computed by brute force.


@st.composite
def closures(draw: st.DrawFn) -> tuple[ClosureGraph, Popularity, list[str]]:
    """A random DAG (edges only to higher numbers), its popularity, and an insertion order."""
    count = draw(st.integers(1, 12))
    specs: dict[str, Spec] = {}
    counts: dict[str, int] = {}
    for index in range(count):
        name = f"n{index}"
        references = draw(
            st.sets(st.integers(index + 1, count - 1)) if index < count - 1 else st.just(set())
        )
        size = draw(st.sampled_from([0, 1, 7, 30 * MB, 60 * MB]))
        specs[name] = (size, [f"n{ref}" for ref in sorted(references)])
        counts[name] = draw(st.sampled_from([1, 3, POPULAR_COUNT - 1, POPULAR_COUNT, 1000]))
    referenced = {ref for _, references in specs.values() for ref in references}
    # Every path nothing references is a root, and maybe some others too.
    roots = [name for name in specs if name not in referenced]
    roots += draw(st.lists(st.sampled_from(sorted(specs)), max_size=2))
    order = draw(st.permutations(sorted(specs)))
    return closure_of(roots, specs), popular(counts), order


def brute_force_layers(closure: ClosureGraph, popularity: Popularity) -> set[Layer]:
    """The unbudgeted layers, from the definition of dominance: h dominates v when
    every route from the image root to v passes through h."""
    root = "image-root"
    graph = closure.graph.copy()
    graph.add_edges_from((root, path) for path in closure.roots)
    for path in closure.paths:
        size = closure.total_size(closure.closure_of(path))
        if size > BIG_CLOSURE_BYTES or popularity.of(path) >= POPULAR_COUNT:
            graph.add_edge(root, path)
    reachable = nx.descendants(graph, root)
    dominated = {
        head: {head} | (reachable - nx.descendants(nx.restricted_view(graph, [head], []), root))
        for head in closure.paths
    }
    heads = [
        head
        for head in closure.paths
        if not any(head in dominated[other] for other in closure.paths if other != head)
    ]
    return {
        Layer(
            paths=tuple(dominated[head]),
            merge_rating=popularity.of(head) * closure.total_size(dominated[head]),
        )
        for head in heads
    }


@settings(max_examples=150, deadline=None)
@given(closures(), st.integers(1, 6))
def test_random_closures_are_grouped_by_their_dominators(
    drawn: tuple[ClosureGraph, Popularity, list[str]], budget: int
) -> None:
    closure, popularity, order = drawn
    unbudgeted = group(closure, popularity, budget=len(closure.paths))
    assert set(unbudgeted) == brute_force_layers(closure, popularity)
    ratings = [layer.merge_rating for layer in unbudgeted]
    assert ratings == sorted(ratings, reverse=True)

    layers = group(closure, popularity, budget)
    # All but (at most) the one merged layer are layers of the unbudgeted grouping.
    assert len(set(layers) - set(unbudgeted)) <= 1

    reordered = ClosureGraph(
        list(reversed(closure.roots)),
        {path: closure.paths[path] for path in map(store_path, order)},
    )
    assert group(reordered, popularity, budget) == layers
