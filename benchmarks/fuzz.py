"""Seeded HTTP fuzzing of a real ``nixeryd serve`` over loopback, with its figures.

A registry on an untrusted network gets every malformed request there is.
This sends ``--count`` requests generated from ``--seed`` (odd path segments
and encodings, ``..``, ``//``, ``%2f``, invalid UTF-8, long names, bad digests,
every method, Range and Accept variants, huge and many headers, bodies,
chunked bodies, HTTP/1.0, pipelining, requests cut off mid-way) to a daemon
on the test package set (``tests/pkgs``) with filesystem storage, and counts
what must never happen:

* ``5xx``: answers with a 5xx status (a client's mistake is a 4xx);
* ``tracebacks``: "Traceback" lines in the daemon's log;
* ``outside_storage``: answers whose body holds the token of a canary file
  planted next to (not inside) the storage directory, so any read outside
  storage, through ``..`` or otherwise, shows up;
* ``hangs``: requests that got no answer within ``--timeout`` seconds.

``benchmarks/fuzz`` runs it (10,000 requests by default); the end-to-end
test ``tests/e2e/test_fuzz.py`` runs a smaller count and asserts the zeros.
The package set is tiny and the image names come from a small pool, so the
builds the fuzzer starts are few and quick; ``slow`` is never asked for.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import os
import random
import secrets
import socket
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from benchmarks.harness import daemon, working_directory

ROOT = Path(__file__).resolve().parents[1]
TEST_PACKAGES = ROOT / "tests" / "pkgs"

#: Image names that build quickly from the test package set (never ``slow``), names that
#: fail to build or evaluate, and names that are not packages at all.
IMAGES = [
    "hello",
    "shell",
    "shell/hello",
    "busybox",
    "libgreet",
    "tools.greeter",
    "haskellpackages.greeter",
    "helloWorld",
    "9lives",
    "big",
    "hello/libgreet",
    "arm64/hello",
    "brokenBuild",
    "evalError",
    "notAPackage",
    "nosuchpackage",
]
METHODS = ["GET", "GET", "GET", "HEAD", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
ODD_METHODS = ["TRACE", "CONNECT", "get", "FOO", "G\x00T", "PROPFIND", ""]
ODD_SEGMENTS = [
    "",
    ".",
    "..",
    "%2e%2e",
    "%2E%2E",
    "..%2f..",
    "%2f",
    "%2F%2F",
    "%ff",
    "%c0%af",
    "%00",
    "%",
    "%zz",
    "\u00e9",
    "%e2%82%ac",
    "a" * 300,
    "b" * 5000,
    "UPPER",
    "a..b",
    "-x",
    "x_",
    "@",
    ";x",
    "\\",
    "~",
]
ACCEPTS = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "*/*",
    "",
    "text/html;q=0.9, */*;q=0.1",
    "application/json;q=abc",
    ",,,;;;",
    "x" * 10000,
]
HUGE_DIGITS = "9" * 5000


@dataclass
class Targets:
    """Real digests, learnt from the daemon before fuzzing, so blob and manifest requests
    reach the code that serves bytes."""

    blobs: list[str]
    manifests: list[str]


@dataclass
class Case:
    """One connection's worth of fuzzing: what is sent, in which pieces, and which
    methods' answers to read back (none for a request cut off on purpose)."""

    kind: str
    pieces: list[bytes]
    methods: list[str]
    #: The request target of each answer read, in the order of ``methods``.
    paths: list[str] = field(default_factory=list)


@dataclass
class Figures:
    requests: int = 0
    answers: Counter[int] = field(default_factory=Counter)
    fivexx: int = 0
    hangs: int = 0
    dropped: int = 0
    outside_storage: int = 0
    #: (method, target, SHA-256 of the body) of each 200 to a target with ``..`` in it.
    dotdot_200: list[tuple[str, str, str]] = field(default_factory=list)
    #: Those answers by why they were legitimate (:func:`classify_dotdot`).
    dotdot_why: Counter[str] = field(default_factory=Counter)
    tracebacks: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, other: Figures) -> None:
        """Count ``other``'s figures in too (one connection's, from a worker thread)."""
        self.requests += other.requests
        self.answers.update(other.answers)
        self.fivexx += other.fivexx
        self.hangs += other.hangs
        self.dropped += other.dropped
        self.outside_storage += other.outside_storage
        self.dotdot_200.extend(other.dotdot_200)
        for what, examples in other.examples.items():
            for example in examples:
                self.examples.setdefault(what, [])
                if len(self.examples[what]) < 5:
                    self.examples[what].append(example)

    def note(self, what: str, case: Case) -> None:
        self.examples.setdefault(what, [])
        if len(self.examples[what]) < 5:
            self.examples[what].append(repr(b"".join(case.pieces)[:300]))


def _climbs(path: str) -> bool:
    """Whether a request target holds ``..`` (or an encoded dot), anywhere in it."""
    return ".." in path or "%2e" in path.lower()


def _path(rng: random.Random, targets: Targets) -> str:
    """A request target; some try to climb out with ``..``."""
    image = rng.choice(IMAGES)
    kind = rng.random()
    if kind < 0.3:
        path = f"/v2/{image}/manifests/{rng.choice(['latest', 'latest', 'v1', *targets.manifests])}"
    elif kind < 0.55:
        digest = rng.choice(
            [
                *targets.blobs,
                "sha256:" + "0" * 64,
                "sha256:" + "A" * 64,
                "sha256:abc",
                "sha512:" + "0" * 128,
                "md5:x",
                "sha256:" + "0" * 64 + "/../../canary",
                "../../../canary",
                "",
            ]
        )
        path = f"/v2/{image}/blobs/{digest}"
    elif kind < 0.62:
        path = f"/v2/{image}/tags/list" + rng.choice(["", "?n=1", "?n=-1", "?n=" + HUGE_DIGITS])
    elif kind < 0.67:
        path = f"/v2/{image}/referrers/{rng.choice([*targets.manifests, 'sha256:x'])}"
    elif kind < 0.75:
        path = rng.choice(
            [
                "/",
                "/v2",
                "/v2/",
                "/v2/_catalog",
                "/errors/1/log",
                "/errors/" + HUGE_DIGITS + "/log",
                "/errors/-1/log",
                "/v2/hello/blobs/uploads/",
                "/../canary",
                "/v2/../../canary",
                "//",
                "/v2//",
            ]
        )
    else:
        path = f"/v2/{image}/manifests/latest"
    segments = path.split("/")
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        where = rng.randrange(1, len(segments) + 1)
        mutation = rng.random()
        if mutation < 0.5:
            segments.insert(where, rng.choice(ODD_SEGMENTS))
        elif mutation < 0.8 and where < len(segments):
            segments[where] = segments[where] + rng.choice(ODD_SEGMENTS)
        else:
            segments.insert(
                where, "/".join(rng.choice(["..", "%2e%2e", "..%2f"]) for _ in range(4))
            )
    path = "/".join(segments)
    if rng.random() < 0.05:
        path += rng.choice(["?", "?a=b&a=c", "?%ff=%ff", "#frag", "?" + "q" * 3000])
    return path


def _headers(rng: random.Random, method: str) -> tuple[list[str], bytes]:
    """Header lines and a body for one request."""
    headers = ["Host: 127.0.0.1"]
    body = b""
    for _ in range(rng.choice([0, 0, 1, 1, 2, 4])):
        choice = rng.random()
        if choice < 0.25:
            spec = rng.choice(
                [
                    "bytes=0-0",
                    "bytes=0-",
                    "bytes=-1",
                    "bytes=5-1",
                    "bytes=0-1,2-3",
                    "bytes=1-2, 5-",
                    "items=0-1",
                    f"bytes={HUGE_DIGITS}-",
                    f"bytes=-{HUGE_DIGITS}",
                    f"bytes=0-{HUGE_DIGITS}",
                    f"bytes={'1' * 4000}-{'2' * 4000}",
                    "bytes=999999999999-",
                    "bytes=-0",
                    "bytes=-",
                    "bytes=\u00e9",
                    "bytes=0x10-",
                    "",
                ]
            )
            headers.append(f"Range: {spec}")
            if rng.random() < 0.2:
                headers.append(rng.choice(['If-Range: "x"', "If-Range: " + HUGE_DIGITS]))
        elif choice < 0.5:
            headers.extend(f"Accept: {rng.choice(ACCEPTS)}" for _ in range(rng.choice([1, 1, 3])))
        elif choice < 0.58:
            headers.append("X-Huge: " + "h" * rng.choice([8_000, 20_000, 70_000, 200_000]))
        elif choice < 0.64:
            headers.extend(f"X-Many-{n}: v" for n in range(rng.choice([50, 120, 600])))
        elif choice < 0.7:
            headers.append(rng.choice(["Connection: close", "Connection: keep-alive"]))
        elif choice < 0.76:
            body = rng.randbytes(rng.choice([1, 100, 5000, 70_000]))
            headers.append(f"Content-Length: {len(body)}")
        elif choice < 0.8:
            headers.append(
                "Content-Length: "
                + rng.choice(["107374182400", "-1", "abc", "1, 2", HUGE_DIGITS, "0"])
            )
        elif choice < 0.85:
            headers.append("Transfer-Encoding: chunked")
            size = rng.choice([0, 10, 3000])
            chunk = rng.randbytes(size)
            body = (f"{size:x}\r\n".encode() + chunk + b"\r\n" if size else b"") + b"0\r\n\r\n"
            if rng.random() < 0.3:
                body = rng.choice([b"zz\r\n", b"ffffffffffffffffffff\r\n", b"5\r\nab"])
        elif choice < 0.88:
            headers.append("Expect: 100-continue")
        elif choice < 0.92:
            headers.append(
                rng.choice(
                    [
                        "X-Folded: a\r\n b",
                        "Bad Name: x",
                        ": empty",
                        "X-Nul: a\x00b",
                        "X-Latin: \u00ff\u00fe",
                        "Host: a\r\nHost: b",
                        "Authorization: Basic !!!",
                        "Upgrade: h2c",
                    ]
                )
            )
        else:
            headers.append(f"User-Agent: {rng.choice(['docker/24', 'x' * 500, ''])}")
    if method in ("POST", "PUT", "PATCH") and not body and rng.random() < 0.5:
        body = rng.randbytes(rng.choice([10, 4000]))
        headers.append(f"Content-Length: {len(body)}")
    return headers, body


def _request(rng: random.Random, targets: Targets) -> tuple[bytes, str, str]:
    method = rng.choice(METHODS) if rng.random() < 0.97 else rng.choice(ODD_METHODS)
    path = _path(rng, targets)
    version = rng.choice(["HTTP/1.1"] * 12 + ["HTTP/1.0", "HTTP/1.0", "HTTP/2.0", "HTTP/1.x", ""])
    headers, body = _headers(rng, method)
    line = f"{method} {path} {version}".rstrip()
    end = "\r\n" if rng.random() < 0.97 else "\n"
    head = end.join([line, *headers]) + end + end
    return head.encode("utf-8", "surrogateescape") + body, method, path


def generate(rng: random.Random, targets: Targets) -> Case:
    """One case: usually a single request, sometimes a pipeline, a request sent a byte at
    a time, or one cut off before it ends."""
    kind = rng.random()
    if kind < 0.08:
        requests = [_request(rng, targets) for _ in range(rng.randint(2, 5))]
        pieces = [b"".join(raw for raw, _, _ in requests)]
        return Case("pipeline", pieces, [m for _, m, _ in requests], [p for *_, p in requests])
    raw, method, path = _request(rng, targets)
    if kind < 0.12:
        cut = rng.randrange(0, max(1, len(raw)))
        return Case("cut", [raw[:cut]], [])
    if kind < 0.16:
        step = max(1, len(raw) // 8)
        return Case(
            "pieces", [raw[i : i + step] for i in range(0, len(raw), step)], [method], [path]
        )
    return Case("single", [raw], [method], [path])


class _Buffered:
    """The socket as http.client sees it: every response read from one buffer, which
    reading a response does not close, so that pipelined answers are read in turn."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file

    def makefile(self, *_: Any, **__: Any) -> _Buffered:
        return self

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def run_case(host: str, port: int, case: Case, timeout: float, canary: bytes) -> Figures:
    """Send one case and read its answers; the figures of what must not happen."""
    fig = Figures()
    with contextlib.suppress(OSError):
        _exchange(host, port, case, timeout, canary, fig)
    return fig


def _exchange(
    host: str, port: int, case: Case, timeout: float, canary: bytes, fig: Figures
) -> None:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            for piece in case.pieces:
                sock.sendall(piece)
        except OSError:
            pass  # the server refused early and closed: its answer is still readable
        if not case.methods:
            return
        file = sock.makefile("rb")
        for method, path in zip(case.methods, case.paths, strict=True):
            fig.requests += 1
            response = http.client.HTTPResponse(_Buffered(file), method=method)  # type: ignore[arg-type]
            try:
                response.begin()
                body = response.read()
            except TimeoutError:
                fig.hangs += 1
                fig.note("hang", case)
                return
            except (http.client.HTTPException, OSError, ValueError):
                fig.dropped += 1
                return
            fig.answers[response.status] += 1
            if response.status >= 500:
                fig.fivexx += 1
                fig.note(f"{response.status}", case)
            if canary in body:
                fig.outside_storage += 1
                fig.note("outside storage", case)
            if _climbs(path) and response.status == 200:
                fig.dotdot_200.append((method, path, hashlib.sha256(body).hexdigest()))
            if response.will_close:
                return


def learn_targets(port: int) -> Targets:
    """The digests of a built image's manifest, config and layers."""
    url = f"http://127.0.0.1:{port}/v2/hello/manifests/latest"
    request = urllib.request.Request(
        url, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        manifest = json.load(response)
        digest = response.headers["Docker-Content-Digest"]
    blobs = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    return Targets(blobs=blobs, manifests=[digest])


def classify_dotdot(port: int, method: str, target: str, digest: str) -> str:
    """Why a target with ``..`` in it was answered 200, asked of the daemon again; "not
    explained" when none of the legitimate reasons holds.

    Legitimate: the dots are in the query only; they are part of a name component
    (``a..b``: a package or tag name holding dots, nothing climbs); or the target,
    percent-decoded as twisted.web does and with its dot segments removed (RFC 3986),
    is a path of the registry's that answers the same bytes, so that ``..`` moved
    within the registry's own routes and never outside them.
    """
    path = target.partition("?")[0].partition("#")[0]
    if not _climbs(path):
        return "dots in the query only"
    decoded = "/".join(urllib.parse.unquote(segment) for segment in path.split("/"))
    components = decoded.split("/")
    if not any(component in (".", "..") for component in components):
        return "dots within a name component"
    normal: list[str] = []
    for component in components[1:]:
        if component == "..":
            if normal:
                normal.pop()
        elif component != ".":
            normal.append(component)
    normalised = "/" + "/".join(normal)
    quoted = urllib.parse.quote(normalised)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{quoted}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            same = hashlib.sha256(response.read()).hexdigest() == digest
    except (OSError, http.client.HTTPException):
        same = False
    if same:
        return f"the answer of {normalised.split('/', 3)[1] or '/'}/... with dot segments removed"
    return "not explained"


def fuzz(workdir: Path, count: int, seed: int, timeout: float, workers: int) -> Figures:
    """Start a daemon in ``workdir``, send ``count`` cases generated from ``seed``, stop it."""
    token = secrets.token_hex(16).encode()
    # Next to storage: reachable from it only by climbing out.
    (workdir / "canary").write_bytes(b"nixeryd fuzz canary " + token + b"\n")
    # ``nixeryd serve`` over the test package set, filesystem storage in ``workdir``.
    environment = {
        "NIX_CONFIG": os.environ.get("NIX_CONFIG", "substituters ="),
        "NIXERY_PKGS_PATH": str(TEST_PACKAGES),
        "NIXERY_STORAGE_BACKEND": "filesystem",
        "STORAGE_PATH": str(workdir / "storage"),
    }
    log_path = workdir / "nixeryd.log"
    figures = Figures()
    with daemon(log_path, environment) as server:
        targets = learn_targets(server.port)
        rng = random.Random(seed)
        cases = [generate(rng, targets) for _ in range(count)]
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for future in [
                pool.submit(run_case, "127.0.0.1", server.port, case, timeout, token)
                for case in cases
            ]:
                figures.add(future.result())
        figures.seconds = time.monotonic() - started
        for method, target, digest in figures.dotdot_200:
            why = classify_dotdot(server.port, method, target, digest)
            figures.dotdot_why[why] += 1
            figures.examples.setdefault(f"'..' answered 200: {why}", [])
            if len(figures.examples[f"'..' answered 200: {why}"]) < 5:
                figures.examples[f"'..' answered 200: {why}"].append(f"{method} {target}")
    log = log_path.read_text(errors="replace")
    figures.tracebacks = sum(1 for line in log.splitlines() if "Traceback" in line)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="connections (cases) to send")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument(
        "--timeout",
        type=float,
        default=15.0,
        help="seconds without an answer that count as a hang (default 15: longer than the "
        "server's 10 s deadline for a request to arrive whole, so a request cut short is "
        "answered 408 by then)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=32,
        help="connections at once (cases cut short wait out the server's deadline)",
    )
    parser.add_argument("--workdir", type=Path, help="keep the daemon's storage and log here")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with working_directory(args.workdir, "nixeryd-fuzz-") as workdir:
        figures = fuzz(workdir, args.count, args.seed, args.timeout, args.workers)
    summary = {
        "cases": args.count,
        "seed": args.seed,
        "requests": figures.requests,
        "5xx": figures.fivexx,
        "tracebacks": figures.tracebacks,
        "outside_storage": figures.outside_storage,
        "hangs": figures.hangs,
        "dropped": figures.dropped,
        "dotdot_200": len(figures.dotdot_200),
        "dotdot_200_why": dict(figures.dotdot_why),
        "dotdot_200_not_explained": figures.dotdot_why["not explained"],
        "seconds": round(figures.seconds, 1),
        "statuses": dict(sorted(figures.answers.items())),
        "examples": figures.examples,
    }
    for key in ("cases", "seed", "requests", "5xx", "tracebacks", "outside_storage", "hangs"):
        print(f"{key:16} {summary[key]}")
    print(f"{'dropped':16} {figures.dropped} (connections closed without an answer)")
    print(f"{'dotdot_200':16} {len(figures.dotdot_200)} ('..' in the path, answered 200)")
    for why, number in figures.dotdot_why.most_common():
        print(f"{'':16}   {number}: {why}")
    print(f"{'seconds':16} {summary['seconds']}")
    print(f"{'statuses':16} {summary['statuses']}")
    for what, examples in figures.examples.items():
        print(f"examples of {what}:")
        for example in examples:
            print("  " + example)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
