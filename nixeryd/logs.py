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


def start_logging(log_format: str) -> None:
    observer = (
        jsonFileLogObserver(sys.stdout) if log_format == "json" else textFileLogObserver(sys.stdout)
    )
    # Twisted's zope interfaces are not visible to mypy: the observers provide them.
    filtered: Any = FilteringLogObserver(
        cast(Any, observer), [cast(Any, LogLevelFilterPredicate(defaultLogLevel=LogLevel.info))]
    )
    globalLogBeginner.beginLoggingTo([filtered], redirectStandardIO=False)
