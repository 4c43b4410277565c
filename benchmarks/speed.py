"""nixeryd's speed, measured side by side with reference tools in the same run.

Absolute times on shared machines are noise; the ratios between nixeryd and
the references run moments apart on the same data are what this reports:

* layer pipeline: nixeryd's cold build of a large image (its layer-write
  step, from its own log) versus GNU ``tar -c | pigz | sha256sum`` and
  ``tar -c | gzip -6 | sha256sum`` over the same store paths;
* cold-build breakdown: evaluation, realisation, closure query, layering,
  layer writes, manifest;
* serving: cached manifest GET and HEAD by tag, manifest GET by digest, small
  and large blob GET under concurrency (wrk), nixeryd versus Debian's
  ``docker-registry`` (distribution 2.8) serving the same image, copied into
  it with skopeo;
* peak daemon memory (VmHWM) while serving 100 concurrent 200 MB downloads.

Run it as ``benchmarks/speed`` (see benchmarks/README.md); ``--scale tiny``
is the smoke test's few-second version.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    NIX_ENV,
    Server,
    daemon,
    free_port,
    medians,
    run,
    serving,
    working_directory,
)

HERE = Path(__file__).resolve().parent
DOCKER_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"


@dataclass(frozen=True)
class Scale:
    packages: int
    binaries: int
    text_bytes: int
    small_files: int
    repeats: int
    wrk_seconds: int
    memory_blob_mb: int
    memory_clients: int


SCALES = {
    # About 400 MB in 41 store paths: 40 packages of 3 x 2 MB ELF, 4 MB text, 60 small files.
    "full": Scale(40, 3, 4_000_000, 60, 3, 5, 200, 100),
    # The smoke test: a few MB, one repetition, one-second load runs.
    "tiny": Scale(3, 1, 200_000, 5, 1, 1, 8, 10),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=SCALES, default="full")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    parser.add_argument("--skip", action="append", default=[], help="pipeline, serving, memory")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    scale = SCALES[args.scale]
    cores = len(os.sched_getaffinity(0))
    with working_directory(args.workdir, "nixeryd-speed-") as workdir:
        bench = Bench(workdir, scale, cores)
        results: dict[str, Any] = {"scale": args.scale, "cores": cores}
        print(f"# nixeryd speed benchmark, scale {args.scale}, {cores} cores, in {workdir}")
        print(f"# load: {os.getloadavg()[0]:.2f} (a shared machine: absolute times are noise)")
        bench.build_package_set()
        if "pipeline" not in args.skip:
            results["pipeline"] = bench.pipeline()
        if "serving" not in args.skip:
            results["serving"] = bench.serving()
        if "memory" not in args.skip:
            results["memory"] = bench.memory()
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


class Bench:
    def __init__(self, workdir: Path, scale: Scale, cores: int) -> None:
        self.workdir = workdir
        self.scale = scale
        self.cores = cores
        self.pkgs = workdir / "pkgs"

    # The package set

    def build_package_set(self) -> None:
        """Write the package set (a git repository too, for the pinned source) and build it."""
        self.pkgs.mkdir(exist_ok=True)
        text = (HERE / "pkgset.nix.in").read_text()
        for key, value in {
            "PACKAGES": self.scale.packages,
            "BINARIES": self.scale.binaries,
            "TEXT_BYTES": self.scale.text_bytes,
            "SMALL_FILES": self.scale.small_files,
        }.items():
            text = text.replace(f"@{key}@", str(value))
        (self.pkgs / "default.nix").write_text(text)
        git = ["git", "-C", str(self.pkgs), "-c", "user.name=bench", "-c", "user.email=b@b"]
        if not (self.pkgs / ".git").exists():
            run([*git, "init", "-q"])
        run([*git, "add", "default.nix"])
        run([*git, "commit", "-q", "--allow-empty", "-m", "package set"])
        self.commit = run([*git, "rev-parse", "HEAD"]).strip()
        started = time.monotonic()
        out = run(
            ["nix-build", "--no-out-link", "-j", str(self.cores), str(self.pkgs), "-A", "all"],
            env=NIX_ENV,
        ).split()[-1]
        self.closure = run(["nix-store", "-qR", out], env=NIX_ENV).split()
        path_info = ["nix", "--extra-experimental-features", "nix-command", "path-info"]
        info = json.loads(run([*path_info, "--json", *self.closure], env=NIX_ENV))
        entries = info.values() if isinstance(info, dict) else info
        # A fresh build leaves hundreds of MB of dirty pages; nixeryd's fsyncs would wait
        # for their write-back while the references (which write nothing) would not.
        os.sync()
        self.input_bytes = sum(entry["narSize"] for entry in entries)
        print(
            f"# package set: {len(self.closure)} store paths, {self.input_bytes / 1e6:.0f} MB"
            f" (NAR), built in {time.monotonic() - started:.0f} s (cached after the first run)"
        )

    # Layer pipeline

    def pipeline(self) -> dict[str, Any]:
        mb = self.input_bytes / 1e6
        results: dict[str, Any] = {"input_mb": mb}
        builds = [self.cold_build(f"pipeline-{n}") for n in range(self.scale.repeats)]
        ours = _median_build(builds)
        results["nixeryd"] = ours
        references: dict[str, dict[str, float]] = {}
        tar = "tar -cf - -C / --sort=name " + " ".join(p.lstrip("/") for p in self.closure)
        commands = {
            f"tar | pigz -p{self.cores} -1 | sha256sum": f"pigz -p{self.cores} -1",
            f"tar | pigz -p{self.cores} -6 | sha256sum": f"pigz -p{self.cores} -6",
            "tar | gzip -6 | sha256sum": "gzip -6",
        }
        for name, compressor in commands.items():
            repeats = 1 if compressor == "gzip -6" else self.scale.repeats
            runs = [self.reference(tar, compressor) for _ in range(repeats)]
            references[name] = {
                "seconds": statistics.median(seconds for seconds, _ in runs),
                "bytes": runs[0][1],
            }
        results["references"] = references
        for compressor in ("zstd", "zlib"):
            results[f"nixeryd-{compressor}"] = self.cold_build(
                f"pipeline-{compressor}", NIXERYD_LAYER_COMPRESSOR=compressor
            )
        gzip6 = references["tar | gzip -6 | sha256sum"]["bytes"]
        pigz1 = references[f"tar | pigz -p{self.cores} -1 | sha256sum"]["seconds"]

        print("\n## Layer pipeline")
        print(f"{mb:.0f} MB in {len(self.closure)} store paths; median of {self.scale.repeats}")
        print("(gzip -6 once). nixeryd's time is its layer-write step: tar, both digests,")
        print("compression and fsync'ed storage of every layer.\n")
        print("| pipeline | MB/s of input | x pigz -1 | size vs gzip -6 |")
        print("|---|---:|---:|---:|")
        rows = [
            (f"nixeryd, {ours['compression']} (default)", ours["layers"], ours["bytes"]),
            *[
                (f"nixeryd, {results[k]['compression']}", results[k]["layers"], results[k]["bytes"])
                for k in ("nixeryd-zstd", "nixeryd-zlib")
            ],
            *[
                (f"`{name}`".replace("|", "\\|"), ref["seconds"], ref["bytes"])
                for name, ref in references.items()
            ],
        ]
        for name, seconds, size in rows:
            print(f"| {name} | {mb / seconds:.0f} | {pigz1 / seconds:.2f}x | {size / gzip6:.3f}x |")

        print("\n## Cold build breakdown (nixeryd, default compressor, median build)\n")
        print("| step | seconds |")
        print("|---|---:|")
        for step in ("evaluation", "realise", "closure", "layering", "layers", "manifest"):
            print(f"| {step} | {ours[step]:.2f} |")
        print(f"| total (client's view of the cold GET) | {ours['total']:.2f} |")
        print(
            "\n(evaluation is the cold GET's time less the other steps: source resolution,"
            "\nNix evaluation and request handling; realise finds everything built already.)"
        )
        return results

    def cold_build(self, name: str, **environment: str) -> dict[str, Any]:
        """A fresh daemon with empty storage builds the image ``all``; its log has the steps."""
        storage = self.workdir / name
        shutil.rmtree(storage, ignore_errors=True)
        with nixeryd(self.workdir / f"{name}.log", storage, self.pkgs, **environment) as server:
            started = time.monotonic()
            manifest = json.loads(http_get(f"{server.url}/v2/all/manifests/latest"))
            total = time.monotonic() - started
        steps: dict[str, Any] = {"total": total}
        for event in server.events():
            if "timings" in event:
                for part in event["timings"].split(", "):
                    step, seconds = part.split()
                    steps[step] = float(seconds.rstrip("s"))
            if "compression" in event and "budget" in event:
                steps["compression"] = event["compression"]
        measured = ("realise", "closure", "layering", "layers", "manifest")
        steps["evaluation"] = total - sum(steps.get(step, 0.0) for step in measured)
        steps["bytes"] = sum(layer["size"] for layer in manifest["layers"])
        steps["layer_count"] = len(manifest["layers"])
        shutil.rmtree(storage, ignore_errors=True)
        return steps

    def reference(self, tar: str, compressor: str) -> tuple[float, int]:
        """Seconds for ``tar | compressor | sha256sum`` and the compressed size (by a tee
        to ``wc -c``, which costs little next to compression)."""
        size_file = self.workdir / "reference-size"
        command = (
            f"set -o pipefail; {tar} | {compressor} | tee >(wc -c > {size_file}) "
            "| sha256sum > /dev/null"
        )
        started = time.monotonic()
        subprocess.run(["bash", "-c", command], check=True)
        seconds = time.monotonic() - started
        for _ in range(50):  # the process substitution may finish just after the pipeline
            text = size_file.read_text().strip() if size_file.exists() else ""
            if text:
                break
            time.sleep(0.05)
        size_file.unlink()
        return seconds, int(text)

    # Serving

    def serving(self) -> dict[str, Any]:
        storage = self.workdir / "serving"
        shutil.rmtree(storage, ignore_errors=True)
        registry_dir = self.workdir / "docker-registry"
        shutil.rmtree(registry_dir, ignore_errors=True)
        results: dict[str, Any] = {}
        with (
            nixeryd(
                self.workdir / "serving.log",
                storage,
                None,
                NIXERY_PKGS_REPO=f"file://{self.pkgs}",
            ) as ours,
            docker_registry(registry_dir) as theirs,
        ):
            tag_path = f"/v2/all/manifests/{self.commit}"
            body = http_get(ours.url + tag_path, accept=DOCKER_ACCEPT)
            manifest = json.loads(body)
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            run(
                [
                    "skopeo",
                    "copy",
                    "-q",
                    "--preserve-digests",
                    "--src-tls-verify=false",
                    "--dest-tls-verify=false",
                    f"docker://{ours.host}/all:{self.commit}",
                    f"docker://{theirs.host}/all:latest",
                ]
            )
            their_body = http_get(theirs.url + "/v2/all/manifests/latest", accept=DOCKER_ACCEPT)
            assert their_body == body, "docker-registry serves a different manifest"
            largest = max(manifest["layers"], key=lambda layer: layer["size"])
            config = manifest["config"]["digest"]
            scenarios = [
                ("manifest GET by tag", tag_path, "/v2/all/manifests/latest", "GET", 64),
                ("manifest HEAD by tag", tag_path, "/v2/all/manifests/latest", "HEAD", 64),
                ("manifest GET by digest", f"/v2/all/manifests/{digest}", None, "GET", 64),
                ("small blob GET (config)", f"/v2/all/blobs/{config}", None, "GET", 64),
                ("large blob GET", f"/v2/all/blobs/{largest['digest']}", None, "GET", 8),
            ]
            for name, our_path, their_path, method, connections in scenarios:
                urls = {"nixeryd": ours.url + our_path, "docker-registry": theirs.url}
                urls["docker-registry"] += their_path or our_path
                # The two take turns, so that a burst of load elsewhere on a shared
                # machine weighs on both rather than on one.
                runs: dict[str, list[dict[str, float]]] = {server: [] for server in urls}
                for _ in range(self.scale.repeats):
                    for server, url in urls.items():
                        runs[server].append(wrk(url, method, connections, self.scale))
                results[name] = {"connections": connections}
                results[name].update({server: medians(runs[server]) for server in runs})
        print("\n## Serving (wrk with 1 thread, ab for HEAD; nixeryd / docker-registry ratios)")
        print(
            f"Large blob: {largest['size'] / 1e6:.1f} MB; {self.scale.wrk_seconds} s per run;"
            f" each figure the median of {self.scale.repeats} runs, the servers taking turns.\n"
        )
        print(
            "| request | clients | nixeryd req/s | registry req/s | req/s ratio | MB/s ratio"
            " | nixeryd p99 ms | registry p99 ms | p99 ratio |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, result in results.items():
            a, b = result["nixeryd"], result["docker-registry"]
            print(
                f"| {name} | {result['connections']} | {a['rps']:.0f} | {b['rps']:.0f} |"
                f" {a['rps'] / b['rps']:.2f}x | {a['mbps'] / b['mbps']:.2f}x"
                f" ({a['mbps']:.0f} vs {b['mbps']:.0f} MB/s) |"
                f" {a['p99_ms']:.2f} | {b['p99_ms']:.2f} | {a['p99_ms'] / b['p99_ms']:.2f}x |"
            )
        return results

    # Memory

    def memory(self) -> dict[str, Any]:
        """Peak RSS of a fresh daemon while ``memory_clients`` download one large blob at once."""
        storage = self.workdir / "memory"
        shutil.rmtree(storage, ignore_errors=True)
        blobs = storage / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        size = self.scale.memory_blob_mb * 1_000_000
        digest = hashlib.sha256()
        tmp = blobs / "incoming"
        with tmp.open("wb") as file:
            block = hashlib.sha512(b"nixeryd").digest() * 16384  # 1 MiB, deterministic
            written = 0
            while written < size:
                piece = block[: size - written]
                file.write(piece)
                digest.update(piece)
                written += len(piece)
        hex_digest = digest.hexdigest()
        tmp.rename(blobs / hex_digest)
        (blobs / f"{hex_digest}.json").write_text(
            json.dumps({"mediaType": "application/octet-stream", "size": size})
        )
        clients = self.scale.memory_clients
        with nixeryd(self.workdir / "memory.log", storage, self.pkgs) as server:
            before = server.rss_kb()
            result = wrk(
                f"{server.url}/v2/all/blobs/sha256:{hex_digest}",
                "GET",
                clients,
                self.scale,
                seconds=max(self.scale.wrk_seconds * 3, 3),
            )
            peak = server.peak_rss_kb()
        shutil.rmtree(storage, ignore_errors=True)
        print(f"\n## Memory: {clients} concurrent downloads of a {size / 1e6:.0f} MB blob\n")
        print("| daemon RSS before | peak RSS (VmHWM) | downloads/s | MB/s |")
        print("|---:|---:|---:|---:|")
        print(
            f"| {before / 1024:.0f} MB | {peak / 1024:.0f} MB | {result['rps']:.1f} |"
            f" {result['mbps']:.0f} |"
        )
        return {"rss_before_mb": before / 1024, "peak_rss_mb": peak / 1024, **result}


def _median_build(builds: list[dict[str, Any]]) -> dict[str, Any]:
    """The build whose layer-write step is the median one."""
    ordered = sorted(builds, key=lambda build: build["layers"])
    return ordered[len(ordered) // 2]


# Processes


def http_get(url: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=600) as response:
        data: bytes = response.read()
        return data


@contextlib.contextmanager
def nixeryd(log: Path, storage: Path, pkgs: Path | None, **environment: str) -> Iterator[Server]:
    """``nixeryd serve`` with JSON logs, filesystem storage at ``storage``."""
    with daemon(
        log,
        {
            **NIX_ENV,
            "STORAGE_PATH": str(storage),
            "NIXERYD_LOG_FORMAT": "json",
            # docker-registry runs with its access log disabled too.
            "NIXERYD_ACCESS_LOG": "false",
            **({"NIXERY_PKGS_PATH": str(pkgs)} if pkgs else {}),
            **environment,
        },
    ) as server:
        yield server


@contextlib.contextmanager
def docker_registry(root: Path) -> Iterator[Server]:
    """Debian's docker-registry (distribution 2.8) on filesystem storage under ``root``."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: false\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    argv = ["docker-registry", "serve", str(config)]
    with serving(argv, port, root / "registry.log") as server:
        yield server


def wrk(
    url: str, method: str, connections: int, scale: Scale, seconds: int | None = None
) -> dict[str, float]:
    """Requests/s, MB/s and p99 latency (ms) of ``connections`` keep-alive clients.

    wrk waits for a body after a HEAD response with a Content-Length, so HEAD
    requests are made with ApacheBench (``ab -k -i``) instead.
    """
    if method == "HEAD":
        return _ab_head(url, connections, seconds or scale.wrk_seconds)
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds or scale.wrk_seconds}s",
        "--latency",
        "--timeout",
        "60s",
        "-H",
        f"Accept: {DOCKER_ACCEPT}",
    ]
    output = run([*argv, url])
    if "Non-2xx" in output:
        raise SystemExit(f"wrk got errors from {url}:\n{output}")
    return {
        "rps": float(_field(r"Requests/sec:\s+([\d.]+)", output)),
        "mbps": _bytes(_field(r"Transfer/sec:\s+([\d.]+\w+)", output)) / 1e6,
        "p99_ms": _millis(_field(r"\s99%\s+([\d.]+\w+)", output)),
    }


def _ab_head(url: str, connections: int, seconds: int) -> dict[str, float]:
    argv = ["ab", "-q", "-k", "-i", f"-c{connections}", f"-t{seconds}", "-n", "100000000"]
    output = run([*argv, "-H", f"Accept: {DOCKER_ACCEPT}", url])
    if re.search(r"Non-2xx responses:\s+[1-9]", output):
        raise SystemExit(f"ab got errors from {url}:\n{output}")
    return {
        "rps": float(_field(r"Requests per second:\s+([\d.]+)", output)),
        "mbps": float(_field(r"Transfer rate:\s+([\d.]+) \[Kbytes/sec\]", output)) * 1024 / 1e6,
        "p99_ms": float(_field(r"\s99%\s+(\d+)", output)),
    }


def _field(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise SystemExit(f"unexpected wrk output:\n{text}")
    return match.group(1)


def _bytes(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(\w*)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[unit]


def _millis(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


if __name__ == "__main__":
    main()
