"""The client matrix: every major registry client pulls from one nixeryd serving two platforms.

Each client pulls ``shell/hello`` by tag and by digest, runs or reads the
program from what it pulled, and pulls the arm64 variant both through the
index (the client chooses the platform) and through the ``arm64/`` prefix.
The container engines run as private daemons under temp dirs, started and
stopped by these tests. The test package set builds the same bytes for every
platform; what is checked is the protocol and each platform's config.

Every test runs twice, on filesystem storage and on S3 storage (a SeaweedFS
bucket over plain HTTP). On S3 each client follows ``307`` redirects for the
layers to presigned bucket URLs, and the test checks in the access log that
it was redirected (see "Clients and redirects" in docs/storage.md).

Run only these with ``scripts/test -m clients``; leave them out with
``-m "not clients"``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nixeryd.manifest import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from tests.e2e.conftest import Daemon, require
from tests.e2e.test_pull import fetch, in_chroot
from tests.nixinstalls import NixInstallation
from tests.s3servers import S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.clients]

IMAGE = "shell/hello"
GREETING = "Hello, world!\n"
#: The Docker CLI of Debian's docker.io (another one may be first on PATH).
DOCKER_CLI = "/usr/bin/docker"


@pytest.fixture(scope="module", params=["filesystem", "s3"])
def registry(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    nix_installation: NixInstallation | None,
) -> Iterator[Daemon]:
    """One nixeryd building every image for linux/amd64 and linux/arm64, on each storage.

    On S3 (a SeaweedFS bucket) the layers are not served by nixeryd: their GETs
    are answered ``307`` to presigned bucket URLs, so every client test checks
    too that the client follows a redirect to another host.
    """
    storage: dict[str, str] = {}
    if request.param == "s3":
        seaweedfs: S3Server = request.getfixturevalue("seaweedfs")
        storage = seaweedfs.environment(seaweedfs.new_bucket())
    instance = Daemon(
        tmp_path_factory.mktemp(f"matrix-{request.param}"),
        NIXERYD_PLATFORMS="linux/amd64,linux/arm64",
        **storage,
    )
    yield instance
    instance.stop()


def on_s3(registry: Daemon) -> bool:
    return registry.environment["NIXERY_STORAGE_BACKEND"] == "s3"


def check_blob_gets(registry: Daemon, since: int) -> None:
    """Check the blob GETs in the log after offset ``since``: on S3, layers were redirected.

    Every blob GET was answered (no client error, no 5xx); on S3 some with
    ``307`` (the layers; configs are small, answered by nixeryd itself), which
    the client followed, since its pull succeeded with the layers' bytes.
    """
    answers = [
        line.split('"')[4].split()[0]
        for line in registry.log()[since:].splitlines()
        if line.count('"') >= 4 and line.split('"')[3].startswith("GET ")
        and "/blobs/sha256:" in line.split('"')[3]
    ]  # fmt: skip
    assert answers, "no blob was fetched from the registry"
    assert set(answers) <= {"200", "307"}, answers
    assert ("307" in answers) == on_s3(registry), answers


def platform_digests(registry: Daemon, name: str = IMAGE) -> dict[str, str]:
    """The manifest list of ``name`` as the engines get it: architecture -> manifest digest."""
    request = urllib.request.Request(
        f"{registry.url}/v2/{name}/manifests/latest",
        headers={"Accept": f"{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        index = json.load(response)
    return {entry["platform"]["architecture"]: entry["digest"] for entry in index["manifests"]}


def tag_digest(
    registry: Daemon, name: str, accept: str = f"{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}"
) -> str:
    """The digest a client sees for ``name:latest`` (by default, a Docker engine)."""
    request = urllib.request.Request(
        f"{registry.url}/v2/{name}/manifests/latest", headers={"Accept": accept}, method="HEAD"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return str(response.headers["Docker-Content-Digest"])


def requests_by(registry: Daemon, user_agent: str) -> list[str]:
    """The request lines of the registry's access log that came from one client."""
    return [
        line.split('"')[3]
        for line in registry.log().splitlines()
        if '" 200 ' in line and user_agent in line and line.count('"') >= 4
    ]


def run(
    *argv: str,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    input_text: str | None = None,
) -> str:
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        input=input_text,
    )
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def wait_for(check: Any, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"{what} did not start within {seconds:g} s")


def short_tempdir(prefix: str) -> Path:
    """A temp dir with a short path: daemons put unix sockets under it (108-byte limit)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# -- skopeo + umoci --------------------------------------------------------------------


def oci_layout_config(layout: Path, tag: str) -> dict[str, Any]:
    """The image config of ``tag`` in an OCI layout skopeo wrote."""

    def blob(digest: str) -> Any:
        return json.loads((layout / "blobs" / "sha256" / digest.split(":")[1]).read_text())

    index = json.loads((layout / "index.json").read_text())
    [entry] = [
        entry
        for entry in index["manifests"]
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    return dict(blob(blob(entry["digest"])["config"]["digest"]))


def test_skopeo(registry: Daemon, tmp_path: Path) -> None:
    log_start = len(registry.log())
    require("skopeo", "umoci")
    layout = tmp_path / "oci"
    source = f"docker://{registry.host}"

    def copy(reference: str, tag: str, *options: str) -> dict[str, Any]:
        run("skopeo", *options, "copy", "--quiet", "--src-tls-verify=false",
            f"{source}/{reference}", f"oci:{layout}:{tag}")  # fmt: skip
        return oci_layout_config(layout, tag)

    assert copy(IMAGE, "tag")["architecture"] == "amd64"
    run("umoci", "unpack", "--image", f"{layout}:tag", str(tmp_path / "bundle"))
    assert in_chroot(tmp_path / "bundle" / "rootfs", "/bin/hello") == GREETING

    digests = platform_digests(registry)
    assert copy(f"{IMAGE}@{digests['amd64']}", "digest")["architecture"] == "amd64"
    by_index = copy(IMAGE, "arm-index", "--override-arch", "arm64")
    assert (by_index["architecture"], by_index["variant"]) == ("arm64", "v8")
    assert copy(f"arm64/{IMAGE}", "arm-prefix")["architecture"] == "arm64"

    check_blob_gets(registry, since=log_start)


def test_skopeo_inspect_needs_no_extra_flags(registry: Daemon) -> None:
    require("skopeo")
    image = f"docker://{registry.host}/{IMAGE}"
    report = json.loads(run("skopeo", "inspect", "--tls-verify=false", image))
    assert report["RepoTags"] == ["latest"]
    assert report["Architecture"] == "amd64"


# -- podman ----------------------------------------------------------------------------


def test_podman(registry: Daemon, tmp_path: Path) -> None:
    log_start = len(registry.log())
    require("podman")
    conf = tmp_path / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{tmp_path}/graph"\nrunroot = "{tmp_path}/run"\n'
    )
    env = {"CONTAINERS_STORAGE_CONF": str(conf)}

    def podman(*argv: str) -> str:
        return run("podman", "--cgroup-manager=cgroupfs", "--events-backend=file", *argv, env=env)

    def pull(reference: str, *options: str) -> dict[str, Any]:
        image_id = podman("pull", "--quiet", "--tls-verify=false", *options,
                          f"{registry.host}/{reference}").strip()  # fmt: skip
        [inspected] = json.loads(podman("image", "inspect", image_id))
        return dict(inspected)

    tagged = pull(IMAGE)
    assert tagged["Architecture"] == "amd64"
    # podman run needs rlimits this sandbox refuses; the pulled image's own files are the
    # test: its root file system, mounted by podman, runs the program.
    rootfs = Path(podman("image", "mount", tagged["Id"]).strip())
    try:
        assert in_chroot(rootfs, "/bin/hello") == GREETING
    finally:
        podman("image", "unmount", tagged["Id"])

    digests = platform_digests(registry)
    assert pull(f"{IMAGE}@{digests['amd64']}")["Id"] == tagged["Id"]
    assert pull(IMAGE, "--arch", "arm64")["Architecture"] == "arm64"
    assert pull(f"arm64/{IMAGE}")["Architecture"] == "arm64"

    check_blob_gets(registry, since=log_start)


# -- containerd ------------------------------------------------------------------------


@pytest.fixture
def containerd() -> Iterator[str]:
    """A private containerd (no CRI) under a temp dir; its socket address."""
    require("containerd", "ctr")
    root = short_tempdir("nxd-ctd-")
    socket = root / "containerd.sock"
    (root / "config.toml").write_text(
        "version = 2\n"
        f'root = "{root}/root"\nstate = "{root}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{socket}"\n'
    )
    with (root / "containerd.log").open("wb") as log:
        daemon = subprocess.Popen(
            ["containerd", "--config", str(root / "config.toml")], stdout=log, stderr=log
        )
    try:
        version = ["ctr", "-a", str(socket), "version"]
        wait_for(lambda: subprocess.run(version, capture_output=True).returncode == 0, "containerd")
        yield str(socket)
    finally:
        subprocess.run(["umount", "-R", str(root / "mnt")], capture_output=True)
        daemon.terminate()
        daemon.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def test_containerd(registry: Daemon, containerd: str) -> None:
    log_start = len(registry.log())

    def ctr(*argv: str) -> str:
        return run("ctr", "-a", containerd, *argv)

    def pull(reference: str, *options: str) -> str:
        ref = f"{registry.host}/{reference}"
        ctr("images", "pull", "--plain-http", "--snapshotter", "native", *options, ref)
        return ref

    tagged = pull(f"{IMAGE}:latest")
    mountpoint = Path(containerd).parent / "mnt"
    mountpoint.mkdir()
    ctr("images", "mount", "--snapshotter", "native", tagged, str(mountpoint))
    try:
        assert in_chroot(mountpoint, "/bin/hello") == GREETING
    finally:
        ctr("images", "unmount", str(mountpoint))

    digests = platform_digests(registry)
    pull(f"{IMAGE}@{digests['amd64']}")

    def config_of(manifest_digest: str) -> dict[str, Any]:
        manifest = json.loads(ctr("content", "get", manifest_digest))
        return dict(json.loads(ctr("content", "get", manifest["config"]["digest"])))

    pull(f"{IMAGE}:latest", "--platform", "linux/arm64")
    assert config_of(digests["arm64"])["architecture"] == "arm64"  # fetched through the index
    pull(f"arm64/{IMAGE}:latest", "--platform", "linux/arm64")
    assert config_of(tag_digest(registry, f"arm64/{IMAGE}"))["architecture"] == "arm64"

    # containerd resolves a tag with HEAD, then fetches by digest.
    seen = requests_by(registry, "containerd/")
    assert f"HEAD /v2/{IMAGE}/manifests/latest HTTP/1.1" in seen
    assert any(line.startswith(f"GET /v2/{IMAGE}/manifests/sha256:") for line in seen)

    check_blob_gets(registry, since=log_start)


# -- the Docker engine -----------------------------------------------------------------


@pytest.fixture
def dockerd() -> Iterator[list[str]]:
    """A private dockerd (vfs, no networking) under a temp dir; the CLI command to reach it."""
    require("dockerd")
    if not os.access(DOCKER_CLI, os.X_OK):
        pytest.fail(f"{DOCKER_CLI} (Debian docker.io) is missing: run scripts/setup")
    root = short_tempdir("nxd-dkr-")
    socket = f"unix://{root}/docker.sock"
    with (root / "dockerd.log").open("wb") as log:
        daemon = subprocess.Popen(
            ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none",
             "--storage-driver=vfs", "--data-root", f"{root}/data", "--exec-root",
             f"{root}/exec", "--pidfile", f"{root}/docker.pid", "-H", socket],
            stdout=log, stderr=log,
        )  # fmt: skip
    cli = [DOCKER_CLI, "-H", socket]
    try:
        wait_for(lambda: subprocess.run([*cli, "version"], capture_output=True).returncode == 0,
                 "dockerd")  # fmt: skip
        yield cli
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_docker_engine(registry: Daemon, dockerd: list[str]) -> None:
    log_start = len(registry.log())

    def docker(*argv: str) -> str:
        return run(*dockerd, *argv)

    def pull(reference: str, *options: str) -> dict[str, Any]:
        ref = f"{registry.host}/{reference}"
        docker("pull", "--quiet", *options, ref)
        [inspected] = json.loads(docker("image", "inspect", ref))
        return dict(inspected)

    assert pull(IMAGE)["Architecture"] == "amd64"
    hello = docker("run", "--rm", "--network", "none", f"{registry.host}/{IMAGE}", "hello")
    assert hello == GREETING

    digests = platform_digests(registry)
    assert pull(f"{IMAGE}@{digests['amd64']}")["Architecture"] == "amd64"
    by_index = pull(IMAGE, "--platform", "linux/arm64")
    assert (by_index["Architecture"], by_index.get("Variant")) == ("arm64", "v8")
    assert pull(f"arm64/{IMAGE}", "--platform", "linux/arm64")["Architecture"] == "arm64"

    # The engine resolves a tag with HEAD, then fetches by digest.
    seen = requests_by(registry, "docker/")
    assert f"HEAD /v2/{IMAGE}/manifests/latest HTTP/1.1" in seen
    assert any(line.startswith(f"GET /v2/{IMAGE}/manifests/sha256:") for line in seen)

    check_blob_gets(registry, since=log_start)


# -- a Python client: the PyPI oras package --------------------------------------------


def test_oras_python_client(registry: Daemon, tmp_path: Path) -> None:
    log_start = len(registry.log())
    import oras.client

    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    repository = f"{registry.host}/{IMAGE}"

    def config_of(manifest: dict[str, Any], name: str = IMAGE) -> dict[str, Any]:
        path = client.download_blob(
            f"{registry.host}/{name}", manifest["config"]["digest"], str(tmp_path / "config")
        )
        return dict(json.loads(Path(path).read_text()))

    index = client.get_manifest(f"{repository}:latest", allowed_media_type=[OCI_INDEX])
    by_arch = {entry["platform"]["architecture"]: entry for entry in index["manifests"]}
    amd64 = client.get_manifest(
        f"{repository}@{by_arch['amd64']['digest']}", allowed_media_type=[OCI_MANIFEST]
    )
    assert config_of(amd64)["architecture"] == "amd64"
    # The image's files, unpacked from the layers oras downloaded: hello and its greeting.
    rootfs = tmp_path / "rootfs"
    for number, layer in enumerate(amd64["layers"]):
        path = client.download_blob(repository, layer["digest"], str(tmp_path / f"layer{number}"))
        with tarfile.open(path) as tar:
            tar.extractall(rootfs, filter="tar")
    assert in_chroot(rootfs, "/bin/hello") == GREETING

    tagged = client.get_manifest(f"{repository}:latest", allowed_media_type=[OCI_MANIFEST])
    assert tagged == amd64
    arm64 = client.get_manifest(
        f"{repository}@{by_arch['arm64']['digest']}", allowed_media_type=[OCI_MANIFEST]
    )
    assert config_of(arm64)["architecture"] == "arm64"
    by_prefix = client.get_manifest(
        f"{registry.host}/arm64/{IMAGE}:latest", allowed_media_type=[OCI_MANIFEST]
    )
    assert config_of(by_prefix, f"arm64/{IMAGE}")["architecture"] == "arm64"

    check_blob_gets(registry, since=log_start)


# -- a platform without a builder ------------------------------------------------------


def test_a_platform_nix_cannot_build_is_left_out_and_logged(registry: Daemon) -> None:
    # nativeOnly is built for the requested system, and nothing here builds aarch64-linux.
    assert list(platform_digests(registry, "nativeonly")) == ["amd64"]
    log = registry.log()
    assert "linux/arm64/v8:nativeonly:latest: left out of the index" in log
    assert "a 'aarch64-linux' with features {} is required to build" in log


def test_every_digest_seen_by_tag_survives_a_restart(tmp_path: Path) -> None:
    workdir = tmp_path / "restart"
    first = Daemon(workdir, NIXERYD_PLATFORMS="linux/amd64,linux/arm64")
    try:
        digests = {
            accept: tag_digest(first, IMAGE, accept)
            for accept in (DOCKER_MANIFEST_LIST, OCI_INDEX, DOCKER_MANIFEST, OCI_MANIFEST)
        }
        digests.update(platform_digests(first))
    finally:
        first.stop()
    second = Daemon(workdir, NIXERYD_PLATFORMS="linux/amd64,linux/arm64")
    try:
        for seen, digest in digests.items():
            status, _, body = fetch(second, f"/v2/{IMAGE}/manifests/{digest}")
            assert status == 200, (seen, body)
        assert " built " not in second.log()  # served from storage, not rebuilt
    finally:
        second.stop()
