"""The stable layering strategy: global dominance groups, budget by size, base first."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixeryd.builtin.stable_layering import NAME, StableLayering
from nixeryd.closure import ClosureGraph, StorePath
from nixeryd.layering import Layer, LayeringStrategy
from nixeryd.plugins import Plugins, make_plugin_manager
from nixeryd.popularity import Popularity

NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"

#: A package set: each package's nar size and the packages it references.
PackageSet = Mapping[str, tuple[int, Sequence[str]]]


def store_path(name: str) -> str:
    digest = hashlib.sha256(name.encode()).digest()
    return "/nix/store/" + "".join(NIX_BASE32[byte % 32] for byte in digest) + f"-{name}-1.0"


def image(roots: Iterable[str], packages: PackageSet) -> ClosureGraph:
    """The closure of ``roots`` in ``packages``, as Nix would report it."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(packages[name][1])
    return ClosureGraph(
        [store_path(root) for root in roots],
        {
            store_path(name): StorePath(
                store_path(name), packages[name][0], tuple(store_path(r) for r in packages[name][1])
            )
            for name in seen
        },
    )


def reference_counts(packages: PackageSet) -> Popularity:
    """Popularity as ``nixeryd popcount`` computes it: referrers in the whole package set."""
    counts: dict[str, int] = {}
    for _, references in packages.values():
        for reference in set(references):
            counts[f"{reference}-1.0"] = counts.get(f"{reference}-1.0", 0) + 1
    return Popularity(counts)


def names(layers: Iterable[Layer]) -> list[set[str]]:
    return [
        {path.split("-", 1)[1].removesuffix("-1.0") for path in layer.paths} for layer in layers
    ]


def group(closure: ClosureGraph, popularity: Popularity, budget: int = 93) -> list[Layer]:
    layers = StableLayering(base_names=("shell",)).group(closure, popularity, budget)
    assert sorted(path for layer in layers for path in layer.paths) == sorted(closure.paths)
    assert len(layers) <= budget
    return layers


# libc is everywhere; libssl is shared by curl and git; libcurl only by curl-users;
# pcre only by git in the whole set; zlib by curl and by zip, which no image here has.
PACKAGES: PackageSet = {
    "shell": (100, ["libc"]),
    "git": (300, ["libc", "libssl", "pcre", "libcurl"]),
    "curl": (200, ["libc", "libcurl"]),
    "libcurl": (80, ["libssl", "zlib"]),
    "libssl": (90, ["libc"]),
    "pcre": (10, ["libc"]),
    "zlib": (5, ["libc"]),
    "zip": (50, ["zlib"]),
    "libc": (500, []),
}


def test_the_strategy_is_a_registered_builtin() -> None:
    strategy: LayeringStrategy = StableLayering()
    assert NAME == "stable"
    plugins = Plugins(make_plugin_manager(load_entrypoints=False))
    assert plugins.layering_strategy("stable").name == "stable"
    assert isinstance(plugins.layering_strategy("stable").create(None), type(strategy))  # type: ignore[arg-type]


def test_a_path_joins_its_referrer_only_when_the_image_has_all_its_referrers() -> None:
    popularity = reference_counts(PACKAGES)
    layers = group(image(["git"], PACKAGES), popularity)
    # pcre: git is its only referrer anywhere, so it travels with git. zlib: zip
    # also references it, so it heads its own layer even though only libcurl
    # needs it in this image; so does libcurl, shared with curl.
    assert sorted(map(sorted, names(layers))) == sorted(
        [["git", "pcre"], ["libc"], ["libcurl"], ["libssl"], ["zlib"]]
    )


def test_without_popularity_data_a_path_joins_the_one_group_referencing_it() -> None:
    layers = group(image(["curl", "git"], PACKAGES), Popularity())
    assert sorted(map(sorted, names(layers))) == sorted(
        [["curl"], ["git", "pcre"], ["libcurl", "zlib"], ["libc"], ["libssl"]]
    )


def test_a_requested_package_heads_its_own_layer() -> None:
    layers = group(image(["git", "pcre"], PACKAGES), reference_counts(PACKAGES))
    assert {"pcre"} in names(layers)
    assert {"git"} in names(layers)


def test_the_base_comes_first_then_the_largest() -> None:
    layers = group(image(["curl", "git", "shell"], PACKAGES), reference_counts(PACKAGES))
    # shell's closure (shell, libc) first, largest first; then the rest by size.
    assert names(layers) == [
        {"libc"},
        {"shell"},
        {"git", "pcre"},
        {"curl"},
        {"libssl"},
        {"libcurl"},
        {"zlib"},
    ]


def test_over_the_budget_the_smallest_groups_share_the_last_layer() -> None:
    layers = group(image(["curl", "git", "shell"], PACKAGES), reference_counts(PACKAGES), 4)
    assert names(layers) == [
        {"libc"},
        {"git", "pcre"},
        {"curl"},
        {"shell", "libssl", "libcurl", "zlib"},
    ]


def test_a_budget_of_one_is_one_layer_and_zero_is_refused() -> None:
    closure = image(["git"], PACKAGES)
    assert len(group(closure, Popularity(), 1)) == 1
    with pytest.raises(ValueError, match="at least 1"):
        StableLayering().group(closure, Popularity(), 0)


def test_by_default_the_base_is_nixpkgs_shell_and_implicit_packages() -> None:
    def path(name: str) -> StorePath:
        return StorePath(f"/nix/store/{'a' * 32}-{name}", 10, ())

    big, base = path("big-tool-1.0"), path("nss-cacert-3.98")
    bash_like = path("bash-interactive-tools-1.0")  # not bash-interactive-<version>
    closure = ClosureGraph(
        [big.path, base.path, bash_like.path],
        {big.path: StorePath(big.path, 1000, ()), base.path: base, bash_like.path: bash_like},
    )
    layers = StableLayering().group(closure, Popularity(), 10)
    assert [layer.paths for layer in layers] == [(base.path,), (big.path,), (bash_like.path,)]


def test_a_malformed_closure_with_a_cycle_is_still_layered() -> None:
    a, b = store_path("a"), store_path("b")
    closure = ClosureGraph([a], {a: StorePath(a, 1, (b,)), b: StorePath(b, 1, (a,))})
    layers = StableLayering().group(closure, Popularity(), 10)
    assert sorted(path for layer in layers for path in layer.paths) == sorted([a, b])


@st.composite
def package_sets(draw: st.DrawFn) -> PackageSet:
    """Random DAGs: package i may reference any package j > i."""
    count = draw(st.integers(min_value=1, max_value=14))
    packages = {}
    for i in range(count):
        later = st.integers(min_value=i + 1, max_value=count - 1)
        references = draw(st.sets(later, max_size=4)) if i + 1 < count else set()
        size = draw(st.integers(min_value=1, max_value=1000))
        packages[f"p{i}"] = (size, [f"p{j}" for j in sorted(references)])
    return packages


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_layers_are_the_same_in_every_image_that_holds_their_head(data: st.DataObject) -> None:
    """Take a layer of image A and its head (the one path of the layer that no other path
    of it references). Any image B holding the head holds its whole closure, and then:
    the layer is never split across B's layers unless B requested one of its other paths
    by name, and B has the very same layer if B requested the head too (else B may pull
    the head into a bigger group) and neither image requested another path of either."""
    packages = data.draw(package_sets())
    roots_a = data.draw(
        st.lists(st.sampled_from(sorted(packages)), min_size=1, max_size=3, unique=True)
    )
    roots_b = data.draw(
        st.lists(st.sampled_from(sorted(packages)), min_size=1, max_size=3, unique=True)
    )
    popularity = reference_counts(packages)
    closure_a, closure_b = image(roots_a, packages), image(roots_b, packages)
    layers_b = group(closure_b, popularity, budget=len(packages))
    for layer in group(closure_a, popularity, budget=len(packages)):
        members = set(layer.paths)
        heads = [p for p in layer.paths if members.isdisjoint(closure_a.graph.predecessors(p))]
        assert len(heads) == 1
        head = heads[0]
        if head not in closure_b.paths or not members.isdisjoint(set(closure_b.roots) - {head}):
            continue
        holding = [other for other in layers_b if head in other.paths]
        assert members <= set(holding[0].paths)
        requested = set(closure_a.roots) | set(closure_b.roots)
        if head in closure_b.roots and requested.isdisjoint(
            (members | set(holding[0].paths)) - {head}
        ):
            assert holding[0] == layer


@settings(max_examples=150, deadline=None)
@given(packages=package_sets(), data=st.data())
def test_no_image_exceeds_the_budget(packages: PackageSet, data: st.DataObject) -> None:
    roots = data.draw(st.lists(st.sampled_from(sorted(packages)), min_size=1, unique=True))
    budget = data.draw(st.integers(min_value=1, max_value=20))
    popularity = data.draw(st.sampled_from([Popularity(), reference_counts(packages)]))
    group(image(roots, packages), popularity, budget)
