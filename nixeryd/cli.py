"""The ``nixeryd`` command: ``nixeryd serve`` runs the daemon; ``nixeryd popcount``
computes popularity data for it (see :mod:`nixeryd.popcount`); ``nixeryd build``
builds one image into files, without a registry (see :mod:`nixeryd.export`);
``nixeryd gc`` removes what no kept image needs from storage (see :mod:`nixeryd.gc`).

Options come from :data:`nixeryd.config.OPTIONS`, so every option is a flag,
an environment variable (Nixery's names) and a config-file key alike.
"""

from __future__ import annotations

import getopt
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from twisted.python import usage

from nixeryd import __version__
from nixeryd.config import OPTIONS, ConfigError, load_config


class ServeOptions(usage.Options):
    """``nixeryd serve``: run the registry until stopped."""

    synopsis = "nixeryd serve [options]"
    optParameters: ClassVar[list[list[Any]]] = [
        ["config", "c", None, "TOML config file (also $NIXERYD_CONFIG)"],
        *[[option.name.replace("_", "-"), None, None, option.help] for option in OPTIONS],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint to listen on, such as tcp:8080:interface=127.0.0.1 or
        systemd:domain=INET:index=0; repeatable (default: tcp:$PORT, else tcp:8080)"""
        self["listen"].append(endpoint)


class PopcountOptions(usage.Options):
    """``nixeryd popcount``: write popularity data in Nixery's format."""

    synopsis = (
        "nixeryd popcount (--pkgs-path PATH [--attr NAME]... [--build] | --cache URL "
        "[--paths FILE]) [-o FILE]"
    )
    optParameters: ClassVar[list[list[Any]]] = [
        ["pkgs-path", None, None, "count a package set: a directory or .nix file"],
        ["cache", None, None, "count a binary cache: http(s):// or file:// URL"],
        ["paths", None, None, "store paths to crawl the cache from, one a line (.xz too); "
         "needed for HTTP caches (default for file://: every narinfo)"],
        ["output", "o", None, "write the JSON here (default: stdout)"],
        ["system", None, None, "Nix system to evaluate the package set for"],
        ["concurrency", None, 16, "narinfos fetched at once", int],
        ["retries", None, 3, "retries of a failed narinfo fetch", int],
        ["timeout", None, 3600.0, "seconds each Nix invocation may run", float],
        ["chunk-size", None, 200, "top-level names of a package set evaluated per Nix process",
         int],
        ["eval-jobs", None, 2, "Nix evaluations of a package set run at once", int],
        ["limit", None, None, "count only the first N top-level names (a trial run)", int],
        ["nix-bin-dir", None, None, "directory of the Nix commands (default: "
         "$NIXERYD_NIX_BIN_DIR, else from PATH)"],
    ]  # fmt: skip
    optFlags: ClassVar[list[list[Any]]] = [
        ["build", None, "build package set outputs that are not in the store (default: skip)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["attr"] = []

    def opt_attr(self, name: str) -> None:
        """Count only this attribute path of the package set (repeatable; default: every
        top-level derivation and those of sets marked recurseForDerivations)"""
        self["attr"].append(name)

    def postOptions(self) -> None:
        if bool(self["pkgs-path"]) == bool(self["cache"]):
            raise usage.UsageError("give exactly one of --pkgs-path and --cache")
        if self["concurrency"] < 1 or self["retries"] < 0:
            raise usage.UsageError("--concurrency must be at least 1, --retries at least 0")
        if self["chunk-size"] < 1 or self["eval-jobs"] < 1:
            raise usage.UsageError("--chunk-size and --eval-jobs must be at least 1")


class BuildOptions(usage.Options):
    """``nixeryd build``: build one image with the daemon's builder and write it to files."""

    synopsis = "nixeryd build NAME[:TAG] -o (oci:DIR[:REF] | docker-archive:FILE[:REF]) [options]"
    longdesc = (
        "Builds NAME (an image name as pulled: shell/hello, arm64/git/htop) at TAG (default "
        "latest) with the daemon's builder and settings, and writes it without a registry. The "
        "OCI layout holds the registry's manifest and blobs, byte for byte; the docker-archive "
        "its gzip layers as they are (zstd ones uncompressed). Storage: the configured one "
        "(--storage-path, $STORAGE_PATH, --storage-backend, a config file), which a daemon on "
        "it then serves without building again; none configured, a temporary directory, "
        "removed. Logs, Nix's included, go to stderr (--log-level debug: every line Nix "
        "prints). Exit status: 0 written; 1 the image could not be built or written (the "
        "registry's message); 2 a usage or configuration error."
    )
    optParameters: ClassVar[list[list[Any]]] = [
        ["output", "o", None, "where to write the image: oci:DIR[:REF], an OCI image layout "
         "(umoci, skopeo; REF defaults to the tag), or docker-archive:FILE[:REF], a tarball "
         "for docker load and podman load (REF defaults to NAME:TAG)"],
        ["platform", None, None, "build for this platform alone, such as linux/arm64 (default: "
         "the configured platforms; a docker-archive holds the first)"],
        ["config", "c", None, "TOML config file (also $NIXERYD_CONFIG), as for serve"],
        *[[option.name.replace("_", "-"), None, None, option.help] for option in OPTIONS],
    ]  # fmt: skip

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Options may follow NAME too (``nixeryd build shell/hello -o oci:DIR``): Twisted's
        parser, like getopt's, would stop at the first argument."""
        try:
            flags, arguments = getopt.gnu_getopt(list(options or ()), self.shortOpt, self.longOpt)
        except getopt.error as error:
            raise usage.UsageError(str(error)) from error
        ordered: list[str] = []
        for flag, value in flags:
            if flag.startswith("--"):
                ordered.append(f"{flag}={value}" if f"{flag[2:]}=" in self.longOpt else flag)
            else:
                ordered += [flag, value] if f"{flag[1]}:" in self.shortOpt else [flag]
        super().parseOptions([*ordered, "--", *arguments])

    # Twisted reads the positional arguments from this signature; its stub has none.
    def parseArgs(self, reference: str) -> None:  # type: ignore[override]
        """NAME[:TAG]: the image name a pull would give, such as shell/hello or hello:v1"""
        self["reference"] = reference

    def postOptions(self) -> None:
        from nixeryd.export import parse_output
        from nixeryd.platform import parse_platform

        if self["output"] is None:
            raise usage.UsageError("say where to write the image: -o oci:DIR or "
                                   "-o docker-archive:FILE")  # fmt: skip
        try:
            self["output"] = parse_output(self["output"])
            if self["platform"] is not None:
                self["platform"] = parse_platform(self["platform"])
        except ValueError as error:
            raise usage.UsageError(str(error)) from error


#: The gc_* options ``nixeryd gc`` takes as flags; it has flags of its own for the others.
GC_CONFIG_OPTIONS = ("gc_roots",)


class GcOptions(usage.Options):
    """``nixeryd gc``: remove the records and blobs no kept image needs, and stale Nix GC roots.

    Takes every option of ``nixeryd serve`` (so the same config file and environment
    select the same storage and platforms), and its own below, which override the
    configuration's ``gc_max_age``, ``gc_grace`` and add to its ``gc_keep``.
    """

    synopsis = (
        "nixeryd gc [--max-age AGE] [--keep FILE]... [--keep-image NAME[:TAG]]... "
        "[--grace AGE] [--dry-run] [serve's options]"
    )
    optParameters: ClassVar[list[list[Any]]] = [
        ["max-age", None, None, "remove image records not written or used for this long "
         "(0, 90s, 36h, 7d), unless kept (default: gc_max_age, else never by age)"],
        ["grace", None, None, "keep everything younger than this, and remove a blob only "
         "once it was unreferenced this long: longer than a build may take (default: "
         "gc_grace, else 1h)"],
        ["config", "c", None, "TOML config file (also $NIXERYD_CONFIG)"],
        *[
            [option.name.replace("_", "-"), None, None, option.help]
            for option in OPTIONS
            if option.name in GC_CONFIG_OPTIONS or not option.name.startswith("gc_")
        ],
    ]  # fmt: skip
    optFlags: ClassVar[list[list[Any]]] = [
        ["dry-run", "n", "say what would be removed; remove nothing"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["keep"] = []
        self["keep-image"] = []

    def opt_keep(self, path: str) -> None:
        """a file of images to keep whatever their age, one NAME[:TAG] a line as pulled
        (shell/hello, git:main); # starts a comment (repeatable)"""
        self["keep"].append(path)

    def opt_keep_image(self, name: str) -> None:
        """an image to keep whatever its age, NAME[:TAG] as pulled; without a tag, every
        tag's newest image (repeatable)"""
        self["keep-image"].append(name)

    def postOptions(self) -> None:
        from nixeryd.config import parse_age

        for key in ("max-age", "grace"):
            if self[key] is not None:
                try:
                    self[key] = parse_age(self[key])
                except ValueError as error:
                    raise usage.UsageError(f"--{key}: {error}") from None


class Options(usage.Options):
    synopsis = "nixeryd <command> [options]"
    subCommands: ClassVar[list[list[Any]]] = [
        ["serve", None, ServeOptions, "Run the registry"],
        ["popcount", None, PopcountOptions, "Compute popularity data (NIX_POPULARITY_URL)"],
        ["build", None, BuildOptions, "Build one image into an OCI layout or a docker-archive"],
        ["gc", None, GcOptions, "Remove what no kept image needs from storage"],
    ]

    def opt_version(self) -> None:
        """Print the version and exit"""
        print(f"nixeryd {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command: serve, popcount, build, gc")


def main(argv: list[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as error:
        print(f"{options}\nnixeryd: {error}", file=sys.stderr)
        sys.exit(2)
    if options.subCommand == "popcount":
        popcount(options.subOptions)
    elif options.subCommand == "build":
        build(options.subOptions)
    elif options.subCommand == "gc":
        gc(options.subOptions)
    else:
        serve(options.subOptions)


#: Seconds a thread may hold the GIL while another waits for it (Python's default is
#: 0.005). Each time the reactor thread makes a system call (a socket write, a log line)
#: a worker thread writing a layer or a record can take the GIL, and the reactor waits
#: for it up to this long before it answers the next cached pull: at the default, a
#: flood of new images put the cached p99 at 2-4x of idle; at 1 ms, mostly within 2x.
GIL_SWITCH_INTERVAL = 0.001


def serve(options: Any) -> None:
    """Start logging, build the service tree and run the reactor until a signal stops it."""
    from twisted.internet import reactor

    from nixeryd.logs import start_logging
    from nixeryd.service import make_service
    from nixeryd.systemd import Notifier

    cli = {key.replace("-", "_"): value for key, value in options.items()}
    config_file = cli.pop("config", None) or os.environ.get("NIXERYD_CONFIG")
    # Taken out of the environment, which the Nix commands inherit.
    notifier = Notifier.from_environment(os.environ)
    try:
        config = load_config(cli, os.environ, Path(config_file) if config_file else None)
        start_logging(config.log_format, level=config.log_level)
        service = make_service(config, reactor, notifier=notifier)
    except (ConfigError, ValueError) as error:
        print(f"nixeryd: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[arg-type]
    reactor.run()  # type: ignore[misc]
    if service.failure is not None:
        print(
            f"nixeryd: {service.failed_step} did not start: {service.failure.getErrorMessage()}",
            file=sys.stderr,
        )
        sys.exit(1)


#: Why ``nixeryd popcount --pkgs-path`` wrote nothing, and what the operator can do.
NOTHING_COUNTED = (
    "nixeryd popcount: nothing counted: none of the package set's outputs is in the local "
    "Nix store, and references are only known for built outputs. Build them with --build "
    "(where Nix can build or substitute them), or count a binary cache that has them with "
    "--cache URL (e.g. --cache https://cache.nixos.org --paths store-paths.xz)."
)


def popcount(options: Any) -> None:
    """Count, write the JSON, and exit non-zero with a message if counting failed."""
    from twisted.internet import task

    from nixeryd.logs import start_logging

    start_logging("text", stream=sys.stderr)
    task.react(lambda reactor: _popcount(reactor, options))


def _popcount(reactor: Any, options: Any) -> Any:
    from treq.client import HTTPClient
    from twisted.web.client import Agent

    from nixeryd.popcount import (
        BinaryCache,
        PackageSetCount,
        PackageSetCounter,
        count_references,
        default_progress,
        read_store_paths,
        store_hash,
        write_popularity,
    )
    from nixeryd.process import ReactorProcessRunner

    if options["pkgs-path"]:
        counter = PackageSetCounter(
            ReactorProcessRunner(reactor),
            timeout=options["timeout"],
            bin_dir=options["nix-bin-dir"] or os.environ.get("NIXERYD_NIX_BIN_DIR"),
            chunk_size=options["chunk-size"],
            jobs=options["eval-jobs"],
            limit=options["limit"],
            reactor=reactor,
        )
        counted = counter.references(
            Path(options["pkgs-path"]),
            options["attr"],
            build=bool(options["build"]),
            system=options["system"],
        )
    else:
        cache = BinaryCache(
            options["cache"],
            http=HTTPClient(Agent(reactor)),  # type: ignore[arg-type]
            clock=reactor,
            concurrency=options["concurrency"],
            retries=options["retries"],
        )
        try:
            start = (
                [store_hash(path) for path in read_store_paths(Path(options["paths"]))]
                if options["paths"]
                else cache.listing()
            )
        except (OSError, ValueError) as error:
            print(f"nixeryd popcount: {error}", file=sys.stderr)
            sys.exit(1)
        counted = cache.references(start, default_progress())

    def write(counted: Any) -> None:
        if isinstance(counted, PackageSetCount):
            print(f"nixeryd popcount: {counted.summary()}", file=sys.stderr)
            if not counted.references:
                print(NOTHING_COUNTED, file=sys.stderr)
                raise SystemExit(1)
            references = counted.references
        else:
            references = counted
        counts = count_references(references)
        if options["output"]:
            with open(options["output"], "w") as out:
                write_popularity(counts, out)
        else:
            write_popularity(counts, sys.stdout)
        print(
            f"nixeryd popcount: {len(counts)} names referenced among {len(references)} store paths",
            file=sys.stderr,
        )

    def fail(failure: Any) -> None:
        print(f"nixeryd popcount: {failure.getErrorMessage()}", file=sys.stderr)
        raise SystemExit(1)

    return counted.addCallbacks(write, fail)


def build(options: Any) -> None:
    """Build the image and write it; exit 1 with the registry's message if it cannot be built
    or written, 2 for a configuration error. Logs (Nix's included) go to stderr."""
    from twisted.internet import task

    from nixeryd.logs import start_logging

    settings = {
        key.replace("-", "_"): value
        for key, value in options.items()
        if key not in ("reference", "output", "platform")
    }
    config_file = settings.pop("config", None) or os.environ.get("NIXERYD_CONFIG")
    try:
        config = load_config(settings, os.environ, Path(config_file) if config_file else None)
    except (ConfigError, ValueError) as error:
        print(f"nixeryd: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    start_logging(config.log_format, stream=sys.stderr, level=config.log_level)
    failures: list[str] = []
    try:
        task.react(lambda reactor: _build(reactor, config, options, failures))
    finally:
        # After the reactor's own last lines, so that the reason is the last line.
        for failure in failures:
            print(f"nixeryd build: {failure}", file=sys.stderr)


def _build(reactor: Any, config: Any, options: Any, failures: list[str]) -> Any:
    import shutil
    import tempfile
    from dataclasses import replace

    from treq.client import HTTPClient
    from twisted.web.client import Agent

    from nixeryd.errors import RegistryError
    from nixeryd.export import Exporter, OutputFailed, parse_reference
    from nixeryd.lifecycle import Lifecycle, StartFailed
    from nixeryd.service import make_registry

    # Configured storage is reused, so that a daemon on it later serves these layers
    # without building them; with none configured, nothing is left behind.
    if not {"storage_backend", "storage_path"} & set(config.origins):
        temporary = tempfile.mkdtemp(prefix="nixeryd-build-")
        config = replace(config, storage_path=temporary)
        # After the layer writers have stopped, also when a signal ends the build.
        reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, temporary, True)
    lifecycle = Lifecycle(reactor)
    try:
        registry = make_registry(config, reactor, lifecycle=lifecycle)
    except (ConfigError, ValueError) as error:
        failures.append(f"configuration error: {error}")
        raise SystemExit(2) from error
    # Threads, storage and Nix stop with the reactor: at the end, or when a signal ends it.
    reactor.addSystemEventTrigger("before", "shutdown", lifecycle.stopService)
    storage = registry.storage
    exporter = Exporter(registry.images, storage, HTTPClient(Agent(reactor)), reactor)  # type: ignore[arg-type]
    name, tag = parse_reference(options["reference"])

    def built(_: Any) -> Any:
        return exporter.export(name, tag, options["output"], options["platform"])

    def not_started(failure: Any) -> None:
        failure.trap(StartFailed)
        failures.append(failure.getErrorMessage())
        raise SystemExit(1)

    def fail(failure: Any) -> None:
        failure.trap(RegistryError, OutputFailed)
        failures.append(failure.getErrorMessage())
        raise SystemExit(1)

    exported = lifecycle.start().addCallbacks(built, not_started)
    return exported.addErrback(fail)


def gc(options: Any) -> None:
    """Read the configuration and the keep-list, run one collection, print its summary;
    exit 2 for a configuration or keep-list mistake, 1 if storage failed."""
    from twisted.internet import task

    from nixeryd.gc import KeepListError, policy_for
    from nixeryd.logs import start_logging

    own = {"max-age", "grace", "dry-run", "keep", "keep-image"}
    cli = {key.replace("-", "_"): value for key, value in options.items() if key not in own}
    config_file = cli.pop("config", None) or os.environ.get("NIXERYD_CONFIG")
    try:
        config = load_config(cli, os.environ, Path(config_file) if config_file else None)
        policy = policy_for(
            config,
            max_age=options["max-age"],
            grace=options["grace"],
            keep_files=options["keep"],
            keep_images=options["keep-image"],
        )
    except (ConfigError, KeepListError, ValueError, OSError) as error:
        print(f"nixeryd gc: {error}", file=sys.stderr)
        sys.exit(2)
    start_logging(config.log_format, level=config.log_level, stream=sys.stderr)
    task.react(lambda reactor: _gc(reactor, config, policy, bool(options["dry-run"])))


def _gc(reactor: Any, config: Any, policy: Any, dry_run: bool) -> Any:
    from twisted.internet.defer import Deferred

    from nixeryd.gc import collect

    def report(done: Any) -> None:
        print(f"nixeryd gc: {done.summary()}")

    def fail(failure: Any) -> None:
        print(f"nixeryd gc: {failure.getErrorMessage()}", file=sys.stderr)
        raise SystemExit(1)

    running = Deferred.fromCoroutine(collect(config, reactor, policy, dry_run=dry_run))
    return running.addCallbacks(report, fail)
