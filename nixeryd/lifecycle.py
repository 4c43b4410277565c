"""The daemon's lifecycle: what it runs, started in order and stopped in the reverse order.

Everything that holds threads, connections, processes or files is a
:class:`Step` of the :class:`Lifecycle` (a Twisted service): thread pools,
the HTTP client's connections, storage, the Nix commands and their garbage
collector roots, the listeners. A step starts only once the one before it
has (storage only once the threads it writes with run, the listeners only
once storage is ready, ``READY=1`` only once every listener listens), and a
step that cannot start stops the daemon with its reason. Stopping runs the
other way, one step at a time: listeners stop accepting first, requests
still waiting are answered (:class:`Drain`), Nix is killed with its
builders and their roots are dropped, and only then do the thread pools and
storage stop, so nothing still running uses what was stopped under it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import MultiService, Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.defer import maybeDeferred as maybe_deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from nixeryd.answers import SERVER
from nixeryd.errors import ShuttingDown
from nixeryd.registry import API_VERSION
from nixeryd.systemd import Notifier

log = Logger()

Action = Callable[[], "Deferred[Any] | Any"]


class Step(Service):
    """One thing the daemon starts and stops, by name (for the log and systemd's status).

    ``start`` and ``stop`` may return a Deferred: the next step waits for it.
    """

    def __init__(self, name: str, start: Action | None = None, stop: Action | None = None) -> None:
        super().__init__()
        self.setName(name)
        self._start = start
        self._stop = stop

    @property
    def starts(self) -> bool:
        """True if starting it does something (it is only stopped otherwise)."""
        return self._start is not None

    def begin(self) -> Deferred[Any]:
        """Start, firing once started (or failing with why it could not)."""
        Service.startService(self)
        return maybe_deferred(self._start) if self._start is not None else succeed(None)

    def startService(self) -> None:
        """Start outside a :class:`Lifecycle`, which calls :meth:`begin` to wait for it."""
        self.begin().addErrback(lambda f: log.failure("{step} did not start", f, step=self.name))

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        return maybe_deferred(self._stop) if self._stop is not None else succeed(None)


class StartFailed(Exception):
    """A step could not start: its name, and why."""

    def __init__(self, step: str, failure: Failure) -> None:
        super().__init__(f"{step} did not start: {failure.getErrorMessage()}")
        self.step = step
        self.failure = failure


class Lifecycle(MultiService):
    """Starts its :class:`Step` children one after another; stops them in reverse."""

    def __init__(self, reactor: Any, notifier: Notifier | None = None) -> None:
        super().__init__()
        self._reactor = reactor
        self._notifier = notifier or Notifier(None)
        self._starting: Deferred[None] | None = None
        #: The step that could not start, and why, for the command's exit status.
        self.failed_step: str | None = None
        self.failure: Failure | None = None

    def add(self, name: str, start: Action | None = None, stop: Action | None = None) -> Step:
        """Add a step, started after those added before it and stopped before them."""
        step = Step(name, start, stop)
        step.setServiceParent(self)
        return step

    def start(self) -> Deferred[None]:
        """Start the steps in turn; fires once all have, fails with :class:`StartFailed`
        (or CancelledError when stopped first). A one-off command waits for it."""
        # Marks this service running; the steps are started in turn by _start_steps.
        Service.startService(self)
        started: Deferred[None] = Deferred()
        self._starting = self._start_steps(started)
        return started

    def startService(self) -> None:
        """The daemon's start: a step that cannot start stops the reactor."""
        self.start().addErrback(self._not_started)

    def _not_started(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        failure.trap(StartFailed)
        failed = cast(StartFailed, failure.value)
        log.critical(
            "{step} did not start: {reason}",
            step=failed.step,
            reason=failed.failure.getErrorMessage(),
        )
        # Start-up may fail before the reactor runs; stopping it then would be refused.
        self._reactor.callWhenRunning(self._reactor.stop)

    @inlineCallbacks
    def _start_steps(self, started: Deferred[None]) -> Any:
        for step in list(self):
            if not self.running:
                started.errback(Failure(CancelledError()))
                return
            if step.starts:
                self._notifier.status(f"starting: {step.name}")
            try:
                yield step.begin()
            except CancelledError:
                started.errback(Failure(CancelledError()))  # stopped while starting
                return
            except Exception:
                self.failed_step, self.failure = step.name, Failure()
                step.running = False
                started.errback(StartFailed(step.name, self.failure))
                return
        started.callback(None)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._starting is not None:
            # A step still starting (storage waiting for a bucket) is stopped with the others;
            # once every step has started, this does nothing.
            self._starting.cancel()
        return self._stop_steps([step for step in reversed(list(self)) if step.running])

    @inlineCallbacks
    def _stop_steps(self, steps: list[Any]) -> Any:
        for step in steps:
            try:
                yield step.stopService()
            except Exception:
                log.failure("{step} did not stop cleanly", Failure(), step=step.name)
        log.info("stopped")
        self._notifier.close()


class Listener:
    """Listening on one endpoint with the site: a step's start and stop."""

    def __init__(self, description: str, endpoint: Any, factory: Any) -> None:
        """``endpoint`` is an IStreamServerEndpoint, ``factory`` the site."""
        self.description = description
        self._endpoint = endpoint
        self._factory = factory
        #: The IListeningPort while listening.
        self._port: Any = None

    @inlineCallbacks
    def start(self) -> Any:
        self._port = yield self._endpoint.listen(self._factory)
        log.info("listening on {address}", address=self.address)

    @property
    def address(self) -> str:
        """Where it listens, as ``host:port`` (``[::]:8080``), or the endpoint's description."""
        host = self._port.getHost() if self._port is not None else None
        if host is None or not hasattr(host, "port"):
            return self.description
        return f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"

    def stop(self) -> Deferred[None] | None:
        """Stop accepting connections; those open stay, for :class:`Drain` to answer."""
        port, self._port = self._port, None
        return port.stopListening() if port is not None else None


#: Seconds the requests already sending a response (a blob) may take to finish once the
#: daemon stops; then the reactor closes their connections.
DRAIN_GRACE = 5.0


class Drain:
    """The requests being answered, so that stopping answers them rather than resetting them.

    Once :meth:`stop` is called, every request that has not started its
    response gets a 503 ``UNAVAILABLE`` registry error ("nixeryd is shutting
    down") and its connection closes, as does every request that arrives on
    an open connection afterwards; a response already being sent (a blob)
    gets up to :data:`DRAIN_GRACE` seconds to finish. The builds the answered
    requests waited for are stopped by the next steps, with the Nix commands.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._requests: set[DrainingRequest] = set()
        self.stopping = False

    def request(self, channel: Any, *args: Any) -> DrainingRequest:
        """A request of ``channel``: the site's request factory."""
        return DrainingRequest(channel, *args, drain=self)

    @property
    def in_flight(self) -> int:
        """How many requests are being answered."""
        return len(self._requests)

    def track(self, request: DrainingRequest) -> None:
        self._requests.add(request)
        request.notifyFinish().addBoth(lambda _: self._requests.discard(request))

    def stop(self) -> Deferred[Any]:
        self.stopping = True
        waiting = [request for request in self._requests if not request.startedWriting]
        if waiting:
            log.info("answering {count} requests in flight: shutting down", count=len(waiting))
        for request in waiting:
            request.answer_shutting_down()
        sending = [request.notifyFinish() for request in self._requests]
        if not sending:
            return succeed(None)
        log.info(
            "waiting up to {grace:g} s for {count} responses", grace=DRAIN_GRACE, count=len(sending)
        )
        finished = gatherResults(sending, consumeErrors=True)
        finished.addTimeout(DRAIN_GRACE, self._clock)
        return finished.addErrback(lambda _: None)


class DrainingRequest(Request):
    """A request :class:`Drain` keeps track of while it is answered."""

    def __init__(self, channel: Any, *args: Any, drain: Drain) -> None:
        super().__init__(channel, *args)
        self._drain = drain
        #: Answered by :meth:`answer_shutting_down`: what the route writes later is dropped.
        self._shut = False

    def process(self) -> None:
        if self._drain.stopping:
            self.answer_shutting_down()
            return
        self._drain.track(self)
        super().process()

    def answer_shutting_down(self) -> None:
        """Answer 503 now, close the connection after it, and drop the route's own answer.

        Those waiting for the request's end are told it ended without its own
        answer (as a lost connection tells them), which is what makes klein
        cancel the route's Deferred quietly rather than log the route's later
        failure as unhandled.
        """
        body = json.dumps(ShuttingDown("nixeryd is shutting down; try again").as_json()).encode()
        self.setResponseCode(ShuttingDown.status)
        self.responseHeaders = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"Content-Length": [b"%d" % len(body)],
                b"Retry-After": [b"5"],
                b"Docker-Distribution-API-Version": [API_VERSION],
                b"Server": [SERVER],
            }
        )
        self.setHeader(b"Connection", b"close")
        self.channel.persistent = False
        waiting, self.notifications = self.notifications, []
        self.write(body)
        self.finish()
        self._shut = True
        for notification in waiting:
            notification.errback(Failure(CancelledError("nixeryd is shutting down")))

    def write(self, data: bytes) -> None:
        if not self._shut:
            super().write(data)

    def finish(self) -> None:
        if not self._shut:
            super().finish()
