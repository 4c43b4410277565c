"""The fuzz benchmark (benchmarks/fuzz.py) as a test: a seeded, bounded run of malformed
and odd requests against a real daemon must get no 5xx, no traceback in the log, no
byte from outside storage, no hang, and no 200 to a ``..`` target that is not explained.

A smaller count than the benchmark's 10,000 keeps it within a minute; the seed is
fixed, so a failure reproduces with ``benchmarks/fuzz --count 2000``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import run_benchmark
from tests.nixinstalls import NixInstallation

pytestmark = pytest.mark.e2e


def test_fuzzed_requests_get_no_5xx_traceback_outside_read_or_hang(
    tmp_path: Path, nix_installation: NixInstallation | None
) -> None:
    report, figures = run_benchmark("fuzz", tmp_path, "--count", "2000")
    assert figures["requests"] > 2000, report  # pipelines send several per connection
    assert figures["5xx"] == 0, report
    assert figures["tracebacks"] == 0, report + (tmp_path / "work" / "nixeryd.log").read_text()
    assert figures["outside_storage"] == 0, report
    assert figures["hangs"] == 0, report
    # A 200 to a target with ".." must be one of the legitimate kinds (dots in the query or
    # inside a name, or the registry's own answer once the dot segments are removed).
    assert figures["dotdot_200_not_explained"] == 0, report
