"""The fuzz benchmark's account of 200 answers to targets with ``..``: legitimate kinds
are named, anything else is "not explained" (and fails tests/e2e/test_fuzz.py)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator

import pytest

from benchmarks.fuzz import classify_dotdot

BODY = b'{"schemaVersion": 2}'


class _Registry(http.server.BaseHTTPRequestHandler):
    """One route of a registry's, and 404 for everything else."""

    def do_GET(self) -> None:
        found = self.path == "/v2/hello/manifests/latest"
        self.send_response(200 if found else 404)
        self.send_header("Content-Length", str(len(BODY) if found else 0))
        self.end_headers()
        if found:
            self.wfile.write(BODY)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("/v2/hello/manifests/latest?x=..", "dots in the query only"),
        ("/v2/a..b/manifests/latest", "dots within a name component"),
        ("/v2/hello/manifests/1.0..", "dots within a name component"),
        ("/v2/hello/x/../manifests/latest", "the answer of v2/... with dot segments removed"),
        ("/v2/hello/x/%2e%2e/manifests/./latest", "the answer of v2/... with dot segments removed"),
        ("/v2/../../canary", "not explained"),
    ],
)
def test_each_200_to_a_dotdot_target_is_explained_or_not(port: int, target: str, why: str) -> None:
    assert classify_dotdot(port, "GET", target, hashlib.sha256(BODY).hexdigest()) == why


def test_other_bytes_than_the_normalised_routes_are_not_explained(port: int) -> None:
    other = hashlib.sha256(b"the canary").hexdigest()
    assert classify_dotdot(port, "GET", "/v2/hello/x/../manifests/latest", other) == (
        "not explained"
    )
