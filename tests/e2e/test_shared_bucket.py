"""Several nixeryd instances on one S3 bucket (SeaweedFS): what one builds, the others serve.

The package set is a git repository, so that a tag is a commit (a pin): an
instance that finds the pin's manifest record in the bucket answers it
without running Nix at all, which is what lets a load balancer spread pulls
over instances.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, Daemon
from tests.e2e.test_git_tags import git
from tests.e2e.test_pull import fetch, in_chroot, pull_and_unpack
from tests.nixinstalls import NixInstallation
from tests.s3servers import S3Server

pytestmark = pytest.mark.e2e

PACKAGE_SET = """\
{{ system ? builtins.currentSystem, ... }}:
let lib = import {lib} {{ }};
in {{
  inherit (import {example} {{ inherit system; }}) bashInteractive coreutils moreutils nano hello;
  greeter = lib.mkPackage {{
    name = "greeter";
    version = "{version}";
    bins.greet = ''echo "greetings {version}"'';
  }};
  # Incompressible bytes, so that its layer is large enough to upload in parts.
  bulky = lib.mkPackage {{
    name = "bulky";
    version = "{version}";
    script = ''mkdir -p $out/share; head -c 48000000 /dev/urandom > $out/share/noise'';
  }};
}}
"""

#: What a daemon logs when it runs Nix (a Nix step ending, an evaluator starting).
NIX_RAN = (" evaluation done", " realise done", " closure done", "evaluator started")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("shared-pkgs")
    git(repo, "init", "-q", "-b", "main")
    text = PACKAGE_SET.format(
        lib=ROOT / "nix" / "example" / "lib.nix", example=ROOT / "nix" / "example", version="1"
    )
    (repo / "default.nix").write_text(text)
    git(repo, "add", "default.nix")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    return repo


@pytest.fixture
def instances(
    tmp_path: Path, seaweedfs: S3Server, repo: Path, nix_installation: NixInstallation | None
) -> Iterator[tuple[Daemon, Daemon]]:
    """Two daemons on one fresh bucket, with nothing else in common but the Nix store."""
    environment = {
        **seaweedfs.environment(seaweedfs.new_bucket()),
        "NIXERY_PKGS_PATH": "",
        "NIXERY_PKGS_REPO": f"file://{repo}",
        # S3's smallest parts: the 48 MB layer of `bulky` goes up in ten.
        "NIXERYD_S3_PART_SIZE": "5",
    }
    first = Daemon(tmp_path / "a", **environment)
    second = Daemon(tmp_path / "b", **environment)
    yield first, second
    first.stop()
    second.stop()


def commit(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD")


def manifest_digest(daemon: Daemon, image: str, tag: str) -> tuple[int, str]:
    status, headers, body = fetch(daemon, f"/v2/{image}/manifests/{tag}")
    return status, headers.get("Docker-Content-Digest") or body.decode(errors="replace")


def nix_lines(daemon: Daemon) -> list[str]:
    return [line for line in daemon.log().splitlines() if any(mark in line for mark in NIX_RAN)]


def test_an_instance_serves_what_another_built_without_running_nix(
    instances: tuple[Daemon, Daemon], repo: Path, tmp_path: Path
) -> None:
    builder, server = instances
    pin = commit(repo)
    status, built = manifest_digest(builder, "shell/greeter", pin)
    assert status == 200, built
    assert nix_lines(builder)

    status, served = manifest_digest(server, "shell/greeter", pin)
    assert (status, served) == (200, built)
    assert nix_lines(server) == []
    # A whole pull through the second instance: blobs answered with redirects to the bucket.
    rootfs = pull_and_unpack(server, f"shell/greeter:{pin}", tmp_path)
    assert in_chroot(rootfs, "/bin/greet") == "greetings 1\n"
    assert nix_lines(server) == []
    assert ' HTTP/1.1" 307 ' in server.log()


def test_concurrent_pulls_of_a_new_image_across_instances_agree(
    instances: tuple[Daemon, Daemon], repo: Path
) -> None:
    """Both instances build it (nothing is coordinated but the bucket); every write is
    create-only and the build is reproducible, so every client sees one digest."""
    pin = commit(repo)
    daemons = [instances[n % 2] for n in range(10)]
    with ThreadPoolExecutor(10) as pool:
        answers = list(
            pool.map(lambda daemon: manifest_digest(daemon, "hello/coreutils", pin), daemons)
        )
    assert {status for status, _ in answers} == {200}, answers
    assert len({digest for _, digest in answers}) == 1
    manifest = json.loads(fetch(instances[1], f"/v2/hello/coreutils/manifests/{pin}")[2])
    for layer in manifest["layers"]:
        assert_blob_intact(instances[0], layer["digest"])


def test_a_writer_killed_mid_upload_leaves_no_wrong_object(
    instances: tuple[Daemon, Daemon], repo: Path, seaweedfs: S3Server
) -> None:
    victim, survivor = instances
    bucket = victim_bucket(victim)
    client = seaweedfs.client()
    pulling = subprocess.Popen(
        ["curl", "-s", "-o", "/dev/null", f"{victim.url}/v2/bulky/manifests/{commit(repo)}"]
    )
    deadline = time.monotonic() + 300
    while not client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
        assert time.monotonic() < deadline, "the large layer's multipart upload never began"
        assert pulling.poll() is None, "the build ended before its upload could be interrupted"
        time.sleep(0.05)
    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.wait()
    pulling.wait()

    for entry in client.list_objects_v2(Bucket=bucket, Prefix="blobs/").get("Contents", []):
        data = client.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
        assert entry["Key"].endswith(hashlib.sha256(data).hexdigest()), entry["Key"]
    status, digest = manifest_digest(survivor, "bulky", commit(repo))
    assert status == 200, digest
    manifest = json.loads(fetch(survivor, f"/v2/bulky/manifests/{digest}")[2])
    biggest = max(manifest["layers"], key=lambda layer: layer["size"])
    assert biggest["size"] > 40_000_000
    assert_blob_intact(survivor, biggest["digest"])


def victim_bucket(daemon: Daemon) -> str:
    """The bucket a daemon was started on."""
    return daemon.environment["S3_BUCKET"]


def assert_blob_intact(daemon: Daemon, digest: str) -> None:
    """GET the blob as a client does (following the redirect) and check its digest."""
    with urllib.request.urlopen(f"{daemon.url}/v2/any/blobs/{digest}", timeout=120) as response:
        data = response.read()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
