"""Prometheus metrics and the access log of a real daemon: scraped around real pulls."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Daemon, free_port, require
from tests.e2e.test_pull import fetch

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= set(found))


def skopeo_copy(daemon: Daemon, image: str, layout: Path) -> None:
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
         f"docker://{daemon.host}/{image}", f"oci:{layout}:latest"],
        check=True, timeout=180,
    )  # fmt: skip


def test_metrics_move_with_pulls_the_fast_path_included(
    fresh_daemon: Daemon, tmp_path: Path
) -> None:
    require("skopeo")
    url = fresh_daemon.url + "/metrics"
    before = scrape(url)
    assert total(before, "nixeryd_builds_total") == 0
    assert total(before, "nixeryd_nix_commands", state="running") == 0

    skopeo_copy(fresh_daemon, "shell/hello", tmp_path / "first")
    first = scrape(url)
    assert total(first, "nixeryd_builds_total", result="built") == 1
    for stage in ("evaluation", "realise", "closure", "layering", "layers", "manifest"):
        count = "nixeryd_build_stage_duration_seconds_count"
        assert total(first, count, stage=stage) == 1, stage
    assert total(first, "nixeryd_layers_written_total") >= 2
    assert total(first, "nixeryd_layer_bytes_written_total") > 10_000
    assert total(first, "nixeryd_http_requests_total", route="manifest", code="200") >= 1
    assert total(first, "nixeryd_http_requests_total", route="blob", code="200") >= 3
    assert total(first, "nixeryd_http_requests_total", route="metrics") == 1
    assert total(first, "nixeryd_nix_commands", state="running") == 0
    assert total(first, "nixeryd_storage_errors_total") == 0

    # The same image again: no build; small blobs (the config) answered from memory.
    skopeo_copy(fresh_daemon, "shell/hello", tmp_path / "second")
    second = scrape(url)
    assert total(second, "nixeryd_builds_total", result="built") == 1
    assert total(second, "nixeryd_cache_hits_total", level="manifests") >= 1
    blobs = "nixeryd_http_requests_total"
    assert total(second, blobs, route="blob") > total(first, blobs, route="blob")

    # A manifest by digest on one keep-alive connection: the first GET is routed and
    # remembered, the next ones are written by the channel itself, and still counted.
    _, headers, manifest = fetch(fresh_daemon, "/v2/shell/hello/manifests/latest")
    path = f"/v2/shell/hello/manifests/{headers['Docker-Content-Digest']}"
    counted = scrape(url)
    request = f"GET {path} HTTP/1.1\r\nHost: r\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", fresh_daemon.port), timeout=30) as connection:
        for _ in range(3):
            connection.sendall(request)
            received = b""
            while not received.endswith(manifest):
                received += connection.recv(65536)
            assert received.startswith(b"HTTP/1.1 200 OK")
    after = scrape(url)
    hits = "nixeryd_cache_hits_total"
    assert total(after, hits, level="answers") - total(counted, hits, level="answers") >= 2
    by_digest = {"route": "manifest", "method": "GET", "code": "200"}
    assert total(after, blobs, **by_digest) - total(counted, blobs, **by_digest) == 3
    latency = "nixeryd_http_request_duration_seconds_bucket"
    fast = total(after, latency, route="manifest", le="0.001")
    assert fast - total(counted, latency, route="manifest", le="0.001") >= 2
    # No label holds an image name, a digest or a path.
    labels = {value for _, found in after for _, value in found}
    assert not {value for value in labels if "hello" in value or "sha256" in value or "/" in value}


def wait_for(daemon: Daemon, text: str) -> str:
    """The daemon's log once ``text`` is in it (access lines are written at a turn's end)."""
    deadline = time.monotonic() + 10
    while text not in daemon.log():
        assert time.monotonic() < deadline, f"{text!r} never logged"
        time.sleep(0.05)
    return daemon.log()


def test_metrics_on_their_own_listener_and_the_json_access_log(tmp_path: Path) -> None:
    port = free_port()
    daemon = Daemon(
        tmp_path / "json",
        NIXERYD_LOG_FORMAT="json",
        NIXERYD_METRICS_LISTEN=f"tcp:{port}:interface=127.0.0.1",
    )
    try:
        status, _, body = fetch(daemon, "/metrics")
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
        scraped = scrape(f"http://127.0.0.1:{port}/metrics")
        assert total(scraped, "nixeryd_http_requests_total", route="metrics", code="404") == 1
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=30)
        assert refused.value.code == 404
        fetch(daemon, "/v2/?probe=json", **{"User-Agent": "probe/1", "Authorization": "Basic eDp5"})
        log = wait_for(daemon, "/v2/?probe=json")
    finally:
        daemon.stop()
    records = [json.loads(line) for line in log.split("\x1e") if line.strip()]
    access = [record for record in records if record.get("log_namespace") == "nixeryd.access"]
    probe = next(record for record in access if record["path"] == "/v2/?probe=json")
    assert probe["method"] == "GET" and probe["status"] == 200 and probe["bytes"] == 2
    assert probe["user_agent"] == "probe/1" and probe["remote"] == "127.0.0.1"
    assert "user" not in probe and "eDp5" not in log
    assert 0 <= probe["duration_ms"] < 10_000
    # The main listener's /metrics (404) is logged; the metrics listener's scrape is not.
    assert [record["status"] for record in access if record["path"] == "/metrics"] == [404]
