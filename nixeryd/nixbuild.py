"""Nix: evaluate an image's packages, realise them, and query their runtime closure.

Three invocations per uncached image, each through the process seam with
``NIX_TIMEOUT`` and every stderr line logged as it arrives, tagged with the
image:

1. ``nix-instantiate --eval`` of ``nix/nixeryd.nix`` resolves the requested
   names in the package set and reports the missing ones, or the derivations;
2. ``nix-store --realise`` builds (or substitutes) those derivations;
3. ``nix path-info --json --recursive`` reports the closure graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from nixeryd.closure import ClosureGraph
from nixeryd.errors import BuildFailed, BuildTimedOut, ManifestUnknown
from nixeryd.imagename import ImageTarget
from nixeryd.process import ProcessResult, ProcessRunner, ProcessTimedOut
from nixeryd.sources import SourceRef

#: Lines of Nix's error a client is shown; the log keeps all of them.
ERROR_EXCERPT_LINES = 12


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
    cause = causes[-1] if causes else builders[0] if builders else (stated or errors)[-1]
    block_end = next((i for i in errors if i > cause), len(lines))
    parts = [_useful(lines[cause:block_end])]
    frames = _package_set_frames(lines)
    if frames:
        parts.append("\n".join(frames))
    others = [lines[i].strip() for i in stated if i != cause]
    if others:
        parts.append("\n".join(others))
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
    return text.startswith(("building '", "this derivation", "these ", "warning:", "/nix/store/"))


class Nix:
    """Runs Nix for images; every method's Deferred fails with a RegistryError a client can read."""

    log = Logger()

    def __init__(
        self,
        processes: ProcessRunner,
        *,
        timeout: float,
        bin_dir: str | None = None,
        env: Mapping[str, str] | None = None,
        expression: Path | None = None,
        gc_roots: Path | None = None,
        nixpkgs_config: Mapping[str, Any] | None = None,
        overlays: Sequence[str] = (),
    ) -> None:
        """``nixpkgs_config`` and ``overlays`` are passed to a package set that takes
        them (see ``nix/nixeryd.nix``); None and () leave nixpkgs' own in force."""
        self._processes = processes
        self._nixpkgs_config = None if nixpkgs_config is None else dict(nixpkgs_config)
        self._overlays = tuple(overlays)
        self._timeout = timeout
        self._bin_dir = bin_dir
        self._env = env
        self._gc_roots = gc_roots
        self._expression = expression or Path(str(files("nixeryd") / "nixexprs" / "nixeryd.nix"))
        self._evaluation_identity = _evaluation_identity(self._nixpkgs_config, self._overlays)

    @property
    def evaluation_identity(self) -> str:
        """What, besides the source and the image name, decides what evaluation gives:
        the nixpkgs configuration and the content of its Nix files as read at start-up.
        Part of the key of manifests cached by source pin, so that a site that changes
        them is answered with new images after a restart."""
        return self._evaluation_identity

    def _command(self, name: str) -> str:
        return nix_command(self._bin_dir, name)

    @inlineCallbacks
    def _run(self, argv: Sequence[str], image: str, step: str) -> Any:
        def log_line(line: str) -> None:
            self.log.info("{image} {step}: {line}", image=image, step=step, line=line)

        try:
            result: ProcessResult = yield self._processes.run(
                argv, timeout=self._timeout, on_stderr_line=log_line, env=self._env
            )
        except ProcessTimedOut as timed_out:
            self.log.error(
                "{image} {step}: killed after {timeout:g} s",
                image=image,
                step=step,
                timeout=self._timeout,
            )
            raise BuildTimedOut(
                f"{step} of {image} took longer than NIX_TIMEOUT ({self._timeout:g} s) and was "
                "stopped; try again, or ask the operator to raise NIX_TIMEOUT",
                detail={"step": step, "log": list(timed_out.stderr_tail[-ERROR_EXCERPT_LINES:])},
            ) from timed_out
        except OSError as error:
            raise BuildFailed(f"{step} of {image}: cannot run {argv[0]}: {error}") from error
        if result.exit_code != 0:
            excerpt = nix_error_excerpt(result.stderr_tail)
            self.log.error(
                "{image} {step} failed (exit {code}): {excerpt}",
                image=image,
                step=step,
                code=result.exit_code,
                excerpt=excerpt,
            )
            raise BuildFailed(f"{step} of {image} failed:\n{excerpt}", detail={"step": step})
        return result.stdout

    @inlineCallbacks
    def resolve(self, source: SourceRef, image: ImageTarget) -> Any:
        """Evaluate the image's packages; fail with :class:`PackagesNotFound` naming
        every missing one. Fires with a list of :class:`ResolvedPackage`."""
        argv = [
            self._command("nix-instantiate"), "--eval", "--strict", "--json", "--read-write-mode",
            str(self._expression),
            "--argstr", "srcType", source.src_type,
            "--argstr", "srcArgs", json.dumps(dict(source.src_args), sort_keys=True),
            "--argstr", "packages", json.dumps(list(image.packages)),
            "--argstr", "optionalPackages", json.dumps(list(image.optional_packages)),
            "--argstr", "system", image.system,
            "--argstr", "nixpkgsConfig", json.dumps(self._nixpkgs_config, sort_keys=True),
            "--argstr", "overlays", json.dumps(list(self._overlays)),
        ]  # fmt: skip
        stdout = yield self._run(argv, image.canonical, "evaluation")
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

    @inlineCallbacks
    def realise(self, packages: Sequence[ResolvedPackage], image: ImageTarget) -> Any:
        """Build (or substitute) the packages' derivations.

        With ``gc_roots`` set, the outputs are registered as temporary garbage
        collector roots in a directory of this build's own, which fires the
        Deferred; pass it to :meth:`release` once the layers are written, so a
        ``nix-collect-garbage`` meanwhile cannot delete the paths being archived.
        """
        drvs = sorted({package.drv_path for package in packages})
        roots = None
        add_root = []
        if self._gc_roots is not None:
            self._gc_roots.mkdir(parents=True, exist_ok=True)
            roots = Path(tempfile.mkdtemp(dir=self._gc_roots))
            add_root = ["--add-root", str(roots / "result"), "--indirect"]
        try:
            yield self._run(
                [self._command("nix-store"), "--realise", *add_root, *drvs],
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
            shutil.rmtree(roots, ignore_errors=True)

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


def nix_command(bin_dir: str | None, name: str) -> str:
    """The Nix program ``name``: from ``bin_dir`` (``NIXERYD_NIX_BIN_DIR``) if set, else PATH."""
    return str(Path(bin_dir) / name) if bin_dir else name
