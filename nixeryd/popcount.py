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
  without it, so that counting never starts hours of building by surprise. A whole
  set is evaluated a chunk of top-level names at a time, each in a fresh process,
  so that memory stays bounded on sets the size of nixpkgs;
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
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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
from nixeryd.evaluator import Evaluator, EvaluatorLimits, Repl
from nixeryd.nixbuild import nix_command, nix_string, repl_argv
from nixeryd.process import ProcessResult, ProcessRunner, ProcessTimedOut

STORE_DIR = "/nix/store"

#: Store paths given to one Nix command: a whole nixpkgs' outputs (tens of thousands)
#: pass the kernel's limit on a command line's length.
PATHS_PER_COMMAND = 2000

#: Resident bytes past which the repl walking failed chunks is restarted: the
#: evaluations it holds grow with every name, and no Nix process should pass 4 GB.
EVALUATOR_MEMORY = 3 * 2**30


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


@dataclass
class PackageSetCount:
    """What counting a package set found: the references, and how many of what were counted.

    nixpkgs is evaluated in chunks, some of its names fail, and without a binary cache
    little of it is in the store, so the operator needs the figures to tell a count of
    everything from a count of what happens to be built.
    """

    references: dict[str, list[str]]
    listed: int = 0
    derivations: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    outputs: int = 0
    present: int = 0

    def summary(self) -> str:
        """A few lines saying what was counted and what was skipped, and why."""
        lines = []
        if self.listed:
            lines.append(
                f"{self.listed} top-level names listed, {self.listed - len(self.skipped)} "
                f"evaluated, {len(self.skipped)} skipped"
            )
            for name, reason in sorted(self.skipped.items())[:5]:
                lines.append(f"  skipped {name}: {reason}")
            if len(self.skipped) > 5:
                lines.append(f"  ... and {len(self.skipped) - 5} more")
        lines.append(
            f"{self.derivations} derivations with {self.outputs} outputs, {self.present} of "
            f"them in the local store and counted; {len(self.references)} store paths in "
            f"their closures"
        )
        return "\n".join(lines)


class PackageSetCounter:
    """Counts references among the closures of a package set's outputs, with real Nix.

    A whole package set is evaluated in chunks of top-level names, each in a fresh
    ``nix-instantiate`` (nixpkgs evaluated at once grows past 16 GB; a process's memory
    is returned when it ends), a few at once. A chunk that fails (a ``throw`` that
    ``tryEval`` cannot catch, such as a missing file, an abort, memory, the timeout) is
    evaluated again a name at a time, in one ``nix repl`` that holds the package set (an
    :class:`~nixeryd.evaluator.Evaluator`, restarted past :data:`EVALUATOR_MEMORY`), so a
    failing name costs its own evaluation rather than fresh imports of the package set;
    the names that fail are skipped and counted. ``reactor`` times the repl's requests.
    """

    log = Logger()

    def __init__(
        self,
        processes: ProcessRunner,
        *,
        timeout: float,
        bin_dir: str | None = None,
        expression: Path | None = None,
        chunk_size: int = 200,
        jobs: int = 2,
        limit: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        reactor: Any = None,
    ) -> None:
        self._processes = processes
        self._timeout = timeout
        self._bin_dir = bin_dir
        self._expression = expression or Path(str(files("nixeryd") / "nixexprs" / "popcount.nix"))
        self._chunk_size = chunk_size
        self._jobs = jobs
        self._limit = limit
        self._clock = clock
        self._reactor = reactor

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

    def _evaluation(self, package_set: Path, system: str | None) -> list[str]:
        argv = [
            self._command("nix-instantiate"), "--eval", "--strict", "--json", "--read-write-mode",
            str(self._expression), "--arg", "path", str(package_set.resolve()),
        ]  # fmt: skip
        if system:
            argv += ["--argstr", "system", system]
        return argv

    @inlineCallbacks
    def references(
        self, package_set: Path, attributes: Sequence[str], *, build: bool, system: str | None
    ) -> Any:
        """A :class:`PackageSetCount` over the closures of the package set's outputs."""
        evaluation = self._evaluation(package_set, system)
        count = PackageSetCount({})
        if attributes:
            evaluated: ProcessResult = yield self._run(
                [*evaluation, "--argstr", "attrs", json.dumps(list(attributes))], "evaluation"
            )
            packages = json.loads(evaluated.stdout)
            named = {package["attrPath"] for package in packages}
            for attribute in attributes:
                if attribute not in named:
                    self.log.warn(
                        "{attribute}: not a derivation that evaluates; skipped",
                        attribute=attribute,
                    )
        else:
            listing: ProcessResult = yield self._run(
                [*evaluation, "--arg", "names", "true"], "listing"
            )
            names = json.loads(listing.stdout)[: self._limit]
            one_by_one = self._evaluator(package_set, system)
            try:
                packages = yield self._evaluate_chunks(evaluation, names, count, one_by_one)
            finally:
                one_by_one.stop()
        count.derivations = len({package["drvPath"] for package in packages})
        outputs = sorted({package["outputPath"] for package in packages})
        count.outputs = len(outputs)
        if build and packages:
            drvs = sorted({package["drvPath"] for package in packages})
            failed = False
            for batch in _batches(drvs):
                built: ProcessResult = yield self._run(
                    [self._command("nix-store"), "--realise", "--keep-going", *batch],
                    "build",
                    check=False,
                )
                failed = failed or built.exit_code != 0
            if failed:
                self.log.warn("some packages failed to build; their references are not counted")
        present = yield self._valid(outputs)
        count.present = len(present)
        absent = sorted(set(outputs) - set(present))
        if absent:
            self.log.warn(
                "{count} of {total} outputs are not in the store and are skipped{hint}: {names}",
                count=len(absent),
                total=len(outputs),
                hint="" if build else " (pass --build to build them)",
                names=", ".join(store_path_name(path) for path in absent[:20])
                + (f", ... ({len(absent) - 20} more)" if len(absent) > 20 else ""),
            )
        for batch in _batches(present):
            info: ProcessResult = yield self._run(
                [self._command("nix"), "--extra-experimental-features", "nix-command",
                 "path-info", "--json", "--recursive", *batch],
                "closure query",
            )  # fmt: skip
            report = json.loads(info.stdout)
            entries = (
                report.items() if isinstance(report, dict) else ((e["path"], e) for e in report)
            )
            count.references.update(
                (path, list(entry.get("references", ()))) for path, entry in entries if entry
            )
        return count

    def _evaluator(self, package_set: Path, system: str | None) -> Evaluator:
        """The repl that walks the names of failed chunks one at a time (started if needed)."""
        arguments = f"path = /. + {nix_string(str(package_set.resolve()))}; evaluator = true;"
        if system:
            arguments += f" system = {nix_string(system)};"
        limits = EvaluatorLimits(
            capacity=1, memory=EVALUATOR_MEMORY, idle=600, request_timeout=self._timeout
        )
        return Evaluator(
            Repl(self._processes, self._reactor, repl_argv(self._bin_dir), limits),
            setup=f"popcount = import {nix_string(str(self._expression))} {{ {arguments} }}",
            name="popcount",
        )

    @inlineCallbacks
    def _evaluate_chunks(
        self,
        evaluation: Sequence[str],
        names: Sequence[str],
        count: PackageSetCount,
        one_by_one: Evaluator,
    ) -> Any:
        """The derivations under ``names``, evaluated a chunk at a time, ``jobs`` at once."""
        count.listed = len(names)
        chunks = [
            list(names[i : i + self._chunk_size]) for i in range(0, len(names), self._chunk_size)
        ]
        slots = DeferredSemaphore(self._jobs)
        started = self._clock()
        progress = {"names": 0, "chunks": 0}

        def report(packages: list[dict[str, str]], chunk: list[str]) -> list[dict[str, str]]:
            progress["names"] += len(chunk)
            progress["chunks"] += 1
            self.log.info(
                "evaluated {done}/{total} names ({chunks}/{all} chunks), {skipped} skipped, "
                "{elapsed:.0f} s",
                done=progress["names"],
                total=len(names),
                chunks=progress["chunks"],
                all=len(chunks),
                skipped=len(count.skipped),
                elapsed=self._clock() - started,
            )
            return packages

        evaluated = yield gatherResults(
            [
                slots.run(self._evaluate_chunk, evaluation, chunk, count, one_by_one).addCallback(
                    report, chunk
                )
                for chunk in chunks
            ],
            consumeErrors=True,
        ).addErrback(_first_error)
        return [package for packages in evaluated for package in packages]

    @inlineCallbacks
    def _evaluate_chunk(
        self,
        evaluation: Sequence[str],
        names: list[str],
        count: PackageSetCount,
        one_by_one: Evaluator,
    ) -> Any:
        """The derivations under ``names``; if the chunk fails, a name at a time."""
        try:
            result: ProcessResult = yield self._processes.run(
                [*evaluation, "--argstr", "top", json.dumps(names)],
                timeout=self._timeout,
                on_stderr_line=self._log_evaluation_line,
            )
        except ProcessTimedOut as timed_out:
            problem = f"evaluation ran longer than {timed_out.timeout:g} s"
        else:
            if result.exit_code == 0:
                return json.loads(result.stdout)
            problem = _evaluation_error(result)
        if len(names) == 1:
            self._skip(count, names[0], problem)
            return []
        self.log.info(
            "a chunk of {count} names failed ({problem}); evaluating them one at a time",
            count=len(names),
            problem=problem,
        )
        packages = []
        for name in names:
            try:
                answer: ProcessResult = yield one_by_one.evaluate(
                    f"builtins.toJSON (popcount.topLevel [ {nix_string(name)} ])",
                    self._log_evaluation_line,
                )
            except ProcessTimedOut as timed_out:
                self._skip(count, name, f"evaluation ran longer than {timed_out.timeout:g} s")
                continue
            if answer.exit_code == 0:
                packages += json.loads(answer.stdout)
            else:
                self._skip(count, name, _evaluation_error(answer))
        return packages

    def _log_evaluation_line(self, line: str) -> None:
        # nixpkgs prints thousands of rename warnings: debug only.
        self.log.debug("evaluation: {line}", line=line)

    def _skip(self, count: PackageSetCount, name: str, problem: str) -> None:
        count.skipped[name] = problem
        self.log.warn("{name}: skipped: {problem}", name=name, problem=problem)

    @inlineCallbacks
    def _valid(self, outputs: Sequence[str]) -> Any:
        invalid: set[str] = set()
        for batch in _batches(outputs):
            result: ProcessResult = yield self._run(
                [self._command("nix-store"), "--check-validity", "--print-invalid", *batch],
                "validity check",
            )
            invalid.update(result.stdout.decode().split())
        return [path for path in outputs if path not in invalid]


def _batches(paths: Sequence[str]) -> list[Sequence[str]]:
    """``paths`` in runs of :data:`PATHS_PER_COMMAND`, for one command line each."""
    return [paths[i : i + PATHS_PER_COMMAND] for i in range(0, len(paths), PATHS_PER_COMMAND)]


def _evaluation_error(result: ProcessResult) -> str:
    """Nix's own ``error:`` line if it printed one, else how the process ended (killed for
    memory, say)."""
    errors = [line.strip() for line in result.stderr_tail if line.strip().startswith("error:")]
    if errors:
        return errors[-1]
    return f"nix-instantiate exited with status {result.exit_code}"


def write_popularity(counts: Mapping[str, int], out: IO[str]) -> None:
    json.dump(dict(counts), out, indent=None, sort_keys=True, separators=(",", ":"))
    out.write("\n")


def default_progress() -> Progress:
    return Progress(sys.stderr, "narinfos")
