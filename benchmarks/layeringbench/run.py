"""The benchmark's command line: corpora x budgets x strategies, one table each."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.layeringbench.corpus import debian_corpus, nix_corpus
from benchmarks.layeringbench.metrics import Result, measure
from benchmarks.layeringbench.strategies import STRATEGY_NAMES, strategies
from benchmarks.layeringbench.workload import WORKLOADS, workload

NIX_CAPTURE = Path(__file__).resolve().parent / "corpora" / "testpkgs.json"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks/layering",
        description="Compare layering strategies by what a sequence of pulls downloads.",
    )
    parser.add_argument("--corpus", action="append", choices=("debian", "nix"))
    parser.add_argument("--images", "-k", type=int, default=100, help="images pulled (K)")
    parser.add_argument("--budget", type=int, action="append", help="layers per image")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--strategy", action="append", choices=STRATEGY_NAMES)
    parser.add_argument("--workload", action="append", choices=tuple(WORKLOADS),
                        help="traffic shape (default: all)")  # fmt: skip
    parser.add_argument("--packages-file", type=Path, action="append",
                        help="Debian Packages file(s) instead of apt's lists")  # fmt: skip
    parser.add_argument("--nix-capture", type=Path, default=NIX_CAPTURE)
    args = parser.parse_args(argv)
    budgets = args.budget or [94, 40, 125]
    for name in args.corpus or ["debian", "nix"]:
        started = time.perf_counter()
        if name == "debian":
            texts = [path.read_text() for path in args.packages_file or []] or None
            corpus = debian_corpus(texts)
        else:
            corpus = nix_corpus(args.nix_capture)
        loaded = time.perf_counter() - started
        print(
            f"\n## corpus {corpus.name}: {len(corpus.paths)} store paths, "
            f"{len(corpus.tools)} tools; K={args.images} images, seed {args.seed} "
            f"(loaded in {loaded:.1f}s)"
        )
        for shape in args.workload or WORKLOADS:
            images = workload(corpus, args.images, args.seed, shape)
            sizes = sorted(len(corpus.closure(image).paths) for image in images)
            print(
                f"\n### workload {shape}: {len(set(images))} distinct images, store paths "
                f"per image median {sizes[len(sizes) // 2]}, max {sizes[-1]}"
            )
            for budget in budgets:
                compared = strategies(corpus, images)
                results = [
                    measure(name, compared[name], corpus, images, budget)
                    for name in args.strategy or STRATEGY_NAMES
                ]
                print(f"\nbudget {budget}:\n")
                print(table(results))
            sys.stdout.flush()


def table(results: Sequence[Result]) -> str:
    header = (
        "| strategy | pull ratio (digest) | pull ratio (chain) | storage ratio "
        "| layers max | layers mean | ms/image | ms/image (1,000+ paths) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        large = "-" if r.large_milliseconds is None else f"{r.large_milliseconds:.1f}"
        lines.append(
            f"| {r.strategy} | {r.digest_pull_ratio:.3f} | {r.chain_pull_ratio:.3f} "
            f"| {r.storage_ratio:.3f} | {r.max_layers} | {r.mean_layers:.1f} "
            f"| {r.milliseconds:.1f} | {large} |"
        )
    return "\n".join(lines)
