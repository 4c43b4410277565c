"""Log output: readable text for people, JSON lines for machines (journald, log shippers)."""

from __future__ import annotations

import sys
from typing import Any, cast

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)


def start_logging(log_format: str, stream: Any = None, level: str = "info") -> None:
    """Log events of ``level`` and above to ``stream`` (default stdout) from now on.

    At debug, every line Nix prints is logged as it arrives; at info, a summary
    of each Nix step (see :mod:`nixeryd.nixbuild`)."""
    stream = stream or sys.stdout
    observer = jsonFileLogObserver(stream) if log_format == "json" else textFileLogObserver(stream)
    # Twisted's zope interfaces are not visible to mypy: the observers provide them.
    least = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    filtered: Any = FilteringLogObserver(cast(Any, observer), [cast(Any, least)])
    globalLogBeginner.beginLoggingTo([filtered], redirectStandardIO=False)
