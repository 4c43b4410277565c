"""``nixeryd gc`` on storage real daemons wrote, on the filesystem and on S3 (SeaweedFS):
only what no kept image names goes, a dry run removes nothing, a build running during
collection loses nothing, and stopped daemons' Nix GC roots are cleared."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nixeryd.manifest import DOCKER_MANIFEST, OCI_MANIFEST
from nixeryd.storage import record_parts
from tests.e2e.conftest import Daemon, require
from tests.e2e.test_pull import fetch, in_chroot, pull_and_unpack
from tests.nixinstalls import NixInstallation
from tests.s3servers import S3Server

pytestmark = pytest.mark.e2e

#: Three images sharing the shell's layers; each has a package of its own.
KEPT = ("shell/hello", "shell/helloworld")
DROPPED = "shell/9lives"
#: An image built during collection: it reuses the dropped image's own layer.
DURING = "shell/9lives/hello"


class Stored:
    """The blobs and records in a daemon's storage, read behind nixeryd's back."""

    def __init__(self, blobs: Callable[[], set[str]], records: Callable[[], set[str]]) -> None:
        self.blobs = blobs
        self.records = records


def on_disk(storage: Path) -> Stored:
    def blobs() -> set[str]:
        directory = storage / "blobs" / "sha256"
        return {f"sha256:{p.name}" for p in directory.iterdir() if "." not in p.name}

    def records() -> set[str]:
        root = storage / "records"
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    return Stored(blobs, records)


def in_bucket(server: S3Server, bucket: str) -> Stored:
    def keys() -> list[str]:
        pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def blobs() -> set[str]:
        prefix = "blobs/sha256/"
        return {f"sha256:{key[len(prefix) :]}" for key in keys() if key.startswith(prefix)}

    def records() -> set[str]:
        found = {key[len("records/") :] for key in keys() if key.startswith("records/")}
        for name in found:
            record_parts(name)
        return found

    return Stored(blobs, records)


def image_blobs(daemon: Daemon, image: str) -> set[str]:
    """The image's manifests (both forms), config and layers, as the registry serves them."""
    digests = set()
    for accept in (DOCKER_MANIFEST, OCI_MANIFEST):
        status, headers, body = fetch(daemon, f"/v2/{image}/manifests/latest", Accept=accept)
        assert status == 200, body
        digests.add(headers["Docker-Content-Digest"])
        manifest = json.loads(body)
        digests.add(manifest["config"]["digest"])
        digests.update(layer["digest"] for layer in manifest["layers"])
    return digests


def gc(daemon: Daemon, *arguments: str) -> str:
    """Run ``nixeryd gc`` with the daemon's configuration (its environment); its summary."""
    done = subprocess.run(
        [sys.executable, "-m", "nixeryd", "gc", *arguments],
        env=daemon.environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def pulls_intact(daemon: Daemon, image: str, workdir: Path) -> None:
    """skopeo checks every blob's digest; the unpacked image runs its program."""
    program = {"hello": "/bin/hello", "helloworld": "/bin/hello-world", "9lives": "/bin/9lives"}
    workdir = workdir / f"{image.replace('/', '-')}-{time.monotonic_ns()}"
    workdir.mkdir(parents=True)
    rootfs = pull_and_unpack(daemon, image, workdir)
    assert in_chroot(rootfs, program[image.split("/")[-1]])


def check_only_the_dropped_image_goes(
    daemon: Daemon, stored: Stored, tmp_path: Path, restart: Callable[[], Daemon]
) -> None:
    for image in (*KEPT, DROPPED):
        pulls_intact(daemon, image, tmp_path / "first")
    kept = set().union(*(image_blobs(daemon, image) for image in KEPT))
    dropped = image_blobs(daemon, DROPPED)
    assert dropped & kept, "the images share the shell's layers"
    blobs, records = stored.blobs(), stored.records()
    keep_file = tmp_path / "keep"
    keep_file.write_text("# the images to keep\n" + "\n".join(KEPT) + "\n")
    policy = ("--keep", str(keep_file), "--max-age", "0", "--grace", "0")

    dry = gc(daemon, *policy, "--dry-run")
    assert (stored.blobs(), stored.records()) == (blobs, records)
    assert "would delete 0 records" not in dry
    assert f"and {len(dropped - kept)} blobs" in dry, dry

    summary = gc(daemon, *policy)
    assert stored.blobs() == blobs - (dropped - kept), summary
    assert f"and {len(dropped - kept)} blobs" in summary
    gone = records - stored.records()
    assert {name.partition("/")[0] for name in gone} == {"manifests", "builds"}
    assert sum(name.startswith("manifests/") for name in gone) == 1

    # A daemon started afresh serves the kept images from their records, without Nix.
    again = restart()
    for image in KEPT:
        pulls_intact(again, image, tmp_path / "after")
    assert "built linux/" not in again.log()
    # The dropped image is built again at its next pull, whole.
    pulls_intact(again, DROPPED, tmp_path / "after")
    assert "built linux/" in again.log()


def test_gc_on_the_filesystem_removes_only_the_dropped_images_unshared_blobs(
    tmp_path: Path, nix_installation: NixInstallation | None
) -> None:
    roots = str(tmp_path / "gcroots")
    daemons = [Daemon(tmp_path / "d", NIXERYD_GC_ROOTS=roots)]

    def restart() -> Daemon:
        daemons[-1].stop()
        daemons.append(Daemon(tmp_path / "d", NIXERYD_GC_ROOTS=roots))
        return daemons[-1]

    try:
        stored = on_disk(tmp_path / "d" / "storage")
        check_only_the_dropped_image_goes(daemons[0], stored, tmp_path, restart)
    finally:
        daemons[-1].stop()


@pytest.mark.storage
def test_gc_on_s3_removes_only_the_dropped_images_unshared_blobs(
    tmp_path: Path, seaweedfs: S3Server, nix_installation: NixInstallation | None
) -> None:
    bucket = seaweedfs.new_bucket()
    environment = {**seaweedfs.environment(bucket), "NIXERYD_GC_ROOTS": str(tmp_path / "roots")}
    daemons = [Daemon(tmp_path / "d", **environment)]

    def restart() -> Daemon:
        daemons[-1].stop()
        daemons.append(Daemon(tmp_path / "d", **environment))
        return daemons[-1]

    try:
        check_only_the_dropped_image_goes(
            daemons[0], in_bucket(seaweedfs, bucket), tmp_path, restart
        )
    finally:
        daemons[-1].stop()


def test_a_build_during_collection_loses_nothing(
    tmp_path: Path, nix_installation: NixInstallation | None
) -> None:
    """The storage is aged two hours, so that every record and blob of the dropped image
    is past the grace period; collections run back to back while a new image that reuses
    the dropped image's layer is built. They remove the dropped image's other blobs, and
    the new image pulls whole."""
    require("skopeo", "umoci")
    daemon = Daemon(tmp_path / "d", NIXERYD_GC_ROOTS=str(tmp_path / "gcroots"))
    try:
        for image in (*KEPT, DROPPED):
            pulls_intact(daemon, image, tmp_path / "first")
        kept = set().union(*(image_blobs(daemon, image) for image in KEPT))
        dropped = image_blobs(daemon, DROPPED)
        storage = tmp_path / "d" / "storage"
        two_hours_ago = time.time() - 7200
        for path in [*(storage / "blobs").rglob("*"), *(storage / "records").rglob("*")]:
            os.utime(path, (two_hours_ago, two_hours_ago))
        # The new image is kept once its build wrote its record; before that, only the
        # grace period and the marks protect what the build writes and reuses.
        keep = [argument for image in (*KEPT, DURING) for argument in ("--keep-image", image)]
        arguments = ("--max-age", "0", "--grace", "20s", *keep)

        stop = threading.Event()
        runs: list[str] = []

        def collect() -> None:
            while not stop.is_set():
                runs.append(gc(daemon, *arguments))

        collector = threading.Thread(target=collect)
        collector.start()
        try:
            time.sleep(1)  # a run or two first: the dropped image's records go
            pulls_intact(daemon, DURING, tmp_path / "during")
            during = image_blobs(daemon, DURING)
            time.sleep(25)  # past the grace period: the marked blobs are swept
        finally:
            stop.set()
            collector.join()
        assert len(runs) >= 3
        swept = dropped - kept - during
        assert swept, "the dropped image has blobs of its own the new one does not name"
        assert not swept & on_disk(storage).blobs(), runs
        assert during <= on_disk(storage).blobs()
        pulls_intact(daemon, DURING, tmp_path / "after")
        for image in KEPT:
            pulls_intact(daemon, image, tmp_path / "after")
    finally:
        daemon.stop()


def test_stopped_daemons_gc_roots_are_cleared_and_live_ones_kept(
    tmp_path: Path, nix_installation: NixInstallation | None
) -> None:
    roots = tmp_path / "gcroots"
    killed = Daemon(tmp_path / "killed", NIXERYD_GC_ROOTS=str(roots))
    pulls_intact(killed, "shell/hello", tmp_path / "killed-pull")  # its roots directory
    [killed_roots] = roots.iterdir()
    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait()
    live = Daemon(tmp_path / "live", NIXERYD_GC_ROOTS=str(roots))
    try:
        pulls_intact(live, "shell/helloworld", tmp_path / "live-pull")
        [live_roots] = set(roots.iterdir()) - {killed_roots}
        # A daemon's lock is left alone for a minute after it is made: age them both.
        minutes_ago = time.time() - 300
        for directory in (killed_roots, live_roots):
            os.utime(directory / "lock", (minutes_ago, minutes_ago))
        # The live daemon holds its lock: nobody else can take it.
        with open(live_roots / "lock", "rb") as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

        dry = gc(live, "--dry-run")
        assert killed_roots.exists()  # a dry run removes nothing
        assert "would delete 0 records" in dry
        gc(live)
        assert not killed_roots.exists()
        assert live_roots.exists() and (live_roots / "lock").exists()
        pulls_intact(live, "shell/9lives", tmp_path / "live-pull-2")  # builds in its roots
        assert live_roots.exists()
    finally:
        live.stop()
    assert not live_roots.exists()  # stopped in order: it removed its own


def test_a_starting_daemon_clears_a_killed_ones_gc_roots(
    tmp_path: Path, nix_installation: NixInstallation | None
) -> None:
    roots = tmp_path / "gcroots"
    killed = Daemon(tmp_path / "killed", NIXERYD_GC_ROOTS=str(roots))
    pulls_intact(killed, "shell/hello", tmp_path / "pull")
    [killed_roots] = roots.iterdir()
    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait()
    minutes_ago = time.time() - 300
    os.utime(killed_roots / "lock", (minutes_ago, minutes_ago))
    started = Daemon(tmp_path / "started", NIXERYD_GC_ROOTS=str(roots))
    try:
        assert not killed_roots.exists()
        assert "removed the Nix GC roots of 1 stopped daemons" in started.log()
    finally:
        started.stop()


def test_a_daemon_with_gc_interval_collects_by_itself(
    tmp_path: Path, nix_installation: NixInstallation | None
) -> None:
    keep_file = tmp_path / "keep"
    keep_file.write_text("\n".join(KEPT) + "\n")
    daemon = Daemon(
        tmp_path / "d",
        NIXERYD_GC_ROOTS=str(tmp_path / "gcroots"),
        NIXERYD_GC_INTERVAL="1s",
        NIXERYD_GC_MAX_AGE="0",
        NIXERYD_GC_GRACE="3s",
        NIXERYD_GC_KEEP=str(keep_file),
    )
    try:
        for image in (*KEPT, DROPPED):
            pulls_intact(daemon, image, tmp_path / "first")
        kept = set().union(*(image_blobs(daemon, image) for image in KEPT))
        dropped = image_blobs(daemon, DROPPED)
        stored = on_disk(tmp_path / "d" / "storage")
        deadline = time.monotonic() + 60
        while (dropped - kept) & stored.blobs() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not (dropped - kept) & stored.blobs(), daemon.log()
        assert kept <= stored.blobs()
        assert "gc: deleted" in daemon.log()
        for image in KEPT:
            pulls_intact(daemon, image, tmp_path / "after")
        # Each run counts in the daemon's metrics, by result.
        status, _, body = fetch(daemon, "/metrics")
        assert status == 200
        [runs] = [
            line
            for line in body.decode().splitlines()
            if line.startswith('nixeryd_gc_runs_total{result="completed"}')
        ]
        assert float(runs.split()[-1]) >= 2
    finally:
        daemon.stop()
