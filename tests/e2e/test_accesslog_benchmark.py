"""The access log benchmark's smoke test: benchmarks/accesslog.py with one short run each.

It checks that the benchmark runs, prints its table and that every writer logged every
request, not how fast anything is (the benchmark measures that; nothing is asserted).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, nix_env

pytestmark = pytest.mark.e2e


def test_the_access_log_benchmark_runs(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (benchmarks/accesslog installs it)")
    results = tmp_path / "results.json"
    argv = [sys.executable, "-m", "benchmarks.accesslog", "--seconds", "1"]
    completed = subprocess.run(
        [*argv, "--repeats", "1", "--workdir", str(tmp_path / "work"), "--json", str(results)],
        env=nix_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "| twisted |" in completed.stdout and "cheaper" in completed.stdout
    measured = json.loads(results.read_text())
    assert set(measured["rps"]) == {"off", "twisted", "nixeryd", "nixeryd, json"}
    assert measured["lines"]["off"] == 0
    for writer in ("twisted", "nixeryd", "nixeryd, json"):
        # One line per request wrk made, and one for the routed GET before it.
        assert measured["lines"][writer] >= measured["rps"][writer] * 0.5, writer
