"""The access log's cost on cached answers: none, twisted.web's writer, nixeryd's.

Three daemons on one storage serve the same manifest by digest (an answer
written from memory by the HTTP channel, :mod:`nixeryd.site`) to ``wrk``,
taking turns, moments apart:

* ``off``: no access log, the reference;
* ``twisted``: the writer nixeryd had before, twisted.web's own
  (``HTTPFactory.log``: ``combinedLogFormatter`` into ``twisted.python.log``'s
  file object, through the log system to standard output), fed what the
  channel fed it then;
* ``nixeryd``: :mod:`nixeryd.accesslog`, in the text and the JSON format.

Each daemon writes its log to a file, as under systemd it goes to the
journal. The access log's cost per request is ``1/rate - 1/rate(off)``;
the benchmark prints it for each writer and the ratio of old to new.

Run it as ``benchmarks/accesslog`` (see benchmarks/README.md); ``--seconds 1
--repeats 1`` is the smoke test's few-second version.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.harness import NIX_ENV, Server, daemon, working_directory

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCKER_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
#: The daemons measured: name -> (writer, log format).
WRITERS = {
    "off": ("off", "text"),
    "twisted": ("twisted", "text"),
    "nixeryd": ("nixeryd", "text"),
    "nixeryd, json": ("nixeryd", "json"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per daemon (median)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--requests", type=int, default=100_000, help="lines per writer alone")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--serve", choices=sorted({w for w, _ in WRITERS.values()}),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    with working_directory(args.workdir, "nixeryd-accesslog-") as workdir:
        results = measure(workdir, args)
        results["alone"] = writers_alone(workdir / "alone.log", args.requests)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


def measure(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0))
    print(f"# nixeryd access log benchmark, {cores} cores, in {workdir}")
    print(f"# load: {os.getloadavg()[0]:.2f} (a shared machine: absolute rates are noise)")
    storage = workdir / "storage"
    with contextlib.ExitStack() as stack:
        daemons = {
            name: stack.enter_context(
                nixeryd(workdir / f"{writer}-{fmt}.log", storage, writer, fmt)
            )
            for name, (writer, fmt) in WRITERS.items()
        }
        path = cached_manifest(next(iter(daemons.values())))
        for server in daemons.values():
            # Routed once, then remembered: every GET after it is the channel's.
            request(server, path)
        runs: dict[str, list[float]] = {name: [] for name in daemons}
        for _ in range(args.repeats):
            for name, server in daemons.items():
                runs[name].append(wrk(server.url + path, args.connections, args.seconds))
        lines = {name: access_lines(server, path) for name, server in daemons.items()}
    rates = {name: statistics.median(values) for name, values in runs.items()}
    off = rates["off"]
    cost = {name: (1 / rate - 1 / off) * 1e6 for name, rate in rates.items()}
    print(
        f"\n## Cached manifest GETs (by digest, answered from memory), wrk -t1 -c{args.connections}"
    )
    print(f"{args.seconds} s per run; each figure the median of {args.repeats} runs, the daemons")
    print("taking turns; log written to a file.\n")
    print("| access log | req/s | x off | access log us/request | lines written |")
    print("|---|---:|---:|---:|---:|")
    for name, rate in rates.items():
        shown = "-" if name == "off" else f"{cost[name]:.1f}"
        print(f"| {name} | {rate:.0f} | {rate / off:.2f}x | {shown} | {lines[name]} |")
    old, new = cost["twisted"], cost["nixeryd"]
    print(
        f"\nThe access log's cost per cached answer: {old:.1f} us with twisted.web's writer, "
        f"{new:.1f} us with nixeryd's (text): {old / new:.1f}x cheaper "
        f"(JSON: {cost['nixeryd, json']:.1f} us)."
    )
    return {"cores": cores, "rps": rates, "runs": runs, "cost_us": cost, "lines": lines}


def writers_alone(log: Path, requests: int) -> dict[str, float]:
    """Microseconds of CPU per line of each writer alone, in this process, into ``log``
    through the log system as the daemon's: nixeryd's with one line per reactor turn
    (each line its own write, as under light load) and 64 (under load)."""
    from twisted.internet.task import Clock
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from nixeryd.accesslog import AccessLog
    from nixeryd.logs import start_logging

    fields: dict[str, Any] = {
        "remote": "10.0.0.7",
        "method": b"GET",
        "target": b"/v2/hello/manifests/sha256:" + b"0" * 64,
        "protocol": b"HTTP/1.1",
        "status": 200,
        "sent": 1203,
        "seconds": 0.000041,
        "user_agent": b"docker/27.3.1 go/go1.22.7 git-commit/41ca978 os/linux arch/amd64",
        "referer": None,
        "user": None,
    }
    with log.open("w") as stream:
        start_logging("text", stream=stream)
        site = Site(Resource())
        site.startFactory()  # twisted.web's writer: the log system's file, the date
        clock = Clock()  # its advance(0) is the end of a reactor turn
        writers: dict[str, tuple[Any, int]] = {"twisted": (TwistedWriter(site), requests)}
        for turn in (1, 64):
            for fmt in ("text", "json"):
                writers[f"nixeryd, {fmt}, {turn}/turn"] = (AccessLog(stream, fmt, clock), turn)
        costs = {}
        for name, (writer, turn) in writers.items():
            started = time.process_time()
            for done in range(1, requests + 1):
                writer.request(**fields)
                if done % turn == 0:
                    clock.advance(0)
            costs[name] = (time.process_time() - started) / requests * 1e6
        site.stopFactory()
    print(f"\n## Each writer alone: CPU us per line, {requests} lines into a file\n")
    print("| writer | us/line | x twisted.web's |")
    print("|---|---:|---:|")
    for name, cost in costs.items():
        print(f"| {name} | {cost:.2f} | {cost / costs['twisted']:.2f}x |")
    return costs


def cached_manifest(server: Server) -> str:
    """Build the test package set's ``hello`` and give the path of its manifest by digest."""
    url = server.url + "/v2/hello/manifests/latest"
    headers = {"Accept": DOCKER_ACCEPT}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=600) as got:
        return f"/v2/hello/manifests/{got.headers['Docker-Content-Digest']}"


def request(server: Server, path: str) -> None:
    headers = {"Accept": DOCKER_ACCEPT}
    with urllib.request.urlopen(
        urllib.request.Request(server.url + path, headers=headers), timeout=60
    ) as response:
        response.read()


def access_lines(server: Server, path: str) -> int:
    """Access log lines of ``path``: that every writer wrote a line per request."""
    with server.log.open(errors="replace") as log:
        return sum(path in line for line in log)


@contextlib.contextmanager
def nixeryd(log: Path, storage: Path, writer: str, log_format: str) -> Iterator[Server]:
    """A daemon over the test package set with ``writer``'s access log."""
    environment = {
        **NIX_ENV,
        "STORAGE_PATH": str(storage),
        "NIXERY_PKGS_PATH": str(ROOT / "tests" / "pkgs"),
        "NIXERYD_LOG_FORMAT": log_format,
        "PYTHONPATH": str(ROOT),
    }
    argv = [sys.executable, "-m", "benchmarks.accesslog", "--serve", writer]
    with daemon(log, environment, argv) as server:
        yield server


def serve(writer: str) -> None:
    """``nixeryd serve`` from the environment, with ``writer``'s access log."""
    from twisted.internet import reactor

    from nixeryd.config import load_config
    from nixeryd.logs import start_logging
    from nixeryd.service import make_service
    from nixeryd.site import RegistrySite

    config = load_config({"access_log": str(writer != "off")}, os.environ)
    start_logging(config.log_format, level=config.log_level)
    service = make_service(config, reactor)
    if writer == "twisted":
        for child in service:
            site = getattr(child, "factory", None)
            if isinstance(site, RegistrySite):
                site.access_log = TwistedWriter(site)  # type: ignore[assignment]
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[arg-type]
    reactor.run()  # type: ignore[attr-defined]


class TwistedWriter:
    """twisted.web's access log writer, fed as nixeryd's channel fed it before
    :mod:`nixeryd.accesslog`: an object with the fields the formatter reads."""

    def __init__(self, site: Any) -> None:
        self._site = site

    def request(self, **fields: Any) -> None:
        from twisted.web.http import HTTPFactory

        HTTPFactory.log(self._site, _Answered(**fields))

    def flush(self) -> None:
        """Nothing pending: each line went through the log system at once."""


class _Answered:
    """What twisted.web's combined log formatter reads of a request."""

    def __init__(self, **fields: Any) -> None:
        from twisted.internet.address import IPv4Address

        # What the channel's getPeer() gave: a new address, as Twisted makes per call.
        self._address = IPv4Address("TCP", fields["remote"], 0)
        self.code = fields["status"]
        self.method = fields["method"]
        self.uri = fields["target"]
        self.clientproto = fields["protocol"]
        self.sentLength = fields["sent"]
        self._headers = {b"user-agent": fields["user_agent"], b"referer": fields["referer"]}

    def getHeader(self, name: bytes) -> bytes | None:
        return self._headers.get(name.lower())

    def getClientAddress(self) -> Any:
        return self._address


def wrk(url: str, connections: int, seconds: int) -> float:
    """Requests/s of ``connections`` keep-alive clients on one wrk thread."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-H", f"Accept: {DOCKER_ACCEPT}"]
    output = subprocess.run(
        [*argv, url], check=True, capture_output=True, text=True, timeout=seconds + 60
    ).stdout
    if "Non-2xx" in output:
        raise SystemExit(f"wrk got errors from {url}:\n{output}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if match is None:
        raise SystemExit(f"unexpected wrk output:\n{output}")
    return float(match.group(1))


if __name__ == "__main__":
    main()
