"""The access log benchmark's smoke test: benchmarks/accesslog.py with one short run each.

It checks that the benchmark runs, prints its table and that every writer logged every
request, not how fast anything is (the benchmark measures that; nothing is asserted).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import run_benchmark

pytestmark = pytest.mark.e2e


def test_the_access_log_benchmark_runs(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (benchmarks/accesslog installs it)")
    stdout, measured = run_benchmark("accesslog", tmp_path, "--seconds", "1", "--repeats", "1")
    assert "| twisted |" in stdout and "cheaper" in stdout
    assert set(measured["rps"]) == {"off", "twisted", "nixeryd", "nixeryd, json"}
    assert measured["lines"]["off"] == 0
    for writer in ("twisted", "nixeryd", "nixeryd, json"):
        # One line per request wrk made, and one for the routed GET before it.
        assert measured["lines"][writer] >= measured["rps"][writer] * 0.5, writer
