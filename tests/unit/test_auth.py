"""Authentication: htpasswd, the token endpoint and an external issuer's tokens, both
policies, answers held in memory, and credentials kept out of the log."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import bcrypt
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from nixeryd.accesslog import AccessLog
from nixeryd.auth import Gate, Identity, gated
from nixeryd.builtin.auth import Htpasswd
from nixeryd.config import ConfigError
from nixeryd.site import RegistryChannel, RegistrySite
from nixeryd.testing.harness import FakeNix, Harness, RegistryFactory, building, header

PASSWORD = "s3cret-Passw0rd"
SITE_KEY = "the-site-key-" + "k" * 32


def basic(user: str = "alice", password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    path.write_text(f"# users\nalice:{hashed}\n")
    return path


def with_auth(
    registry_with: RegistryFactory,
    nix: FakeNix,
    htpasswd: Path,
    auth: str = "htpasswd",
    policy: str = "everything",
    builds: int = 1,
    **settings: Any,
) -> Harness:
    expect = [step for _ in range(builds) for step in building(nix)]
    return registry_with(
        *expect,
        auth=auth,
        auth_policy=policy,
        plugin_options={auth: {"htpasswd": str(htpasswd), **settings}},
    )


def errors(body: bytes) -> list[str]:
    return [error["code"] for error in json.loads(body)["errors"]]


def test_without_auth_an_anonymous_pull_succeeds(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    """The figure before: no authentication at all."""
    response, _ = registry_with(*building(nix)).get("/v2/hello/manifests/latest")
    assert response.code == 200


def test_htpasswd_refuses_anonymous_and_wrong_credentials_and_pulls_with_right_ones(
    registry_with: RegistryFactory, nix: FakeNix, htpasswd: Path
) -> None:
    registry = with_auth(registry_with, nix, htpasswd)
    for path in ("/v2/", "/v2/hello/manifests/latest", "/"):
        response, body = registry.get(path)
        assert response.code == 401, path
        assert header(response, "WWW-Authenticate") == 'Basic realm="nixeryd"'
        assert errors(body) == ["UNAUTHORIZED"]
        assert header(response, "Docker-Distribution-API-Version") == "registry/2.0"
    for wrong in (basic(password="wrong"), basic(user="bob"), "Basic !!!", "Digest x"):
        response, body = registry.get(
            "/v2/hello/manifests/latest", headers={"Authorization": wrong}
        )
        assert response.code == 401
        assert errors(body) == ["UNAUTHORIZED"]
    assert registry.processes.unexpected == []
    response, body = registry.get("/v2/hello/manifests/latest", headers={"Authorization": basic()})
    assert response.code == 200, body
    assert registry.get("/v2/", headers={"Authorization": basic()})[0].code == 200


@pytest.mark.parametrize(
    "line", ["alice:$apr1$abc$def", "alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "alice:plain"]
)
def test_htpasswd_refuses_hashes_other_than_bcrypt_at_start(
    registry_with: RegistryFactory, tmp_path: Path, line: str
) -> None:
    path = tmp_path / "weak"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match="line 1: user 'alice' has a hash that is not bcrypt"):
        registry_with(auth="htpasswd", plugin_options={"htpasswd": {"htpasswd": str(path)}})


class Server:
    """The site with its channel fast path, over a harness's registry."""

    def __init__(self, registry: Harness, log_format: str = "text") -> None:
        self.log = io.StringIO()
        self.access_log = AccessLog(self.log, log_format, Clock())
        self.site = RegistrySite(
            registry.registry.resource(),
            registry.registry.answers,
            registry.registry.metrics,
            access_log=self.access_log,
            gate=registry.registry.gate,
        )
        self.site.startFactory()
        self.requests = 0
        factory = self.site.requestFactory

        def counting(*args: Any) -> Any:
            self.requests += 1
            return factory(*args)

        self.site.requestFactory = counting

    def exchange(self, path: str, *headers: str) -> tuple[bytes, bytes]:
        raw = "\r\n".join([f"GET {path} HTTP/1.1", "Host: registry", *headers]) + "\r\n\r\n"
        channel = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.7", 5555))
        assert isinstance(channel, RegistryChannel)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.7", 5555))
        channel.makeConnection(transport)
        channel.dataReceived(raw.encode())
        response = transport.value()
        channel.connectionLost(None)  # type: ignore[arg-type]
        status, _, rest = response.partition(b"\r\n")
        return status, rest


def remembered_paths(registry: Harness, authorization: str) -> list[str]:
    """Pull an image with credentials so its manifest by digest and blobs are remembered."""
    credentials = {"Authorization": authorization}
    _, body = registry.get("/v2/hello/manifests/latest", headers=credentials)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    paths = [f"/v2/hello/manifests/{digest}"]
    paths += [
        f"/v2/hello/blobs/{layer['digest']}"
        for layer in [json.loads(body)["config"], *json.loads(body)["layers"]]
    ]
    for path in paths:
        assert registry.get(path, headers=credentials)[0].code == 200
    return paths


def test_no_remembered_answer_bypasses_authentication(
    registry_with: RegistryFactory, nix: FakeNix, htpasswd: Path
) -> None:
    registry = with_auth(registry_with, nix, htpasswd)
    paths = remembered_paths(registry, basic())
    server = Server(registry)
    for path in paths:
        # Both ways a remembered answer is served: twisted.web's Request, and the channel.
        response, body = registry.get(path)
        assert response.code == 401, path
        assert errors(body) == ["UNAUTHORIZED"]
        status, rest = server.exchange(path)
        assert status == b"HTTP/1.1 401 Unauthorized", path
        assert b'WWW-Authenticate: Basic realm="nixeryd"' in rest
        status, _ = server.exchange(path, "Authorization: " + basic(password="wrong"))
        assert status == b"HTTP/1.1 401 Unauthorized"
    assert server.requests == 2 * len(paths)


def test_verified_credentials_are_answered_from_memory_by_the_channel(
    registry_with: RegistryFactory, nix: FakeNix, htpasswd: Path
) -> None:
    registry = with_auth(registry_with, nix, htpasswd)
    paths = remembered_paths(registry, basic())
    server = Server(registry)
    for path in paths:
        status, _ = server.exchange(path, "Authorization: " + basic())
        assert status == b"HTTP/1.1 200 OK"
    assert server.requests == 0
    # Two Authorization headers: twisted.web would read the last; the channel takes none.
    status, _ = server.exchange(paths[0], "Authorization: " + basic(), "Authorization: x")
    assert status == b"HTTP/1.1 401 Unauthorized"


def test_credentials_are_never_logged(
    registry_with: RegistryFactory, nix: FakeNix, htpasswd: Path, capsys: Any
) -> None:
    registry = with_auth(registry_with, nix, htpasswd, auth="token")
    server = Server(registry)
    encoded = basic().split()[1]
    status, rest = server.exchange("/token?service=nixeryd&scope=repository:hello:pull",
                                   "Authorization: " + basic())  # fmt: skip
    assert status == b"HTTP/1.1 200 OK"
    token = json.loads(rest.partition(b"\r\n\r\n")[2])["token"]
    for credentials in (basic(), basic(password="wrong"), f"Bearer {token}", "Bearer nonsense"):
        server.exchange("/v2/hello/manifests/latest", "Authorization: " + credentials)
    server.exchange(f"/v2/hello/manifests/latest?password={PASSWORD}")
    server.access_log.flush()
    logged = server.log.getvalue() + "".join(capsys.readouterr())
    assert logged.count("\n") >= 6
    for secret in (PASSWORD, encoded, token, "nonsense"):
        assert secret not in logged.replace(f"password={PASSWORD}", "")


def test_token_endpoint_get_and_post_then_bearer_pulls(
    registry_with: RegistryFactory, nix: FakeNix, htpasswd: Path
) -> None:
    registry = with_auth(registry_with, nix, htpasswd, auth="token")
    response, body = registry.get("/v2/hello/manifests/latest")
    assert response.code == 401
    assert header(response, "WWW-Authenticate") == (
        'Bearer realm="https://registry/token",service="nixeryd",scope="repository:hello:pull"'
    )
    assert errors(body) == ["UNAUTHORIZED"]
    challenge = registry.get("/v2/")[0]
    assert header(challenge, "WWW-Authenticate") == (
        'Bearer realm="https://registry/token",service="nixeryd"'
    )

    response, body = registry.get(
        "/token?service=nixeryd&scope=repository:hello:pull,push",
        headers={"Authorization": basic()},
    )
    assert response.code == 200, body
    answer = json.loads(body)
    assert set(answer) == {"token", "access_token", "expires_in", "issued_at"}
    assert answer["token"] == answer["access_token"]
    assert answer["expires_in"] == 300
    claims = jwt.decode(answer["token"], options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": "hello", "actions": ["pull"]}]
    bearer = {"Authorization": "Bearer " + answer["token"]}
    response, body = registry.get("/v2/hello/manifests/latest", headers=bearer)
    assert response.code == 200, body

    # A token for one repository does not pull another: the client is told what to ask for.
    response, body = registry.get("/v2/other/manifests/latest", headers=bearer)
    assert response.code == 401
    assert 'error="insufficient_scope"' in header(response, "WWW-Authenticate")  # type: ignore[operator]

    # containerd's OAuth2 form.
    response, body = registry.request(
        "POST",
        "http://registry/token",
        data={
            "grant_type": "password",
            "username": "alice",
            "password": PASSWORD,
            "service": "nixeryd",
            "scope": "repository:hello:pull repository:other:pull",
            "client_id": "containerd-client",
        },
    )
    assert response.code == 200, body
    claims = jwt.decode(json.loads(body)["access_token"], options={"verify_signature": False})
    assert [entry["name"] for entry in claims["access"]] == ["hello", "other"]
    for form in (
        {"grant_type": "password", "username": "alice", "password": "wrong"},
        {"grant_type": "password", "username": "alice"},
    ):
        assert registry.request("POST", "http://registry/token", data=form)[0].code == 401
    refresh = {"grant_type": "refresh_token", "refresh_token": "x"}
    assert registry.request("POST", "http://registry/token", data=refresh)[0].code == 400
    assert registry.get("/token", headers={"Authorization": basic(password="x")})[0].code == 401
    # Without credentials under the policy that needs them everywhere: no token.
    assert registry.get("/token?scope=repository:hello:pull")[0].code == 401


def test_a_token_signed_with_another_key_or_expired_is_refused(
    registry_with: RegistryFactory, nix: FakeNix, htpasswd: Path
) -> None:
    registry = with_auth(registry_with, nix, htpasswd, auth="token", key=SITE_KEY)
    access = [{"type": "repository", "name": "hello", "actions": ["pull"]}]
    now = int(time.time())
    claims = {"iss": "nixeryd", "aud": "nixeryd", "sub": "a", "exp": now + 60, "access": access}
    good = jwt.encode(claims, SITE_KEY, algorithm="HS256")
    for token in (
        jwt.encode(claims, "another-key-" + "x" * 32, algorithm="HS256"),
        jwt.encode({**claims, "exp": now - 60}, SITE_KEY, algorithm="HS256"),
        jwt.encode({**claims, "aud": "elsewhere"}, SITE_KEY, algorithm="HS256"),
    ):
        response, _ = registry.get("/v2/", headers={"Authorization": f"Bearer {token}"})
        assert response.code == 401
        assert 'error="invalid_token"' in header(response, "WWW-Authenticate")  # type: ignore[operator]
    assert registry.get("/v2/", headers={"Authorization": f"Bearer {good}"})[0].code == 200


def test_builds_policy_pulls_built_images_anonymously_and_builds_only_for_users(
    registry_with: RegistryFactory, nix: FakeNix, htpasswd: Path
) -> None:
    registry = with_auth(registry_with, nix, htpasswd, auth="token", policy="builds")
    response, body = registry.get("/v2/hello/manifests/latest")
    assert response.code == 401
    assert "only authenticated users may build" in json.loads(body)["errors"][0]["message"]
    assert header(response, "WWW-Authenticate") == (
        'Bearer realm="https://registry/token",service="nixeryd",scope="repository:hello:pull"'
    )
    assert registry.processes.unexpected == []  # no Nix ran for it
    # /v2/ still challenges, so that clients with credentials learn where to send them.
    assert registry.get("/v2/")[0].code == 401

    # An anonymous token (Docker asks for one without credentials) does not build either.
    _, body = registry.get("/token?service=nixeryd&scope=repository:hello:pull")
    anonymous = {"Authorization": "Bearer " + json.loads(body)["token"]}
    assert registry.get("/v2/hello/manifests/latest", headers=anonymous)[0].code == 401

    paths = remembered_paths(registry, basic())
    assert registry.get("/v2/hello/manifests/latest")[0].code == 200
    assert registry.get("/v2/hello/manifests/latest", headers=anonymous)[0].code == 200
    server = Server(registry)
    for path in paths:
        assert registry.get(path)[0].code == 200
        assert server.exchange(path)[0] == b"HTTP/1.1 200 OK"
    assert registry.get("/v2/other/manifests/latest")[0].code == 401


def test_builds_policy_shows_pages_of_built_images_anonymously_but_not_search(
    registry_with: RegistryFactory, nix: FakeNix, htpasswd: Path
) -> None:
    registry = with_auth(registry_with, nix, htpasswd, policy="builds")
    for path in ("/", "/images/hello:latest", "/images?name=hello"):
        assert registry.get(path)[0].code in (200, 302), path
    # Search evaluates the package set, and metrics are the operator's: users only.
    for path in ("/search?q=hello", "/metrics"):
        assert registry.get(path)[0].code == 401, path
    assert registry.get("/search?q=hello", headers={"Authorization": basic()})[0].code != 401
    everything = with_auth(registry_with, nix, htpasswd, policy="everything")
    assert everything.get("/")[0].code == 401
    assert everything.get("/images/hello:latest")[0].code == 401


def test_builds_policy_remembers_built_names_across_restarts(
    registry_with: RegistryFactory, nix: FakeNix, htpasswd: Path
) -> None:
    first = with_auth(registry_with, nix, htpasswd, policy="builds")
    assert (
        first.get("/v2/hello/manifests/latest", headers={"Authorization": basic()})[0].code == 200
    )
    again = with_auth(registry_with, nix, htpasswd, policy="builds")
    assert again.get("/v2/hello/manifests/latest")[0].code == 200


@pytest.fixture
def issuer(tmp_path: Path) -> tuple[Any, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    return key, path


def test_tokens_of_an_external_issuer_are_checked_against_its_keys(
    registry_with: RegistryFactory, nix: FakeNix, issuer: tuple[Any, Path]
) -> None:
    key, jwks = issuer
    registry = registry_with(
        *building(nix),
        auth="jwks",
        plugin_options={
            "jwks": {
                "jwks": str(jwks),
                "issuer": "https://auth.example",
                "service": "registry.example",
                "realm": "https://auth.example/token",
            }
        },
    )
    response, _ = registry.get("/v2/hello/manifests/latest")
    assert header(response, "WWW-Authenticate") == (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:hello:pull"'
    )
    now = int(time.time())
    claims = {
        "iss": "https://auth.example",
        "aud": "registry.example",
        "sub": "carol",
        "exp": now + 60,
        "access": [{"type": "repository", "name": "hello", "actions": ["pull"]}],
    }

    def pull(token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        return int(registry.get("/v2/hello/manifests/latest", headers=headers)[0].code)

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert pull(jwt.encode(claims, other, algorithm="RS256", headers={"kid": "k1"})) == 401
    for wrong in ({"iss": "https://evil.example"}, {"aud": "other"}, {"access": []}):
        signed = jwt.encode({**claims, **wrong}, key, algorithm="RS256", headers={"kid": "k1"})
        assert pull(signed) == 401
    assert pull(jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})) == 200


def test_a_short_signing_key_is_refused_at_start(
    registry_with: RegistryFactory, htpasswd: Path
) -> None:
    options = {"token": {"htpasswd": str(htpasswd), "key": "short"}}
    with pytest.raises(ConfigError, match=r"key\) = \(secret\): must be at least 32 bytes"):
        registry_with(auth="token", plugin_options=options)


def test_the_json_access_log_names_the_user_and_never_the_credentials(
    registry_with: RegistryFactory, nix: FakeNix, htpasswd: Path
) -> None:
    registry = with_auth(registry_with, nix, htpasswd)
    paths = remembered_paths(registry, basic())
    server = Server(registry, log_format="json")
    routed = server.exchange("/v2/", "Authorization: " + basic(), "User-Agent: docker/27")
    fast = server.exchange(paths[0], "Authorization: " + basic(), "User-Agent: docker/27")
    anonymous = server.exchange(paths[0])
    wrong = server.exchange("/v2/", "Authorization: " + basic(password="wrong"))
    assert [routed[0], fast[0], anonymous[0], wrong[0]] == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 401 Unauthorized",
        b"HTTP/1.1 401 Unauthorized",
    ]
    assert server.requests == 3, "the verified pull was not answered from memory"
    server.access_log.flush()
    text = server.log.getvalue()
    for secret in (PASSWORD, basic().split()[1], basic(password="wrong").split()[1]):
        assert secret not in text
    assert "uthorization" not in text
    records = [json.loads(line) for line in text.split("\x1e") if line]
    fields = {"log_namespace", "time", "remote", "method", "path", "status", "bytes"}
    fields |= {"duration_ms", "user_agent"}
    assert set(records[0]) == set(records[1]) == fields | {"user"}
    assert set(records[2]) == set(records[3]) == fields
    assert [record["user"] for record in records[:2]] == ["alice", "alice"]
    assert [record["path"] for record in records] == ["/v2/", paths[0], paths[0], "/v2/"]
    assert [record["status"] for record in records] == [200, 200, 401, 401]
    assert records[1]["bytes"] == len(registry.get(paths[0], headers={"Authorization": basic()})[1])
    assert records[1]["user_agent"] == "docker/27" and records[2]["user_agent"] is None
    assert all(record["remote"] == "10.0.0.7" for record in records)
    assert all(record["log_namespace"] == "nixeryd.access" for record in records)
    assert all(0 <= record["duration_ms"] < 1000 for record in records)
    assert all(abs(record["time"] - time.time()) < 60 for record in records)


def test_the_text_access_log_has_the_user_in_its_authuser_field(
    registry_with: RegistryFactory, nix: FakeNix, htpasswd: Path
) -> None:
    registry = with_auth(registry_with, nix, htpasswd)
    paths = remembered_paths(registry, basic())
    server = Server(registry)
    server.exchange(paths[0], "Authorization: " + basic())
    server.exchange("/v2/")
    server.access_log.flush()
    fast, refused = server.log.getvalue().splitlines()
    assert ' "10.0.0.7" - alice [' in fast
    assert f'"GET {paths[0]} HTTP/1.1" 200 ' in fast
    assert ' "10.0.0.7" - - [' in refused


@pytest.mark.parametrize("policy", ["everything", "builds"])
def test_metrics_on_the_registry_listener_need_credentials(
    registry_with: RegistryFactory, nix: FakeNix, htpasswd: Path, policy: str
) -> None:
    registry = with_auth(registry_with, nix, htpasswd, policy=policy)
    response, body = registry.get("/metrics")
    assert response.code == 401
    assert errors(body) == ["UNAUTHORIZED"]
    response, body = registry.get("/metrics", headers={"Authorization": basic()})
    assert response.code == 200
    assert b"nixeryd_http_requests_total" in body


def test_the_htpasswd_file_is_read_again_when_it_changes(
    registry_with: RegistryFactory, nix: FakeNix, htpasswd: Path
) -> None:
    registry = with_auth(registry_with, nix, htpasswd)
    bob = basic(user="bob", password="bobs-password")
    assert registry.get("/v2/", headers={"Authorization": bob})[0].code == 401
    hashed = bcrypt.hashpw(b"bobs-password", bcrypt.gensalt(4)).decode()
    htpasswd.write_text(htpasswd.read_text() + f"bob:{hashed}\n")
    assert registry.get("/v2/", headers={"Authorization": bob})[0].code == 200, "no restart"


def test_a_changed_htpasswd_file_that_does_not_parse_keeps_the_users_read_before(
    htpasswd: Path,
) -> None:
    users = Htpasswd(str(htpasswd), maybeDeferred)
    assert _result(users.check("alice", PASSWORD))
    good = htpasswd.read_text()
    htpasswd.write_text(good + "mallory:plain-text\n")
    assert _result(users.check("alice", PASSWORD)), "a half-written edit locked alice out"
    assert not _result(users.check("mallory", "plain-text"))
    htpasswd.write_text("# nobody\n" + good.replace("alice", "carol"))
    assert not _result(users.check("alice", PASSWORD))
    assert _result(users.check("carol", PASSWORD))


def _result(deferred: Deferred[bool]) -> bool:
    results: list[bool] = []
    deferred.addCallback(results.append)
    assert results, "the check did not fire at once with a synchronous runner"
    return results[0]


class _Later:
    """An authenticator whose verdicts come later, as a bcrypt check in a thread's do."""

    def __init__(self) -> None:
        self.pending: list[Deferred[Identity | None]] = []

    def verify(self, scheme: str, credentials: str) -> Deferred[Identity | None]:
        self.pending.append(Deferred())
        return self.pending[-1]

    def challenge(self, host: str, scope: str | None, error: str | None) -> bytes:
        return b'Basic realm="later"'

    def endpoints(self) -> dict[bytes, Any]:
        return {}


@pytest.mark.parametrize(
    ("verdict", "status"), [(None, 401), (Identity("alice"), 200)], ids=["refused", "allowed"]
)
def test_a_verdict_that_comes_later_is_the_one_answered(
    verdict: Identity | None, status: int
) -> None:
    authenticator = _Later()
    request = DummyRequest([b"v2", b""])
    request.path = b"/v2/"
    request._disconnected = False  # what twisted.web's Request has, and _write reads
    request.requestHeaders.setRawHeaders(b"authorization", [basic(password="wrong").encode()])
    rendered = gated(Gate(authenticator, "everything"), request, lambda _: b"{}")
    assert rendered is NOT_DONE_YET and not request.finished
    authenticator.pending[0].callback(verdict)
    assert request.finished
    assert (request.responseCode or 200) == status
    if status == 401:
        assert json.loads(b"".join(request.written))["errors"][0]["code"] == "UNAUTHORIZED"
    else:
        assert b"".join(request.written) == b"{}"
