"""Evaluation reuse: a second image from a running evaluator versus a cold nix-instantiate.

nixeryd evaluates an image in a long-running ``nix repl`` that holds the
package set (nixeryd/evaluator.py). This measures, on a real nixpkgs and
through nixeryd's own code (``Nix.resolve`` with and without evaluators):

* per pair of distinct images (A, B): B evaluated by an evaluator that has
  just answered A, against a cold ``nix-instantiate`` of B (what nixeryd runs
  with ``NIXERYD_EVALUATORS=0``, as every image did before); and A's cost in a
  new evaluator (the first image) against the cold one;
* a series of images in one evaluator against each image cold;
* the evaluator's resident memory after each image.

Every figure is the median of ``--repeat`` runs, each pair in a new evaluator.
Evaluation only: nothing is built. Run it as ``benchmarks/evaluation`` (see
benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import inlineCallbacks

from nixeryd.evaluator import EvaluatorLimits, EvaluatorPool, Repl
from nixeryd.imagename import ImageTarget, parse_image_name
from nixeryd.nixbuild import Nix, repl_argv
from nixeryd.platform import AMD64
from nixeryd.process import ReactorProcessRunner
from nixeryd.sources import SourceRef

PAIRS = (
    ("hello", "shell/git/htop"),
    ("hello", "python3packages.numpy"),
    ("shell", "xorg.xev"),
    ("git", "htop"),
    ("python3", "nodejs"),
    ("curl", "jq/openssh"),
)
SERIES = ("hello", "shell", "git", "htop", "python3", "nodejs", "xorg.xev", "curl")
GOAL = 0.3


def target(name: str) -> ImageTarget:
    return parse_image_name(name).targets([AMD64])[0]


class Bench:
    def __init__(self, reactor: Any, nixpkgs: Path, bin_dir: str) -> None:
        self.reactor = reactor
        self.processes = ReactorProcessRunner(reactor)
        self.bin_dir = bin_dir
        self.env = dict(os.environ)
        self.env["NIX_CONFIG"] = (self.env.get("NIX_CONFIG", "") + "\nsubstituters =").lstrip()
        self.source = SourceRef("path", {"path": str(nixpkgs)}, pin="benchmark")
        self.one_shot = self.nix(None)

    def nix(self, evaluators: EvaluatorPool | None) -> Nix:
        return Nix(
            self.processes,
            builder_timeout=600,
            step_timeout=600,
            bin_dir=self.bin_dir,
            env=self.env,
            evaluators=evaluators,
        )

    def pool(self) -> EvaluatorPool:
        limits = EvaluatorLimits(capacity=1, memory=2**40, idle=600, request_timeout=600)
        return EvaluatorPool(
            Repl(self.processes, self.reactor, repl_argv(self.bin_dir), limits, env=self.env)
        )

    @inlineCallbacks
    def timed(self, nix: Nix, name: str) -> Generator[Any, Any, float]:
        start = time.perf_counter()
        yield nix.resolve(self.source, target(name))
        return time.perf_counter() - start

    @inlineCallbacks
    def cold(self, name: str, repeat: int) -> Generator[Any, Any, float]:
        times = []
        for _ in range(repeat):
            times.append((yield self.timed(self.one_shot, name)))
        return statistics.median(times)

    @inlineCallbacks
    def in_evaluator(self, names: tuple[str, ...]) -> Generator[Any, Any, list[tuple[float, int]]]:
        """Each image's time and the evaluator's resident memory after it, in a new evaluator."""
        pool = self.pool()
        nix = self.nix(pool)
        results = []
        try:
            for name in names:
                seconds = yield self.timed(nix, name)
                [evaluator] = pool.evaluators()
                results.append((seconds, evaluator.memory() or 0))
        finally:
            pool.stop()
        return results


def mib(size: float) -> str:
    return f"{size / 2**20:.0f} MiB"


@inlineCallbacks
def run(reactor: Any, options: argparse.Namespace) -> Generator[Any, Any, None]:
    bench = Bench(reactor, options.nixpkgs, options.nix_bin_dir)
    yield bench.cold("hello", 1)  # the page cache holds nixpkgs' files from here on
    print(f"nixpkgs {options.nixpkgs}, Nix from {options.nix_bin_dir}, median of {options.repeat}")
    print()
    header = (
        f"{'A -> B':36} {'cold B':>8} {'2nd B':>8} {'ratio':>6} {'1st A/cold A':>13} {'RSS':>9}"
    )
    print(header)
    print("-" * len(header))
    ratios = []
    for first, second in PAIRS:
        cold_first = yield bench.cold(first, options.repeat)
        cold_second = yield bench.cold(second, options.repeat)
        runs = []
        for _ in range(options.repeat):
            runs.append((yield bench.in_evaluator((first, second))))
        first_time = statistics.median(run[0][0] for run in runs)
        second_time = statistics.median(run[1][0] for run in runs)
        memory = max(run[1][1] for run in runs)
        ratio = second_time / cold_second
        ratios.append(ratio)
        print(
            f"{first + ' -> ' + second:36} {cold_second:7.3f}s {second_time:7.3f}s "
            f"{ratio:6.2f} {first_time / cold_first:13.2f} {mib(memory):>9}"
        )
    print()
    print(f"second image / cold: median {statistics.median(ratios):.2f}, worst {max(ratios):.2f}")
    print(f"(goal <= {GOAL})")
    print()
    cold_total = 0.0
    for name in SERIES:
        cold_total += yield bench.cold(name, 1)
    series = yield bench.in_evaluator(SERIES)
    total = sum(seconds for seconds, _ in series)
    print(f"series of {len(SERIES)} images ({', '.join(SERIES)}):")
    print(
        f"  one evaluator {total:.2f}s, each cold {cold_total:.2f}s: ratio {total / cold_total:.2f}"
    )
    print("  evaluator RSS after each image: " + ", ".join(mib(memory) for _, memory in series))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nixpkgs",
        type=Path,
        default=Path(os.environ.get("NIXERYD_TEST_NIXPKGS", "/var/tmp/nixeryd-nixpkgs")),
        help="a nixpkgs checkout (default: $NIXERYD_TEST_NIXPKGS or /var/tmp/nixeryd-nixpkgs)",
    )
    parser.add_argument(
        "--nix-bin-dir",
        default=os.environ.get("NIXERYD_NIX_BIN_DIR", "/opt/nix-2.18/bin"),
        help="a Nix >= 2.18 (default: $NIXERYD_NIX_BIN_DIR or /opt/nix-2.18/bin)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    options = parser.parse_args()
    if not (options.nixpkgs / "pkgs" / "top-level").is_dir():
        parser.error(f"{options.nixpkgs} is not a nixpkgs checkout")
    task.react(lambda reactor: run(reactor, options))


if __name__ == "__main__":
    main()
