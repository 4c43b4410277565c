"""Real clients pull over TLS with credentials: Basic (htpasswd) and the token flow.

One nixeryd per provider listens on an ``ssl:`` endpoint with a certificate
of a private CA made here; skopeo, podman, containerd (ctr), the Docker
engine and oras each pull ``shell/hello`` with a user's password, and a pull
without credentials is refused with 401 and the provider's challenge, in
both policies. The Docker engine treats 127.0.0.0/8 registries as insecure
(TLS without verification; its CA directory is under /etc), so for it the
test checks TLS and credentials, not the CA.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from tests.e2e.conftest import TEST_PACKAGES, free_port, nix_env, require

# The private engines of the client matrix, as fixtures here too.
from tests.e2e.test_clients import IMAGE, containerd, dockerd, run  # noqa: F401
from tests.tlsfiles import PrivateCA

pytestmark = [pytest.mark.e2e, pytest.mark.clients]

USER, PASSWORD = "alice", "pull-Passw0rd"


class TlsDaemon:
    """``nixeryd serve`` on an ``ssl:`` endpoint with authentication, from a config file."""

    def __init__(self, workdir: Path, auth: str, policy: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca = PrivateCA(workdir)
        key, cert = workdir / "key.pem", workdir / "cert.pem"
        self.ca.issue("localhost", key, cert)
        # Clients read a CA from a directory: podman and skopeo's --cert-dir.
        self.cert_dir = workdir / "certs"
        self.cert_dir.mkdir()
        (self.cert_dir / "ca.crt").write_bytes(self.ca.path.read_bytes())
        htpasswd = workdir / "htpasswd"
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(8)).decode()
        htpasswd.write_text(f"{USER}:{hashed}\n")
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"https://{self.host}"
        self.auth = auth
        config = workdir / "nixeryd.toml"
        config.write_text(
            f'listen = ["ssl:{self.port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"]\n'
            f'auth = "{auth}"\nauth_policy = "{policy}"\n'
            f'[plugin.{auth}]\nhtpasswd = "{htpasswd}"\n'
        )
        self.log_path = workdir / "nixeryd.log"
        env = nix_env(
            NIXERY_PKGS_PATH=str(TEST_PACKAGES),
            STORAGE_PATH=str(workdir / "storage"),
            NIXERYD_CONFIG=str(config),
            PORT="",
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nixeryd", "serve"], env=env, stdout=log, stderr=log
            )
        self.tls = ssl.create_default_context(cafile=str(self.ca.path))
        deadline = time.monotonic() + 30
        while self.get("/v2/")[0] == 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nixeryd did not start:\n{self.log()}")
            time.sleep(0.1)

    def get(self, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of a GET over TLS (status 0: nothing is listening)."""
        request = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, context=self.tls, timeout=60) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()
        except OSError:
            return 0, {}, b""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=15)


@pytest.fixture(scope="module", params=["htpasswd", "token"])
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    instance = TlsDaemon(tmp_path_factory.mktemp(f"auth-{request.param}"), request.param,
                         "everything")  # fmt: skip
    yield instance
    instance.stop()
    assert PASSWORD not in instance.log()
    if request.param == "token":
        assert '"GET /token?' in instance.log()  # the token flow, not Basic, was used


def challenge(registry: TlsDaemon, name: str) -> str:
    if registry.auth == "htpasswd":
        return 'Basic realm="nixeryd"'
    return (
        f'Bearer realm="https://{registry.host}/token",service="nixeryd",'
        f'scope="repository:{name}:pull"'
    )


def test_a_wrong_password_is_refused_by_the_daemon_and_the_clients(secured: TlsDaemon) -> None:
    # The password is checked in a worker thread; the refusal that comes from there once
    # let every request through.
    for user, password in ((USER, "wrong-Passw0rd"), ("mallory", PASSWORD)):
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        for path in (
            "/v2/",
            f"/v2/{IMAGE}/manifests/latest",
            f"/token?scope=repository:{IMAGE}:pull",
        ):
            status, _, body = secured.get(path, Authorization=f"Basic {token}")
            assert status == 401, (user, path, body)
    with pytest.raises(AssertionError, match=r"401|nauthorized|authentication required"):
        run("skopeo", "inspect", "--cert-dir", str(secured.cert_dir),
            "--creds", f"{USER}:wrong-Passw0rd", f"docker://{secured.host}/{IMAGE}")  # fmt: skip


def test_an_unauthenticated_pull_is_refused_with_the_challenge(secured: TlsDaemon) -> None:
    status, headers, body = secured.get(f"/v2/{IMAGE}/manifests/latest")
    assert status == 401
    assert headers["WWW-Authenticate"] == challenge(secured, IMAGE)
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    # Held in memory after an authenticated pull: still refused without credentials.
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    status, _, manifest = secured.get(
        f"/v2/{IMAGE}/manifests/latest", Authorization=f"Basic {token}"
    )
    assert status == 200
    digest = json.loads(manifest)["config"]["digest"]
    assert secured.get(f"/v2/{IMAGE}/blobs/{digest}", Authorization=f"Basic {token}")[0] == 200
    status, headers, _ = secured.get(f"/v2/{IMAGE}/blobs/{digest}")
    assert status == 401
    assert headers["WWW-Authenticate"] == challenge(secured, IMAGE)
    with pytest.raises(AssertionError, match=r"401|nauthorized|authentication required"):
        run("skopeo", "inspect", "--cert-dir", str(secured.cert_dir),
            f"docker://{secured.host}/{IMAGE}")  # fmt: skip


def test_skopeo(secured: TlsDaemon, tmp_path: Path) -> None:
    run("skopeo", "copy", "--src-cert-dir", str(secured.cert_dir), "--src-creds",
        f"{USER}:{PASSWORD}", f"docker://{secured.host}/{IMAGE}",
        f"oci:{tmp_path}/layout:latest")  # fmt: skip
    assert (tmp_path / "layout" / "index.json").is_file()


def test_podman(secured: TlsDaemon, tmp_path: Path) -> None:
    require("podman")
    conf = tmp_path / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{tmp_path}/graph"\nrunroot = "{tmp_path}/run"\n'
    )
    output = run("podman", "--cgroup-manager=cgroupfs", "--events-backend=file", "pull",
                 "--quiet", "--cert-dir", str(secured.cert_dir), "--creds",
                 f"{USER}:{PASSWORD}", f"{secured.host}/{IMAGE}",
                 env={"CONTAINERS_STORAGE_CONF": str(conf)})  # fmt: skip
    assert output.strip()


def test_containerd(secured: TlsDaemon, containerd: str, tmp_path: Path) -> None:  # noqa: F811
    # ctr speaks plain HTTP to 127.0.0.1 unless a hosts.toml names an https server.
    hosts = tmp_path / "hosts" / secured.host
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        f'server = "{secured.url}"\n[host."{secured.url}"]\n'
        f'  capabilities = ["pull", "resolve"]\n  ca = "{secured.ca.path}"\n'
    )
    run("ctr", "-a", containerd, "images", "pull", "--snapshotter", "native", "--hosts-dir",
        str(tmp_path / "hosts"), "--user", f"{USER}:{PASSWORD}",
        f"{secured.host}/{IMAGE}:latest")  # fmt: skip
    if secured.auth == "token":
        # containerd fetches its token with the OAuth2 POST form, or with GET after a
        # refusal; either way through the token endpoint. The daemon's log reaches its
        # file a moment after the answer reaches the client.
        deadline = time.monotonic() + 10
        while not re.search(r'"(GET|POST) /token[^"]*" 200 .*containerd', secured.log()):
            assert time.monotonic() < deadline, "containerd did not get a token"
            time.sleep(0.1)


def test_docker_engine(secured: TlsDaemon, dockerd: list[str], tmp_path: Path) -> None:  # noqa: F811
    config = ["--config", str(tmp_path / "docker")]
    docker = [dockerd[0], *config, *dockerd[1:]]
    run(*docker, "login", "--username", USER, "--password-stdin", secured.host,
        input_text=PASSWORD)  # fmt: skip
    run(*docker, "pull", "--quiet", f"{secured.host}/{IMAGE}")


def test_oras_python_client(secured: TlsDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    import oras.client

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(secured.ca.path))
    backend = "basic" if secured.auth == "htpasswd" else "token"
    client = oras.client.OrasClient(hostname=secured.host, auth_backend=backend)
    client.login(username=USER, password=PASSWORD, hostname=secured.host)
    manifest = client.get_manifest(f"{secured.host}/{IMAGE}:latest")
    assert manifest["layers"]


@pytest.fixture
def builds_only(tmp_path: Path) -> Iterator[TlsDaemon]:
    instance = TlsDaemon(tmp_path / "builds", "token", "builds")
    yield instance
    instance.stop()


def test_builds_policy_refuses_anonymous_builds_and_serves_built_images(
    builds_only: TlsDaemon, tmp_path: Path
) -> None:
    registry = builds_only
    status, headers, _ = registry.get(f"/v2/{IMAGE}/manifests/latest")
    assert status == 401
    assert headers["WWW-Authenticate"] == challenge(registry, IMAGE)
    anonymous = ["skopeo", "inspect", "--cert-dir", str(registry.cert_dir),
                 f"docker://{registry.host}/{IMAGE}"]  # fmt: skip
    with pytest.raises(AssertionError):
        run(*anonymous)
    run("skopeo", "copy", "--src-cert-dir", str(registry.cert_dir), "--src-creds",
        f"{USER}:{PASSWORD}", f"docker://{registry.host}/{IMAGE}",
        f"oci:{tmp_path}/layout:latest")  # fmt: skip
    assert json.loads(run(*anonymous))["Name"] == f"{registry.host}/{IMAGE}"
