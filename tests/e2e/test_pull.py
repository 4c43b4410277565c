"""Pulling real images: real Nix builds them, skopeo fetches, umoci unpacks, chroot runs."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from nixeryd.manifest import DOCKER_MANIFEST, OCI_MANIFEST
from tests.e2e.conftest import Daemon, require

pytestmark = pytest.mark.e2e


def pull_and_unpack(daemon: Daemon, image: str, workdir: Path) -> Path:
    """``skopeo copy`` the image into an OCI layout and ``umoci unpack`` it; the rootfs."""
    require("skopeo", "umoci")
    layout, bundle = workdir / "oci", workdir / "bundle"
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
         f"docker://{daemon.host}/{image}", f"oci:{layout}:latest"],
        check=True, timeout=120,
    )  # fmt: skip
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return bundle / "rootfs"


def in_chroot(rootfs: Path, *argv: str) -> str:
    chroot = shutil.which("chroot")
    assert chroot is not None, "chroot (coreutils) is missing"
    result = subprocess.run(
        [chroot, str(rootfs), *argv], capture_output=True, text=True, timeout=60,
        env={"PATH": "/bin", **({"FANCY_CHECK_HARDLINK": "1"} if "fancy" in argv[0] else {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def fetch(daemon: Daemon, path: str, method: str = "GET", **headers: str) -> Any:
    """A raw HTTP exchange (no redirects, no header rewriting): (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=120)
    connection.request(method, path, headers=headers)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, response.headers, body


def error_of(body: bytes) -> dict[str, Any]:
    errors: list[dict[str, Any]] = json.loads(body)["errors"]
    return errors[0]


def test_skopeo_umoci_and_chroot_run_the_package(daemon: Daemon, tmp_path: Path) -> None:
    rootfs = pull_and_unpack(daemon, "shell/hello", tmp_path)
    assert in_chroot(rootfs, "/bin/hello") == "Hello, world!\n"
    assert in_chroot(rootfs, "/bin/bash", "-c", "echo $((6 * 7))") == "42\n"
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert os.readlink(rootfs / "usr/bin/env") == "/bin/env"
    config = json.loads(next((tmp_path / "bundle").glob("config.json")).read_text())
    assert config["process"]["args"] == ["bash"]
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt" in config["process"]["env"]


def test_the_image_keeps_every_kind_of_file(daemon: Daemon, tmp_path: Path) -> None:
    rootfs = pull_and_unpack(daemon, "fancy", tmp_path)
    assert in_chroot(rootfs, "/bin/fancy-check") == "fancy ok\n"
    store = rootfs / "nix" / "store"
    fancy = next(path for path in store.iterdir() if path.name.endswith("-fancy-1.0"))
    entries = {path.relative_to(fancy).as_posix(): path for path in fancy.rglob("*")}
    symlinks = {name: os.readlink(path) for name, path in entries.items() if path.is_symlink()}
    assert any(not target.startswith("/") for target in symlinks.values()), symlinks
    assert any(target.startswith("/nix/store/") for target in symlinks.values()), symlinks
    assert any(path.is_dir() and not any(path.iterdir()) for path in entries.values())
    assert any(len(f"/nix/store/{fancy.name}/{name}") > 150 for name in entries)
    assert any(not name.isascii() for name in entries)
    assert any(" " in name for name in entries)
    modes = {stat.S_IMODE(path.lstat().st_mode) for path in entries.values()}
    assert {0o444, 0o555} <= modes
    inodes = [path.lstat().st_ino for path in entries.values() if path.is_file()]
    assert len(inodes) > len(set(inodes)), "the hard link was not kept"


def test_two_instances_produce_the_same_digests(
    daemon: Daemon, fresh_daemon: Daemon, tmp_path: Path
) -> None:
    for accept in (DOCKER_MANIFEST, OCI_MANIFEST):
        digests = set()
        for instance in (daemon, fresh_daemon):
            status, headers, body = fetch(
                instance, "/v2/shell/hello/manifests/latest", Accept=accept
            )
            assert status == 200, body
            digests.add(headers["Docker-Content-Digest"])
        assert len(digests) == 1, (accept, digests)


def test_skopeo_inspect_with_tags(daemon: Daemon) -> None:
    require("skopeo")
    result = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{daemon.host}/shell/hello"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    inspected = json.loads(result.stdout)
    assert inspected["RepoTags"] == ["latest"]
    assert inspected["Architecture"] == "amd64"


def test_manifest_and_blob_headers(daemon: Daemon) -> None:
    status, headers, body = fetch(daemon, "/v2/hello/manifests/latest")
    assert status == 200
    digest = headers["Docker-Content-Digest"]
    assert digest == "sha256:" + hashlib.sha256(body).hexdigest()
    assert headers["Content-Type"] == DOCKER_MANIFEST
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"

    status, head_headers, head_body = fetch(daemon, "/v2/hello/manifests/latest", "HEAD")
    assert (status, head_body) == (200, b"")
    assert head_headers["Content-Length"] == str(len(body))
    assert head_headers["Docker-Content-Digest"] == digest
    assert head_headers["Content-Type"] == DOCKER_MANIFEST

    for method in ("GET", "HEAD"):
        status, by_digest, data = fetch(daemon, f"/v2/hello/manifests/{digest}", method)
        assert status == 200
        assert by_digest["Content-Type"] == DOCKER_MANIFEST
        assert by_digest["Content-Length"] == str(len(body))
        assert data == (body if method == "GET" else b"")

    layer = max(json.loads(body)["layers"], key=lambda layer: layer["size"])
    path = f"/v2/hello/blobs/{layer['digest']}"
    status, blob_headers, blob = fetch(daemon, path)
    assert status == 200
    assert len(blob) == layer["size"] == int(blob_headers["Content-Length"])
    assert blob_headers["Accept-Ranges"] == "bytes"
    assert blob_headers["Docker-Content-Digest"] == layer["digest"]
    status, range_headers, part = fetch(daemon, path, Range="bytes=10-19")
    assert (status, part) == (206, blob[10:20])
    assert range_headers["Content-Range"] == f"bytes 10-19/{len(blob)}"
    status, _, part = fetch(daemon, path, Range=f"bytes={len(blob) - 5}-")
    assert (status, part) == (206, blob[-5:])
    status, range_headers, _ = fetch(daemon, path, Range=f"bytes={len(blob) + 1}-")
    assert status == 416
    assert range_headers["Content-Range"] == f"bytes */{len(blob)}"


def test_unknown_packages_are_named_together(daemon: Daemon) -> None:
    status, headers, body = fetch(daemon, "/v2/hello/nosuchthing/notapackage/manifests/latest")
    assert status == 404
    assert headers["Content-Type"] == "application/json"
    error = error_of(body)
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "nosuchthing" in error["message"]
    assert "notapackage" in error["message"]
    assert "hello" not in error["message"]


def test_lowercase_nested_and_digit_names_resolve(daemon: Daemon) -> None:
    for name in ("helloworld", "tools.greeter", "9lives", "haskellpackages.greeter"):
        status, _, body = fetch(daemon, f"/v2/{name}/manifests/latest")
        assert status == 200, (name, body)


def test_nix_errors_reach_the_client(daemon: Daemon) -> None:
    status, _, body = fetch(daemon, "/v2/evalerror/manifests/latest")
    assert status == 404
    assert "this package fails to evaluate" in error_of(body)["message"]
    status, _, body = fetch(daemon, "/v2/brokenbuild/manifests/latest")
    assert status == 404
    message = error_of(body)["message"]
    assert "failed with exit code 1" in message
    assert "this build fails on purpose" in message
    assert "this build fails on purpose" in daemon.log()
    status, _, page = fetch(daemon, "/")
    assert b"this build fails on purpose" in page


def test_a_failed_image_asked_again_runs_nix_once(fresh_daemon: Daemon) -> None:
    get, _, body = fetch(fresh_daemon, "/v2/brokenbuild/manifests/latest")
    head, _, _ = fetch(fresh_daemon, "/v2/brokenbuild/manifests/latest", method="HEAD")
    again, _, same = fetch(fresh_daemon, "/v2/brokenbuild/manifests/latest")
    assert (get, head, again) == (404, 404, 404)
    assert same == body
    # Each Nix step logs how it ended: the evaluation and the build ran once.
    assert fresh_daemon.log().count("linux/amd64:brokenbuild evaluation done") == 1
    assert fresh_daemon.log().count("linux/amd64:brokenbuild build failed") == 1


def test_images_of_one_package_set_share_one_evaluator(fresh_daemon: Daemon) -> None:
    """The package set is loaded once: later images, failing ones among them, are
    evaluated by the same ``nix repl``, which stays usable after an error."""
    for name, expected in (
        ("hello", 200),
        ("evalerror", 404),
        ("nosuchpackage", 404),
        ("shell/tools.greeter", 200),
    ):
        status, _, body = fetch(fresh_daemon, f"/v2/{name}/manifests/latest")
        assert status == expected, (name, body)
        if name == "evalerror":
            assert "this package fails to evaluate" in error_of(body)["message"]
    assert fresh_daemon.log().count("evaluator started") == 1


def test_without_evaluators_each_image_runs_nix_instantiate(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "one-shot", NIXERYD_EVALUATORS="0")
    try:
        for name in ("hello", "tools.greeter"):
            status, _, body = fetch(daemon, f"/v2/{name}/manifests/latest")
            assert status == 200, (name, body)
        assert "evaluator started" not in daemon.log()
    finally:
        daemon.stop()


def test_ten_concurrent_requests_run_one_nix_build(fresh_daemon: Daemon) -> None:
    image = "shell/tools.greeter/hello"
    results: list[tuple[int, str]] = []

    def pull() -> None:
        status, headers, _ = fetch(fresh_daemon, f"/v2/{image}/manifests/latest")
        results.append((status, headers["Docker-Content-Digest"]))

    threads = [threading.Thread(target=pull) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 10
    assert {status for status, _ in results} == {200}
    assert len({digest for _, digest in results}) == 1
    built = [line for line in fresh_daemon.log().splitlines() if " built linux/amd64:" in line]
    assert len(built) == 1, built


def test_a_timeout_is_reported_and_the_daemon_keeps_serving(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "timeout", NIX_TIMEOUT="4")
    try:
        status, _, _ = fetch(daemon, "/v2/hello/manifests/latest")
        assert status == 200
        outcome: list[Any] = []
        slow = threading.Thread(
            target=lambda: outcome.append(fetch(daemon, "/v2/slow/manifests/latest"))
        )
        slow.start()
        time.sleep(1)
        started = time.monotonic()
        status, _, _ = fetch(daemon, "/v2/hello/manifests/latest")
        assert status == 200
        assert time.monotonic() - started < 3, "a cached image waited for a running build"
        slow.join()
        status, _, body = outcome[0]
        assert status == 404
        message = error_of(body)["message"]
        assert message.startswith("a builder of linux/amd64:slow ran longer than NIX_TIMEOUT (4 s)")
        assert "timed out after 4 seconds" in message
        assert fetch(daemon, "/v2/")[0] == 200
        leftover = subprocess.run(["pgrep", "-f", "slow-1.0"], capture_output=True, text=True)
        assert leftover.stdout == "", "the stopped build left processes behind"
    finally:
        daemon.stop()


def test_the_build_timeout_stops_a_whole_image(tmp_path: Path) -> None:
    """A builder within NIX_TIMEOUT is still bounded by the image's
    own limit; nixeryd kills the Nix it waits for."""
    daemon = Daemon(tmp_path / "bounded", NIX_TIMEOUT="60", NIXERYD_BUILD_TIMEOUT="3")
    try:
        started = time.monotonic()
        status, _, body = fetch(daemon, "/v2/slow/manifests/latest")
        assert status == 404
        assert time.monotonic() - started < 10
        message = error_of(body)["message"]
        assert "took longer than the build timeout (NIXERYD_BUILD_TIMEOUT, 3 s)" in message
        time.sleep(0.5)
        leftover = subprocess.run(["pgrep", "-f", "slow-1.0"], capture_output=True, text=True)
        assert leftover.stdout == "", "the stopped build left processes behind"
    finally:
        daemon.stop()


def test_the_example_package_set_is_the_default(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "default", NIXERY_PKGS_PATH="")  # unset: the default
    try:
        rootfs = pull_and_unpack(daemon, "shell/hello", tmp_path)
        assert in_chroot(rootfs, "/bin/hello") == "Hello, world!\n"
    finally:
        daemon.stop()


def test_bad_names_and_references(daemon: Daemon) -> None:
    cases = {
        "/v2/Hello/manifests/latest": (400, "NAME_INVALID"),
        "/v2/hello/manifests/.INVALID_MANIFEST_NAME": (404, "TAG_INVALID"),
        "/v2/hello/manifests/sha256:nothex": (400, "DIGEST_INVALID"),
        "/v2/hello/blobs/sha256:" + "0" * 64: (404, "BLOB_UNKNOWN"),
        "/v2/hello/blobs/..%2F..%2Fetc%2Fpasswd": (404, "UNSUPPORTED"),
    }
    for path, (expected_status, code) in cases.items():
        status, headers, body = fetch(daemon, path)
        assert (status, error_of(body)["code"]) == (expected_status, code), path
        assert headers["Content-Type"] == "application/json"


def test_pulls_are_the_only_operation(daemon: Daemon) -> None:
    request = urllib.request.Request(
        f"{daemon.url}/v2/hello/blobs/uploads/", method="POST", data=b""
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code in (404, 405)
    assert error_of(raised.value.read())["code"] == "UNSUPPORTED"
