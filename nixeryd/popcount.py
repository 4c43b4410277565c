"""``nixeryd popcount``: popularity data for ``NIX_POPULARITY_URL``, in Nixery's format.

Popularity is ``{"<name>-<version>": count}``: for each store path name, how
many store paths of a package set reference it. Two sources, both of which
an air-gapped site can run on its own machines:

* a **package set** (:class:`PackageSetCounter`): evaluate its derivations
  (``nix/popcount.nix``: the top-level ones, and those of nested sets marked
  ``recurseForDerivations``, or the attributes asked for), then count the
  references among the closures of their outputs, as ``nix path-info
  --recursive`` reports them. Runtime references exist only for built outputs:
  outputs not in the store are built with ``--build`` and skipped (and named)
  without it, so that counting never starts hours of building by surprise;
* a **binary cache** (:class:`BinaryCache`), ``http(s)://`` or ``file://``
  (one made with ``nix copy --to file:///srv/cache ...``): read the narinfos of
  its store paths and count their ``References``. A ``file://`` cache is listed
  from disk; an HTTP cache cannot be listed, so it is crawled from a list of
  store paths (Nixery uses a channel's ``store-paths.xz``) through the
  references, with bounded concurrency and retries, and a progress bar.

Nixery's own popcount counts the referencing path itself when a path refers to
itself and drops every count of 1 to undo that; here self-references are not
counted at all, so a count is exactly the number of other paths referring to a
name, which the stable layering strategy compares with an image's referrers.
"""

from __future__ import annotations

import json
import lzma
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from twisted.internet.defer import (
    Deferred,
    DeferredSemaphore,
    FirstError,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger

from nixeryd.closure import store_path_name
from nixeryd.nixbuild import nix_command
from nixeryd.process import ProcessResult, ProcessRunner

STORE_DIR = "/nix/store"


def count_references(references: Mapping[str, Iterable[str]]) -> dict[str, int]:
    """Popularity from store paths and their references (full paths or base names).

    Each path counts once for each name it refers to; self-references do not count.
    """
    counts: dict[str, int] = {}
    for path, referenced in references.items():
        own = path.rsplit("/", 1)[-1]
        for reference in set(referenced):
            if reference.rsplit("/", 1)[-1] != own:
                name = store_path_name(reference)
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def parse_narinfo(text: str, origin: str) -> tuple[str, list[str]]:
    """A narinfo's ``StorePath`` and its ``References`` as full store paths."""
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    if "StorePath" not in fields:
        raise ValueError(f"{origin} is not a narinfo: it has no StorePath")
    store_dir = fields["StorePath"].rsplit("/", 1)[0]
    references = [f"{store_dir}/{name}" for name in fields.get("References", "").split()]
    return fields["StorePath"], references


def store_hash(path: str) -> str:
    """The hash part of a store path or base name, which names its narinfo."""
    return path.rsplit("/", 1)[-1].split("-", 1)[0]


class Progress:
    """A one-line progress bar on a terminal, occasional lines elsewhere."""

    WIDTH = 30

    def __init__(self, out: IO[str], what: str) -> None:
        self._out = out
        self._what = what
        self._tty = out.isatty()
        self._shown = -1

    def update(self, done: int, total: int) -> None:
        if self._tty:
            filled = self.WIDTH * done // max(total, 1)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self._out.write(f"\r{self._what} [{bar}] {done}/{total}")
        elif done * 10 // max(total, 1) != self._shown or done == total:
            self._shown = done * 10 // max(total, 1)
            self._out.write(f"{self._what}: {done}/{total}\n")
        self._out.flush()

    def finish(self) -> None:
        if self._tty:
            self._out.write("\n")
            self._out.flush()


class BinaryCache:
    """The narinfos of a binary cache: ``http(s)://`` through treq, ``file://`` from disk."""

    log = Logger()

    def __init__(
        self,
        url: str,
        *,
        http: Any,
        clock: Any,
        concurrency: int = 16,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https", "file"):
            raise ValueError(f"binary cache {url!r}: use http://, https:// or file://")
        self.url = url.rstrip("/")
        self._directory = Path(unquote(parsed.path)) if parsed.scheme == "file" else None
        self._http = http
        self._clock = clock
        self._retries = retries
        self._backoff = backoff
        self._slots = DeferredSemaphore(concurrency)

    def listing(self) -> list[str]:
        """The hashes of every narinfo of a ``file://`` cache (HTTP caches cannot be listed)."""
        if self._directory is None:
            raise ValueError(
                f"an HTTP binary cache cannot be listed: name store paths to start from "
                f"(--paths) for {self.url}"
            )
        if not (self._directory / "nix-cache-info").exists():
            raise ValueError(f"{self.url} is not a binary cache: it has no nix-cache-info")
        return sorted(path.stem for path in self._directory.glob("*.narinfo"))

    def narinfo(self, hash_: str) -> Deferred[str | None]:
        """The narinfo of a store path hash, or None if the cache does not have it."""
        if self._directory is not None:
            path = self._directory / f"{hash_}.narinfo"
            return succeed(path.read_text() if path.exists() else None)
        return self._slots.run(self._fetch, hash_)

    @inlineCallbacks
    def _fetch(self, hash_: str) -> Any:
        url = f"{self.url}/{hash_}.narinfo"
        for attempt in range(self._retries + 1):
            problem: str
            try:
                response = yield self._http.get(url)
                body = yield response.content()
            except Exception as error:  # connection refused, reset, DNS: worth retrying
                problem = str(error)
            else:
                if response.code == 200:
                    return body.decode()
                if response.code == 404:
                    return None
                problem = f"HTTP {response.code}"
                if response.code < 500 and response.code != 429:
                    raise ValueError(f"fetching {url}: {problem}")
            if attempt == self._retries:
                raise ValueError(f"fetching {url}: {problem} ({attempt + 1} attempts)")
            delay = self._backoff * 2**attempt
            self.log.warn(
                "fetching {url}: {problem}; retrying in {delay:g}s",
                url=url,
                problem=problem,
                delay=delay,
            )
            yield deferLater(self._clock, delay, lambda: None)
        raise AssertionError("unreachable")

    @inlineCallbacks
    def references(self, start: Sequence[str], progress: Progress) -> Any:
        """Store path -> references, for ``start`` (hashes) and everything they reference.

        Fires with a dict; narinfos the cache lacks are logged and left out.
        """
        crawl = _Crawl(self, start, progress)
        wave = sorted(crawl.seen)
        while wave:
            yield gatherResults(
                [self.narinfo(hash_).addCallback(crawl.record, hash_) for hash_ in wave],
                consumeErrors=True,
            ).addErrback(_first_error)
            wave, crawl.following = sorted(crawl.following), []
        progress.finish()
        if crawl.missing:
            self.log.warn(
                "{count} store paths are not in {url}, e.g. {example}",
                count=len(crawl.missing),
                url=self.url,
                example=sorted(crawl.missing)[0],
            )
        return crawl.found


class _Crawl:
    """What a crawl through a binary cache has seen, found and has yet to fetch."""

    def __init__(self, cache: BinaryCache, start: Sequence[str], progress: Progress) -> None:
        self.cache = cache
        self.seen = set(start)
        self.progress = progress
        self.found: dict[str, list[str]] = {}
        self.missing: list[str] = []
        self.following: list[str] = []
        self.done = 0

    def record(self, text: str | None, hash_: str) -> None:
        self.done += 1
        self.progress.update(self.done, len(self.seen))
        if text is None:
            self.missing.append(hash_)
            return
        path, references = parse_narinfo(text, f"{self.cache.url}/{hash_}.narinfo")
        self.found[path] = references
        for reference in map(store_hash, references):
            if reference not in self.seen:
                self.seen.add(reference)
                self.following.append(reference)


def _first_error(failure: Any) -> Any:
    """The failure of the first narinfo that failed, rather than gatherResults' wrapper."""
    if isinstance(failure.value, FirstError):
        return failure.value.subFailure
    return failure


def read_store_paths(path: Path) -> list[str]:
    """Store paths, one a line, from a file (``.xz`` like Nixery's ``store-paths.xz``)."""
    data = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
    return [line.strip() for line in data.decode().splitlines() if line.strip()]


class PackageSetCounter:
    """Counts references among the closures of a package set's outputs, with real Nix."""

    log = Logger()

    def __init__(
        self,
        processes: ProcessRunner,
        *,
        timeout: float,
        bin_dir: str | None = None,
        expression: Path | None = None,
    ) -> None:
        self._processes = processes
        self._timeout = timeout
        self._bin_dir = bin_dir
        self._expression = expression or Path(str(files("nixeryd") / "nixexprs" / "popcount.nix"))

    def _command(self, name: str) -> str:
        return nix_command(self._bin_dir, name)

    @inlineCallbacks
    def _run(self, argv: Sequence[str], step: str, *, check: bool = True) -> Any:
        def log_line(line: str) -> None:
            self.log.info("{step}: {line}", step=step, line=line)

        result: ProcessResult = yield self._processes.run(
            argv, timeout=self._timeout, on_stderr_line=log_line
        )
        if check and result.exit_code != 0:
            raise ValueError(
                f"{step} failed (exit {result.exit_code}):\n" + "\n".join(result.stderr_tail[-12:])
            )
        return result

    @inlineCallbacks
    def references(
        self, package_set: Path, attributes: Sequence[str], *, build: bool, system: str | None
    ) -> Any:
        """Store path -> references over the closures of the package set's outputs."""
        argv = [
            self._command("nix-instantiate"), "--eval", "--strict", "--json", "--read-write-mode",
            str(self._expression), "--arg", "path", str(package_set.resolve()),
            "--argstr", "attrs", json.dumps(list(attributes)),
        ]  # fmt: skip
        if system:
            argv += ["--argstr", "system", system]
        evaluated: ProcessResult = yield self._run(argv, "evaluation")
        packages = json.loads(evaluated.stdout)
        named = {package["attrPath"] for package in packages}
        for attribute in attributes:
            if attribute not in named:
                self.log.warn(
                    "{attribute}: not a derivation that evaluates; skipped", attribute=attribute
                )
        outputs = sorted({package["outputPath"] for package in packages})
        if build and packages:
            drvs = sorted({package["drvPath"] for package in packages})
            built: ProcessResult = yield self._run(
                [self._command("nix-store"), "--realise", "--keep-going", *drvs],
                "build",
                check=False,
            )
            if built.exit_code != 0:
                self.log.warn("some packages failed to build; their references are not counted")
        present = yield self._valid(outputs)
        absent = sorted(set(outputs) - set(present))
        if absent:
            self.log.warn(
                "{count} of {total} outputs are not in the store and are skipped{hint}: {names}",
                count=len(absent),
                total=len(outputs),
                hint="" if build else " (pass --build to build them)",
                names=", ".join(store_path_name(path) for path in absent),
            )
        if not present:
            return {}
        info: ProcessResult = yield self._run(
            [self._command("nix"), "--extra-experimental-features", "nix-command",
             "path-info", "--json", "--recursive", *present],
            "closure query",
        )  # fmt: skip
        report = json.loads(info.stdout)
        entries = report.items() if isinstance(report, dict) else ((e["path"], e) for e in report)
        return {path: list(entry.get("references", ())) for path, entry in entries if entry}

    @inlineCallbacks
    def _valid(self, outputs: Sequence[str]) -> Any:
        if not outputs:
            return []
        result: ProcessResult = yield self._run(
            [self._command("nix-store"), "--check-validity", "--print-invalid", *outputs],
            "validity check",
        )
        invalid = set(result.stdout.decode().split())
        return [path for path in outputs if path not in invalid]


def write_popularity(counts: Mapping[str, int], out: IO[str]) -> None:
    json.dump(dict(counts), out, indent=None, sort_keys=True, separators=(",", ":"))
    out.write("\n")


def default_progress() -> Progress:
    return Progress(sys.stderr, "narinfos")
