"""Nix: evaluate an image's packages, realise them, and query their runtime closure.

Three invocations per uncached image, each through the process seam:

1. ``nix/nixeryd.nix`` resolves the requested names in the package set and
   reports the missing ones, or the derivations: in the long-running evaluator
   that holds the package set (:mod:`nixeryd.evaluator`), or, with evaluators
   off, in a ``nix-instantiate --eval`` of its own;
2. ``nix-store --realise`` builds (or substitutes) those derivations, each
   builder limited by ``NIX_TIMEOUT`` (Nix's ``--timeout`` and
   ``--max-silent-time``, as Nixery passes it);
3. ``nix path-info --json --recursive`` reports the closure graph.

What Nix prints is logged as it arrives, tagged with the image, in two
measures: every line at debug level, and at info only what says what happens
(how many derivations will be built, paths fetched, the first warnings) and how
each step ended; a nixpkgs image prints a line per derivation, a thousand for
a small one. Every line is also kept in the image's :class:`BuildLog`, which
the index page serves for a failed build, and handed to ``on_line`` as it
arrives (the build hub of :mod:`nixeryd.builds`, which the web pages stream).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import signal
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger

from nixeryd.closure import ClosureGraph
from nixeryd.errors import BuildFailed, BuildTimedOut, ManifestUnknown
from nixeryd.evaluator import EvaluatorPool
from nixeryd.gcroots import ProcessRoots
from nixeryd.imagename import ImageTarget
from nixeryd.nixslots import NixSlots
from nixeryd.process import ProcessResult, ProcessRunner, ProcessTimedOut
from nixeryd.runtime import ThreadRunner
from nixeryd.sources import SourceRef

T = TypeVar("T")

#: Lines of Nix's error a client is shown; the log keeps all of them.
ERROR_EXCERPT_LINES = 12

#: Lines of one image's Nix output a :class:`BuildLog` keeps; later ones are counted.
BUILD_LOG_LINES = 20_000

#: Images whose last Nix output is kept.
BUILD_LOGS_KEPT = 64

#: Warnings of one step logged at info; the others at debug.
INFO_WARNINGS = 3


@dataclass(frozen=True)
class ResolvedPackage:
    """A requested package as the package set defines it."""

    name: str
    attr_path: str
    drv_path: str
    out_path: str


class PackagesNotFound(ManifestUnknown):
    """Some requested packages are not in the package set; all of them are named."""

    def __init__(self, missing: Sequence[str]) -> None:
        super().__init__(
            f"package{'s' if len(missing) > 1 else ''} not found in the package set: "
            + ", ".join(missing),
            detail={"missing": list(missing)},
        )
        self.missing = tuple(missing)


def nix_error_excerpt(stderr: Sequence[str]) -> str:
    """The cause of a Nix failure first, for a person reading a registry error.

    Nix >= 2.13 prints the trace before the cause, and the trace's first frames
    are nixeryd's own ``nix/nixeryd.nix``; so the excerpt starts at the last
    ``error:`` that states a cause (for a failed build, whose last errors are its
    consequences, the first "builder for" line), then the trace frames located
    outside ``nixeryd.nix`` (the package set's), then the other error lines,
    and, when a builder failed, the last lines it printed. ANSI colours are
    stripped; the whole stays under ``ERROR_EXCERPT_CHARS``. The log keeps every
    line.
    """
    lines = [_ANSI.sub("", line).rstrip() for line in stderr]
    errors = [i for i, line in enumerate(lines) if line.lstrip().startswith("error:")]
    if not errors:
        return (
            _bounded(_useful(lines[-ERROR_EXCERPT_LINES:])) or "Nix failed without an error message"
        )
    stated = [i for i in errors if lines[i].strip() != "error:"]
    # A failed build ends with consequences ("1 dependencies of derivation ... failed to
    # build", "build of ... failed"); its cause is the first builder that failed.
    causes = [i for i in stated if not _BUILD_CONSEQUENCE.match(lines[i].lstrip())]
    builders = [i for i in stated if lines[i].lstrip().startswith("error: builder for")]
    consequences = {i for i in stated if _DEPENDENT_NOT_BUILT.match(lines[i].lstrip())}
    cause = causes[-1] if causes else builders[0] if builders else (stated or errors)[-1]
    block_end = next((i for i in errors if i > cause), len(lines))
    parts = [_useful(lines[cause:block_end])]
    frames = _package_set_frames(lines)
    if frames:
        parts.append("\n".join(frames))
    others = [lines[i].strip() for i in stated if i != cause and i not in consequences]
    if others:
        parts.append("\n".join(others))
    if consequences:
        not_built = len(consequences)
        parts.append(f"({not_built} more errors: the derivations that depend on it were not built)")
    if builders:
        builder_output = [
            line for line in lines[: errors[0]] if line.strip() and not _is_nix_progress(line)
        ]
        if builder_output:
            parts.append("last lines of the build log:\n" + _useful(builder_output[-8:]))
    return _bounded("\n".join(parts))


#: Characters of Nix's error a client is shown.
ERROR_EXCERPT_CHARS = 2000

_BUILD_CONSEQUENCE = re.compile(
    r"error: (builder for |build of |\d+ dependencies of derivation |some outputs of )"
)

#: The errors a failed build ends with that only follow from the first: derivations
#: that depend on a failed one, and the summary of what was asked for.
_DEPENDENT_NOT_BUILT = re.compile(r"error: (\d+ dependencies of derivation |build of )")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _package_set_frames(lines: Sequence[str]) -> list[str]:
    """Trace frames ("… while evaluating …") located outside nixeryd's own expression."""
    frames = []
    for i, line in enumerate(lines):
        text = line.strip()
        if not text.startswith("…"):
            continue
        location = next((other.strip() for other in lines[i + 1 : i + 3] if other.strip()), "")
        if location.startswith("at ") and "/nixeryd.nix:" not in location:
            frames.append(f"{text} ({location.rstrip(':')})")
    return frames


def _useful(lines: Sequence[str]) -> str:
    kept = [line.strip() for line in lines if line.strip() and "--show-trace" not in line]
    return "\n".join(kept[:ERROR_EXCERPT_LINES])


def _bounded(text: str) -> str:
    if len(text) <= ERROR_EXCERPT_CHARS:
        return text
    return text[: ERROR_EXCERPT_CHARS - 1] + "…"


def _is_nix_progress(line: str) -> bool:
    """Lines Nix prints about what it builds, as opposed to the builder's own output."""
    text = line.strip()
    return text.startswith(
        ("building '", "this derivation", "these ", "warning:", "/nix/store/", "waiting for lock")
    )


#: The key of the package search's log among the images' (:meth:`Nix.search`).
SEARCH_LOG = "package search"


class BuildLog:
    """Every line Nix printed for one image's latest evaluation and build, in order.

    Kept so that an operator can read a failed build whole without turning on
    debug logging and asking the client to pull again.
    """

    def __init__(self, image: str) -> None:
        self.image = image
        self.lines: list[str] = []
        self.dropped = 0

    def add(self, step: str, line: str) -> None:
        if len(self.lines) < BUILD_LOG_LINES:
            self.lines.append(f"{step}: {line}")
        else:
            self.dropped += 1

    def text(self) -> str:
        dropped = f"({self.dropped} more lines not kept)\n" if self.dropped else ""
        return "".join(f"{line}\n" for line in self.lines) + dropped


#: Nix's announcement of what it will do: "these 956 derivations will be built:",
#: "this path will be fetched (0.12 MiB download, 0.50 MiB unpacked):".
_PLAN = re.compile(r"^(these \d+|this) (derivations?|paths?) will be (built|fetched)")

_WARNING = ("warning:", "evaluation warning:", "trace: warning:")

#: A retried download: transient, and repeated up to five times per file.
_RETRY = re.compile(r"^warning: .*; retrying in \d+ ms$")


class _StepOutput:
    """One Nix invocation's stderr, line by line: all of it to the image's build log
    and the debug log; its plan and first warnings at info; counts for its summary."""

    def __init__(
        self,
        log: Logger,
        image: str,
        step: str,
        build_log: BuildLog,
        on_line: Callable[[str, str, str], None] | None,
    ) -> None:
        self._log = log
        self._on_line = on_line
        self._image = image
        self._step = step
        self._build_log = build_log
        self.lines = 0
        self.builds = 0
        self.copies = 0
        self._warnings = 0

    def __call__(self, line: str) -> None:
        self.lines += 1
        self._build_log.add(self._step, line)
        self._log.debug("{image} {step}: {line}", image=self._image, step=self._step, line=line)
        text = _ANSI.sub("", line).strip()
        if self._on_line is not None:
            self._on_line(self._image, self._step, _ANSI.sub("", line).rstrip())
        if text.startswith("building '"):
            self.builds += 1
        elif text.startswith("copying path '"):
            self.copies += 1
        elif _PLAN.match(text):
            self._info(text)
        elif text.startswith(_WARNING) and not _RETRY.match(text):
            self._warnings += 1
            if self._warnings <= INFO_WARNINGS:
                self._info(text)
            elif self._warnings == INFO_WARNINGS + 1:
                self._info("further warnings are logged at debug level")

    def _info(self, text: str) -> None:
        self._log.info("{image} {step}: {line}", image=self._image, step=self._step, line=text)

    def summary(self) -> str:
        done = [f"{self.lines} lines of output"]
        if self.builds:
            done.append(f"{self.builds} builds")
        if self.copies:
            done.append(f"{self.copies} paths fetched")
        return ", ".join(done)


#: How Nix says a builder ran longer than --timeout or was silent longer than
#: --max-silent-time (Nix 2.8 to 2.18 and later).
_BUILDER_TIMED_OUT = re.compile(
    r"^error: building of '.*' (from .drv file )?timed out after \d+ seconds"
)


class Nix:
    """Runs Nix for images; every method's Deferred fails with a RegistryError a client can read."""

    log = Logger()

    def __init__(
        self,
        processes: ProcessRunner,
        *,
        builder_timeout: float,
        step_timeout: float,
        bin_dir: str | None = None,
        env: Mapping[str, str] | None = None,
        expression: Path | None = None,
        gc_roots: ProcessRoots | None = None,
        nixpkgs_config: Mapping[str, Any] | None = None,
        overlays: Sequence[str] = (),
        evaluators: EvaluatorPool | None = None,
        unpinned_reuse: float = 0.0,
        slots: NixSlots | None = None,
        run_in_thread: ThreadRunner | None = None,
        on_line: Callable[[str, str, str], None] | None = None,
    ) -> None:
        """``builder_timeout`` (``NIX_TIMEOUT``) is how long one Nix builder may run and
        may be silent; ``step_timeout`` bounds each Nix invocation as a whole (the
        builder bounds a whole image with ``NIXERYD_BUILD_TIMEOUT`` as well, by
        cancelling). ``nixpkgs_config`` and ``overlays`` are passed to a package set
        that takes them (see ``nix/nixeryd.nix``); None and () leave nixpkgs' own in
        force.

        With ``evaluators`` (running :func:`repl_argv`), images are evaluated in
        long-running evaluators, one per package set and system; a source without a
        pin (files that may change) reuses one for at most ``unpinned_reuse``
        seconds, and with 0 gets a ``nix-instantiate`` per image.

        With ``slots``, every step waits for one of its slots (see
        :mod:`nixeryd.nixslots`): an evaluation may be refused with 429 when too
        many wait; None runs every step at once.

        With ``run_in_thread``, each build's garbage collector root directory is
        made and removed in a worker thread: on a disk busy with layer writes, a
        directory operation on the reactor thread stalled cached answers for
        milliseconds.

        ``on_line`` is called with the image (canonical), the step and each line Nix
        prints, as it arrives."""
        self._processes = processes
        self._on_line = on_line
        self._nixpkgs_config = None if nixpkgs_config is None else dict(nixpkgs_config)
        self._overlays = tuple(overlays)
        self._builder_timeout = builder_timeout
        self._step_timeout = step_timeout
        self._build_logs: OrderedDict[str, BuildLog] = OrderedDict()
        self._bin_dir = bin_dir
        self._env = env
        self._gc_roots = gc_roots
        self._expression = expression or Path(str(files("nixeryd") / "nixexprs" / "nixeryd.nix"))
        self._evaluation_identity = _evaluation_identity(self._nixpkgs_config, self._overlays)
        self._unpinned_reuse = unpinned_reuse
        self._evaluators = evaluators
        self._slots = slots
        self._run_in_thread = run_in_thread

    @property
    def evaluation_identity(self) -> str:
        """What, besides the source and the image name, decides what evaluation gives:
        the nixpkgs configuration and the content of its Nix files as read at start-up.
        Part of the key of manifests cached by source pin, so that a site that changes
        them is answered with new images after a restart."""
        return self._evaluation_identity

    def _command(self, name: str) -> str:
        return nix_command(self._bin_dir, name)

    def build_log(self, image: str) -> BuildLog | None:
        """What Nix printed for the latest evaluation and build of ``image`` (canonical)."""
        return self._build_logs.get(image)

    def _new_build_log(self, image: str) -> None:
        """Start ``image``'s log afresh: an evaluation begins each build of it."""
        self._build_logs.pop(image, None)
        self._build_logs[image] = BuildLog(image)
        while len(self._build_logs) > BUILD_LOGS_KEPT:
            self._build_logs.popitem(last=False)

    def _log_for(self, image: str) -> BuildLog:
        if image not in self._build_logs:
            self._new_build_log(image)
        return self._build_logs[image]

    def _run(self, argv: Sequence[str], image: str, step: str) -> Any:
        return self._step(
            lambda output: self._processes.run(
                argv, timeout=self._step_timeout, on_stderr_line=output, env=self._env
            ),
            argv[0],
            image,
            step,
        )

    @inlineCallbacks
    def _step(
        self,
        start: Callable[[Callable[[str], None]], Any],
        program: str,
        image: str,
        step: str,
    ) -> Any:
        """Run one step, ``start(on_line)`` firing with its :class:`ProcessResult`;
        fire with its stdout, or fail with the registry error its output calls for."""
        output = _StepOutput(self.log, image, step, self._log_for(image), self._on_line)
        try:
            if self._slots is None:
                result: ProcessResult = yield start(output)
            else:
                result = yield self._slots.run(
                    lambda: start(output), may_refuse=step == "evaluation"
                )
        except ProcessTimedOut as timed_out:
            self.log.error(
                "{image} {step}: killed after {timeout:g} s",
                image=image,
                step=step,
                timeout=self._step_timeout,
            )
            raise BuildTimedOut(
                f"{step} of {image} took longer than the build timeout "
                f"(NIXERYD_BUILD_TIMEOUT, {self._step_timeout:g} s) and was stopped; try again, "
                "or ask the operator to raise NIXERYD_BUILD_TIMEOUT",
                detail={"step": step, "log": list(timed_out.stderr_tail[-ERROR_EXCERPT_LINES:])},
            ) from timed_out
        except OSError as error:
            raise BuildFailed(f"{step} of {image}: cannot run {program}: {error}") from error
        if result.signal is not None:
            # Killed by someone else (nixeryd's own kills are timeouts or cancellations):
            # what Nix printed before is no explanation, the signal is.
            name = _signal_name(result.signal)
            self.log.error(
                "{image} {step}: {program} was killed by {signal} ({summary})",
                image=image,
                step=step,
                program=program,
                signal=name,
                summary=output.summary(),
            )
            raise BuildFailed(
                f"{step} of {image} was stopped: {program} was killed by {name}, not by "
                "nixeryd (the operator, the kernel's out-of-memory killer, or a stopping "
                "system); try again",
                detail={"step": step, "signal": name},
            )
        if result.exit_code != 0:
            excerpt = nix_error_excerpt(result.stderr_tail)
            self.log.error(
                "{image} {step} failed (exit {code}; {summary}): {excerpt}",
                image=image,
                step=step,
                code=result.exit_code,
                summary=output.summary(),
                excerpt=excerpt,
            )
            if any(_BUILDER_TIMED_OUT.match(line) for line in result.stderr_tail):
                raise BuildTimedOut(
                    f"a builder of {image} ran longer than NIX_TIMEOUT "
                    f"({self._builder_timeout:g} s), or printed nothing for that long, and Nix "
                    "stopped it; try again, or ask the operator to raise NIX_TIMEOUT:\n" + excerpt,
                    detail={"step": step},
                )
            raise BuildFailed(f"{step} of {image} failed:\n{excerpt}", detail={"step": step})
        self.log.info(
            "{image} {step} done ({summary})", image=image, step=step, summary=output.summary()
        )
        return result.stdout

    def resolve(self, source: SourceRef, image: ImageTarget) -> Any:
        """Evaluate the image's packages; fail with :class:`PackagesNotFound` naming
        every missing one. Fires with a list of :class:`ResolvedPackage`."""
        return self._resolve(source, image, in_new_evaluator=False)

    @inlineCallbacks
    def _resolve(self, source: SourceRef, image: ImageTarget, in_new_evaluator: bool) -> Any:
        self._new_build_log(image.canonical)
        packages_json = json.dumps(list(image.packages))
        optional_json = json.dumps(list(image.optional_packages))
        evaluator_key = (source.src_type, _source_json(source), image.system)
        evaluator = self._evaluator(source, image.system, evaluator_key)
        if evaluator is None:
            stdout = yield self._run(
                [*self._instantiate_argv(source, image.system), "--argstr", "packages",
                 packages_json, "--argstr", "optionalPackages", optional_json],
                image.canonical,
                "evaluation",
            )  # fmt: skip
            return _packages(stdout, image)
        expression = (
            f"builtins.toJSON (nixeryd.resolve {{ packages = {nix_string(packages_json)}; "
            f"optionalPackages = {nix_string(optional_json)}; }})"
        )
        stdout = yield self._step(
            lambda output: evaluator.evaluate(expression, output),
            "nix repl",
            image.canonical,
            "evaluation",
        )
        packages = _packages(stdout, image)
        stale = [package.drv_path for package in packages if not Path(package.drv_path).exists()]
        if stale and self._evaluators is not None and not in_new_evaluator:
            # The store lost derivations the evaluator wrote earlier (garbage
            # collection): only a fresh evaluation writes them again.
            self.log.info(
                "{image}: {count} derivations evaluated earlier are gone from the store; "
                "evaluating again in a new evaluator",
                image=image.canonical,
                count=len(stale),
            )
            self._evaluators.discard(evaluator_key)
            result = yield self._resolve(source, image, in_new_evaluator=True)
            return result
        return packages

    def _evaluator(self, source: SourceRef, system: str, key: tuple[str, ...]) -> Any:
        """The evaluator for the package set and system, or None for a nix-instantiate."""
        if self._evaluators is None or (source.pin is None and self._unpinned_reuse <= 0):
            return None
        arguments = {
            "srcType": source.src_type,
            "srcArgs": _source_json(source),
            "system": system,
            "nixpkgsConfig": json.dumps(self._nixpkgs_config, sort_keys=True),
            "overlays": json.dumps(list(self._overlays)),
        }
        bound = " ".join(f"{name} = {nix_string(value)};" for name, value in arguments.items())
        return self._evaluators.evaluator(
            key,
            setup=f"nixeryd = import {nix_string(str(self._expression))} {{ {bound} }}",
            name=f"{source.src_type} {source.pin or _source_json(source)} {system}",
            max_age=None if source.pin is not None else self._unpinned_reuse,
        )

    def _instantiate_argv(self, source: SourceRef, system: str) -> list[str]:
        return [
            self._command("nix-instantiate"), "--eval", "--strict", "--json", "--read-write-mode",
            str(self._expression),
            "--argstr", "srcType", source.src_type,
            "--argstr", "srcArgs", _source_json(source),
            "--argstr", "system", system,
            "--argstr", "nixpkgsConfig", json.dumps(self._nixpkgs_config, sort_keys=True),
            "--argstr", "overlays", json.dumps(list(self._overlays)),
        ]  # fmt: skip

    @inlineCallbacks
    def search(self, source: SourceRef, system: str, query: str) -> Any:
        """The package set's top-level attributes whose lower-cased names contain
        ``query`` (letters, digits, ``.``, ``_``, ``-``; see :mod:`nixeryd.search`), at
        most 50, each a dict with ``attrPath``, ``description`` and ``derivation``."""
        pattern = query.replace(".", "[.]")
        self._new_build_log(SEARCH_LOG)
        evaluator = self._evaluator(source, system, (source.src_type, _source_json(source), system))
        if evaluator is None:
            stdout = yield self._run(
                [*self._instantiate_argv(source, system), "--argstr", "search", pattern],
                SEARCH_LOG,
                "search",
            )
        else:
            expression = f"builtins.toJSON (nixeryd.search {{ query = {nix_string(pattern)}; }})"
            stdout = yield self._step(
                lambda output: evaluator.evaluate(expression, output),
                "nix repl",
                SEARCH_LOG,
                "search",
            )
        try:
            found = json.loads(stdout)
        except ValueError as error:
            raise BuildFailed(f"the package search gave no JSON: {error}") from error
        if not isinstance(found, list) or not all(
            isinstance(entry, dict) and isinstance(entry.get("attrPath"), str) for entry in found
        ):
            # A package set's own nixeryd.nix of another version, or a fake: not a 500.
            raise BuildFailed("the package search printed an unexpected result")
        return found

    @inlineCallbacks
    def realise(self, packages: Sequence[ResolvedPackage], image: ImageTarget) -> Any:
        """Build (or substitute) the packages' derivations.

        With ``gc_roots`` set, the outputs are registered as temporary garbage
        collector roots in a directory of this build's own (under this process's,
        see :mod:`nixeryd.gcroots`), which fires the
        Deferred; pass it to :meth:`release` once the layers are written, so a
        ``nix-collect-garbage`` meanwhile cannot delete the paths being archived.
        """
        drvs = sorted({package.drv_path for package in packages})
        roots = None
        add_root = []
        if self._gc_roots is not None:
            # In a worker thread: the reactor must not wait on the disk while builds queue.
            roots = yield self._blocking(self._gc_roots.build_dir)
            add_root = ["--add-root", str(roots / "result"), "--indirect"]
        seconds = str(max(1, math.ceil(self._builder_timeout)))  # Nix takes whole seconds
        limits = ["--timeout", seconds, "--max-silent-time", seconds]
        try:
            yield self._run(
                [self._command("nix-store"), "--realise", *limits, *add_root, *drvs],
                image.canonical,
                "build",
            )
        except BaseException:
            self.release(roots)
            raise
        return roots

    def release(self, roots: Path | None) -> None:
        """Drop the garbage collector roots :meth:`realise` registered."""
        if roots is not None:
            self._blocking(lambda: shutil.rmtree(roots, ignore_errors=True))

    def _blocking(self, work: Callable[[], T]) -> Deferred[T]:
        """``work()`` in a worker thread, or at once without ``run_in_thread``."""
        if self._run_in_thread is None:
            return succeed(work())
        return self._run_in_thread(work)

    @inlineCallbacks
    def closure(self, packages: Sequence[ResolvedPackage], image: ImageTarget) -> Any:
        """The runtime closure graph of the (realised) packages' outputs."""
        roots = list(dict.fromkeys(package.out_path for package in packages))
        argv = [
            self._command("nix"), "--extra-experimental-features", "nix-command",
            "path-info", "--json", "--recursive", *roots,
        ]  # fmt: skip
        stdout = yield self._run(argv, image.canonical, "closure query")
        try:
            return ClosureGraph.from_path_info(roots, json.loads(stdout))
        except (ValueError, KeyError, TypeError) as error:
            raise BuildFailed(
                f"closure query of {image.canonical} printed an unexpected result: {error}"
            ) from error


def _signal_name(number: int) -> str:
    """``SIGKILL`` for 9: the name an operator looks for."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _evaluation_identity(nixpkgs_config: Mapping[str, Any] | None, overlays: Sequence[str]) -> str:
    """The nixpkgs configuration and its files' content, once: the pinned manifest key
    is computed on every request for a pinned image, which should read no files."""
    files_content = hashlib.sha256()
    for path in (nixpkgs_config or {}).get("configFile"), *overlays:
        if path is not None:
            files_content.update(path.encode() + b"\0")
            with contextlib.suppress(OSError):
                files_content.update(Path(path).read_bytes())
    return json.dumps([nixpkgs_config, list(overlays), files_content.hexdigest()], sort_keys=True)


def _source_json(source: SourceRef) -> str:
    return json.dumps(dict(source.src_args), sort_keys=True)


def _packages(stdout: bytes, image: ImageTarget) -> list[ResolvedPackage]:
    """The packages of ``nix/nixeryd.nix``'s report; :class:`PackagesNotFound` for missing ones."""
    try:
        report = json.loads(stdout)
        missing = list(report["missing"])
        packages = [
            ResolvedPackage(p["name"], p["attrPath"], p["drvPath"], p["outputPath"])
            for p in report["packages"]
        ]
    except (ValueError, KeyError, TypeError) as error:
        raise BuildFailed(
            f"evaluation of {image.canonical} printed an unexpected result: {error}"
        ) from error
    if missing:
        raise PackagesNotFound(missing)
    return packages


def nix_string(text: str) -> str:
    """``text`` as a Nix string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def repl_argv(bin_dir: str | None) -> tuple[str, ...]:
    """The ``nix repl`` an :class:`~nixeryd.evaluator.EvaluatorPool` runs for :class:`Nix`."""
    return (nix_command(bin_dir, "nix"), "--extra-experimental-features", "nix-command", "repl")


def nix_command(bin_dir: str | None, name: str) -> str:
    """The Nix program ``name``: from ``bin_dir`` (``NIXERYD_NIX_BIN_DIR``) if set, else PATH."""
    return str(Path(bin_dir) / name) if bin_dir else name
