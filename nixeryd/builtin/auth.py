"""The built-in authentication providers: htpasswd, a token endpoint, an external issuer.

``htpasswd``
    Basic credentials checked against an htpasswd file of bcrypt hashes
    (``htpasswd -B``). Other hash kinds (MD5-crypt, SHA-1, crypt, plain) are
    refused at start-up: they are fast to guess from a leaked file. The file
    is read again when it changes (see :class:`Htpasswd`).
``token``
    Docker's token flow, with nixeryd as its own issuer: ``GET /token`` with
    Basic credentials (Docker, podman, skopeo, oras) and the OAuth2
    ``POST /token`` form with ``grant_type=password`` (containerd) answer a
    JWT signed with HS256 that grants ``pull`` on the requested repositories;
    the registry then accepts it as a Bearer token. Users come from an
    htpasswd file as above. Without a ``key``, one is generated at start:
    tokens then stop being valid when the daemon restarts, and clients fetch
    new ones at their next 401 (set ``key`` when several instances serve the
    same name, or to keep tokens across restarts). A request without
    credentials gets an anonymous token when ``auth_policy`` is ``builds``.
``jwks``
    Bearer tokens of an external issuer (docker_auth, a cloud's registry
    token service), checked against its JSON Web Key Set (a file, or a URL
    fetched with the daemon's HTTP client and again for a key id it does not
    know), its ``iss`` and the ``aud`` this registry is known by. The token's
    Docker ``access`` claim says which repositories it may pull.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import bcrypt
import jwt
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from nixeryd.auth import Identity, Unauthorized, basic_credentials, refuse
from nixeryd.config import ConfigError
from nixeryd.hookspecs import hookimpl
from nixeryd.runtime import Provider, Runtime, ThreadRunner
from nixeryd.settings import Setting, parse_duration

log = Logger()

#: The bcrypt hash prefixes htpasswd and other tools write.
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")

#: A bcrypt check of an unknown user, so that a wrong name costs as long as a wrong password.
_NO_SUCH_USER = bcrypt.hashpw(b"no such user", bcrypt.gensalt(10))


def _file_version(path: str) -> tuple[int, int, int] | None:
    """What tells one version of a file from the next: modification time, size, inode."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def load_htpasswd(path: str) -> dict[str, bytes]:
    """The users and bcrypt hashes of an htpasswd file; ConfigError for any other kind."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"htpasswd file {path}: {error}") from error
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, colon, hashed = line.strip().partition(":")
        if not colon or not user:
            raise ConfigError(f"htpasswd file {path}, line {number}: not user:hash")
        if not hashed.startswith(_BCRYPT_PREFIXES):
            raise ConfigError(
                f"htpasswd file {path}, line {number}: user {user!r} has a hash that is not "
                "bcrypt; only bcrypt is accepted (write it with htpasswd -B)"
            )
        users[user] = hashed.encode()
    if not users:
        raise ConfigError(f"htpasswd file {path}: no users")
    return users


class Htpasswd:
    """Users checked against bcrypt hashes, in a worker thread (each check costs ~0.2 s).

    The file is read again when it changes: each check first compares its
    modification time, size and inode (one ``stat``, in the same thread) with
    the version loaded, so that adding or removing a user needs no restart. A
    changed file that does not parse is logged and the users loaded before are
    kept, so that a half-written edit locks nobody out; the next change is
    tried again.
    """

    log = Logger()

    def __init__(self, path: str, run_in_thread: ThreadRunner) -> None:
        self._path = path
        self._users = load_htpasswd(path)
        self._version = _file_version(path)
        self._run_in_thread = run_in_thread

    def check(self, user: str, password: str) -> Deferred[bool]:
        def compare() -> bool:
            hashed = self._current().get(user)
            try:
                matches = bcrypt.checkpw(password.encode(), hashed or _NO_SUCH_USER)
            except ValueError:
                return False
            return matches and hashed is not None

        return self._run_in_thread(compare)

    def _current(self) -> Mapping[str, bytes]:
        """The users, read again if the file changed since; in a worker thread."""
        version = _file_version(self._path)
        if version != self._version:
            self._version = version
            try:
                self._users = load_htpasswd(self._path)
            except ConfigError as error:
                self.log.error("{error}; the users read before are kept", error=str(error))
            else:
                self.log.info("htpasswd file {path} read again", path=self._path)
        return self._users

    @inlineCallbacks
    def identity(self, credentials: str) -> Any:
        """The user a Basic ``credentials`` value proves, or None."""
        parsed = basic_credentials(credentials)
        if parsed is None:
            return None
        user, password = parsed
        matches = yield self.check(user, password)
        return Identity(user) if matches else None


class BasicAuthenticator:
    """``htpasswd``: Basic credentials only."""

    def __init__(self, users: Htpasswd, realm: str) -> None:
        self._users = users
        self._realm = realm

    def verify(self, scheme: str, credentials: str) -> Deferred[Identity | None]:
        if scheme != "basic":
            return succeed(None)
        result: Deferred[Identity | None] = self._users.identity(credentials)
        return result

    def challenge(self, host: str, scope: str | None, error: str | None) -> bytes:
        return f'Basic realm="{self._realm}"'.encode()

    def endpoints(self) -> Mapping[bytes, IResource]:
        return {}


def bearer_challenge(realm: str, service: str, scope: str | None, error: str | None) -> bytes:
    """A Bearer challenge of the distribution token spec."""
    parts = [f'realm="{realm}"', f'service="{service}"']
    if scope is not None:
        parts.append(f'scope="{scope}"')
    if error is not None:
        parts.append(f'error="{error}"')
    return ("Bearer " + ",".join(parts)).encode()


def pull_scopes(scopes: Sequence[str]) -> list[str]:
    """The repositories of ``repository:<name>:<actions>`` scopes that ask for pull.

    ``scope`` may repeat and a value may hold several scopes separated by
    spaces (the OAuth2 form); anything else (a push, a registry catalog) is
    not granted: nixeryd serves pulls only.
    """
    repositories = []
    for scope in (part for value in scopes for part in value.split()):
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind == "repository" and name and "pull" in actions.split(","):
            repositories.append(name)
    return repositories


def access_repositories(claims: Mapping[str, Any]) -> frozenset[str]:
    """The repositories a token's Docker ``access`` claim grants pull on."""
    access = claims.get("access")
    if not isinstance(access, list):
        return frozenset()
    return frozenset(
        entry["name"]
        for entry in access
        if isinstance(entry, dict)
        and entry.get("type") == "repository"
        and isinstance(entry.get("name"), str)
        and isinstance(entry.get("actions"), list)
        and "pull" in entry["actions"]
    )


def _identity(claims: Mapping[str, Any]) -> Identity:
    subject = claims.get("sub")
    return Identity(
        subject if isinstance(subject, str) and subject else None,
        access_repositories(claims),
        float(claims["exp"]),
    )


class TokenIssuer:
    """``token``: nixeryd's own token endpoint, and the registry's check of its tokens."""

    ISSUER = "nixeryd"

    def __init__(
        self,
        users: Htpasswd,
        key: str,
        service: str,
        realm: str | None,
        expiry: float,
        anonymous: bool,
    ) -> None:
        self._users = users
        self._key = key
        self.service = service
        self._realm = realm
        self.expiry = int(expiry)
        self.anonymous = anonymous
        self._endpoint = _TokenResource(self)

    def issue(self, subject: str | None, repositories: Sequence[str]) -> dict[str, Any]:
        """The token endpoint's answer: a token for ``subject`` (None: anonymous)."""
        # Wall-clock time: the claims are checked against the clocks of other machines.
        now = int(time.time())
        claims = {
            "iss": self.ISSUER,
            "aud": self.service,
            "sub": subject or "",
            "iat": now,
            "nbf": now - 1,
            "exp": now + self.expiry,
            "jti": secrets.token_hex(16),
            "access": [
                {"type": "repository", "name": name, "actions": ["pull"]}
                for name in dict.fromkeys(repositories)
            ],
        }
        token = jwt.encode(claims, self._key, algorithm="HS256")
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expiry,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }

    def check_password(self, user: str, password: str) -> Deferred[bool]:
        return self._users.check(user, password)

    def verify(self, scheme: str, credentials: str) -> Deferred[Identity | None]:
        if scheme == "basic":
            result: Deferred[Identity | None] = self._users.identity(credentials)
            return result
        try:
            claims = jwt.decode(
                credentials,
                self._key,
                algorithms=["HS256"],
                audience=self.service,
                issuer=self.ISSUER,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError:
            return succeed(None)
        return succeed(_identity(claims))

    def challenge(self, host: str, scope: str | None, error: str | None) -> bytes:
        realm = self._realm or f"https://{host}/token"
        return bearer_challenge(realm, self.service, scope, error)

    def endpoints(self) -> Mapping[bytes, IResource]:
        return {b"/token": cast(IResource, self._endpoint)}


class _TokenResource(Resource):
    """``/token``: the distribution token spec's GET and the OAuth2 password grant POST."""

    isLeaf = True

    def __init__(self, issuer: TokenIssuer) -> None:
        super().__init__()
        self._issuer = issuer

    def render_GET(self, request: Request) -> Any:
        scopes = _args(request, b"scope")
        authorization = request.getHeader(b"authorization")
        if authorization is None:
            return self._anonymous(request, scopes)
        scheme, _, credentials = authorization.decode("latin-1").partition(" ")
        parsed = basic_credentials(credentials.strip()) if scheme.lower() == "basic" else None
        if parsed is None:
            return self._refuse(request, "send Basic credentials to get a token")
        return self._grant(request, *parsed, scopes)

    def render_POST(self, request: Request) -> Any:
        grant = _arg(request, b"grant_type")
        if grant != "password":
            body = json.dumps(
                {
                    "error": "unsupported_grant_type",
                    "error_description": "nixeryd grants tokens for passwords only",
                }
            ).encode()
            request.setResponseCode(400)
            request.setHeader(b"Content-Type", b"application/json")
            return body
        user, password = _arg(request, b"username"), _arg(request, b"password")
        if not user or password is None:
            return self._refuse(request, "a password grant needs username and password")
        return self._grant(request, user, password, _args(request, b"scope"))

    def _anonymous(self, request: Request, scopes: Sequence[str]) -> bytes:
        if not self._issuer.anonymous:
            return self._refuse(request, "credentials are required for a token; log in")
        return _answer(request, self._issuer.issue(None, pull_scopes(scopes)))

    def _grant(self, request: Request, user: str, password: str, scopes: Sequence[str]) -> Any:
        def checked(matches: bool) -> None:
            if request.finished or request._disconnected:
                return
            if matches:
                body = _answer(request, self._issuer.issue(user, pull_scopes(scopes)))
            else:
                body = self._refuse(request, "wrong user name or password")
            request.write(body)
            request.finish()

        self._issuer.check_password(user, password).addCallback(checked)
        return NOT_DONE_YET

    def _refuse(self, request: Request, message: str) -> bytes:
        challenge = f'Basic realm="{self._issuer.service}"'.encode()
        return refuse(request, Unauthorized(message, challenge))


def _answer(request: Request, document: Mapping[str, Any]) -> bytes:
    body = json.dumps(document).encode()
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    request.setHeader(b"Cache-Control", b"no-store")
    return body


def _args(request: Request, name: bytes) -> list[str]:
    return [value.decode("utf-8", "replace") for value in request.args.get(name, [])]


def _arg(request: Request, name: bytes) -> str | None:
    values = _args(request, name)
    return values[0] if values else None


class ExternalIssuer:
    """``jwks``: Bearer tokens of another issuer, checked against its published keys."""

    #: Seconds between fetches of a JWKS URL for a key id it did not list.
    REFETCH_SECONDS = 60.0

    def __init__(
        self,
        jwks: str,
        issuer: str,
        audience: str,
        realm: str,
        http: Any,
        clock: Any,
    ) -> None:
        self._source = jwks
        self._issuer = issuer
        self._audience = audience
        self._realm = realm
        self._http = http
        self._clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched = float("-inf")
        if not jwks.startswith(("http://", "https://")):
            self._keys = _read_keys(jwks, Path(jwks).read_text())

    @inlineCallbacks
    def _key(self, key_id: str | None) -> Any:
        if key_id not in self._keys and self._source.startswith(("http://", "https://")):
            now = self._clock.seconds()
            if now - self._fetched >= self.REFETCH_SECONDS:
                self._fetched = now
                response = yield self._http.get(self._source)
                text = yield response.text("utf-8")
                if response.code != 200:
                    raise ValueError(f"JWKS {self._source} answered {response.code}")
                self._keys = _read_keys(self._source, text)
        if key_id in self._keys:
            return self._keys[key_id]
        return self._keys.get(None) if len(self._keys) == 1 else None

    @inlineCallbacks
    def verify(self, scheme: str, credentials: str) -> Any:
        if scheme != "bearer":
            return None
        try:
            header = jwt.get_unverified_header(credentials)
        except jwt.PyJWTError:
            return None
        key = yield self._key(header.get("kid"))
        if key is None:
            return None
        try:
            claims = jwt.decode(
                credentials,
                key.key,
                algorithms=[key.algorithm_name],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError:
            return None
        return _identity(claims)

    def challenge(self, host: str, scope: str | None, error: str | None) -> bytes:
        return bearer_challenge(self._realm, self._audience, scope, error)

    def endpoints(self) -> Mapping[bytes, IResource]:
        return {}


def _read_keys(source: str, text: str) -> dict[str | None, jwt.PyJWK]:
    """The signing keys of a JWKS document by key id (also under None when there is one)."""
    try:
        keys = jwt.PyJWKSet.from_json(text).keys
    except (jwt.PyJWTError, ValueError) as error:
        raise ConfigError(f"JWKS {source}: not a usable JSON Web Key Set: {error}") from error
    found: dict[str | None, jwt.PyJWK] = {key.key_id: key for key in keys}
    if len(keys) == 1:
        found[None] = keys[0]
    return found


_HTPASSWD = Setting(
    "htpasswd", "an htpasswd file of bcrypt hashes (htpasswd -B)", ("NIXERYD_HTPASSWD",)
)


def _signing_key(text: str) -> str:
    if len(text.encode()) < 32:
        raise ValueError("must be at least 32 bytes (RFC 7518: HS256 keys as long as the hash)")
    return text


def _create_htpasswd(runtime: Runtime) -> BasicAuthenticator:
    users = Htpasswd(runtime.settings["htpasswd"], runtime.run_in_thread)
    return BasicAuthenticator(users, runtime.settings["realm"])


def _create_token(runtime: Runtime) -> TokenIssuer:
    settings = runtime.settings
    users = Htpasswd(settings["htpasswd"], runtime.run_in_thread)
    key = settings["key"]
    if key is None:
        key = secrets.token_urlsafe(48)
        log.warn(
            "token: no key set; tokens are signed with a key made now, and stop being "
            "valid when nixeryd restarts ([plugin.token] key, $NIXERYD_TOKEN_KEY)"
        )
    return TokenIssuer(
        users,
        key,
        settings["service"],
        settings["realm"],
        settings["expiry"],
        anonymous=runtime.config.auth_policy == "builds",
    )


def _create_jwks(runtime: Runtime) -> ExternalIssuer:
    settings = runtime.settings
    source = settings["jwks"]
    if not source.startswith(("http://", "https://")) and not Path(source).is_file():
        raise ConfigError(f"jwks: {source} is neither an http(s) URL nor a file")
    return ExternalIssuer(
        source,
        settings["issuer"],
        settings["service"],
        settings["realm"],
        runtime.http,
        runtime.reactor,
    )


@hookimpl
def nixeryd_authenticators() -> list[Provider[Any]]:
    return [
        Provider(
            "htpasswd",
            "Basic credentials against an htpasswd file of bcrypt hashes",
            _create_htpasswd,
            settings=(
                Setting(_HTPASSWD.name, _HTPASSWD.help, _HTPASSWD.env, required=True),
                Setting("realm", "the realm of the Basic challenge", default="nixeryd"),
            ),
        ),
        Provider(
            "token",
            "Docker's token flow with nixeryd's own /token endpoint and htpasswd users",
            _create_token,
            settings=(
                Setting(_HTPASSWD.name, _HTPASSWD.help, _HTPASSWD.env, required=True),
                Setting(
                    "key",
                    "the HS256 key tokens are signed with (unset: made at start)",
                    ("NIXERYD_TOKEN_KEY",),
                    parse=_signing_key,
                    secret=True,
                ),
                Setting("service", "the service name (the tokens' audience)", default="nixeryd"),
                Setting(
                    "realm",
                    "the token endpoint's URL in challenges (default: https://<Host>/token)",
                ),
                Setting(
                    "expiry",
                    "how long a token is valid (a duration: 5m)",
                    parse=parse_duration,
                    default=300.0,
                ),
            ),
        ),
        Provider(
            "jwks",
            "Bearer tokens of an external issuer, checked against its JSON Web Key Set",
            _create_jwks,
            settings=(
                Setting(
                    "jwks",
                    "the issuer's JWKS: a file or an http(s) URL",
                    ("NIXERYD_JWKS",),
                    required=True,
                ),
                Setting("issuer", "the tokens' iss", ("NIXERYD_JWT_ISSUER",), required=True),
                Setting(
                    "service",
                    "the service name clients ask the issuer for (the tokens' aud)",
                    ("NIXERYD_JWT_AUDIENCE",),
                    required=True,
                ),
                Setting(
                    "realm",
                    "the issuer's token endpoint URL",
                    ("NIXERYD_TOKEN_REALM",),
                    required=True,
                ),
            ),
        ),
    ]
