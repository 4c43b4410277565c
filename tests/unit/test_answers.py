"""Answers served from memory: manifests by digest, small blobs, never a Range request."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from nixeryd.testing.harness import FakeNix, RegistryFactory, building, header


def test_digest_manifests_and_small_blobs_are_answered_from_memory_once_served(
    registry_with: RegistryFactory, nix: FakeNix, tmp_path: Path
) -> None:
    registry = registry_with(*building(nix))
    _, body = registry.get("/v2/hello/manifests/latest")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    config = json.loads(body)["config"]["digest"]
    first = {
        path: registry.get(path)
        for path in (f"/v2/hello/manifests/{digest}", f"/v2/hello/blobs/{config}")
    }
    # Storage gone: what was served is still answered, with the same headers.
    shutil.rmtree(tmp_path / "storage")
    for path, (response, data) in first.items():
        again, same = registry.get(path)
        assert (again.code, same) == (200, data)
        for name in ("Content-Type", "Docker-Content-Digest", "Docker-Distribution-API-Version"):
            assert header(again, name) == header(response, name)
        head, empty = registry.request("HEAD", "http://registry" + path)
        assert (head.code, empty) == (200, b"")
        assert header(head, "Content-Length") == str(len(data))
    # A Range request goes to storage, which no longer has the blob.
    ranged, _ = registry.get(f"/v2/hello/blobs/{config}", headers={"Range": ["bytes=0-1"]})
    assert ranged.code == 404


def test_tags_of_moving_sources_are_not_remembered(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(*building(nix))
    assert registry.get("/v2/hello/manifests/latest")[0].code == 200
    # The path source moves: the second GET evaluates again.
    assert registry.get("/v2/hello/manifests/latest")[0].code == 200
    evaluation = registry.processes.expectations[0]
    assert evaluation.prefix == ["nix-instantiate"]
    assert len(evaluation.calls) == 2
