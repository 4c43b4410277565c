"""A nixpkgs image that cannot be built, through the real daemon on a current Nix.

Nothing in nixpkgs can be built here (no binary cache, no network), which makes
``hello`` the failure every air-gapped site meets first: nearly a thousand
derivations planned, a download refused. The client gets the cause, Nix runs once
for a GET and a HEAD, the info log stays short, and the index page links the
whole of what Nix printed.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

from tests.e2e.conftest import Daemon
from tests.nixinstalls import NixInstallation


def answer(daemon: Daemon, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(daemon.url + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_a_failed_nixpkgs_build_is_answered_once_and_logged_briefly(
    tmp_path: Path, modern_nix: NixInstallation, nixpkgs: Path
) -> None:
    daemon = Daemon(
        tmp_path, NIXERY_PKGS_PATH=str(nixpkgs), NIXERYD_NIX_BIN_DIR=str(modern_nix.bin_dir)
    )
    try:
        status, body = answer(daemon, "/v2/hello/manifests/latest")
        assert status == 404
        message = json.loads(body)["errors"][0]["message"]
        assert "error: unable to download" in message.splitlines()[1], message
        assert answer(daemon, "/v2/hello/manifests/latest", "HEAD")[0] == 404
        _, page = answer(daemon, "/")
        links = re.findall(rb'href="(/errors/\d+/log)"', page)
        assert len(links) == 1, "one failure, listed once"
        status, log = answer(daemon, links[0].decode())
        assert status == 200
        assert log.count(b"\nbuild: ") > 500, "the full log has every line Nix printed"
    finally:
        daemon.stop()
    lines = daemon.log().splitlines()
    assert sum(" evaluation done " in line for line in lines) == 1, "Nix ran more than once"
    assert len(lines) < 50, "\n".join(lines)
