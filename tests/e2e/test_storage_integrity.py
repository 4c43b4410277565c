"""Storage going wrong under a real daemon: damaged and deleted blobs, full and read-only
disks, writers killed mid-layer. The registry never serves wrong bytes, names the
fault, rebuilds what is lost and leaves no temp files behind."""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Daemon, require

pytestmark = pytest.mark.e2e

IMAGE = "shell/big"


def fetch(daemon: Daemon, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=300)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def skopeo_pull(daemon: Daemon, workdir: Path) -> subprocess.CompletedProcess[str]:
    require("skopeo")
    layout = workdir / f"oci-{time.monotonic_ns()}"
    return subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
         f"docker://{daemon.host}/{IMAGE}", f"oci:{layout}:latest"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def blob_files(storage: Path) -> list[Path]:
    blobs = storage / "blobs" / "sha256"
    return [path for path in blobs.iterdir() if "." not in path.name]


def bad_blobs(storage: Path) -> list[str]:
    """Blob files whose bytes do not hash to their name or whose size is not the record's."""
    bad = []
    for path in blob_files(storage):
        data = path.read_bytes()
        sidecar = json.loads(path.with_name(path.name + ".json").read_bytes())
        if hashlib.sha256(data).hexdigest() != path.name or len(data) != sidecar["size"]:
            bad.append(path.name)
    return bad


def largest_blob(storage: Path) -> Path:
    return max(blob_files(storage), key=lambda path: path.stat().st_size)


def temp_files(storage: Path) -> list[Path]:
    return list((storage / "tmp").iterdir())


@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped"])
def test_a_damaged_layer_is_never_served_and_is_rebuilt_when_next_asked_for(
    fresh_daemon: Daemon, tmp_path: Path, damage: str
) -> None:
    storage = Path(fresh_daemon.environment["STORAGE_PATH"])
    pulled = skopeo_pull(fresh_daemon, tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    layer = largest_blob(storage)
    good = layer.read_bytes()
    if damage == "deleted":
        layer.unlink()
    elif damage == "truncated":
        layer.write_bytes(good[: len(good) // 2])
    else:
        layer.write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])

    blob = f"/v2/{IMAGE}/blobs/sha256:{layer.name}"
    status, body = fetch(fresh_daemon, blob)
    if damage == "flipped":
        # Found only by hashing the file as it is served, when that answer has begun: a
        # 404, never the wrong bytes; the file is taken away and the image naming it is
        # built again at once, so the client's retry is answered.
        assert status == 404, f"the {damage} blob was answered {status}"
        assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
        status, body = fetch(fresh_daemon, blob)
    # Missing, or of the wrong size: the image naming it is built again within the GET,
    # which writes the same bytes (layers are deterministic), and they are the answer.
    assert (status, body == good) == (200, True), f"the {damage} blob was answered {status}"
    assert "is lost: building" in fresh_daemon.log()

    pulled = skopeo_pull(fresh_daemon, tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    assert layer.read_bytes() == good
    status, body = fetch(fresh_daemon, f"/v2/{IMAGE}/blobs/sha256:{layer.name}")
    assert (status, body == good) == (200, True)
    assert bad_blobs(storage) == []
    assert "Traceback" not in fresh_daemon.log()


def test_the_first_pull_after_a_layer_is_deleted_succeeds(
    fresh_daemon: Daemon, tmp_path: Path
) -> None:
    """skopeo does not retry a 404: the blob is written again within its GET."""
    storage = Path(fresh_daemon.environment["STORAGE_PATH"])
    assert skopeo_pull(fresh_daemon, tmp_path).returncode == 0
    layer = largest_blob(storage)
    good = layer.read_bytes()
    layer.unlink()
    pulled = skopeo_pull(fresh_daemon, tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    assert layer.read_bytes() == good
    assert bad_blobs(storage) == []


def test_damage_while_stopped_is_found_and_rebuilt_by_the_next_pull(tmp_path: Path) -> None:
    """A flipped byte keeps the size: the first GET after start hashes the file and
    refuses it (that pull fails with 404, never with wrong bytes); the next pull rebuilds."""
    daemon = Daemon(tmp_path / "d")
    storage = Path(daemon.environment["STORAGE_PATH"])
    try:
        assert skopeo_pull(daemon, tmp_path).returncode == 0
    finally:
        daemon.stop()
    layer = largest_blob(storage)
    good = layer.read_bytes()
    layer.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    daemon = Daemon(tmp_path / "d")
    try:
        first = skopeo_pull(daemon, tmp_path)
        assert first.returncode == 0 or "404" in first.stderr, first.stderr
        pulled = skopeo_pull(daemon, tmp_path)
        assert pulled.returncode == 0, pulled.stderr
        assert layer.read_bytes() == good
        assert bad_blobs(storage) == []
    finally:
        daemon.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (the test runs as root): too small for the 2 MiB layer of ``big``."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def assert_storage_error(daemon: Daemon, image: str, status: int, cause: str) -> None:
    code, body = fetch(daemon, f"/v2/{image}/manifests/latest")
    assert code == status, body
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert cause in error["message"]
    log = daemon.log()
    assert "Traceback" not in log
    assert cause in log
    index = fetch(daemon, "/")[1].decode()
    assert cause in index


def test_a_full_disk_is_a_registry_error_naming_it(tmp_path: Path, small_disk: Path) -> None:
    daemon = Daemon(tmp_path / "d", STORAGE_PATH=str(small_disk / "storage"))
    try:
        assert_storage_error(daemon, "big", 507, "storage is full")
        # The other layers' writes fail and are discarded a moment after the answer.
        deadline = time.monotonic() + 30
        while temp_files(small_disk / "storage") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert temp_files(small_disk / "storage") == []
    finally:
        daemon.stop()


def test_read_only_storage_is_a_registry_error_naming_it(tmp_path: Path, small_disk: Path) -> None:
    daemon = Daemon(tmp_path / "d", STORAGE_PATH=str(small_disk / "storage"))
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        assert_storage_error(daemon, "hello", 503, "storage is read-only")
    finally:
        daemon.stop()


def test_writers_killed_mid_layer_leave_no_temp_files(tmp_path: Path) -> None:
    storage = tmp_path / "d" / "storage"
    # Build the image once, so that the kills below hit layer writes, not Nix.
    daemon = Daemon(tmp_path / "d")
    try:
        assert skopeo_pull(daemon, tmp_path).returncode == 0
    finally:
        daemon.stop()
    subprocess.run(["rm", "-rf", str(storage)], check=True)
    kills = 0
    left: list[int] = []
    for _ in range(5):
        daemon = Daemon(tmp_path / "d")
        left_at_start = temp_files(storage)
        assert left_at_start == [], f"start-up left temp files: {_holders(left_at_start)}"
        request = threading.Thread(target=_ignore_errors, args=(daemon,), daemon=True)
        request.start()
        deadline = time.monotonic() + 120
        while not _writing(storage):
            assert time.monotonic() < deadline, "no layer write seen"
            time.sleep(0.001)
        daemon.process.kill()
        daemon.process.wait()
        kills += 1
        left.append(len(temp_files(storage)))
        request.join(timeout=30)
    assert kills == 5
    assert all(count > 0 for count in left), left
    daemon = Daemon(tmp_path / "d")
    try:
        assert temp_files(storage) == []
        pulled = skopeo_pull(daemon, tmp_path)
        assert pulled.returncode == 0, pulled.stderr
        assert bad_blobs(storage) == []
        assert temp_files(storage) == []
    finally:
        daemon.stop()


def _writing(storage: Path) -> bool:
    """Whether a layer is being written: a temp file larger than any config or manifest."""
    try:
        return any(path.stat().st_size > 256 * 1024 for path in temp_files(storage))
    except FileNotFoundError:
        return False


def _ignore_errors(daemon: Daemon) -> Any:
    try:
        return fetch(daemon, f"/v2/{IMAGE}/manifests/latest")
    except OSError:
        return None


def _holders(paths: list[Path]) -> dict[str, list[str]]:
    """For a failure's message: which processes hold each file open."""
    held: dict[str, list[str]] = {str(path): [] for path in paths}
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = str(fd.readlink())
            if target in held:
                held[target].append((fd.parents[1] / "cmdline").read_text().replace("\0", " "))
        except OSError:
            continue
    return held
