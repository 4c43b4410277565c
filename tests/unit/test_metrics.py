"""Prometheus metrics: what each stage counts, the /metrics page, and bounded label sets."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import StringTransport

from nixeryd.builtin.filesystem import FilesystemStorage
from nixeryd.config import ConfigError, load_config
from nixeryd.errors import DigestInvalid, StorageFailed
from nixeryd.metrics import (
    BUILD_RESULTS,
    CACHE_LEVELS,
    METHODS,
    ROUTES,
    STAGES,
    Metrics,
    MetricsSite,
    route_of,
)
from nixeryd.site import RegistryChannel, RegistryRequest, RegistrySite
from nixeryd.testing.harness import FakeNix, Harness, RegistryFactory, building, header


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's value; 0 when it was never counted."""
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def requests(metrics: Metrics, route: str, method: str = "GET", code: str = "200") -> float:
    return value(metrics, "nixeryd_http_requests_total", route=route, method=method, code=code)


@pytest.mark.parametrize(
    "path, route",
    [
        (b"/v2/", "v2"),
        (b"/v2", "v2"),
        (b"/v2/shell/hello/manifests/latest", "manifest"),
        (b"/v2/hello/manifests/sha256:abc", "manifest"),
        # Names may hold any component: the kind is read from the end.
        (b"/v2/blobs/manifests/latest", "manifest"),
        (b"/v2/manifests/blobs/sha256:abc", "blob"),
        (b"/v2/tags/list/tags/list", "tags"),
        (b"/v2/hello/tags/list", "tags"),
        (b"/v2/hello/referrers/sha256:abc", "other"),
        (b"/v2/hello", "other"),
        (b"/v2/manifests/latest", "other"),  # no name: not the manifest route
        (b"/v2/hello/blobs/uploads/", "other"),
        (b"/token", "token"),
        (b"/metrics", "metrics"),
        (b"/", "index"),
        (b"/errors/1/log", "other"),
        (b"/etc/passwd", "other"),
    ],
)
def test_every_path_has_one_route_template(path: bytes, route: str) -> None:
    assert route_of(path) == route
    assert route in ROUTES


def test_a_method_a_client_invents_is_counted_as_other() -> None:
    metrics = Metrics()
    for method in (b"GET", b"BREW", b"X" * 100, b"\xff"):
        metrics.request("other", method, 405, 0.001)
    assert requests(metrics, "other", "GET", "405") == 1
    assert requests(metrics, "other", "other", "405") == 3


def pull(registry: Harness, path: str = "/v2/hello/manifests/latest") -> tuple[Any, bytes]:
    response, body = registry.get(path)
    assert response.code == 200, body
    return response, body


def test_a_build_is_counted_with_each_stage_and_its_layers(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(*building(nix))
    metrics = registry.registry.metrics
    pull(registry)
    assert value(metrics, "nixeryd_builds_total", result="built") == 1
    for stage in STAGES:
        count = "nixeryd_build_stage_duration_seconds_count"
        assert value(metrics, count, stage=stage) == 1, stage
    layers = value(metrics, "nixeryd_layers_written_total", compression="isal")
    assert layers >= 2  # the store paths' layers and the symlink forest's
    assert value(metrics, "nixeryd_layer_bytes_written_total", compression="isal") > 0
    assert value(metrics, "nixeryd_cache_misses_total", level="layer_record") == layers
    assert value(metrics, "nixeryd_cache_misses_total", level="manifest_record") == 1
    # The path source is moving: the next pull evaluates, and finds the image in memory.
    pull(registry)
    assert value(metrics, "nixeryd_builds_total", result="built") == 1
    assert value(metrics, "nixeryd_cache_hits_total", level="manifests") == 1
    assert requests(metrics, "manifest") == 0, "the harness bypasses the site: nothing counted"


def test_failures_are_counted_by_result_and_answered_again_from_memory(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(nix.evaluation(missing=["nope"]))
    metrics = registry.registry.metrics
    for _ in range(2):
        response, _ = registry.get("/v2/nope/manifests/latest")
        assert response.code == 404
    assert value(metrics, "nixeryd_builds_total", result="not_found") == 1
    assert value(metrics, "nixeryd_cache_hits_total", level="failure") == 1
    registry = registry_with(nix.evaluation(exit_code=1, stderr=["error: nixeryd-test: no"]))
    registry.get("/v2/hello/manifests/latest")
    assert value(registry.registry.metrics, "nixeryd_builds_total", result="failed") == 1


def test_a_refused_image_is_counted_and_nix_slots_are_watched(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    gate: Deferred[None] = Deferred()
    registry = registry_with(*building(nix, gate=gate), nix_jobs=1, nix_queue=0)
    metrics = registry.registry.metrics
    first = registry.treq.get("http://registry/v2/shell/hello/manifests/latest")
    registry.treq.flush()
    assert value(metrics, "nixeryd_nix_commands", state="running") == 1
    assert value(metrics, "nixeryd_nix_commands", state="queued") == 0
    refused, _ = registry.get("/v2/shell/other/manifests/latest")
    assert refused.code == 429
    assert value(metrics, "nixeryd_builds_total", result="refused") == 1
    gate.callback(None)
    assert registry.settle(first).code == 200
    assert value(metrics, "nixeryd_nix_commands", state="running") == 0


def test_storage_errors_are_counted_by_backend_operation_and_class(
    registry_with: RegistryFactory, nix: FakeNix, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(self: FilesystemStorage, name: str, data: bytes) -> Deferred[None]:
        return fail(StorageFailed("storage is read-only while writing a record"))

    monkeypatch.setattr(FilesystemStorage, "put_record", failing)
    registry = registry_with(*building(nix))
    response, _ = registry.get("/v2/hello/manifests/latest")
    assert response.code == 503
    metrics = registry.registry.metrics
    errors = "nixeryd_storage_errors_total"
    labels = {"backend": "filesystem", "kind": "StorageFailed"}
    assert value(metrics, errors, operation="put_record", **labels) >= 1
    assert value(metrics, "nixeryd_builds_total", result="error") == 1
    # A client's malformed digest is not the storage's error.
    before = sum(v for k, v in samples(metrics).items() if k[0] == errors)
    response, _ = registry.get("/v2/hello/blobs/sha256:nothex")
    assert response.code in (400, 404)
    with pytest.raises(DigestInvalid):
        registry.settle(registry.registry.storage.stat_blob("sha256:../../etc"))
    assert sum(v for k, v in samples(metrics).items() if k[0] == errors) == before


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
    }


def test_no_label_holds_an_image_name_digest_or_path(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(*building(nix))
    server = Site(registry)
    _, manifest = pull(registry)
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    config = json.loads(manifest)["config"]["digest"]
    for path in (f"/v2/hello/manifests/{digest}", f"/v2/hello/blobs/{config}", "/v2/x/y/z/q"):
        server.exchange(f"GET {path} HTTP/1.1")
        server.exchange(f"GET {path} HTTP/1.1")
    server.exchange("BREW /v2/hello/manifests/latest HTTP/1.1")
    bounded = {
        "route": set(ROUTES),
        "method": {method.decode() for method in METHODS} | {"other"},
        "stage": set(STAGES),
        "level": set(CACHE_LEVELS),
        "result": set(BUILD_RESULTS),
        "state": {"running", "queued"},
        "compression": {"isal", "zlib", "zstd"},
        "backend": {"filesystem"},
    }
    seen: dict[str, set[str]] = {}
    for (_, labels), _ in samples(registry.registry.metrics).items():
        for name, label in labels:
            seen.setdefault(name, set()).add(label)
    for name, labels in seen.items():
        for label in labels:
            assert "hello" not in label and "sha256" not in label and "/" not in label, label
        if name in bounded:
            assert labels <= bounded[name], (name, labels - bounded[name])
    assert seen["code"] <= {"200", "404", "405"}


class Site:
    """The daemon's site over a harness's registry: raw requests, one connection each."""

    def __init__(self, registry: Harness) -> None:
        self.metrics = registry.registry.metrics
        self.site = RegistrySite(
            registry.registry.resource(), registry.registry.answers, self.metrics
        )
        self.site.startFactory()
        self.routed = 0
        self.site.requestFactory = self._counting  # type: ignore[assignment]

    def _counting(self, *args: Any) -> RegistryRequest:
        self.routed += 1
        return RegistryRequest(*args)

    def exchange(self, request_line: str, *headers: str) -> bytes:
        raw = "\r\n".join([request_line, "Host: registry", *headers]) + "\r\n\r\n"
        channel = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.7", 5555))
        assert isinstance(channel, RegistryChannel)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.7", 5555))
        channel.makeConnection(transport)
        channel.dataReceived(raw.encode())
        response = transport.value()
        channel.connectionLost(None)  # type: ignore[arg-type]
        return response


def test_answers_from_memory_are_counted_as_requests_and_cache_hits(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(*building(nix))
    _, manifest = pull(registry)
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    server = Site(registry)
    path = f"/v2/hello/manifests/{digest}"
    server.exchange(f"GET {path} HTTP/1.1")  # routed, and then remembered
    assert server.routed == 1
    assert requests(server.metrics, "manifest") == 1
    for method in ("GET", "HEAD", "GET"):
        assert server.exchange(f"{method} {path} HTTP/1.1").startswith(b"HTTP/1.1 200 OK")
    assert server.routed == 1, "not answered from memory"
    assert requests(server.metrics, "manifest") == 3
    assert requests(server.metrics, "manifest", "HEAD") == 1
    latency = "nixeryd_http_request_duration_seconds_count"
    assert value(server.metrics, latency, route="manifest", method="GET") == 3
    assert value(server.metrics, "nixeryd_cache_hits_total", level="answers") == 3
    server.exchange("GET /v2/ HTTP/1.1")
    assert requests(server.metrics, "v2") == 1


def test_the_metrics_page_speaks_both_formats(registry_with: RegistryFactory, nix: FakeNix) -> None:
    registry = registry_with(*building(nix))
    pull(registry)
    response, body = registry.get("/metrics")
    assert response.code == 200
    assert (header(response, "Content-Type") or "").startswith("text/plain; version=")
    assert b'nixeryd_builds_total{result="built"} 1.0' in body
    assert b"nixeryd_info{version=" in body
    response, body = registry.get(
        "/metrics", headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain"}
    )
    assert (header(response, "Content-Type") or "").startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    response, body = registry.request("POST", "http://registry/metrics")
    assert response.code == 405
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


def test_metrics_off_or_on_another_listener_leave_the_registry_without_it(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    for options in ({"metrics": False}, {"metrics_listen": ("tcp:0",)}):
        response, body = registry_with(**options).get("/metrics")
        assert response.code == 404
        assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


def test_the_metrics_listener_serves_metrics_alone() -> None:
    metrics = Metrics()
    metrics.build("built")
    site = MetricsSite(metrics)
    answers = {}
    for path in (b"/metrics", b"/v2/", b"/"):
        channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.7", 5555))
        transport = StringTransport()
        channel.makeConnection(transport)  # type: ignore[union-attr]
        channel.dataReceived(b"GET %s HTTP/1.1\r\nHost: m\r\n\r\n" % path)  # type: ignore[union-attr]
        answers[path] = transport.value()
    assert answers[b"/metrics"].startswith(b"HTTP/1.1 200 OK")
    assert b'nixeryd_builds_total{result="built"} 1.0' in answers[b"/metrics"]
    for path in (b"/v2/", b"/"):
        assert answers[path].startswith(b"HTTP/1.1 404 Not Found")
        assert b'"UNSUPPORTED"' in answers[path]


def test_a_metrics_listener_with_metrics_off_is_a_configuration_error() -> None:
    config = load_config({}, {"NIXERYD_METRICS_LISTEN": "tcp:9090,unix:/run/m.sock"})
    assert config.metrics_listen == ("tcp:9090", "unix:/run/m.sock")
    with pytest.raises(ConfigError, match=r"metrics_listen \(from \$NIXERYD_METRICS_LISTEN\)"):
        load_config({"metrics": "false"}, {"NIXERYD_METRICS_LISTEN": "tcp:9090"})


def test_gc_runs_are_counted_by_result() -> None:
    metrics = Metrics()
    metrics.gc_run("completed")
    metrics.gc_run("completed")
    assert value(metrics, "nixeryd_gc_runs_total", result="completed") == 2
