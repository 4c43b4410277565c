"""TLS listeners whose certificate is read again when it changes, without a restart.

A ``listen`` endpoint ``ssl:8443:privateKey=key.pem:certKey=cert.pem`` is
Twisted's ``ssl:`` syntax (``certKey`` defaults to ``privateKey`` when the
one file holds both; ``extraCertChainFile`` adds intermediates), but served
by :class:`ReloadingContextFactory`: each new connection gets the context
of the files as they are now. The files are looked at (their modification
time and size) at most once per :data:`CHECK_SECONDS`, and at once on
``SIGHUP``; a certificate renewed by certbot or cert-manager is served to
the next client. A pair that does not load (a half-written file, a key that
does not match) is logged and the previous one is kept.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import endpoints
from twisted.logger import Logger

from nixeryd.config import ConfigError

log = Logger()

#: Seconds between looks at the certificate files.
CHECK_SECONDS = 1.0


class ReloadingContextFactory:
    """An old-style Twisted context factory that reloads its certificate files."""

    def __init__(self, key: str, certificate: str, chain: str | None = None) -> None:
        self._files = tuple(path for path in (key, certificate, chain) if path)
        self._key = key
        self._certificate = certificate
        self._chain = chain
        self._stamp = self._stamps()
        self._checked = time.monotonic()
        try:
            self._context = self._load()
        except (OSError, SSL.Error, crypto.Error) as error:
            raise ConfigError(f"TLS certificate {certificate} or key {key}: {error}") from error

    def _stamps(self) -> tuple[tuple[float, int], ...]:
        stamps = []
        for path in self._files:
            try:
                status = os.stat(path)
            except OSError:
                stamps.append((0.0, -1))
            else:
                stamps.append((status.st_mtime, status.st_size))
        return tuple(stamps)

    def _load(self) -> SSL.Context:
        """A server context of the files now: TLS 1.2 or later, OpenSSL's default ciphers.

        The certificate file may hold the chain after the certificate, as
        certbot's ``fullchain.pem`` does; ``extraCertChainFile`` adds more.
        """
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        context.use_privatekey_file(self._key)
        context.use_certificate_chain_file(self._certificate)
        if self._chain:
            with open(self._chain, "rb") as file:
                for extra in _certificates(file.read()):
                    context.add_extra_chain_cert(extra)
        context.check_privatekey()
        return context

    def reload(self) -> None:
        """Read the files again now; keep the current pair if the new one does not load."""
        self._stamp = self._stamps()
        try:
            self._context = self._load()
        except (OSError, SSL.Error, crypto.Error, ValueError) as error:
            log.error(
                "TLS certificate {certificate} not reloaded, the previous one is served: {error}",
                certificate=self._certificate,
                error=error,
            )
            return
        log.info("TLS certificate {certificate} loaded", certificate=self._certificate)

    def getContext(self) -> SSL.Context:
        """The context for a new connection, after a look at the files now and then."""
        now = time.monotonic()
        if now - self._checked >= CHECK_SECONDS:
            self._checked = now
            if self._stamps() != self._stamp:
                self.reload()
        return self._context


def _certificates(pem: bytes) -> list[crypto.X509]:
    marker = b"-----END CERTIFICATE-----"
    return [
        crypto.load_certificate(crypto.FILETYPE_PEM, block + marker)
        for block in pem.split(marker)
        if block.strip()
    ]


def tls_endpoint(description: str, reactor: Any) -> endpoints.SSL4ServerEndpoint:
    """The endpoint of an ``ssl:`` description, whose certificate is reloaded."""
    args, options = endpoints._parse(description)  # type: ignore[attr-defined]
    if len(args) != 2 or not str(args[1]).isdigit():
        raise ConfigError(f"listen {description!r}: expected ssl:<port>:privateKey=<file>:...")
    key = options.pop("privateKey", None)
    if key is None:
        raise ConfigError(f"listen {description!r}: privateKey=<file> is required")
    contexts = ReloadingContextFactory(
        key, options.pop("certKey", key), options.pop("extraCertChainFile", None)
    )
    interface = options.pop("interface", "")
    backlog = int(options.pop("backlog", 50))
    if options:
        raise ConfigError(f"listen {description!r}: unsupported {', '.join(sorted(options))}")
    reactor.addSystemEventTrigger("after", "startup", _reload_on_hangup, reactor, contexts)
    return endpoints.SSL4ServerEndpoint(
        reactor, int(args[1]), contexts, backlog=backlog, interface=interface
    )


def _reload_on_hangup(reactor: Any, contexts: ReloadingContextFactory) -> None:
    """SIGHUP reads the certificate again at once (the files are also watched)."""
    previous = signal.getsignal(signal.SIGHUP)

    def hangup(number: int, frame: Any) -> None:
        reactor.callFromThread(contexts.reload)
        if callable(previous):
            previous(number, frame)

    signal.signal(signal.SIGHUP, hangup)
