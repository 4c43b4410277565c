"""The ``nixeryd`` command: ``nixeryd serve`` runs the daemon; ``nixeryd popcount``
computes popularity data for it (see :mod:`nixeryd.popcount`).

Options come from :data:`nixeryd.config.OPTIONS`, so every option is a flag,
an environment variable (Nixery's names) and a config-file key alike.
"""

from __future__ import annotations

import os
import sys
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


class Options(usage.Options):
    synopsis = "nixeryd <command> [options]"
    subCommands: ClassVar[list[list[Any]]] = [
        ["serve", None, ServeOptions, "Run the registry"],
        ["popcount", None, PopcountOptions, "Compute popularity data (NIX_POPULARITY_URL)"],
    ]

    def opt_version(self) -> None:
        """Print the version and exit"""
        print(f"nixeryd {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command: serve, popcount")


def main(argv: list[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as error:
        print(f"{options}\nnixeryd: {error}", file=sys.stderr)
        sys.exit(2)
    if options.subCommand == "popcount":
        popcount(options.subOptions)
    else:
        serve(options.subOptions)


def serve(options: Any) -> None:
    """Start logging, build the service tree and run the reactor until a signal stops it."""
    from twisted.internet import reactor

    from nixeryd.logs import start_logging
    from nixeryd.service import make_service

    cli = {key.replace("-", "_"): value for key, value in options.items()}
    config_file = cli.pop("config", None) or os.environ.get("NIXERYD_CONFIG")
    try:
        config = load_config(cli, os.environ, Path(config_file) if config_file else None)
        start_logging(config.log_format, level=config.log_level)
        service = make_service(config, reactor)
    except (ConfigError, ValueError) as error:
        print(f"nixeryd: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[arg-type]
    reactor.run()  # type: ignore[misc]
    if service.storage_failure is not None:
        print(
            f"nixeryd: storage backend did not start: {service.storage_failure.getErrorMessage()}",
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
