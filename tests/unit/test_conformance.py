"""Protocol conformance: every route and status of the pull side of the distribution spec
(OCI distribution spec v1.1), odd requests included, answered with the spec's codes.

In memory, against the real klein resource and storage with a fake Nix; the
socket-level cases (bodies on keep-alive connections, TLS probes) are in
``tests/e2e/test_protocol.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

import pytest

from nixeryd.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from nixeryd.platform import AMD64, ARM64
from nixeryd.testing.harness import FakeNix, Harness, RegistryFactory, building, header

MANIFEST_TYPES = [DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX]
ZERO_DIGEST = "sha256:" + "0" * 64


def json_error(response: Any, body: bytes) -> dict[str, Any]:
    """The one error of an error response, after checking its envelope."""
    assert header(response, "Content-Type") == "application/json"
    assert header(response, "Docker-Distribution-API-Version") == "registry/2.0"
    errors = json.loads(body)["errors"]
    assert len(errors) == 1 and set(errors[0]) <= {"code", "message", "detail"}
    assert errors[0]["message"]
    return dict(errors[0])


@pytest.fixture
def built(registry_with: RegistryFactory, nix: FakeNix) -> tuple[Harness, dict[str, Any]]:
    """A two-platform registry that has built ``hello``; its Docker manifest list."""
    registry = registry_with(*building(nix), platforms=(AMD64, ARM64))
    response, body = registry.get("/v2/hello/manifests/latest", headers={"Accept": MANIFEST_TYPES})
    assert response.code == 200, body
    return registry, json.loads(body)


# -- /v2/ ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v2/", "/v2"])
def test_base_answers_get_and_head(registry_with: RegistryFactory, path: str) -> None:
    registry = registry_with()
    get, body = registry.get(path)
    assert (get.code, json.loads(body)) == (200, {})
    assert header(get, "Content-Type") == "application/json"
    head, nothing = registry.request("HEAD", "http://registry" + path)
    assert (head.code, nothing) == (200, b"")
    assert header(head, "Docker-Distribution-API-Version") == "registry/2.0"


# -- manifests -------------------------------------------------------------------------


@pytest.mark.parametrize("order", list(itertools.permutations(MANIFEST_TYPES)))
def test_accept_lines_in_any_order_get_one_answer(
    built: tuple[Harness, dict[str, Any]], order: tuple[str, ...]
) -> None:
    registry, index = built
    response, body = registry.get("/v2/hello/manifests/latest", headers={"Accept": list(order)})
    assert header(response, "Content-Type") == DOCKER_MANIFEST_LIST
    assert json.loads(body) == index


def test_every_answer_by_tag_is_served_by_digest_with_the_same_bytes(
    built: tuple[Harness, dict[str, Any]],
) -> None:
    registry, _index = built
    for accept in ([DOCKER_MANIFEST], [OCI_MANIFEST], [OCI_INDEX], MANIFEST_TYPES, []):
        for method in ("GET", "HEAD"):
            response, body = registry.request(
                method, "http://registry/v2/hello/manifests/latest", headers={"Accept": accept}
            )
            digest = header(response, "Docker-Content-Digest")
            assert digest is not None
            assert header(response, "ETag") == f'"{digest}"'
            media_type = header(response, "Content-Type")
            length = int(header(response, "Content-Length") or response.length)
            by_digest, data = registry.get(f"/v2/hello/manifests/{digest}")
            assert by_digest.code == 200
            assert header(by_digest, "Content-Type") == media_type
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
            assert len(data) == length
            assert body == (b"" if method == "HEAD" else data)


def test_index_entries_are_fetchable_by_digest_from_any_name(
    built: tuple[Harness, dict[str, Any]],
) -> None:
    registry, index = built
    for entry in index["manifests"]:
        response, data = registry.get(f"/v2/other/name/manifests/{entry['digest']}")
        assert response.code == 200
        assert header(response, "Content-Type") == entry["mediaType"]
        assert len(data) == entry["size"]


@pytest.mark.parametrize(
    "accept",
    [
        ["application/x-unknown"],
        ["application/vnd.docker.distribution.manifest.v1+prettyjws"],
        ["*/*"],
        ["text/html; q=0.9, */*; q=0.8"],
        ["garbage;;;, ,;q="],
    ],
)
def test_unknown_media_types_get_the_default_manifest(
    built: tuple[Harness, dict[str, Any]], accept: list[str]
) -> None:
    registry, index = built
    response, _ = registry.get("/v2/hello/manifests/latest", headers={"Accept": accept})
    assert response.code == 200
    assert header(response, "Content-Type") == DOCKER_MANIFEST
    assert header(response, "Docker-Content-Digest") == index["manifests"][0]["digest"]


@pytest.mark.parametrize(
    ("reference", "status", "code"),
    [
        (".INVALID_MANIFEST_NAME", 404, "TAG_INVALID"),
        ("-leading-dash", 404, "TAG_INVALID"),
        ("a" * 129, 404, "TAG_INVALID"),
        ("sha256:abc", 400, "DIGEST_INVALID"),
        ("sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
        ("SHA256:" + "a" * 64, 400, "DIGEST_INVALID"),
        ("sha256:", 400, "DIGEST_INVALID"),
        (ZERO_DIGEST, 404, "MANIFEST_UNKNOWN"),
        ("sha512:" + "a" * 128, 404, "MANIFEST_UNKNOWN"),
    ],
)
def test_invalid_and_unknown_manifest_references(
    registry_with: RegistryFactory, reference: str, status: int, code: str
) -> None:
    registry = registry_with()
    for method in ("GET", "HEAD"):
        response, body = registry.request(method, f"http://registry/v2/hello/manifests/{reference}")
        assert response.code == status, body
        if method == "GET":
            assert json_error(response, body)["code"] == code
        else:
            assert body == b""


@pytest.mark.parametrize("name", ["Hello", "a//b", "a..b", "-a", "x" * 256, "arm64", "shell/UPPER"])
def test_invalid_names_are_name_invalid_on_every_route(
    registry_with: RegistryFactory, name: str
) -> None:
    registry = registry_with()
    for route in ("manifests/latest", f"blobs/{ZERO_DIGEST}", "tags/list"):
        response, body = registry.get(f"/v2/{name}/{route}")
        assert response.code == 400, (route, body)
        assert json_error(response, body)["code"] == "NAME_INVALID"


def test_a_layer_digest_is_not_a_manifest(built: tuple[Harness, dict[str, Any]]) -> None:
    registry, index = built
    manifest = json.loads(registry.get(f"/v2/hello/manifests/{index['manifests'][0]['digest']}")[1])
    for blob in [manifest["config"], *manifest["layers"]]:
        response, body = registry.get(f"/v2/hello/manifests/{blob['digest']}")
        assert json_error(response, body)["code"] == "MANIFEST_UNKNOWN"


# -- blobs -----------------------------------------------------------------------------


def test_blobs_get_head_and_ranges(built: tuple[Harness, dict[str, Any]]) -> None:
    registry, index = built
    manifest = json.loads(registry.get(f"/v2/hello/manifests/{index['manifests'][0]['digest']}")[1])
    layer = manifest["layers"][0]
    url = f"http://registry/v2/hello/blobs/{layer['digest']}"
    get, data = registry.get(f"/v2/hello/blobs/{layer['digest']}")
    assert get.code == 200
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
    assert header(get, "Docker-Content-Digest") == layer["digest"]
    assert header(get, "Accept-Ranges") == "bytes"
    assert header(get, "ETag") == f'"{layer["digest"]}"'
    head, nothing = registry.request("HEAD", url)
    assert (head.code, nothing) == (200, b"")
    assert header(head, "Content-Length") == str(layer["size"])

    partial, chunk = registry.request("GET", url, headers={"Range": "bytes=1-4"})
    assert (partial.code, chunk) == (206, data[1:5])
    assert header(partial, "Content-Range") == f"bytes 1-4/{len(data)}"
    tail, end = registry.request("GET", url, headers={"Range": "bytes=-3"})
    assert (tail.code, end) == (206, data[-3:])
    unsatisfiable, _ = registry.request(
        "GET", url, headers={"Range": f"bytes={len(data)}-{len(data) + 10}"}
    )
    assert unsatisfiable.code == 416
    assert header(unsatisfiable, "Content-Range") == f"bytes */{len(data)}"


@pytest.mark.parametrize(
    ("digest", "status", "code"),
    [
        (ZERO_DIGEST, 404, "BLOB_UNKNOWN"),
        ("sha512:" + "a" * 128, 404, "BLOB_UNKNOWN"),
        ("sha256:..", 400, "DIGEST_INVALID"),
        ("sha256:" + "0" * 63, 400, "DIGEST_INVALID"),
        ("latest", 400, "DIGEST_INVALID"),
    ],
)
def test_unknown_and_invalid_blobs(
    registry_with: RegistryFactory, digest: str, status: int, code: str
) -> None:
    response, body = registry_with().get(f"/v2/hello/blobs/{digest}")
    assert response.code == status
    assert json_error(response, body)["code"] == code


# -- tags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "tags", "link"),
    [
        ("", ["latest"], None),
        ("?n=1", ["latest"], None),
        ("?n=0", [], None),
        ("?last=a", ["latest"], None),
        ("?last=latest", [], None),
        ("?last=zzz&n=5", [], None),
    ],
)
def test_tags_list_with_n_and_last(
    registry_with: RegistryFactory, query: str, tags: list[str], link: str | None
) -> None:
    response, body = registry_with().get(f"/v2/shell/hello/tags/list{query}")
    assert response.code == 200
    assert header(response, "Content-Type") == "application/json"
    assert json.loads(body) == {"name": "shell/hello", "tags": tags}
    assert header(response, "Link") == link


@pytest.mark.parametrize("n", ["x", "-1", "1.5", ""])
def test_tags_list_rejects_a_bad_n(registry_with: RegistryFactory, n: str) -> None:
    response, body = registry_with().get(f"/v2/hello/tags/list?n={n}")
    assert response.code == 400
    assert json_error(response, body)["code"] == "PAGINATION_NUMBER_INVALID"


# -- referrers, push, other routes -----------------------------------------------------


def test_referrers_is_an_empty_index(registry_with: RegistryFactory) -> None:
    registry = registry_with()
    response, body = registry.get(f"/v2/hello/referrers/{ZERO_DIGEST}")
    assert response.code == 200
    assert header(response, "Content-Type") == OCI_INDEX
    assert json.loads(body) == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    response, body = registry.get("/v2/hello/referrers/nope")
    assert json_error(response, body)["code"] == "DIGEST_INVALID"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/hello/blobs/uploads/"),
        ("PATCH", "/v2/hello/blobs/uploads/some-session"),
        ("PUT", "/v2/hello/blobs/uploads/some-session?digest=" + ZERO_DIGEST),
        ("PUT", "/v2/hello/manifests/latest"),
        ("DELETE", "/v2/hello/manifests/" + ZERO_DIGEST),
        ("DELETE", "/v2/hello/blobs/" + ZERO_DIGEST),
        ("POST", "/v2/"),
    ],
)
def test_push_and_delete_are_unsupported(
    registry_with: RegistryFactory, method: str, path: str
) -> None:
    response, body = registry_with().request(method, "http://registry" + path, data=b"{}")
    assert response.code == 405
    error = json_error(response, body)
    assert error["code"] == "UNSUPPORTED"
    assert "pulls only" in error["message"]


@pytest.mark.parametrize("path", ["/v2/_catalog", "/v2/hello/nonsense", "/v3/", "/favicon.ico"])
def test_other_paths_are_unsupported(registry_with: RegistryFactory, path: str) -> None:
    response, body = registry_with().get(path)
    assert response.code == 404
    assert json_error(response, body)["code"] == "UNSUPPORTED"


# -- odd requests ----------------------------------------------------------------------


def test_a_get_with_a_body_is_answered_as_without(built: tuple[Harness, dict[str, Any]]) -> None:
    registry, index = built
    response, body = registry.get(
        "/v2/hello/manifests/latest",
        headers={"Accept": MANIFEST_TYPES},
        data=b'{"unexpected": "body"}' * 1000,
    )
    assert response.code == 200
    assert json.loads(body) == index


def test_query_strings_do_not_change_a_manifest(built: tuple[Harness, dict[str, Any]]) -> None:
    registry, index = built
    _response, body = registry.get(
        "/v2/hello/manifests/latest?foo=bar&ns=docker.io", headers={"Accept": MANIFEST_TYPES}
    )
    assert json.loads(body) == index


def test_a_missing_manifest_by_tag_is_manifest_unknown(registry_with: RegistryFactory) -> None:
    """The OCI conformance suite's "missing manifest by tag": a path source has only
    ``latest``, so another tag names nothing, and no Nix runs for it."""
    registry = registry_with()
    response, body = registry.get("/v2/hello/manifests/missing-tag")
    assert response.code == 404, body
    error = json_error(response, body)
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "latest" in error["message"]


def test_accept_any_tag_restores_nixerys_behaviour(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(*building(nix), accept_any_tag=True)
    response, body = registry.get("/v2/hello/manifests/any-tag")
    assert response.code == 200, body
