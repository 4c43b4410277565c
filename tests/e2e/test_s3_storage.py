"""A daemon on S3 storage (SeaweedFS): real builds, a real pull through presigned redirects."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixeryd.manifest import OCI_MANIFEST
from nixeryd.storage import SMALL_BLOB_SIZE
from tests.e2e.conftest import Daemon
from tests.e2e.test_pull import fetch, in_chroot, pull_and_unpack
from tests.nixinstalls import NixInstallation
from tests.s3servers import S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.storage]


@pytest.fixture
def s3_daemon(
    tmp_path: Path, seaweedfs: S3Server, nix_installation: NixInstallation | None
) -> Iterator[Daemon]:
    """A daemon storing in a fresh SeaweedFS bucket, as Nixery is configured for S3."""
    instance = Daemon(tmp_path / "s3-daemon", **seaweedfs.environment(seaweedfs.new_bucket()))
    yield instance
    instance.stop()


def test_an_image_pulled_through_s3_runs_and_matches_filesystem_storage(
    s3_daemon: Daemon, daemon: Daemon, seaweedfs: S3Server, tmp_path: Path
) -> None:
    rootfs = pull_and_unpack(s3_daemon, "shell/hello", tmp_path)
    assert in_chroot(rootfs, "/bin/hello") == "Hello, world!\n"

    path = "/v2/shell/hello/manifests/latest"
    status, on_s3, body = fetch(s3_daemon, path, Accept=OCI_MANIFEST)
    assert status == 200
    _, on_disk, _ = fetch(daemon, path, Accept=OCI_MANIFEST)
    assert on_s3["Docker-Content-Digest"] == on_disk["Docker-Content-Digest"]

    layer = max(json.loads(body)["layers"], key=lambda layer: layer["size"])
    assert layer["size"] > SMALL_BLOB_SIZE  # answered by serve_blob: a redirect
    status, headers, _ = fetch(s3_daemon, f"/v2/shell/hello/blobs/{layer['digest']}")
    assert status == 307
    assert headers["Location"].startswith(f"{seaweedfs.endpoint}/")
    with urllib.request.urlopen(headers["Location"], timeout=30) as response:
        data = response.read()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]

    # HEAD is answered by nixeryd from the blob's info: clients check for a blob
    # without being sent to the bucket.
    status, headed, _ = fetch(s3_daemon, f"/v2/shell/hello/blobs/{layer['digest']}", "HEAD")
    assert (status, int(headed["Content-Length"])) == (200, layer["size"])
    assert headed["Docker-Content-Digest"] == layer["digest"]
    # A ranged GET (the Docker engine resumes an interrupted layer so) is redirected too; the
    # client's Range, sent on to the presigned URL, is honoured there: it is not signed.
    path = f"/v2/shell/hello/blobs/{layer['digest']}"
    status, ranged, _ = fetch(s3_daemon, path, Range="bytes=100-199")
    assert (status, ranged["Location"]) == (307, headers["Location"])
    part = urllib.request.Request(ranged["Location"], headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(part, timeout=30) as response:
        assert (response.status, response.read()) == (206, data[100:200])


def test_a_proxying_daemon_streams_blobs_itself(
    tmp_path: Path, seaweedfs: S3Server, nix_installation: NixInstallation | None
) -> None:
    environment = {**seaweedfs.environment(seaweedfs.new_bucket()), "NIXERYD_S3_PROXY": "true"}
    proxying = Daemon(tmp_path / "proxying", **environment)
    try:
        rootfs = pull_and_unpack(proxying, "shell/hello", tmp_path)
        assert in_chroot(rootfs, "/bin/hello") == "Hello, world!\n"
        _, _, body = fetch(proxying, "/v2/shell/hello/manifests/latest", Accept=OCI_MANIFEST)
        layer = max(json.loads(body)["layers"], key=lambda layer: layer["size"])
        status, headers, data = fetch(proxying, f"/v2/shell/hello/blobs/{layer['digest']}")
        assert (status, int(headers["Content-Length"])) == (200, layer["size"])
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
        status, _, part = fetch(
            proxying, f"/v2/shell/hello/blobs/{layer['digest']}", Range="bytes=100-199"
        )
        assert (status, part) == (206, data[100:200])
    finally:
        proxying.stop()
