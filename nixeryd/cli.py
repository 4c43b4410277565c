"""The ``nixeryd`` command: ``nixeryd serve`` runs the daemon.

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


class Options(usage.Options):
    synopsis = "nixeryd <command> [options]"
    subCommands: ClassVar[list[list[Any]]] = [["serve", None, ServeOptions, "Run the registry"]]

    def opt_version(self) -> None:
        """Print the version and exit"""
        print(f"nixeryd {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command: serve")


def main(argv: list[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as error:
        print(f"{options}\nnixeryd: {error}", file=sys.stderr)
        sys.exit(2)
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
        start_logging(config.log_format)
        service = make_service(config, reactor)
    except (ConfigError, ValueError) as error:
        print(f"nixeryd: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[arg-type]
    reactor.run()  # type: ignore[misc]
