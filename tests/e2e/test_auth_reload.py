"""What a running daemon reads again without a restart: its TLS certificate on SIGHUP,
and its htpasswd file when that changes; each seen by real TLS clients.

The certificate is replaced by one of the same size and modification time, so that
the daemon's own look at the files (modification time and size, once a second) cannot
tell: only SIGHUP makes it read them again.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from cryptography import x509

from tests.e2e.conftest import require
from tests.e2e.test_auth_clients import PASSWORD, USER, TlsDaemon

pytestmark = pytest.mark.e2e


@pytest.fixture
def secured(tmp_path: Path) -> Any:
    instance = TlsDaemon(tmp_path / "reload", "htpasswd", "everything")
    yield instance
    instance.stop()


def _served_serial(registry: TlsDaemon) -> int:
    """The serial number of the certificate a new TLS connection is given (verified)."""
    with (
        socket.create_connection(("127.0.0.1", registry.port), timeout=10) as raw,
        registry.tls.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_serves_a_new_certificate_the_file_watch_cannot_see(
    secured: TlsDaemon, tmp_path: Path
) -> None:
    workdir = secured.log_path.parent
    key, cert = workdir / "key.pem", workdir / "cert.pem"
    before = _served_serial(secured)
    stamps = {path: os.stat(path) for path in (key, cert)}
    for _ in range(200):  # a new pair of the same sizes (a serial's DER length varies)
        new_key, new_cert = tmp_path / "key.pem", tmp_path / "cert.pem"
        issued = secured.ca.issue("localhost", new_key, new_cert)
        if all(os.stat(new).st_size == stamps[old].st_size
               for new, old in ((new_key, key), (new_cert, cert))):  # fmt: skip
            break
    else:
        pytest.fail("no certificate of the same size was issued")
    for new, old in ((new_key, key), (new_cert, cert)):
        shutil.copyfile(new, old)
        os.utime(old, ns=(stamps[old].st_atime_ns, stamps[old].st_mtime_ns))
    time.sleep(1.5)  # past the file watch's interval: it looks, and sees no change
    assert _served_serial(secured) == before
    secured.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while _served_serial(secured) != issued.serial_number:
        assert time.monotonic() < deadline, "SIGHUP did not load the new certificate"
        time.sleep(0.1)
    assert secured.process.poll() is None, "SIGHUP stopped the daemon"
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert secured.get("/v2/", Authorization=f"Basic {token}")[0] == 200
    assert "TLS certificate" in secured.log() and "loaded" in secured.log()


def test_a_user_added_to_the_htpasswd_file_pulls_without_a_restart(
    secured: TlsDaemon, tmp_path: Path
) -> None:
    require("skopeo")
    htpasswd = secured.log_path.parent / "htpasswd"
    inspect = ["skopeo", "inspect", "--cert-dir", str(secured.cert_dir),
               "--creds", "bob:bobs-Passw0rd", f"docker://{secured.host}/hello"]  # fmt: skip
    refused = subprocess.run(inspect, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    hashed = bcrypt.hashpw(b"bobs-Passw0rd", bcrypt.gensalt(8)).decode()
    htpasswd.write_text(htpasswd.read_text() + f"bob:{hashed}\n")
    pulled = subprocess.run(inspect, capture_output=True, text=True, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    assert "htpasswd file" in secured.log() and "read again" in secured.log()
    assert secured.process.poll() is None
