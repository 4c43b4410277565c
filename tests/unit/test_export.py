"""nixeryd.export: the registry's image written to an OCI layout or a docker-archive, read
out of storage through each backend's own answer, and the outputs' syntax."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from nixeryd.cli import BuildOptions
from nixeryd.errors import BlobUnknown, NameInvalid, StorageFailed
from nixeryd.export import (
    DOCKER_ARCHIVE,
    OCI,
    REF_NAME,
    Exporter,
    Output,
    OutputFailed,
    parse_output,
    parse_reference,
)
from nixeryd.manifest import OCI_INDEX, OCI_MANIFEST
from nixeryd.platform import AMD64, ARM64
from nixeryd.storage import BlobInfo, Redirect
from nixeryd.testing.harness import FakeNix, Harness, RegistryFactory, building


@pytest.mark.parametrize(
    ("text", "output"),
    [
        ("oci:out", Output(OCI, Path("out"))),
        ("oci:/tmp/out:v1", Output(OCI, Path("/tmp/out"), "v1")),
        ("docker-archive:a.tar", Output(DOCKER_ARCHIVE, Path("a.tar"))),
        (
            "docker-archive:a.tar:localhost:5000/shell/hello:v1",
            Output(DOCKER_ARCHIVE, Path("a.tar"), "localhost:5000/shell/hello:v1"),
        ),
    ],
)
def test_outputs_are_named_as_skopeo_names_them(text: str, output: Output) -> None:
    assert parse_output(text) == output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("out", "unknown output"),
        ("tar:out.tar", "unknown output"),
        ("oci:", "no directory"),
        ("docker-archive::x", "no file"),
        ("docker-archive:a.tar:Shell/Hello", "not a valid docker-archive image reference"),
        ("docker-archive:a.tar:hello:", "not a valid docker-archive image reference"),
        ("oci:out:-v1", "not a valid oci image reference"),
    ],
)
def test_a_bad_output_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_output(text)


def test_a_reference_without_a_tag_is_latest() -> None:
    assert parse_reference("shell/hello") == ("shell/hello", "latest")
    assert parse_reference("hello:v1") == ("hello", "v1")


def exporter(registry: Harness, http: Any = None) -> Exporter:
    return Exporter(registry.registry.images, registry.storage, http, registry.clock)


def served(registry: Harness) -> tuple[str, dict[str, Any]]:
    """The OCI manifest the registry serves for ``hello:latest``: digest and document."""
    response, body = registry.get("/v2/hello/manifests/latest", headers={"Accept": OCI_MANIFEST})
    assert response.code == 200, body
    return f"sha256:{hashlib.sha256(body).hexdigest()}", json.loads(body)


def blob_digests(manifest: dict[str, Any]) -> list[str]:
    return [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def test_an_oci_layout_holds_the_registrys_manifest_and_blobs(
    registry_with: RegistryFactory, nix: FakeNix, tmp_path: Path
) -> None:
    registry = registry_with(*building(nix))
    layout = tmp_path / "oci"
    registry.settle(exporter(registry).export("hello", "latest", Output(OCI, layout, "v1")))

    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    [entry] = json.loads((layout / "index.json").read_text())["manifests"]
    assert entry["annotations"] == {REF_NAME: "v1"}
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    digest, manifest = served(registry)
    assert entry["digest"] == digest
    blobs = layout / "blobs" / "sha256"
    for name in [digest, *blob_digests(manifest)]:
        data = (blobs / name.split(":")[1]).read_bytes()
        assert f"sha256:{hashlib.sha256(data).hexdigest()}" == name
        _, body = registry.get(f"/v2/hello/blobs/{name}")
        assert body == data
    assert sorted(path.name for path in blobs.iterdir()) == sorted(
        name.split(":")[1] for name in [digest, *blob_digests(manifest)]
    )


def test_a_layout_keeps_other_references_and_replaces_its_own(
    registry_with: RegistryFactory, nix: FakeNix, tmp_path: Path
) -> None:
    registry = registry_with(*building(nix))
    layout = tmp_path / "oci"
    layout.mkdir()
    other = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "0" * 64, "size": 1}
    index = {"schemaVersion": 2, "manifests": [{**other, "annotations": {REF_NAME: "kept"}}]}
    (layout / "index.json").write_text(json.dumps(index))
    for _ in range(2):
        registry.settle(exporter(registry).export("hello", "latest", Output(OCI, layout)))
    names = [
        e["annotations"][REF_NAME]
        for e in json.loads((layout / "index.json").read_text())["manifests"]
    ]
    assert names == ["kept", "latest"]


def test_a_file_in_the_way_of_the_layout_is_said(
    registry_with: RegistryFactory, nix: FakeNix, tmp_path: Path
) -> None:
    registry = registry_with(*building(nix))
    (tmp_path / "oci").write_text("")
    with pytest.raises(OutputFailed, match="while writing the OCI layout"):
        registry.settle(exporter(registry).export("hello", "latest", Output(OCI, tmp_path / "oci")))
    layout = tmp_path / "other"
    layout.mkdir()
    (layout / "index.json").write_text("{")
    with pytest.raises(OutputFailed, match="is not an OCI index"):
        registry.settle(exporter(registry).export("hello", "latest", Output(OCI, layout)))


def test_a_docker_archive_holds_the_registrys_blobs_as_they_are(
    registry_with: RegistryFactory, nix: FakeNix, tmp_path: Path
) -> None:
    registry = registry_with(*building(nix), accept_any_tag=True)
    archive = tmp_path / "hello.tar"
    registry.settle(exporter(registry).export("hello", "v1", Output(DOCKER_ARCHIVE, archive)))
    _, manifest = served(registry)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        entries = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        files = {
            member.name: tar.extractfile(member).read()  # type: ignore[union-attr]
            for member in members
        }
    assert archive.stat().st_size % tarfile.RECORDSIZE == 0
    assert all(member.mtime == 0 and member.mode == 0o644 for member in members)
    names = ["blobs/sha256/" + digest.split(":")[1] for digest in blob_digests(manifest)]
    assert entries == [{"Config": names[0], "RepoTags": ["hello:v1"], "Layers": names[1:]}]
    assert [member.name for member in members] == ["manifest.json", *names]
    for name, digest in zip(names, blob_digests(manifest), strict=True):
        assert registry.get(f"/v2/hello/blobs/{digest}")[1] == files[name]


def test_a_docker_archive_reference_gets_the_tag_unless_it_has_one(
    registry_with: RegistryFactory, nix: FakeNix, tmp_path: Path
) -> None:
    registry = registry_with(*building(nix), accept_any_tag=True)
    for reference, tags in (("mine", ["mine:v2"]), ("mine:v3", ["mine:v3"])):
        archive = tmp_path / f"{reference}.tar"
        output = Output(DOCKER_ARCHIVE, archive, reference)
        registry.settle(exporter(registry).export("hello", "v2", output))
        with tarfile.open(archive) as tar:
            [entry] = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert entry["RepoTags"] == tags


def test_a_blob_gone_from_storage_is_blob_unknown_and_leaves_no_file(
    registry_with: RegistryFactory, nix: FakeNix, tmp_path: Path
) -> None:
    registry = registry_with(*building(nix))
    registry.settle(exporter(registry).export("hello", "latest", Output(OCI, tmp_path / "a")))
    _, manifest = served(registry)
    layer = manifest["layers"][0]["digest"].split(":")[1]
    (tmp_path / "storage" / "blobs" / "sha256" / layer).unlink()
    archive = tmp_path / "hello.tar"
    with pytest.raises(BlobUnknown, match=layer):
        registry.settle(
            exporter(registry).export("hello", "latest", Output(DOCKER_ARCHIVE, archive))
        )
    assert sorted(path.name for path in tmp_path.iterdir() if "tar" in path.name) == []


class _Response:
    """What treq's client answers a redirected GET with: a status and a body delivered."""

    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self._body = body
        self.length = len(body)

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(None)
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class _BlobHost:
    """An object store's presigned URLs, as an HTTP client sees them: ``url -> bytes``."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.fetched: list[str] = []

    def get(self, url: str, unbuffered: bool = False) -> Any:
        from twisted.internet.defer import succeed

        self.fetched.append(url)
        body = self.blobs.get(url)
        return succeed(_Response(404, b"") if body is None else _Response(200, body))


class _Redirecting:
    """A storage backend whose blobs are served by redirects to a :class:`_BlobHost`."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def serve_blob(self, info: BlobInfo) -> Redirect:
        return Redirect(f"http://store/{info.digest}")


def test_a_redirect_is_followed_and_its_bytes_checked(
    registry_with: RegistryFactory, nix: FakeNix, tmp_path: Path
) -> None:
    registry = registry_with(*building(nix))
    _, manifest = served(registry)
    blobs = {
        f"http://store/{digest}": registry.get(f"/v2/hello/blobs/{digest}")[1]
        for digest in blob_digests(manifest)
    }
    host = _BlobHost(blobs)
    redirected = Exporter(
        registry.registry.images, _Redirecting(registry.storage), host, registry.clock
    )
    layout = tmp_path / "oci"
    registry.settle(redirected.export("hello", "latest", Output(OCI, layout)))
    assert sorted(host.fetched) == sorted(blobs)
    for digest in blob_digests(manifest):
        assert (layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes() == blobs[
            f"http://store/{digest}"
        ]

    layer = f"http://store/{manifest['layers'][0]['digest']}"
    blobs[layer] = blobs[layer][:-1] + bytes([blobs[layer][-1] ^ 1])
    with pytest.raises(StorageFailed, match="bytes that are not it"):
        registry.settle(redirected.export("hello", "latest", Output(OCI, tmp_path / "bad")))
    del blobs[layer]
    with pytest.raises(BlobUnknown, match="HTTP 404"):
        registry.settle(redirected.export("hello", "latest", Output(OCI, tmp_path / "gone")))


def test_zstd_layers_go_into_a_docker_archive_as_their_tars(
    registry_with: RegistryFactory, nix: FakeNix, tmp_path: Path
) -> None:
    registry = registry_with(*building(nix), layer_compressor="zstd")
    archive = tmp_path / "hello.tar"
    registry.settle(exporter(registry).export("hello", "latest", Output(DOCKER_ARCHIVE, archive)))
    with tarfile.open(archive) as tar:
        [entry] = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(tar.extractfile(entry["Config"]))  # type: ignore[arg-type]
        layers = [tar.extractfile(name).read() for name in entry["Layers"]]  # type: ignore[union-attr]
    diff_ids = config["rootfs"]["diff_ids"]
    assert entry["Layers"] == ["blobs/sha256/" + diff_id.split(":")[1] for diff_id in diff_ids]
    for layer, diff_id in zip(layers, diff_ids, strict=True):
        assert f"sha256:{hashlib.sha256(layer).hexdigest()}" == diff_id
        with tarfile.open(fileobj=io.BytesIO(layer)) as inner:
            assert inner.getnames()


def test_several_platforms_go_into_a_layout_as_the_registrys_index(
    registry_with: RegistryFactory, nix: FakeNix, tmp_path: Path
) -> None:
    registry = registry_with(*building(nix), *building(nix), platforms=(AMD64, ARM64))
    layout = tmp_path / "oci"
    registry.settle(exporter(registry).export("hello", "latest", Output(OCI, layout)))
    [entry] = json.loads((layout / "index.json").read_text())["manifests"]
    _, body = registry.get("/v2/hello/manifests/latest", headers={"Accept": OCI_INDEX})
    assert entry["mediaType"] == OCI_INDEX and "platform" not in entry
    assert entry["digest"] == f"sha256:{hashlib.sha256(body).hexdigest()}"
    blobs = layout / "blobs" / "sha256"
    for listed in json.loads(body)["manifests"]:
        manifest = json.loads((blobs / listed["digest"].split(":")[1]).read_bytes())
        for digest in blob_digests(manifest):
            assert (blobs / digest.split(":")[1]).is_file()

    archive = tmp_path / "hello.tar"
    registry.settle(exporter(registry).export("hello", "latest", Output(DOCKER_ARCHIVE, archive)))
    with tarfile.open(archive) as tar:
        [archived] = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(tar.extractfile(archived["Config"]))  # type: ignore[arg-type]
    assert config["architecture"] == "amd64"  # the first configured platform


def test_the_platform_chosen_is_built_alone(
    registry_with: RegistryFactory, nix: FakeNix, tmp_path: Path
) -> None:
    registry = registry_with(*building(nix), platforms=(AMD64, ARM64))
    layout = tmp_path / "oci"
    registry.settle(exporter(registry).export("hello", "latest", Output(OCI, layout), ARM64))
    [entry] = json.loads((layout / "index.json").read_text())["manifests"]
    assert entry["mediaType"] == OCI_MANIFEST
    assert entry["platform"] == {"architecture": "arm64", "os": "linux", "variant": "v8"}
    with pytest.raises(NameInvalid, match="is for linux/arm64"):
        registry.settle(
            exporter(registry).export("arm64/hello", "latest", Output(OCI, layout), AMD64)
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["hello"], "say where to write the image"),
        (["hello", "-o", "tar:x"], "unknown output"),
        (["hello", "--platform", "plan9/mips", "-o", "oci:x"], "unknown platform"),
        (["-o", "oci:x"], "Wrong number of arguments"),
        (["hello", "extra", "-o", "oci:x"], "Wrong number of arguments"),
        (["hello", "--no-such-flag", "-o", "oci:x"], "no-such-flag"),
    ],
)
def test_build_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        BuildOptions().parseOptions(argv)


def test_build_options_may_follow_the_name() -> None:
    options = BuildOptions()
    options.parseOptions(["shell/hello:v1", "-o", "oci:out:x", "--layer-budget=20", "--platform",
                          "linux/arm64", "--storage-path", ""])  # fmt: skip
    assert options["reference"] == "shell/hello:v1"
    assert options["output"] == Output(OCI, Path("out"), "x")
    assert options["platform"] == ARM64
    assert (options["layer-budget"], options["storage-path"]) == ("20", "")
