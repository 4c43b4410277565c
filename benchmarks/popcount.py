"""Memory and time of ``nixeryd popcount --pkgs-path`` on nixpkgs, against one evaluation.

nixpkgs evaluated in one Nix process grows with every package it instantiates (past
16 GB for the whole set); ``nixeryd popcount`` evaluates it in chunks, each in a fresh
process. This runs the command over the first ``--limit`` top-level names and measures

* the peak RSS of its largest process (``RUSAGE_CHILDREN``'s ``ru_maxrss``) and of its
  whole process tree (summed from ``/proc`` every 0.1 s), and its wall time;
* the reference, in the same run: the names it evaluated (the skipped ones left out, so
  that it finishes) in ONE ``nix-instantiate``, as the command did before chunking;

and prints the ratio and the 4 GB goal for any one Nix process. Nothing is built: on a
checkout without a binary cache the command ends with "nothing counted" (exit 1), after
the evaluation this measures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The reference evaluates its names in one process: more would risk the machine's memory.
REFERENCE_MAX_NAMES = 2000
EXPRESSION = ROOT / "nix" / "popcount.nix"
GOAL_BYTES = 4 * 1024**3
SKIPPED = re.compile(r"\] (\S+): skipped: ")


def tree_rss(root: int) -> int:
    """The summed RSS, in bytes, of ``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_sampled(argv: list[str], env: dict[str, str]) -> tuple[int, float, int, int, str]:
    """Exit code, wall seconds, peak tree RSS, peak largest-process RSS and stderr of argv."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.monotonic()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss(process.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.monotonic() - started
    sampler.join()
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if largest <= before * 1024:
        largest = 0  # an earlier, larger child still holds the maximum: not this run's
    return process.returncode, wall, peak[0], largest, stderr.decode()


def single_evaluation(nixpkgs: Path, bin_dir: Path, names: list[str]) -> tuple[int, float, int]:
    """Exit code, wall seconds and peak RSS of one nix-instantiate over all of ``names``."""
    argv = [
        str(bin_dir / "nix-instantiate"), "--eval", "--strict", "--json", "--read-write-mode",
        str(EXPRESSION), "--arg", "path", str(nixpkgs), "--argstr", "top", json.dumps(names),
    ]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.monotonic() - started, usage.ru_maxrss * 1024


def gib(size: int) -> str:
    return f"{size / 1024**3:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nixpkgs", type=Path, default=Path("/var/tmp/nixeryd-nixpkgs"))
    parser.add_argument("--nix-bin-dir", type=Path, default=Path("/opt/nix-2.18/bin"))
    parser.add_argument("--limit", type=int, default=1000, help="top-level names (0: all)")
    parser.add_argument("--chunk-size", type=int, default=200)
    parser.add_argument("--eval-jobs", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "NIX_CONFIG": os.environ.get("NIX_CONFIG", "substituters =")}
    command = [
        sys.executable, "-m", "nixeryd", "popcount", "--pkgs-path", str(args.nixpkgs),
        "--nix-bin-dir", str(args.nix_bin_dir), "--chunk-size", str(args.chunk_size),
        "--eval-jobs", str(args.eval_jobs),
    ]  # fmt: skip
    if args.limit:
        command += ["--limit", str(args.limit)]
    code, wall, tree, largest, stderr = run_sampled(command, env)
    lines = stderr.splitlines()
    closing = [i for i, line in enumerate(lines) if line.startswith("nixeryd popcount:")]
    print("\n".join(lines[closing[0] :] if closing else lines[-20:]))
    listing = subprocess.run(
        [str(args.nix_bin_dir / "nix-instantiate"), "--eval", "--strict", "--json",
         str(EXPRESSION), "--arg", "path", str(args.nixpkgs), "--arg", "names", "true"],
        capture_output=True, check=True, env=env,
    )  # fmt: skip
    names = json.loads(listing.stdout)[: args.limit or None]
    skipped = set(SKIPPED.findall(stderr))
    evaluated = [name for name in names if name not in skipped]
    reference = None
    if len(evaluated) <= REFERENCE_MAX_NAMES:
        reference = single_evaluation(args.nixpkgs, args.nix_bin_dir, evaluated)
    print(f"\n{len(names)} names, {len(skipped)} skipped; chunks of {args.chunk_size}, "
          f"{args.eval_jobs} at once; nixeryd popcount exit {code}")  # fmt: skip
    print(f"{'':38} {'peak RSS':>12} {'wall':>8}")
    print(f"{'popcount, largest Nix process':38} {gib(largest):>12} {wall:>7.0f}s")
    print(f"{'popcount, whole process tree':38} {gib(tree):>12}")
    if reference is None:
        print(f"one nix-instantiate, same names: not run for more than {REFERENCE_MAX_NAMES} "
              "names (the whole set in one process grows past 16 GB)")  # fmt: skip
    else:
        ref_code, ref_wall, ref_peak = reference
        print(f"{'one nix-instantiate, same names':38} {gib(ref_peak):>12} {ref_wall:>7.0f}s"
              f"  (exit {ref_code})")  # fmt: skip
        print(f"largest process / one process: {largest / max(ref_peak, 1):.2f}")
    print(f"goal: any Nix process <= {gib(GOAL_BYTES)}: "
          f"{'met' if largest <= GOAL_BYTES else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
