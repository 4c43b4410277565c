"""The layering benchmark on tiny inputs: the Debian mapping, the metrics, the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.layeringbench.corpus import debian_corpus, parse_packages
from benchmarks.layeringbench.metrics import measure
from benchmarks.layeringbench.run import main
from benchmarks.layeringbench.strategies import (
    AutoLayer,
    BuildLayeredImage,
    SingleLayer,
    WorkloadOracle,
    popularity_contest_order,
)
from benchmarks.layeringbench.workload import WORKLOADS, workload
from nixeryd.closure import ClosureGraph, StorePath
from nixeryd.popularity import Popularity

PACKAGES = """\
Package: libc6
Version: 2.36-9
Installed-Size: 100
Size: 5000
Depends: libgcc-s1

Package: libgcc-s1
Version: 12.2.0
Installed-Size: 10
Size: 500
Depends: libc6 (>= 2.35)

Package: mawk
Version: 1.3.4
Priority: required
Installed-Size: 2
Size: 100
Provides: awk
Pre-Depends: libc6

Package: gawk
Version: 1:5.2.1
Priority: optional
Installed-Size: 3
Size: 150
Provides: awk

Package: bash
Version: 5.2.15
Installed-Size: 7
Size: 1400
Pre-Depends: libc6 (>= 2.36), libtinfo6

Package: libtinfo6
Version: 6.4
Installed-Size: 4
Size: 300
Depends: libc6

Package: tool
Version: 1.0
Installed-Size: 20
Size: 2000
Depends: awk, missing-package | libtinfo6 (>= 6), ghost
"""


def test_the_debian_mapping() -> None:
    corpus = debian_corpus([PACKAGES], tools=["tool", "gawk"], shell=["bash"], implicit=[])
    path = corpus.packages
    # libc6 and libgcc-s1 depend on each other: one node, sizes summed, named after libc6.
    assert path["libc6"] == path["libgcc-s1"]
    assert path["libc6"].endswith("-libc6+1-2.36-9")
    assert corpus.paths[path["libc6"]].nar_size == 110 * 1024
    assert corpus.compressed[path["libc6"]] == 5500
    # The virtual awk resolves to its provider of highest priority; an alternative to the
    # first real package; a dependency on nothing is dropped.
    assert set(corpus.paths[path["tool"]].references) == {path["mawk"], path["libtinfo6"]}
    assert corpus.popularity.of(path["libc6"]) == 3  # mawk, bash, libtinfo6
    assert corpus.popularity.of(path["libtinfo6"]) == 2
    assert corpus.paths[path["gawk"]].references == ()
    assert path["gawk"].endswith("-gawk-5.2.1")  # no epoch in a store path name
    closure = corpus.closure(["bash", "tool"])
    assert closure.roots == (path["bash"], path["tool"])
    assert len(closure.paths) == 5


def test_package_stanzas_keep_their_relations() -> None:
    (tool,) = [p for p in parse_packages(PACKAGES) if p.name == "tool"]
    assert tool.depends == (("awk",), ("missing-package", "libtinfo6"), ("ghost",))


def test_the_workload_is_seeded_and_shaped_like_nixery_traffic() -> None:
    corpus = debian_corpus([PACKAGES], tools=["tool", "gawk"], shell=["bash"], implicit=["mawk"])
    images = workload(corpus, 50, seed=3)
    assert images == workload(corpus, 50, seed=3)
    assert all(image[-1] == "mawk" for image in images)
    assert sum("bash" in image for image in images) > 25


def test_every_workload_is_seeded_and_draws_from_the_corpus() -> None:
    corpus = debian_corpus(
        [PACKAGES], tools=["tool", "gawk"], toolchains=[["libtinfo6"]], shell=["bash"],
        implicit=["mawk"],
    )  # fmt: skip
    # Libraries are not drawn as tools from the whole corpus.
    assert corpus.everything == ("bash", "gawk", "mawk", "tool")
    assert corpus.toolchains == (("libtinfo6",),)
    for shape in WORKLOADS:
        images = workload(corpus, 30, 5, shape)
        assert images == workload(corpus, 30, 5, shape)
        assert all("mawk" in image and set(image) <= set(corpus.packages) for image in images)
    assert all("libtinfo6" in image for image in workload(corpus, 30, 5, "ci"))
    assert all(len(image) >= 4 for image in workload(corpus, 30, 5, "huge"))
    mixed = workload(corpus, 30, 5, "mixed")
    assert len(set(mixed)) < len(mixed)  # popular images are pulled again


def paths(*specs: tuple[str, int, tuple[str, ...]]) -> dict[str, StorePath]:
    return {name: StorePath(name, size, refs) for name, size, refs in specs}


def test_the_popularity_contest_counts_as_closure_graph_py_documents() -> None:
    # closure-graph.py's example: A-B-C-D-F, C-E-F, B-E, A-G gives
    # F 9, E 5, D 4, C 3, B 2, G 2, A 1.
    graph = paths(
        ("/nix/store/a-A", 1, ("/nix/store/b-B", "/nix/store/g-G")),
        ("/nix/store/b-B", 1, ("/nix/store/c-C", "/nix/store/e-E")),
        ("/nix/store/c-C", 1, ("/nix/store/d-D", "/nix/store/e-E")),
        ("/nix/store/d-D", 1, ("/nix/store/f-F",)),
        ("/nix/store/e-E", 1, ("/nix/store/f-F",)),
        ("/nix/store/f-F", 1, ()),
        ("/nix/store/g-G", 1, ()),
    )
    order = popularity_contest_order(ClosureGraph(["/nix/store/a-A"], graph))
    assert [path[-1] for path in order] == ["F", "E", "D", "C", "B", "G", "A"]
    layers = BuildLayeredImage().group(ClosureGraph(["/nix/store/a-A"], graph), Popularity(), 3)
    assert [len(layer.paths) for layer in layers] == [1, 1, 5]


def test_auto_layer_gives_large_paths_their_own_layer_with_what_only_they_use() -> None:
    graph = paths(
        ("/nix/store/a-app", 10, ("/nix/store/b-big", "/nix/store/l-lib")),
        ("/nix/store/b-big", 1000, ("/nix/store/p-private", "/nix/store/l-lib")),
        ("/nix/store/p-private", 5, ()),
        ("/nix/store/l-lib", 50, ()),
    )
    layers = AutoLayer().group(ClosureGraph(["/nix/store/a-app"], graph), Popularity(), 3)
    assert {layer.paths for layer in layers} == {
        ("/nix/store/b-big", "/nix/store/p-private"),
        ("/nix/store/l-lib",),
        ("/nix/store/a-app",),
    }


def test_pull_ratios_count_digests_and_chains() -> None:
    corpus = debian_corpus([PACKAGES], tools=["tool", "gawk"], shell=["bash"], implicit=[])
    images = [("bash",), ("bash", "tool")]
    single = measure("single", SingleLayer(), corpus, images, 10)
    distinct = sum(corpus.compressed.values()) - corpus.compressed[corpus.packages["gawk"]]
    both = sum(corpus.compressed[p] for p in corpus.closure(["bash"]).paths) + distinct
    assert single.digest_pull_ratio == pytest.approx(both / distinct)
    assert single.chain_pull_ratio == single.digest_pull_ratio
    assert single.max_layers == 2  # and the symlink forest


def test_the_oracle_layers_by_which_images_of_the_workload_hold_a_path() -> None:
    corpus = debian_corpus([PACKAGES], tools=["tool", "gawk"], shell=["bash"], implicit=[])
    images = [("bash",), ("bash", "tool"), ("bash",)]
    oracle = WorkloadOracle(corpus, images)
    closure = corpus.closure(["bash", "tool"])
    layers = oracle.group(closure, corpus.popularity, 10)
    # bash's closure is in every image, the rest of tool's in the second only: two classes.
    shared = corpus.closure(["bash"]).paths
    assert sorted(sorted(layer.paths) for layer in layers) == sorted(
        [sorted(shared), sorted(set(closure.paths) - set(shared))]
    )
    assert measure("oracle", oracle, corpus, images, 10).digest_pull_ratio == 1.0
    # Over the budget the smallest classes share the last layer.
    assert [len(layer.paths) for layer in oracle.group(closure, corpus.popularity, 1)] == [
        len(closure.paths)
    ]


def test_the_benchmark_prints_one_table_per_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    packages = tmp_path / "Packages"
    packages.write_text(PACKAGES)
    main(["--corpus", "debian", "--corpus", "nix", "--packages-file", str(packages),
          "-k", "5", "--budget", "94", "--budget", "3"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("| strategy |") == 2 * len(WORKLOADS) * 2
    assert out.count("### workload huge") == 2
    assert "| nixeryd (stable) |" in out
    assert "| nixeryd (prefix) |" in out
    assert "| workload oracle |" in out
    assert "corpus nix:testpkgs" in out
