"""TLS listeners: a renewed certificate is served to the next connection, no restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL

from nixeryd import tls
from nixeryd.config import ConfigError
from nixeryd.tls import ReloadingContextFactory
from tests.tlsfiles import PrivateCA


def served(contexts: ReloadingContextFactory) -> x509.Certificate:
    """The certificate a new connection is given."""
    certificate = SSL.Connection(contexts.getContext()).get_certificate()
    assert certificate is not None
    return certificate.to_cryptography()


def test_a_renewed_certificate_is_served_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = PrivateCA(tmp_path)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    first = ca.issue("registry.test", key, cert)
    contexts = ReloadingContextFactory(str(key), str(cert))
    assert served(contexts) == first

    monkeypatch.setattr(tls, "CHECK_SECONDS", 0.0)
    time.sleep(0.01)  # a later modification time
    renewed = ca.issue("registry.test", key, cert)
    assert served(contexts) == renewed

    # A half-written pair is not loaded: the previous one stays.
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    assert served(contexts) == renewed
    # SIGHUP's reload, with files unchanged since the last look.
    again = ca.issue("registry.test", key, cert)
    monkeypatch.setattr(tls, "CHECK_SECONDS", 3600.0)
    assert served(contexts) == renewed
    contexts.reload()
    assert served(contexts) == again


def test_a_certificate_that_does_not_load_stops_start_up(tmp_path: Path) -> None:
    ca = PrivateCA(tmp_path)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    ca.issue("registry.test", key, cert)
    ca.issue("registry.test", tmp_path / "other.pem", tmp_path / "other-cert.pem")
    with pytest.raises(ConfigError):
        ReloadingContextFactory(str(tmp_path / "other.pem"), str(cert))
    with pytest.raises(ConfigError, match="privateKey"):
        tls.tls_endpoint("ssl:8443:certKey=x", object())
