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


def start_logging(log_format: str, stream: Any = None) -> None:
    """Log to ``stream`` (default stdout) from now on."""
    stream = stream or sys.stdout
    observer = jsonFileLogObserver(stream) if log_format == "json" else textFileLogObserver(stream)
    # Twisted's zope interfaces are not visible to mypy: the observers provide them.
    filtered: Any = FilteringLogObserver(
        cast(Any, observer), [cast(Any, LogLevelFilterPredicate(defaultLogLevel=LogLevel.info))]
    )
    globalLogBeginner.beginLoggingTo([filtered], redirectStandardIO=False)
