"""Nix work is bounded and never outlives what started it.

Nix starts each builder in a session of its own under a ``nixbld`` user: a
build nixeryd stops (its own deadline, NIX_TIMEOUT, or the daemon stopping)
must take the builder with it, or the builder finishes a build nobody waits
for and registers ``slow`` in the store. The processes are watched through the
daemon's descendants in ``/proc`` while the build runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nixeryd.process import descendants
from tests.e2e.conftest import Daemon
from tests.e2e.processes import Descendants, command_line, kill, runs
from tests.e2e.test_pull import error_of, fetch

pytestmark = pytest.mark.e2e


def _builders(daemon: Daemon) -> Descendants:
    """The ``sleep`` of the test package ``slow`` under ``daemon``, sampled until stopped."""
    return Descendants(daemon.process.pid, runs("sleep"))


def _pull_slow(daemon: Daemon) -> tuple[Descendants, Any]:
    builders = _builders(daemon)
    try:
        return builders, fetch(daemon, "/v2/slow/manifests/latest")
    except BaseException:
        builders.stop()
        raise


@pytest.mark.parametrize(
    ("limits", "said"),
    [
        ({"NIXERYD_BUILD_TIMEOUT": "3", "NIX_TIMEOUT": "60"}, "took longer than the build timeout"),
        ({"NIX_TIMEOUT": "2"}, "ran longer than NIX_TIMEOUT (2 s)"),
    ],
    ids=["build-timeout", "nix-timeout"],
)
def test_a_stopped_build_leaves_no_builder(
    tmp_path: Path, limits: dict[str, str], said: str
) -> None:
    daemon = Daemon(tmp_path / "bounded", **limits)
    try:
        builders, (status, _, body) = _pull_slow(daemon)
        left = builders.left_after()
        kill(left)
        assert status == 404
        assert said in error_of(body)["message"]
        assert builders.seen, "the build of slow never started its sleep"
        assert left == {}, f"the stopped build left builders running: {left}"
    finally:
        daemon.stop()


def test_stopping_the_daemon_kills_its_running_builds(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "stopping", NIX_TIMEOUT="60")
    builders = _builders(daemon)
    pull = threading.Thread(target=_pull_until_stopped, args=(daemon,))
    pull.start()
    try:
        builders.wait_for("sleep")
        daemon.process.send_signal(signal.SIGTERM)
        daemon.process.wait(timeout=30)
    finally:
        left = builders.left_after()
        daemon.stop()
        pull.join()
        kill(left)
    assert left == {}, f"the stopped daemon left builders running: {left}"


def _pull_until_stopped(daemon: Daemon) -> None:
    with contextlib.suppress(OSError):  # the daemon stops mid-answer, on purpose
        fetch(daemon, "/v2/slow/manifests/latest")


def test_a_nix_store_killed_from_outside_leaves_no_builder_and_says_so(tmp_path: Path) -> None:
    # The out-of-memory killer or an operator's kill -9: nix-store dies at once, and its
    # builder (in a session of its own) is orphaned before anything can look for it.
    daemon = Daemon(tmp_path / "killed", NIX_TIMEOUT="60")
    builders = _builders(daemon)
    answers: list[Any] = []
    pull = threading.Thread(
        target=lambda: answers.append(fetch(daemon, "/v2/slow/manifests/latest"))
    )
    pull.start()
    try:
        builders.wait_for("sleep")
        realise = [
            pid
            for pid in descendants(daemon.process.pid)
            if "nix-store --realise" in command_line(pid)
        ]
        assert len(realise) == 1, realise
        os.kill(realise[0], signal.SIGKILL)
        pull.join(timeout=60)
        deadline = time.monotonic() + 5
        while builders.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        left = builders.left_after()
        kill(left)
        pull.join()
        daemon.stop()
    assert left == {}, f"the killed nix-store left builders running: {left}"
    status, _, body = answers[0]
    assert status == 404
    message = error_of(body)["message"]
    assert "nix-store was killed by SIGKILL" in message, message
    assert "killed and reaped process" in daemon.log()
