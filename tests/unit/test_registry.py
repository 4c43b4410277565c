"""The registry routes, in memory: the real klein resource under StubTreq, real storage,
real layer writing, and an expectation fake standing in for Nix."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, fail

from nixeryd.builtin.filesystem import FilesystemStorage
from nixeryd.errors import RegistryError
from nixeryd.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from nixeryd.platform import AMD64, ARM64
from nixeryd.testing.harness import FakeNix, RegistryFactory, building, header
from nixeryd.testing.processes import Expect


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


def test_new_images_past_the_nix_queue_are_told_to_retry(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    gate: Deferred[None] = Deferred()
    registry = registry_with(*building(nix, gate=gate), nix_jobs=1, nix_queue=0)
    first = registry.treq.get("http://registry/v2/shell/hello/manifests/latest")
    registry.treq.flush()
    refused, body = registry.get("/v2/shell/other/manifests/latest")
    assert refused.code == 429
    assert header(refused, "Retry-After") == "10"
    error = json.loads(body)["errors"][0]
    assert error["code"] == "TOOMANYREQUESTS"
    assert "NIXERYD_NIX_JOBS" in error["message"]
    gate.callback(None)
    assert registry.settle(first).code == 200
    retried, _ = registry.get("/v2/shell/other/manifests/latest")
    assert retried.code == 200, "a refusal was remembered as the image's failure"


def _sized_closure(nix: FakeNix, hello_bytes: int) -> Expect:
    """The closure query, with hello's NAR ``hello_bytes`` long."""
    report = [
        {"path": nix.hello, "narSize": hello_bytes, "references": [nix.hello, nix.lib]},
        {"path": nix.lib, "narSize": 500, "references": []},
        {"path": nix.cacert, "narSize": 200, "references": []},
    ]
    return Expect(["nix", "--extra-experimental-features"], stdout=json.dumps(report).encode())


@pytest.mark.parametrize(
    ("limit", "named"),
    [
        ({"max_closure_size": 2}, "(NIXERYD_MAX_CLOSURE_SIZE, 2.0 MiB)"),
        ({"max_layer_size": 2}, "(NIXERYD_MAX_LAYER_SIZE, 2.0 MiB)"),
    ],
)
def test_an_image_past_a_size_limit_is_refused_naming_it(
    registry_with: RegistryFactory, nix: FakeNix, limit: dict[str, int], named: str
) -> None:
    building_it = [
        nix.evaluation(),
        Expect(["nix-store", "--realise"]),
        _sized_closure(nix, 3 * 1024 * 1024),
    ]
    registry = registry_with(*building_it, **limit)
    response, body = registry.get("/v2/shell/hello/manifests/latest")
    assert response.code == 404
    error = json.loads(body)["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert named in error["message"]


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
    registry = registry_with(nix.evaluation(timed_out=True), build_timeout=900.0)
    response, body = registry.get("/v2/hello/manifests/latest")
    assert response.code == 404
    message = json.loads(body)["errors"][0]["message"]
    assert "NIXERYD_BUILD_TIMEOUT, 900 s" in message


def test_builders_are_limited_by_nix_timeout(registry_with: RegistryFactory, nix: FakeNix) -> None:
    """NIX_TIMEOUT is what Nixery makes it: how long each builder may run and be silent."""
    expectations = building(nix)
    registry = registry_with(*expectations, nix_timeout=90.5)
    assert registry.get("/v2/hello/manifests/latest")[0].code == 200
    realise = expectations[1].calls[0]
    assert "--timeout 91 --max-silent-time 91" in " ".join(realise)


def test_a_builder_nix_stopped_is_a_timeout_and_not_remembered(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    stopped = Expect(
        ["nix-store", "--realise"],
        exit_code=101,
        stderr=[
            "building '/nix/store/x-slow-1.0.drv'...",
            "error: building of '/nix/store/x-slow-1.0.drv^*' from .drv file timed out after "
            "60 seconds of silence",
        ],
    )
    registry = registry_with(nix.evaluation(), stopped, nix.path_info())
    response, body = registry.get("/v2/hello/manifests/latest")
    assert response.code == 404
    message = json.loads(body)["errors"][0]["message"]
    assert message.startswith("a builder of linux/amd64:hello ran longer than NIX_TIMEOUT (60 s)")
    assert "timed out after 60 seconds of silence" in message
    registry.get("/v2/hello/manifests/latest")
    assert len(stopped.calls) == 2


def test_a_whole_image_is_bounded_by_the_build_timeout(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    never: Deferred[None] = Deferred()
    expectations = building(nix, gate=never)
    registry = registry_with(*expectations, build_timeout=120.0)
    pending = registry.treq.get("http://registry/v2/hello/manifests/latest")
    answered: list[object] = []
    pending.addBoth(lambda result: answered.append(result) or result)
    registry.treq.flush()
    registry.daemon_clock.advance(119)
    registry.treq.flush()
    assert not answered
    registry.daemon_clock.advance(1)
    response = registry.settle(pending)
    assert response.code == 404
    message = json.loads(registry.settle(response.content()))["errors"][0]["message"]
    assert "took longer than the build timeout (NIXERYD_BUILD_TIMEOUT, 120 s)" in message
    assert expectations[0].cancelled == 1, "the running Nix was not stopped"


def test_a_failed_image_is_answered_again_without_running_nix(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    failing = nix.evaluation(missing=["nope"])
    registry = registry_with(failing, failure_ttl=60.0)
    get, body = registry.get("/v2/nope/manifests/latest")
    head, _ = registry.request("HEAD", "http://registry/v2/nope/manifests/latest")
    again, same = registry.get("/v2/nope/manifests/latest")
    assert (get.code, head.code, again.code) == (404, 404, 404)
    assert same == body
    assert len(failing.calls) == 1
    registry.daemon_clock.advance(61)  # a path source may have been fixed since
    registry.get("/v2/nope/manifests/latest")
    assert len(failing.calls) == 2


def test_the_index_page_lists_a_failure_once_and_links_its_log(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    failing = nix.evaluation(exit_code=1, stderr=["some trace", "error: nixeryd-test: no"])
    registry = registry_with(failing)
    registry.get("/v2/nope/manifests/latest")
    registry.request("HEAD", "http://registry/v2/nope/manifests/latest")
    _, page = registry.get("/")
    assert page.count(b"nixeryd-test: no") == 1, "a remembered failure is no new error"
    assert b'<a href="/errors/1/log">full log</a>' in page
    response, log = registry.get("/errors/1/log")
    assert response.code == 200
    assert header(response, "Content-Type") == "text/plain; charset=utf-8"
    assert log.splitlines() == [
        b"linux/amd64:nope:latest",
        b"",
        b"evaluation: some trace",
        b"evaluation: error: nixeryd-test: no",
    ]
    gone, _ = registry.get("/errors/2/log")
    assert gone.code == 404


def test_failures_are_not_remembered_when_the_ttl_is_zero(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    failing = nix.evaluation(missing=["nope"])
    registry = registry_with(failing, failure_ttl=0.0)
    registry.get("/v2/nope/manifests/latest")
    registry.get("/v2/nope/manifests/latest")
    assert len(failing.calls) == 2


def test_timeouts_are_not_remembered(registry_with: RegistryFactory, nix: FakeNix) -> None:
    timing_out = nix.evaluation(timed_out=True)
    registry = registry_with(timing_out)
    registry.get("/v2/hello/manifests/latest")
    registry.get("/v2/hello/manifests/latest")
    assert len(timing_out.calls) == 2  # a busy machine or a slow download may pass


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
        # werkzeug would redirect these (merged slashes, an added one) and, unhandled, 500.
        ("/v2//etc/passwd/manifests/latest", 404, "UNSUPPORTED"),
        ("/v2/hello//manifests/latest", 400, "NAME_INVALID"),
        ("/v2/hello%2f%2fetc/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/hello/tags/list/", 404, "UNSUPPORTED"),
        ("/v2/%ff/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/hello/blobs/%c0%af", 400, "NAME_INVALID"),
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
    assert registry.get("/v2/hello/tags/list?n=%C2%B2")[0].code == 400  # a digit int() refuses
    response, body = registry.get("/v2/hello/tags/list?n=" + "9" * 5000)
    assert json.loads(body)["tags"] == ["latest"]


def test_get_with_a_body_is_answered(registry_with: RegistryFactory) -> None:
    response, _ = registry_with().get("/v2/", data=b"x" * 10000)
    assert response.code == 200


DOCKER_ENGINE_ACCEPT = [DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX]


def test_several_platforms_are_served_as_an_index(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    expectations = building(nix)
    registry = registry_with(*expectations, platforms=(AMD64, ARM64))
    response, body = registry.get(
        "/v2/hello/manifests/latest", headers={"Accept": DOCKER_ENGINE_ACCEPT}
    )
    assert response.code == 200, body
    assert header(response, "Content-Type") == DOCKER_MANIFEST_LIST
    assert header(response, "Vary") == "Accept"
    index = json.loads(body)
    assert [entry["platform"] for entry in index["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    evaluate = expectations[0]
    assert [argv[argv.index("system") + 1] for argv in evaluate.calls] == [
        "x86_64-linux",
        "aarch64-linux",
    ]
    for entry in index["manifests"]:
        child, data = registry.get(f"/v2/hello/manifests/{entry['digest']}")
        assert header(child, "Content-Type") == entry["mediaType"] == DOCKER_MANIFEST
        assert len(data) == entry["size"]
        config_digest = json.loads(data)["config"]["digest"]
        config = json.loads(registry.get(f"/v2/hello/blobs/{config_digest}")[1])
        assert {"architecture": config["architecture"], "os": config["os"]}.items() <= entry[
            "platform"
        ].items()
    by_digest, same = registry.get(
        f"/v2/hello/manifests/{header(response, 'Docker-Content-Digest')}"
    )
    assert (header(by_digest, "Content-Type"), same) == (DOCKER_MANIFEST_LIST, body)

    oci, oci_body = registry.get("/v2/hello/manifests/latest", headers={"Accept": [OCI_INDEX]})
    assert header(oci, "Content-Type") == OCI_INDEX
    assert {entry["mediaType"] for entry in json.loads(oci_body)["manifests"]} == {OCI_MANIFEST}

    # A client that takes no index gets the first platform's image.
    plain, _ = registry.get("/v2/hello/manifests/latest")
    assert header(plain, "Content-Type") == DOCKER_MANIFEST
    assert header(plain, "Docker-Content-Digest") == index["manifests"][0]["digest"]


def test_the_arm64_prefix_picks_one_platform(registry_with: RegistryFactory, nix: FakeNix) -> None:
    expectations = building(nix)
    registry = registry_with(*expectations)
    response, body = registry.get(
        "/v2/arm64/hello/manifests/latest", headers={"Accept": DOCKER_ENGINE_ACCEPT}
    )
    assert header(response, "Content-Type") == DOCKER_MANIFEST
    config_digest = json.loads(body)["config"]["digest"]
    config = json.loads(registry.get(f"/v2/arm64/hello/blobs/{config_digest}")[1])
    assert (config["architecture"], config["variant"]) == ("arm64", "v8")
    assert "aarch64-linux" in expectations[0].calls[0]


def test_a_platform_that_cannot_be_built_is_left_out_for_a_while(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    no_builder = Expect(
        ["nix-instantiate"],
        containing=["system", "aarch64-linux"],
        exit_code=1,
        stderr=["error: a 'aarch64-linux' with features {} is required to build '/x.drv'"],
    )
    expectations = [no_builder, *building(nix)]
    registry = registry_with(*expectations, platforms=(AMD64, ARM64))
    accept = {"Accept": DOCKER_ENGINE_ACCEPT}
    response, body = registry.get("/v2/hello/manifests/latest", headers=accept)
    assert response.code == 200, body
    assert [entry["platform"]["architecture"] for entry in json.loads(body)["manifests"]] == [
        "amd64"
    ]
    _, page = registry.get("/")
    assert b"aarch64-linux" in page  # the index page says why

    registry.get("/v2/hello/manifests/latest", headers=accept)
    assert len(no_builder.calls) == 1  # not retried on every pull
    registry.daemon_clock.advance(301)
    registry.get("/v2/hello/manifests/latest", headers=accept)
    assert len(no_builder.calls) == 2


def test_when_no_platform_builds_the_first_error_is_answered(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(nix.evaluation(missing=["nope"]), platforms=(AMD64, ARM64))
    response, body = registry.get("/v2/nope/manifests/latest")
    assert response.code == 404
    assert "nope" in json.loads(body)["errors"][0]["message"]


def test_a_storage_failure_is_not_remembered(
    registry_with: RegistryFactory, nix: FakeNix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object store being down is the registry's trouble and may pass: the next pull
    builds again rather than getting the failure from memory."""

    class StorageDown(RegistryError):
        status = 502

    down = [True]
    put_record = FilesystemStorage.put_record

    def failing_once(self: FilesystemStorage, name: str, data: bytes) -> Deferred[None]:
        if down:
            down.pop()
            return fail(StorageDown("the bucket is unreachable"))
        return put_record(self, name, data)

    monkeypatch.setattr(FilesystemStorage, "put_record", failing_once)
    registry = registry_with(*building(nix))
    first, body = registry.get("/v2/hello/manifests/latest")
    assert first.code == 502, body
    again, body = registry.get("/v2/hello/manifests/latest")
    assert again.code == 200, body


@pytest.mark.parametrize("served_by", ["read_blob", "serve_blob"])
def test_a_blob_lost_from_storage_is_written_again_within_its_get(
    registry_with: RegistryFactory, nix: FakeNix, tmp_path: Path, served_by: str
) -> None:
    registry = registry_with(*building(nix))
    manifest = json.loads(registry.get("/v2/hello/manifests/latest")[1])
    lost = manifest["layers"][0]
    path = f"/v2/hello/blobs/{lost['digest']}"
    # A Range goes past remembered answers and read_blob, to serve_blob's resource.
    headers = {"Range": "bytes=0-"} if served_by == "serve_blob" else {}
    registry.get(f"/v2/hello/blobs/{manifest['config']['digest']}")  # the size is known
    (tmp_path / "storage/blobs/sha256" / lost["digest"].removeprefix("sha256:")).unlink()
    # Within the GET that finds it lost: the image is built again, the same bytes written.
    response, data = registry.get(path, headers=headers)
    assert response.code in (200, 206)
    assert "sha256:" + hashlib.sha256(data).hexdigest() == lost["digest"]
    assert registry.get("/v2/hello/manifests/latest")[0].code == 200
