"""The prefix layering strategy: the base a fixed prefix, the rest by size."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixeryd.builtin.prefix_layering import NAME, PrefixLayering
from nixeryd.closure import ClosureGraph, StorePath
from nixeryd.layering import Layer, LayeringStrategy
from nixeryd.plugins import Plugins, make_plugin_manager
from nixeryd.popularity import Popularity
from tests.unit.test_layering_stable import (
    PACKAGES,
    PackageSet,
    image,
    names,
    reference_counts,
)

#: The test package sets' base: "certs" is added to every image, "shell" is the shell.
PARTS = (("certs",), ("shell",))


def group(closure: ClosureGraph, popularity: Popularity, budget: int = 93) -> list[Layer]:
    layers = PrefixLayering(base_parts=PARTS).group(closure, popularity, budget)
    assert sorted(path for layer in layers for path in layer.paths) == sorted(closure.paths)
    assert len(layers) <= budget
    return layers


#: PACKAGES with a base: certs (in every image) and a shell of small tools, of which
#: vim and scripts (in no image here) share all but nano.
BASED: PackageSet = {
    **PACKAGES,
    "vim": (50, ["ncurses", "perl"]),
    "scripts": (5, ["bash"]),
    "certs": (40, ["libssl"]),
    "shell": (100, ["libc", "bash", "nano", "perl"]),
    "bash": (60, ["libc"]),
    "nano": (20, ["libc", "ncurses"]),
    "ncurses": (15, ["libc"]),
    "perl": (70, ["libc"]),
}


def test_the_strategy_is_a_registered_builtin_and_the_default() -> None:
    strategy: LayeringStrategy = PrefixLayering()
    plugins = Plugins(make_plugin_manager(load_entrypoints=False))
    assert NAME == "prefix"
    assert isinstance(plugins.layering_strategy("prefix").create(None), type(strategy))  # type: ignore[arg-type]
    from nixeryd.config import Config

    assert Config().layering_strategy == NAME


def test_the_base_parts_come_first_each_in_a_few_layers_then_the_rest_by_size() -> None:
    closure = image(["certs", "git", "shell"], BASED)
    layers = group(closure, reference_counts(BASED), budget=40)
    # At budget 40 each base part has two layers: its largest group, then the others.
    # certs' closure: libc, libssl, certs. shell's adds shell + nano (only shell refers
    # to nano), bash, perl, ncurses. The rest (git + pcre, libcurl, zlib) largest first.
    assert names(layers) == [
        {"libc"},
        {"libssl", "certs"},
        {"shell", "nano"},
        {"bash", "ncurses", "perl"},
        {"git", "pcre"},
        {"libcurl"},
        {"zlib"},
    ]


def test_the_base_layers_do_not_depend_on_the_rest_of_the_image() -> None:
    popularity = reference_counts(BASED)
    small = group(image(["certs", "shell"], BASED), popularity, 6)
    large = group(image(["certs", "curl", "git", "shell", "zip"], BASED), popularity, 6)
    # At budget 6 each base part is one layer; over the budget, the smallest groups of
    # the rest share the last layer.
    assert len(small) == 2
    assert large[:2] == small
    assert names(large[2:]) == [{"git", "pcre"}, {"curl"}, {"libcurl"}, {"zip", "zlib"}]


def test_an_image_without_the_shell_shares_the_first_part() -> None:
    popularity = reference_counts(BASED)
    with_shell = group(image(["certs", "curl", "shell"], BASED), popularity, 40)
    without = group(image(["certs", "curl"], BASED), popularity, 40)
    assert without[:2] == with_shell[:2]


def test_base_layers_grow_with_the_budget() -> None:
    closure = image(["certs", "shell"], BASED)
    popularity = reference_counts(BASED)
    assert len(group(closure, popularity, 24)) == 2  # one layer per part
    assert len(group(closure, popularity, 94)) == 7  # four per part: certs has 3 groups
    assert [len(layer.paths) for layer in group(closure, popularity, 30)] == [3, 5]


def test_small_budgets_are_kept_and_zero_is_refused() -> None:
    closure = image(["certs", "git", "shell"], BASED)
    for budget in (1, 2, 3):
        assert len(group(closure, reference_counts(BASED), budget)) <= budget
    with pytest.raises(ValueError, match="at least 1"):
        PrefixLayering().group(closure, Popularity(), 0)


def test_by_default_the_base_is_nixpkgs_cacert_and_iana_etc_then_the_shell() -> None:
    def path(name: str, size: int = 10, references: Sequence[str] = ()) -> StorePath:
        return StorePath(f"/nix/store/{name[0] * 32}-{name}", size, tuple(references))

    cacert, bash, tool = path("nss-cacert-3.98"), path("bash-interactive-5.2"), path("xtool-1", 99)
    closure = ClosureGraph(
        [bash.path, tool.path, cacert.path], {p.path: p for p in (cacert, bash, tool)}
    )
    layers = PrefixLayering().group(closure, Popularity(), 94)
    assert [layer.paths for layer in layers] == [(cacert.path,), (bash.path,), (tool.path,)]


@st.composite
def large_package_sets(draw: st.DrawFn) -> PackageSet:
    """Random DAGs of several hundred packages (each may reference any of the 60 after
    it), a base of "certs" and "shell" over the last few."""
    count = draw(st.integers(min_value=300, max_value=600))
    rng = random.Random(draw(st.integers(min_value=0, max_value=2**32 - 1)))
    packages: dict[str, tuple[int, list[str]]] = {}
    for i in range(count):
        below = [f"p{j}" for j in range(i + 1, min(i + 61, count))]
        fan_out = min(len(below), rng.choice((0, 1, 2, 3, 5, 8)))
        packages[f"p{i}"] = (rng.randint(1, 10**6), sorted(rng.sample(below, fan_out)))
    packages["certs"] = (100, [f"p{count - 1}"])
    packages["shell"] = (100, [f"p{j}" for j in range(count - 8, count)])
    return packages


@settings(max_examples=40, deadline=None)
@given(packages=large_package_sets(), data=st.data())
def test_large_closures_keep_the_budget_the_base_prefix_and_the_groups(
    packages: PackageSet, data: st.DataObject
) -> None:
    """Two images of several hundred paths each: every path in one layer, the budget
    kept, the base's layers identical in both, whatever else they hold; and a layer of
    A's rest (not its last) lies whole in one layer of B if B holds its head and neither
    image requested another of its paths, and is that very layer if both requested the
    head, B gave it a layer of its own, and neither requested another path of that."""
    popularity = reference_counts(packages)
    budget = data.draw(st.sampled_from([10, 40, 93, 124]))
    tools = st.sampled_from([f"p{i}" for i in range(60)])
    roots_a, roots_b = (
        ["certs", "shell", *data.draw(st.lists(tools, min_size=5, max_size=30, unique=True))]
        for _ in range(2)
    )
    closure_a, closure_b = image(roots_a, packages), image(roots_b, packages)
    assert max(len(closure_a.paths), len(closure_b.paths)) >= 150
    layers_a, layers_b = group(closure_a, popularity, budget), group(closure_b, popularity, budget)
    base = len(group(image(["certs", "shell"], packages), popularity, budget))
    if base < budget:
        assert layers_a[:base] == layers_b[:base]
    requested = set(closure_a.roots) | set(closure_b.roots)
    for layer in layers_a[base:-1]:
        members = set(layer.paths)
        (head,) = [p for p in layer.paths if members.isdisjoint(closure_a.graph.predecessors(p))]
        if head not in closure_b.paths or not requested.isdisjoint(members - {head}):
            continue
        (holding,) = [other for other in layers_b if head in other.paths]
        assert members <= set(holding.paths)
        if (
            head in closure_a.roots
            and head in closure_b.roots
            and holding != layers_b[-1]
            and requested.isdisjoint(set(holding.paths) - {head})
        ):
            assert holding == layer


def test_a_closure_of_two_thousand_paths_is_layered_in_well_under_a_second() -> None:
    """The benchmark measures it (goal: 50 ms per image of 1,000+ paths); this bounds it
    loosely, so a shared machine cannot fail it, against an accidental quadratic blow-up."""
    packages: dict[str, tuple[int, list[str]]] = {
        f"p{i}": (i + 1, [f"p{j}" for j in (i + 1, i + 7, i * 2 + 3) if j < 2000])
        for i in range(2000)
    }
    packages["certs"] = (1, ["p1999"])
    packages["shell"] = (1, ["p1990"])
    closure = image(["certs", "shell", *(f"p{i}" for i in range(0, 200, 2))], packages)
    assert len(closure.paths) >= 1900
    started = time.perf_counter()
    group(closure, reference_counts(packages), 93)
    assert time.perf_counter() - started < 2.0
