"""What plugins are built with: the configuration and the injected services.

Nothing in nixeryd imports a global reactor or HTTP client; the composition
root (:mod:`nixeryd.service`) builds a :class:`Runtime` once and hands it to
every plugin factory, so tests can pass fakes (a memory reactor, StubTreq, an
expectation fake for processes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred

from nixeryd.config import Config
from nixeryd.process import ProcessRunner

T = TypeVar("T")

#: Runs a blocking, CPU-bound function in a worker thread; its result arrives on the reactor.
ThreadRunner = Callable[[Callable[[], T]], Deferred[T]]


@dataclass(frozen=True)
class Runtime:
    """The configuration and the services a plugin may use."""

    config: Config
    #: The reactor: IReactorTime, IReactorProcess, IReactorThreads.
    reactor: Any
    #: An HTTP client with treq's interface (``treq`` itself, or ``treq.testing.StubTreq``).
    http: Any
    processes: ProcessRunner
    run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]]


@dataclass(frozen=True)
class Provider(Generic[T]):
    """A named implementation a plugin offers: a storage backend, a package source,
    or a layering strategy. ``create`` is called once, at start-up, if the
    configuration selects ``name``."""

    name: str
    summary: str
    create: Callable[[Runtime], T]
