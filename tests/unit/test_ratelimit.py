"""Per-client rationing of requests for image names not yet served."""

from __future__ import annotations

import json

import pytest
from twisted.internet.task import Clock

from nixeryd.config import ConfigError, load_config
from nixeryd.errors import TooManyRequests
from nixeryd.ratelimit import ClientBuckets, Rate, parse_rate
from nixeryd.testing.harness import FakeNix, RegistryFactory, building, header


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("20/minute, burst 10", Rate(20, 60, 10)),
        ("20/minute,10", Rate(20, 60, 10)),
        ("5/second", Rate(5, 1, 5)),
        ("0.5/hour", Rate(0.5, 3600, 1)),
        ("0", None),
    ],
)
def test_rates_are_read_as_written(text: str, rate: Rate | None) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["20", "20/day", "-1/minute", "20/minute, burst 0", "x/minute"])
def test_a_malformed_rate_is_a_configuration_error_naming_the_variable(text: str) -> None:
    with pytest.raises(ConfigError, match="NIXERYD_BUILD_RATE"):
        load_config({}, {"NIXERYD_BUILD_RATE": text})


def test_a_bucket_allows_its_burst_then_refuses_until_a_token_is_back() -> None:
    clock = Clock()
    buckets = ClientBuckets(Rate(6, 60, 2), clock)
    buckets.take("a", "p1:latest")
    buckets.take("a", "p2:latest")
    with pytest.raises(TooManyRequests) as refused:
        buckets.take("a", "p3:latest")
    assert refused.value.retry_after == 10
    assert refused.value.status == 429 and refused.value.code == "TOOMANYREQUESTS"
    assert "NIXERYD_BUILD_RATE" in refused.value.message
    buckets.take("b", "p3:latest")  # another client has its own bucket
    clock.advance(10)
    buckets.take("a", "p3:latest")
    with pytest.raises(TooManyRequests):
        buckets.take("a", "p4:latest")


def test_buckets_are_kept_for_the_most_recent_clients_only() -> None:
    buckets = ClientBuckets(Rate(1, 3600, 1), Clock(), kept=100)
    for client in range(10_000):
        buckets.take(f"address 10.0.{client // 256}.{client % 256}", "p:latest")
    assert len(buckets) == 100


def test_new_names_past_a_clients_rate_get_429_and_served_ones_do_not(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(*building(nix), build_rate=Rate(1, 60, 1))
    first, _ = registry.get("/v2/shell/hello/manifests/latest")
    assert first.code == 200
    digest = header(first, "Docker-Content-Digest")
    again, _ = registry.get("/v2/shell/hello/manifests/latest")
    assert again.code == 200, "a tag already served took a token"
    by_digest, _ = registry.get(f"/v2/shell/hello/manifests/{digest}")
    assert by_digest.code == 200
    refused, body = registry.get("/v2/shell/other/manifests/latest")
    assert refused.code == 429
    assert header(refused, "Retry-After") == "60"
    error = json.loads(body)["errors"][0]
    assert error["code"] == "TOOMANYREQUESTS"
    assert "shell/other:latest" in error["message"]
    registry.daemon_clock.advance(60)
    retried, _ = registry.get("/v2/shell/other/manifests/latest")
    assert retried.code != 429
