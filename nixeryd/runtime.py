"""What plugins are built with: the configuration and the injected services.

Nothing in nixeryd imports a global reactor or HTTP client; the composition
root (:mod:`nixeryd.service`) builds a :class:`Runtime` once and hands it to
every plugin factory, so tests can pass fakes (a memory reactor, StubTreq, an
expectation fake for processes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred

from nixeryd.config import Config
from nixeryd.process import ProcessRunner
from nixeryd.settings import Setting, resolve

T = TypeVar("T")
_R = TypeVar("_R")


class ThreadRunner(Protocol):
    """Runs a blocking call (file I/O, hashing, a blocking library) in a worker thread.

    Call it on the reactor thread; the Deferred fires there with ``work``'s
    result or exception. The server's runner uses a thread pool sized from
    the cores and stopped at shutdown; work must not touch the reactor except
    through ``reactor.callFromThread``.
    """

    def __call__(self, work: Callable[[], _R], /) -> Deferred[_R]: ...


@dataclass(frozen=True)
class Runtime:
    """The configuration and the services a plugin may use."""

    config: Config
    #: The reactor: IReactorTime, IReactorProcess, IReactorThreads.
    reactor: Any
    #: An HTTP client with treq's interface (``treq`` itself, or ``treq.testing.StubTreq``).
    http: Any
    #: Runs commands (Nix, git) without blocking the reactor; a fake in tests.
    processes: ProcessRunner
    #: Where blocking work goes: ``run_in_thread(work)`` runs ``work()`` in a worker
    #: thread and fires on the reactor thread (see :class:`ThreadRunner`).
    run_in_thread: ThreadRunner
    #: The settings the provider being created declared, resolved (:mod:`nixeryd.settings`).
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Provider(Generic[T]):
    """A named implementation a plugin offers: a storage backend, a package source,
    or a layering strategy. ``create`` is called once, at start-up, if the
    configuration selects ``name``, with ``runtime.settings`` holding the
    declared ``settings`` resolved."""

    name: str
    summary: str
    create: Callable[[Runtime], T]
    settings: tuple[Setting, ...] = ()

    def create_with(self, runtime: Runtime) -> T:
        """``create``, given the runtime with this provider's settings resolved from the
        ``[plugin.<name>]`` table and the environment; ConfigError if they are wrong."""
        table = runtime.config.plugin_options.get(self.name, {})
        settings = resolve(self.name, self.settings, table, runtime.config.environment)
        return self.create(replace(runtime, settings=settings))
