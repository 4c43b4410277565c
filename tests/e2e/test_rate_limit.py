"""Each client's rate of new image names (NIXERYD_BUILD_RATE) on a real daemon.

A client past its rate is told to wait (429 TOOMANYREQUESTS with Retry-After)
before any Nix runs for the name; what it was served before, by tag or by
digest, it still gets, with skopeo as with a bare HTTP client; skopeo, refused,
waits as it is told and is answered.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemon, require
from tests.e2e.test_pull import error_of, fetch, pull_and_unpack

pytestmark = pytest.mark.e2e


def test_new_names_past_a_clients_rate_are_refused_and_served_ones_are_not(
    tmp_path: Path,
) -> None:
    require("skopeo")
    daemon = Daemon(tmp_path / "rated", NIXERYD_BUILD_RATE="6/minute, burst 2")
    try:
        (tmp_path / "hello").mkdir()
        rootfs = pull_and_unpack(daemon, "hello", tmp_path / "hello")
        assert (rootfs / "bin" / "hello").exists()
        status, headers, _ = fetch(daemon, "/v2/busybox/manifests/latest")
        assert status == 200
        digest = headers["Docker-Content-Digest"]

        status, headers, body = fetch(daemon, "/v2/libgreet/manifests/latest")
        assert status == 429
        assert 1 <= int(headers["Retry-After"]) <= 10
        error = error_of(body)
        assert error["code"] == "TOOMANYREQUESTS"
        assert "NIXERYD_BUILD_RATE" in error["message"]
        assert "libgreet evaluation" not in daemon.log(), "Nix ran for a refused name"

        # What was served before is not rationed: by tag, by digest, through skopeo.
        assert fetch(daemon, "/v2/busybox/manifests/latest")[0] == 200
        assert fetch(daemon, f"/v2/busybox/manifests/{digest}")[0] == 200
        inspected = subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", f"docker://{daemon.host}/hello"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert inspected.returncode == 0, inspected.stderr
        assert json.loads(inspected.stdout)["Digest"].startswith("sha256:")

        # skopeo, refused the new name, waits as told and asks again.
        started = time.monotonic()
        retried = subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", f"docker://{daemon.host}/libgreet"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert retried.returncode == 0, retried.stderr
        refusals = daemon.log().count('"GET /v2/libgreet/manifests/latest HTTP/1.1" 429')
        assert refusals >= 2, "skopeo was not refused before it was answered"
        assert time.monotonic() - started >= 1
    finally:
        daemon.stop()
