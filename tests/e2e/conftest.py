"""End-to-end fixtures: real ``nixeryd serve`` processes over the test package set.

Every end-to-end test runs once per Nix installation found (``tests/nixinstalls.py``):
Debian's Nix 2.8 and a current one. The client matrix and the browser tests run on the
newest alone: what they check is the registry's answers and pages, which do not depend on
the Nix that built the image.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.nixinstalls import NixInstallation, installations

ROOT = Path(__file__).resolve().parents[2]
TEST_PACKAGES = ROOT / "tests" / "pkgs"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    found = installations()
    if not found:
        return  # the tests that need Nix say so themselves
    if any(
        metafunc.definition.get_closest_marker(marker) is not None
        for marker in ("clients", "browser")
    ):
        found = found[-1:]
    metafunc.parametrize(
        "nix_installation",
        found,
        ids=[installation.label for installation in found],
        indirect=True,
        scope="session",
    )


@pytest.fixture(scope="session", autouse=True)
def nix_installation(request: pytest.FixtureRequest) -> Iterator[NixInstallation | None]:
    """The Nix this test runs on: first on PATH for the test and the daemons it starts."""
    installation: NixInstallation | None = getattr(request, "param", None)
    if installation is None:
        yield None
        return
    saved = os.environ["PATH"]
    os.environ["PATH"] = installation.env()["PATH"]
    try:
        yield installation
    finally:
        os.environ["PATH"] = saved


def nix_env(**extra: str) -> dict[str, str]:
    """The environment for Nix here: no binary cache to wait for (there is no internet)."""
    return {**os.environ, "NIX_CONFIG": "substituters =", **extra}


def run_benchmark(module: str, tmp_path: Path, *arguments: str) -> tuple[str, Any]:
    """Run ``benchmarks.<module>`` as its launcher does (a module, from the root) with a work
    directory and a JSON report under ``tmp_path``: what it printed and the report. It must
    succeed; its output is the failure's message otherwise."""
    report = tmp_path / "report.json"
    files = ["--workdir", str(tmp_path / "work"), "--json", str(report)]
    completed = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *arguments, *files],
        env=nix_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout, json.loads(report.read_text())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Daemon:
    """A ``nixeryd serve`` child process on a free port, with its log in a file."""

    def __init__(self, workdir: Path, **environment: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.log_path = workdir / "nixeryd.log"
        defaults = {
            "PORT": str(self.port),
            "NIXERY_PKGS_PATH": str(TEST_PACKAGES),
            "NIXERY_STORAGE_BACKEND": "filesystem",
            "STORAGE_PATH": str(workdir / "storage"),
        }
        env = nix_env(**{**defaults, **environment})
        #: What the daemon was started with, for tests that need its settings.
        self.environment = env
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nixeryd", "serve"], env=env, stdout=log, stderr=log
            )
        self._wait_until_serving()

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nixeryd exited early:\n{self.log()}")
            try:
                urllib.request.urlopen(self.url + "/v2/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"nixeryd did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, nix_installation: NixInstallation | None
) -> Iterator[Daemon]:
    """One daemon for the session over the test package set; Nix's store makes later
    builds of the same packages cheap."""
    instance = Daemon(tmp_path_factory.mktemp("daemon"))
    yield instance
    instance.stop()


@pytest.fixture
def fresh_daemon(tmp_path: Path, nix_installation: NixInstallation | None) -> Iterator[Daemon]:
    """A daemon with its own empty storage."""
    instance = Daemon(tmp_path / "fresh")
    yield instance
    instance.stop()


def require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"end-to-end tests need {', '.join(missing)}: run scripts/setup")
