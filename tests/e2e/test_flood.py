"""A flood of new images: Nix stays within its bound, cached answers stay fast.

Fifty distinct new image names are asked for at once from a daemon whose
package set makes fifty tiny, never-built packages (``benchmarks/flood``).
Meanwhile the Nix commands under the daemon are counted by sampling
``/proc``, and a cached manifest is fetched by digest over and over; its p99
is compared with the same fetches on the idle daemon (2 s of back-to-back GETs each:
the flood's from its start, idle before and after it). Evaluators are off, so
that each evaluation is a process of its own and counted as one.

Run alone, for the figures: ``pytest -s tests/e2e/test_flood.py -k nix-2.8``.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from nixeryd.process import descendants
from tests.e2e.conftest import ROOT, Daemon

pytestmark = pytest.mark.e2e

IMAGES = 50
NIX_JOBS = 2
#: Seconds of cached GETs timed, idle and from the flood's start (it lasts 3-8 s).
TIMED_SECONDS = 2.0
#: The p99 allowed over 2x of idle: the idle p99 moves between 0.3 and 0.6 ms from one
#: 2 s window to the next on a quiet machine (more beside other work on 2 shared cores),
#: and the flood's between 0.45 and 0.85 ms (1.1-2.9 ms when the reactor spawned Nix
#: itself; benchmarks/README.md has the history).
NOISE_FLOOR = 0.001
NIX_PROGRAMS = ("nix-store", "nix-instantiate", "nix")


def _package_set(tmp_path: Path) -> Path:
    template = (ROOT / "benchmarks" / "flood" / "pkgs.nix.in").read_text()
    text = (
        template.replace("@ROOT@", str(ROOT))
        .replace("@COUNT@", str(IMAGES))
        .replace("@LAST@", str(IMAGES - 1))
        .replace("@SALT@", uuid.uuid4().hex[:12])
    )
    path = tmp_path / "flood.nix"
    path.write_text(text)
    return path


def _nix_running(root: int) -> int:
    """The Nix commands the daemon runs: its children (each execs Nix in a session of its
    own); what Nix starts itself (a build hook, ``nix __build-remote``) is not counted."""
    count = 0
    for pid in descendants(root):
        if _parent(pid) != root:
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if Path(argv[0].decode(errors="replace")).name in NIX_PROGRAMS:
            count += 1
    return count


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


#: Times back-to-back GETs of one path for a number of seconds, in a process of its own,
#: so that the test's threads (the pulls, the /proc sampler) do not hold the GIL of the
#: client being timed; prints the count, p50 and p99 in seconds.
_TIMED_FETCHES = """
import http.client, sys, time
port, path, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
samples = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    started = time.perf_counter()
    connection.request("GET", path)
    response = connection.getresponse()
    response.read()
    samples.append(time.perf_counter() - started)
    assert response.status == 200, response.status
samples.sort()
print(len(samples), samples[len(samples) // 2], samples[int(len(samples) * 0.99)])
"""


@dataclass(frozen=True)
class Latency:
    fetches: int
    p50: float
    p99: float

    def __str__(self) -> str:
        return f"p50 {self.p50 * 1000:.2f} ms, p99 {self.p99 * 1000:.2f} ms ({self.fetches} GETs)"


def _timed(daemon: Daemon, path: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _TIMED_FETCHES, str(daemon.port), path, str(TIMED_SECONDS)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _latency(timed: subprocess.Popen[str]) -> Latency:
    stdout, _ = timed.communicate(timeout=120)
    assert timed.returncode == 0, stdout
    fetches, p50, p99 = stdout.split()
    return Latency(int(fetches), float(p50), float(p99))


def _pull(daemon: Daemon, name: str, statuses: list[int]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=600)
    connection.request("GET", f"/v2/{name}/manifests/latest")
    response = connection.getresponse()
    response.read()
    statuses.append(response.status)
    connection.close()


def test_a_flood_of_new_images_keeps_nix_bounded_and_cached_answers_fast(tmp_path: Path) -> None:
    daemon = Daemon(
        tmp_path / "flood",
        NIXERY_PKGS_PATH=str(_package_set(tmp_path)),
        NIXERYD_EVALUATORS="0",
        NIXERYD_NIX_JOBS=str(NIX_JOBS),
        NIXERYD_NIX_QUEUE=str(IMAGES * 3),
        NIXERYD_BUILD_TIMEOUT="600",
    )
    try:
        statuses: list[int] = []
        _pull(daemon, "hello", statuses)
        connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
        connection.request("GET", "/v2/hello/manifests/latest")
        digest = connection.getresponse().headers["Docker-Content-Digest"]
        connection.close()
        cached = f"/v2/hello/manifests/{digest}"
        before = _latency(_timed(daemon, cached))

        most = 0
        flooding = True

        def sample() -> None:
            # Each look reads every process's stat, a millisecond of CPU on a busy
            # machine, a hundred times a second: at the lowest priority, so that the
            # count does not take the CPU from the daemon it measures.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            nonlocal most
            while flooding:
                most = max(most, _nix_running(daemon.process.pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        pulls = [
            threading.Thread(target=_pull, args=(daemon, f"p{index}", statuses))
            for index in range(IMAGES)
        ]
        for pull in pulls:
            pull.start()
        flood = _latency(_timed(daemon, cached))
        for pull in pulls:
            pull.join()
        flooding = False
        sampler.join()
        seconds = time.monotonic() - started
        after = _latency(_timed(daemon, cached))
        # The machine's idle is the worse window, before or after: other work on the
        # shared cores comes and goes, and a quiet window beside a busy one is no baseline.
        idle = max(before, after, key=lambda latency: latency.p99)
        print(
            f"\nflood of {IMAGES}: {seconds:.1f} s; most Nix processes at once {most} "
            f"(bound {NIX_JOBS}); cached manifest idle {idle}, under the flood {flood} "
            f"(p99 {flood.p99 / idle.p99:.2f}x); statuses {sorted(set(statuses))}"
        )
        assert statuses.count(200) == IMAGES + 1
        assert 0 < most <= NIX_JOBS
        # The bound, 2x of idle, with a floor for a sub-millisecond idle p99 on a
        # shared machine (see NOISE_FLOOR).
        assert flood.p99 <= max(2 * idle.p99, idle.p99 + NOISE_FLOOR)
    finally:
        daemon.stop()
