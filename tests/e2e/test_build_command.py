"""``nixeryd build``: an image built by real Nix without a registry, written to files that
umoci, skopeo, podman and the Docker engine read, with the layers a daemon serves."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nixeryd.export import REF_NAME
from nixeryd.manifest import OCI_MANIFEST
from tests.e2e import test_clients
from tests.e2e.conftest import TEST_PACKAGES, Daemon, nix_env, require
from tests.e2e.test_pull import in_chroot
from tests.s3servers import S3Server

pytestmark = pytest.mark.e2e

GREETING = "Hello, world!\n"

#: The private Docker engine of the client matrix (a temp dir, vfs, no network).
dockerd = test_clients.dockerd


def nixeryd_build(
    *argv: str, tmp_path: Path, **environment: str
) -> subprocess.CompletedProcess[str]:
    """``nixeryd build`` over the test package set, with a temp dir of its own (TMPDIR)
    so that the test sees what it leaves there."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    env = nix_env(NIXERY_PKGS_PATH=str(TEST_PACKAGES), TMPDIR=str(tmpdir), **environment)
    return subprocess.run(
        [sys.executable, "-m", "nixeryd", "build", *argv],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def built(*argv: str, tmp_path: Path, **environment: str) -> str:
    """Run ``nixeryd build``, which must succeed; its stderr (the log)."""
    result = nixeryd_build(*argv, tmp_path=tmp_path, **environment)
    assert result.returncode == 0, result.stderr
    return result.stderr


def layout_manifest(layout: Path, reference: str = "latest") -> tuple[str, dict[str, Any]]:
    """The digest and document of the image named ``reference`` in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    [entry] = [entry for entry in index["manifests"] if entry["annotations"][REF_NAME] == reference]
    data = (layout / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_bytes()
    return entry["digest"], json.loads(data)


def served_manifest(daemon: Daemon, name: str) -> tuple[str, dict[str, Any]]:
    """The digest and document of the OCI manifest the daemon serves for ``name:latest``."""
    request = urllib.request.Request(
        f"{daemon.url}/v2/{name}/manifests/latest", headers={"Accept": OCI_MANIFEST}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return str(response.headers["Docker-Content-Digest"]), json.load(response)


def digests(manifest: dict[str, Any]) -> list[str]:
    return [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def test_an_oci_layout_runs_and_holds_the_daemons_layers(daemon: Daemon, tmp_path: Path) -> None:
    require("umoci", "skopeo")
    layout = tmp_path / "oci"
    log = built("shell/hello", "-o", f"oci:{layout}", tmp_path=tmp_path)
    assert "evaluation done" in log and f"to oci:{layout}" in log  # progress on stderr

    assert hello_in_unpacked(layout, tmp_path / "bundle") == GREETING

    # The daemon builds on storage of its own: the same manifest, byte for byte.
    digest, manifest = layout_manifest(layout)
    served_digest, served = served_manifest(daemon, "shell/hello")
    assert digests(manifest) == digests(served)
    assert digest == served_digest
    for blob in digests(manifest):
        assert (layout / "blobs" / "sha256" / blob.split(":")[1]).is_file()

    inspected = json.loads(subprocess.run(
        ["skopeo", "inspect", f"oci:{layout}:latest"],
        capture_output=True, check=True, text=True, timeout=60,
    ).stdout)  # fmt: skip
    assert inspected["Digest"] == digest
    assert inspected["Layers"] == digests(manifest)[1:]
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"oci:{layout}:latest",
         f"docker-archive:{tmp_path / 'copied.tar'}:shell/hello:latest"],
        check=True, timeout=120,
    )  # fmt: skip

    # The temporary storage is gone; only Nix's GC root directory is left in TMPDIR.
    assert [path.name for path in (tmp_path / "tmpdir").iterdir()] == ["nixeryd-gcroots"]


def test_a_layout_keeps_its_other_images(tmp_path: Path) -> None:
    layout = tmp_path / "oci"
    built("hello", "-o", f"oci:{layout}", tmp_path=tmp_path)
    built("helloworld", "-o", f"oci:{layout}:world", tmp_path=tmp_path)
    built("shell/hello", "-o", f"oci:{layout}", tmp_path=tmp_path)
    index = json.loads((layout / "index.json").read_text())
    names = [
        entry["annotations"]["org.opencontainers.image.ref.name"] for entry in index["manifests"]
    ]
    assert sorted(names) == ["latest", "world"]
    # "latest" was replaced by the larger shell/hello image.
    latest, world = layout_manifest(layout)[1], layout_manifest(layout, "world")[1]
    assert len(latest["layers"]) > len(world["layers"])


def test_the_platform_option_builds_for_that_platform(daemon: Daemon, tmp_path: Path) -> None:
    layout = tmp_path / "oci"
    built("hello", "--platform", "linux/arm64", "-o", f"oci:{layout}", tmp_path=tmp_path)
    _, manifest = layout_manifest(layout)
    config = json.loads(
        (layout / "blobs" / "sha256" / manifest["config"]["digest"].split(":")[1]).read_text()
    )
    assert (config["architecture"], config["variant"]) == ("arm64", "v8")
    assert digests(manifest) == digests(served_manifest(daemon, "arm64/hello")[1])


def test_configured_storage_is_shared_with_a_daemon(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    layout = tmp_path / "oci"
    built("shell/hello", "-o", f"oci:{layout}", tmp_path=tmp_path, STORAGE_PATH=str(storage))
    later = Daemon(tmp_path / "daemon", STORAGE_PATH=str(storage))
    try:
        digest, _ = served_manifest(later, "shell/hello")
    finally:
        later.stop()
    assert digest == layout_manifest(layout)[0]
    # The daemon evaluated the name and found the image recorded: it built nothing.
    assert "evaluation done" in later.log()
    assert " built " not in later.log() and "store paths in" not in later.log()


@pytest.mark.storage
def test_layers_are_read_from_s3_through_its_redirects(
    seaweedfs: S3Server, daemon: Daemon, tmp_path: Path
) -> None:
    layout = tmp_path / "oci"
    environment = seaweedfs.environment(seaweedfs.new_bucket())
    built("shell/hello", "-o", f"oci:{layout}", tmp_path=tmp_path, **environment)
    _, manifest = layout_manifest(layout)
    assert digests(manifest) == digests(served_manifest(daemon, "shell/hello")[1])
    assert hello_in_unpacked(layout, tmp_path / "bundle") == GREETING


def archive_manifest(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        [entry] = json.load(member)
    return dict(entry)


def test_a_docker_archive_holds_the_daemons_compressed_layers(
    daemon: Daemon, tmp_path: Path
) -> None:
    archive = tmp_path / "hello.tar"
    built("shell/hello", "-o", f"docker-archive:{archive}", tmp_path=tmp_path)
    entry = archive_manifest(archive)
    assert entry["RepoTags"] == ["shell/hello:latest"]
    served = digests(served_manifest(daemon, "shell/hello")[1])
    assert [entry["Config"], *entry["Layers"]] == [
        "blobs/sha256/" + digest.split(":")[1] for digest in served
    ]


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Any]:
    """podman on vfs storage under the test's temp dir, as the client matrix runs it."""
    require("podman")
    conf = tmp_path / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{tmp_path}/graph"\nrunroot = "{tmp_path}/run"\n'
    )

    def run(*argv: str) -> str:
        return test_clients.run(
            "podman", "--cgroup-manager=cgroupfs", "--events-backend=file", *argv,
            env={"CONTAINERS_STORAGE_CONF": str(conf)},
        )  # fmt: skip

    yield run


@pytest.mark.clients
def test_podman_loads_a_docker_archive_and_runs_it(podman: Any, tmp_path: Path) -> None:
    archive = tmp_path / "hello.tar"
    built("shell/hello", "-o", f"docker-archive:{archive}:nixeryd/hello:v1", tmp_path=tmp_path)
    assert "Loaded image: localhost/nixeryd/hello:v1" in podman("load", "-i", str(archive))
    [inspected] = json.loads(podman("image", "inspect", "localhost/nixeryd/hello:v1"))
    assert inspected["Architecture"] == "amd64"
    # podman run needs rlimits this sandbox refuses (see the client matrix): the image's
    # root file system, mounted by podman, runs the program.
    rootfs = Path(podman("image", "mount", inspected["Id"]).strip())
    try:
        assert in_chroot(rootfs, "/bin/hello") == GREETING
    finally:
        podman("image", "unmount", inspected["Id"])


@pytest.mark.clients
@pytest.mark.parametrize("compressor", ["isal", "zstd"])
def test_docker_loads_a_docker_archive_and_runs_it(
    compressor: str, dockerd: list[str], tmp_path: Path
) -> None:
    """Docker 20.10 reads gzip layers, the registry's blobs; zstd ones go in uncompressed."""
    archive = tmp_path / "hello.tar"
    built("shell/hello", "-o", f"docker-archive:{archive}", tmp_path=tmp_path,
          NIXERYD_LAYER_COMPRESSOR=compressor)  # fmt: skip
    loaded = test_clients.run(*dockerd, "load", "-i", str(archive))
    assert "Loaded image: shell/hello:latest" in loaded
    hello = test_clients.run(*dockerd, "run", "--rm", "--network", "none", "shell/hello", "hello")
    assert hello == GREETING


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("hello/nosuchpackage", "nosuchpackage"),
        ("Hello", "invalid repository name component 'Hello'"),
        ("hello:no/tag", "not a valid tag"),
        ("brokenbuild", "this build fails on purpose"),
        ("evalerror", "this package fails to evaluate"),
        ("arm64/hello --platform linux/amd64", "is for linux/arm64"),
    ],
)
def test_an_image_that_cannot_be_built_exits_1_with_the_registrys_message(
    name: str, message: str, tmp_path: Path
) -> None:
    layout = tmp_path / "oci"
    result = nixeryd_build(*name.split(), "-o", f"oci:{layout}", tmp_path=tmp_path)
    assert result.returncode == 1, result.stderr
    # The registry's message (a build failure's runs over lines) ends the output.
    _, said, reason = result.stderr.rpartition("\nnixeryd build: ")
    assert said and message in reason and "#info]" not in reason, result.stderr
    assert "Traceback" not in result.stderr
    assert not (layout / "index.json").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["hello"], "say where to write the image"),
        (["hello", "-o", "tar:out.tar"], "unknown output"),
        (["hello", "-o", "oci:"], "no directory"),
        (["hello", "-o", "docker-archive:out.tar:Not A Name"], "not a valid docker-archive"),
        (["hello", "--platform", "plan9/mips", "-o", "oci:x"], "unknown platform"),
        (["-o", "oci:x"], "Wrong number of arguments"),
    ],
)
def test_a_usage_error_exits_2(argv: list[str], message: str, tmp_path: Path) -> None:
    result = nixeryd_build(*argv, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_output_that_cannot_be_written_exits_1(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = nixeryd_build("hello", "-o", f"oci:{blocker}", tmp_path=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "nixeryd build: " in result.stderr and str(blocker) in result.stderr
    assert "Traceback" not in result.stderr


def hello_in_unpacked(layout: Path, bundle: Path) -> str:
    """What hello prints in a chroot of the layout's image, unpacked by umoci."""
    run = subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return in_chroot(bundle / "rootfs", "/bin/hello")
