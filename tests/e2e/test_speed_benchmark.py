"""The speed benchmark's smoke test: benchmarks/speed.py on a tiny package set.

It checks that the benchmark runs and prints its tables, not how fast anything
is (speed is measured by the benchmark, not asserted). Its reference tools
(pigz, wrk, ab, Debian's docker-registry) are installed by scripts/setup;
a part whose tools are missing is skipped.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import run_benchmark

pytestmark = pytest.mark.e2e


def test_the_speed_benchmark_runs_on_a_tiny_package_set(tmp_path: Path) -> None:
    tools = ("pigz", "wrk", "ab", "docker-registry", "skopeo")
    skip = ["--skip", "pipeline"] if shutil.which("pigz") is None else []
    if any(shutil.which(tool) is None for tool in tools[1:]):
        skip += ["--skip", "serving", "--skip", "memory"]
    if len(skip) == 6:
        pytest.skip("the benchmark's reference tools are not installed (benchmarks/speed does)")
    stdout, report = run_benchmark("speed", tmp_path, "--scale", "tiny", *skip)
    if "pipeline" not in skip:
        assert "## Layer pipeline" in stdout
        assert report["pipeline"]["nixeryd"]["layers"] > 0
        assert report["pipeline"]["nixeryd"]["compression"] == "isal-2"
    if "serving" not in skip:
        assert report["serving"]["manifest GET by tag"]["nixeryd"]["rps"] > 0
        assert report["memory"]["peak_rss_mb"] > 0
