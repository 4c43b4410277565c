"""What the benchmark scripts share: the commands they run and the servers they start.

Every benchmark (``speed``, ``storage``, ``accesslog``, ``fuzz``) starts a
``nixeryd serve``, and some a reference server beside it, as child processes on
loopback; waits until each answers; measures; and stops them however the
measurement ended, so that no daemon outlives its run on a shared machine.
They run command-line tools (``wrk``, ``nix-build``, ``skopeo``) whose output
they read, and report medians of repeated runs. This module holds that once.

The scripts import it, so they run as modules from the repository's root
(``python -m benchmarks.speed``), as their launchers do; the root on the path
is also what makes ``python -m nixeryd`` the checkout's nixeryd.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

#: The environment for Nix: no binary cache to wait for (the benchmark machines are often
#: offline) and none to take store paths from, so every build is of what the run defines.
NIX_ENV = {**os.environ, "NIX_CONFIG": "substituters ="}

#: ``nixeryd serve`` of the nixeryd this interpreter imports: the checkout's, from its root.
NIXERYD_SERVE = (sys.executable, "-m", "nixeryd", "serve")


def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """The standard output of ``argv``, run to its end.

    A command that fails ends the benchmark, with the end of its standard error: a figure
    measured on a failed command would mislead, and the error is what says why.
    """
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed:\n{result.stderr[-3000:]}")
    return result.stdout


def free_port() -> int:
    """A loopback port that is free now.

    The servers are told their port (a variable, a config file) rather than picking one,
    so that it is known before they start; another process may take it meanwhile, which
    on loopback in a few milliseconds is rare enough.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each measure's median over ``runs``: a run slowed by load elsewhere on a shared
    machine does not move it, as it would a mean."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop ``process`` as systemd stops a daemon: SIGTERM, so that it shuts down cleanly
    (its log complete), then SIGKILL after 15 s, so that a hung one cannot hang the run."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def proc_status_kb(field: str, pid: int | str = "self") -> int:
    """A field in kB of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``): the kernel's own count
    of a process's memory, its peak included, which no sampling from outside would catch."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(field)


class Server:
    """A server running as a child process: where it answers and where it logs."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"
        self.log = log

    def wait(self, path: str) -> None:
        """Return once a GET of ``path`` succeeds, polling for a minute at most: a server
        listens a moment after its process starts, and measuring before would count errors.

        A server that exits or never answers ends the benchmark with the end of its log,
        which is where it says why.
        """
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited early:\n{self._log_tail()}")
            try:
                urllib.request.urlopen(self.url + path, timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"server did not start:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def events(self) -> Iterator[dict[str, Any]]:
        """The lines of a JSON log (``NIXERYD_LOG_FORMAT=json``) as objects: what nixeryd
        reports of its own work, such as a build's timings, without parsing prose."""
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                yield json.loads(line)

    def rss_kb(self) -> int:
        """The server's resident memory now, in kB."""
        return proc_status_kb("VmRSS", self.process.pid)

    def peak_rss_kb(self) -> int:
        """The server's peak resident memory since it started (VmHWM), in kB."""
        return proc_status_kb("VmHWM", self.process.pid)

    def stop(self) -> None:
        stop(self.process)


@contextlib.contextmanager
def serving(
    argv: Sequence[str], port: int, log: Path, env: Mapping[str, str] | None = None
) -> Iterator[Server]:
    """``argv``, a server told to listen on ``port``, with its output in ``log``; yielded
    once it answers ``/v2/`` (every server here is a registry) and stopped on the way out,
    whatever happened inside."""
    with log.open("wb") as file:
        process = subprocess.Popen(argv, env=env, stdout=file, stderr=file)
    server = Server(process, port, log)
    try:
        server.wait("/v2/")
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def daemon(
    log: Path, environment: Mapping[str, str], argv: Sequence[str] = NIXERYD_SERVE
) -> Iterator[Server]:
    """``nixeryd serve`` (or ``argv``, a script that serves as it does) on a free port,
    configured as a site would be, by its environment: this process's, with
    ``environment`` and ``PORT`` on top."""
    port = free_port()
    env = {**os.environ, **environment, "PORT": str(port)}
    with serving(argv, port, log, env) as server:
        yield server


@contextlib.contextmanager
def working_directory(chosen: Path | None, prefix: str) -> Iterator[Path]:
    """Where a run writes its files: ``chosen`` (``--workdir``), created if need be and
    kept, so that a run's logs and storage can be looked at afterwards; else a temporary
    directory, removed at the end, so that runs leave nothing behind."""
    if chosen:
        path = chosen.resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as temporary:
            yield Path(temporary)
