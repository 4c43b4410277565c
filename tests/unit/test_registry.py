"""The registry routes, in memory: the real klein resource under StubTreq, real storage,
real layer writing, and an expectation fake standing in for Nix."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from nixeryd.config import Config
from nixeryd.manifest import DOCKER_MANIFEST, OCI_MANIFEST
from nixeryd.plugins import Plugins, make_plugin_manager
from nixeryd.service import make_registry
from tests.fakes import Expect, ExpectingProcessRunner
from tests.memoryhttp import MemoryHTTP

HASH = "0123456789abcdfghijklmnpqrsvwxyz"


class FakeNix:
    """A store of real files in a temp dir and the Nix answers that describe it."""

    def __init__(self, root: Path) -> None:
        self.store = root / "store"
        self.hello = self._package("a", "hello-2.12", {"bin/hello": b"#!/bin/sh\necho hi\n"})
        self.lib = self._package("b", "libgreet-1.0", {"share/greeting": b"hello"})
        self.cacert = self._package("c", "nss-cacert-3.9", {"etc/ssl/certs/ca-bundle.crt": b"x"})

    def _package(self, letter: str, name: str, files: dict[str, bytes]) -> str:
        path = self.store / f"{letter * 32}-{name}"
        for relative, data in files.items():
            (path / relative).parent.mkdir(parents=True, exist_ok=True)
            (path / relative).write_bytes(data)
        return str(path)

    def evaluation(self, missing: list[str] | None = None, **extra: Any) -> Expect:
        packages = [
            {"name": name, "attrPath": name, "drvPath": f"/{name}.drv", "outputPath": path}
            for name, path in (("hello", self.hello), ("cacert", self.cacert))
        ]
        report = {"missing": missing or [], "packages": [] if missing else packages}
        return Expect(["nix-instantiate"], stdout=json.dumps(report).encode(), **extra)

    def path_info(self) -> Expect:
        report = [
            {"path": self.hello, "narSize": 1000, "references": [self.hello, self.lib]},
            {"path": self.lib, "narSize": 500, "references": []},
            {"path": self.cacert, "narSize": 200, "references": []},
        ]
        return Expect(["nix", "--extra-experimental-features"], stdout=json.dumps(report).encode())


class Harness(MemoryHTTP):
    """The registry built by the composition root, with fake Nix and real everything else."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *expect: Expect) -> None:
        self.processes = ExpectingProcessRunner(*expect)
        config = Config(pkgs_path=str(tmp_path), storage_path=str(tmp_path / "storage"))
        registry = make_registry(
            config,
            Clock(),
            plugins=Plugins(make_plugin_manager(load_entrypoints=False)),
            http=object(),
            processes=self.processes,
            run_in_thread=maybeDeferred,
        )
        super().__init__(registry.resource(), monkeypatch)

    def get(self, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        return self.request("GET", "http://registry" + path, **kwargs)


RegistryFactory = Callable[..., Harness]


@pytest.fixture
def registry_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RegistryFactory:
    """Makes a registry whose Nix answers the given expectations."""
    return lambda *expect: Harness(tmp_path, monkeypatch, *expect)


@pytest.fixture
def nix(tmp_path: Path) -> FakeNix:
    return FakeNix(tmp_path)


def building(nix: FakeNix, **extra: Any) -> list[Expect]:
    return [nix.evaluation(**extra), Expect(["nix-store", "--realise"]), nix.path_info()]


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name.encode())
    return values[0].decode() if values else None


def test_base_endpoint_has_api_version(registry_with: RegistryFactory) -> None:
    registry = registry_with()
    response, body = registry.get("/v2/")
    assert response.code == 200
    assert json.loads(body) == {}
    assert header(response, "Docker-Distribution-API-Version") == "registry/2.0"


def test_manifest_by_tag_then_by_digest_then_blobs(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(*building(nix))
    response, body = registry.get("/v2/hello/manifests/latest")
    assert response.code == 200, body
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert header(response, "Content-Type") == DOCKER_MANIFEST
    assert header(response, "Docker-Content-Digest") == digest
    assert response.length == len(body)  # the client parser takes Content-Length
    assert header(response, "ETag") == f'"{digest}"'

    by_digest, same = registry.get(f"/v2/hello/manifests/{digest}")
    assert by_digest.code == 200
    assert same == body
    assert header(by_digest, "Content-Type") == DOCKER_MANIFEST

    manifest = json.loads(body)
    # Two store-path layers at most (hello+lib may merge or split) plus the symlink forest.
    assert 2 <= len(manifest["layers"]) <= 4
    for layer in [manifest["config"], *manifest["layers"]]:
        blob, data = registry.get(f"/v2/hello/blobs/{layer['digest']}")
        assert blob.code == 200
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
        assert len(data) == layer["size"]
    config = json.loads(registry.get(f"/v2/x/blobs/{manifest['config']['digest']}")[1])
    assert config["config"]["Env"] == ["SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"]


def test_head_sends_headers_without_body_and_does_not_rebuild(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    expectations = building(nix)
    registry = registry_with(*expectations)
    get, _ = registry.get("/v2/hello/manifests/latest")
    head, nothing = registry.request("HEAD", "http://registry/v2/hello/manifests/latest")
    assert head.code == 200
    assert nothing == b""
    assert header(head, "Docker-Content-Digest") == header(get, "Docker-Content-Digest")
    evaluate, realise, path_info = expectations
    assert len(evaluate.calls) == 2  # a path source is re-evaluated: it may have changed
    assert len(realise.calls) == 1  # but the unchanged image is not rebuilt
    assert len(path_info.calls) == 1


def test_oci_only_clients_get_the_oci_manifest(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(*building(nix))
    response, body = registry.get("/v2/hello/manifests/latest", headers={"Accept": [OCI_MANIFEST]})
    assert header(response, "Content-Type") == OCI_MANIFEST
    digest = header(response, "Docker-Content-Digest")
    again, same = registry.get(f"/v2/hello/manifests/{digest}")
    assert same == body
    assert header(again, "Content-Type") == OCI_MANIFEST


def test_ten_concurrent_requests_run_one_build(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    gate: Deferred[None] = Deferred()
    expectations = building(nix, gate=gate)
    registry = registry_with(*expectations)
    pending = [
        registry.treq.get("http://registry/v2/shell/hello/manifests/latest") for _ in range(10)
    ]
    registry.treq.flush()
    gate.callback(None)
    responses = [registry.settle(request) for request in pending]
    assert [response.code for response in responses] == [200] * 10
    digests = {header(response, "Docker-Content-Digest") for response in responses}
    assert len(digests) == 1
    assert [len(expect.calls) for expect in expectations] == [1, 1, 1]


def test_missing_packages_are_all_named(registry_with: RegistryFactory, nix: FakeNix) -> None:
    registry = registry_with(nix.evaluation(missing=["nope", "nada"]))
    response, body = registry.get("/v2/nope/nada/manifests/latest")
    assert response.code == 404
    assert header(response, "Content-Type") == "application/json"
    error = json.loads(body)["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "nope" in error["message"] and "nada" in error["message"]


def test_nix_failures_reach_the_client_and_the_index_page(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    failing = Expect(
        ["nix-instantiate"],
        exit_code=1,
        stderr=["warning: something", "error: unfree package 'x' refused", "(use '--show-trace')"],
    )
    registry = registry_with(failing)
    response, body = registry.get("/v2/x/manifests/latest")
    assert response.code == 404
    error = json.loads(body)["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "error: unfree package 'x' refused" in error["message"]
    assert "show-trace" not in error["message"]
    _, page = registry.get("/")
    assert b"unfree package" in page


def test_timeouts_say_what_happened(registry_with: RegistryFactory, nix: FakeNix) -> None:
    registry = registry_with(nix.evaluation(timed_out=True))
    response, body = registry.get("/v2/hello/manifests/latest")
    assert response.code == 404
    assert "NIX_TIMEOUT" in json.loads(body)["errors"][0]["message"]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/Hello/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/hello/manifests/.INVALID_MANIFEST_NAME", 404, "TAG_INVALID"),
        ("/v2/hello/manifests/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/hello/manifests/sha512:" + "a" * 128, 404, "MANIFEST_UNKNOWN"),
        ("/v2/hello/manifests/sha256:" + "a" * 64, 404, "MANIFEST_UNKNOWN"),
        ("/v2/hello/blobs/sha256:" + "a" * 64, 404, "BLOB_UNKNOWN"),
        ("/v2/hello/blobs/../../etc/passwd", 404, "UNSUPPORTED"),
        ("/v2/hello/blobs/sha256:../../etc/passwd", 404, "UNSUPPORTED"),
        ("/v2/hello/blobs/sha256:..", 400, "DIGEST_INVALID"),
        ("/v2/hello/nonsense", 404, "UNSUPPORTED"),
    ],
)
def test_bad_requests_get_registry_errors(
    registry_with: RegistryFactory, path: str, status: int, code: str
) -> None:
    response, body = registry_with().get(path)
    assert response.code == status, body
    assert json.loads(body)["errors"][0]["code"] == code
    assert header(response, "Docker-Distribution-API-Version") == "registry/2.0"


def test_push_is_unsupported(registry_with: RegistryFactory) -> None:
    response, body = registry_with().request(
        "PUT", "http://registry/v2/hello/manifests/latest", data=b"{}"
    )
    assert response.code == 405
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


def test_a_manifest_route_never_serves_a_layer(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(*building(nix))
    manifest = json.loads(registry.get("/v2/hello/manifests/latest")[1])
    layer = manifest["layers"][0]["digest"]
    response, _ = registry.get(f"/v2/hello/manifests/{layer}")
    assert response.code == 404


def test_tags_list_paginates(registry_with: RegistryFactory) -> None:
    registry = registry_with()
    response, body = registry.get("/v2/shell/hello/tags/list")
    assert json.loads(body) == {"name": "shell/hello", "tags": ["latest"]}
    response, body = registry.get("/v2/hello/tags/list?n=0")
    assert json.loads(body)["tags"] == []
    response, body = registry.get("/v2/hello/tags/list?last=latest")
    assert json.loads(body)["tags"] == []
    response, body = registry.get("/v2/hello/tags/list?n=x")
    assert response.code == 400


def test_get_with_a_body_is_answered(registry_with: RegistryFactory) -> None:
    response, _ = registry_with().get("/v2/", data=b"x" * 10000)
    assert response.code == 200
