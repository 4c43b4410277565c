"""systemd's service notifications, written in-tree: a datagram to ``$NOTIFY_SOCKET``.

A ``Type=notify`` unit is started once the daemon says ``READY=1``; until then
systemd holds back the units ordered after it, and a socket-activated client
waits in the socket's queue rather than hitting a daemon that cannot answer.
The protocol is one ``KEY=value`` line per field in one datagram to a Unix
socket whose address systemd passes in ``NOTIFY_SOCKET`` (a path, or an
abstract name written with a leading ``@``); python-systemd's binding to
libsystemd would be a C dependency for a dozen lines of socket code.

The watchdog (``WatchdogSec=``): systemd passes ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``, the process it means) and restarts a service that says
``WATCHDOG=1`` less often than that. :class:`Watchdog` says it from the
reactor every half interval, so a reactor stuck in a blocking call (a hung
storage driver, a deadlock) misses its pings and is restarted.

Sending never raises: a daemon started by hand, or by a service manager that
stopped listening, must keep serving. The variables are taken out of the
environment once read, so the Nix commands the daemon runs (which inherit
it) cannot speak for the daemon.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


class Notifier:
    """Sends notifications to systemd's socket at ``address``; does nothing without one."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """``address`` is ``NOTIFY_SOCKET``'s value; ``watchdog_usec`` the watchdog's
        interval in microseconds, when systemd asks for pings from this process."""
        self._name = address
        self._address = _socket_address(address) if address else None
        self._socket: socket.socket | None = None
        #: Seconds between watchdog pings (half systemd's interval), or None: no watchdog.
        self.watchdog_interval = watchdog_usec / 2_000_000 if watchdog_usec else None

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str]) -> Notifier:
        """The notifier systemd's variables in ``environ`` call for; they are removed."""
        address = environ.pop("NOTIFY_SOCKET", None)
        usec = environ.pop("WATCHDOG_USEC", None)
        pid = environ.pop("WATCHDOG_PID", None)
        interval = None
        if usec is not None and (pid is None or pid == str(os.getpid())):
            try:
                interval = int(usec)
            except ValueError:
                log.warn("WATCHDOG_USEC={usec!r} is not a number; no watchdog", usec=usec)
        return cls(address, interval if interval and interval > 0 else None)

    @property
    def enabled(self) -> bool:
        """True when a service manager listens."""
        return self._address is not None

    def send(self, **fields: str) -> None:
        """Send ``fields`` (``READY="1"``, ``STATUS="..."``) in one datagram."""
        if self._address is None:
            return
        message = "".join(f"{key}={value}\n" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # A full queue drops the message rather than stalling the reactor.
                self._socket.setblocking(False)
            self._socket.sendto(message, self._address)
        except OSError as error:
            log.warn(
                "cannot notify systemd at {address}: {error}",
                address=self._name,
                error=error,
            )

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(address: str) -> str | bytes:
    """The socket address ``NOTIFY_SOCKET`` names: ``@name`` is the abstract ``\\0name``."""
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


class Watchdog:
    """``WATCHDOG=1`` every ``notifier.watchdog_interval`` seconds, from the reactor."""

    def __init__(self, notifier: Notifier, clock: Any) -> None:
        self._notifier = notifier
        self._loop = LoopingCall(notifier.send, WATCHDOG="1")
        self._loop.clock = clock

    def start(self) -> None:
        interval = self._notifier.watchdog_interval
        if interval is not None and self._notifier.enabled:
            log.info("pinging systemd's watchdog every {interval:g} s", interval=interval)
            self._loop.start(interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
