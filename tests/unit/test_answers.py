"""Answers served from memory: manifests by digest, small blobs, never a Range request."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

from nixeryd.answers import Answers
from nixeryd.metrics import Metrics
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


class _Request:
    """The parts of a request Answers reads."""

    def __init__(self, path: bytes, method: bytes = b"GET") -> None:
        from twisted.web.http_headers import Headers

        self.path = path
        self.method = method
        self.requestHeaders = Headers()
        self.code = 200
        self.headers: dict[bytes, bytes] = {}

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value


def test_a_redirect_is_answered_for_gets_until_it_goes_stale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    answers = Answers([(b"Docker-Distribution-API-Version", b"registry/2.0")], Metrics())
    path = b"/v2/hello/blobs/sha256:" + b"a" * 64
    location = [(b"Location", b"https://bucket.example/blob?X-Amz-Signature=1")]
    answers.remember(_Request(path), location, b"", by_accept=False, code=307, until=1150.0)  # type: ignore[arg-type]

    response = answers.response(b"GET", path, [])
    assert response is not None
    raw, code, length = response
    assert raw.startswith(b"HTTP/1.1 307 Temporary Redirect\r\n")
    assert b"Location: https://bucket.example/blob?X-Amz-Signature=1\r\n" in raw
    assert (code, length) == (307, 0)
    request = _Request(path)
    assert answers.answer(request) == b""  # type: ignore[arg-type]
    assert request.code == 307
    # The presigned URL is signed for GET: a HEAD is left to the registry, which knows the size.
    assert answers.response(b"HEAD", path, []) is None
    assert answers.answer(_Request(path, b"HEAD")) is None  # type: ignore[arg-type]

    now[0] = 1150.0
    assert answers.response(b"GET", path, []) is None
    fresh = [(b"Location", b"https://bucket.example/blob?X-Amz-Signature=2")]
    answers.remember(_Request(path), fresh, b"", by_accept=False, code=307, until=1300.0)  # type: ignore[arg-type]
    again = answers.response(b"GET", path, [])
    assert again is not None
    assert b"X-Amz-Signature=2" in again[0]
