"""Authentication and authorisation: who may pull, and who may make nixeryd build.

An :class:`Authenticator` (a plugin's provider, selected by the ``auth``
option; built-ins in :mod:`nixeryd.builtin.auth`) turns an ``Authorization``
header into an :class:`Identity` and words the ``WWW-Authenticate``
challenge that tells a client how to get one. The :class:`Gate` applies the
site's policy (``auth_policy``) to every request, before routing and before
any remembered answer:

``everything``
    every request needs valid credentials; without them: 401 ``UNAUTHORIZED``
    with the challenge.
``builds``
    anyone may pull what is already built; a manifest by tag of a name no
    authenticated user has pulled before (which would make nixeryd run Nix)
    needs credentials. The registry makes that decision
    (:meth:`nixeryd.registry.RegistryApp.manifest`) before asking the
    platform fan-out for the image, from a record in storage
    (``auth/built/<hash of name and tag>``) written when an authenticated
    pull of the name succeeded. A moving source (a path, a branch) may still
    rebuild such a name for an anonymous client when the source moved: the
    names are bounded by what authenticated users chose, not the builds.

``/v2/`` answers 401 to a request without credentials in both policies: it
is where Docker, containerd and podman learn the challenge before they pull,
and a 200 there would make them pull without credentials.

Answers held in memory go through the same decision: the HTTP channel asks
:meth:`Gate.permits_remembered` before writing one, which answers from the
identities verified in the last :data:`VERIFIED_SECONDS` (keyed by a hash of
the header, never the header itself) and otherwise sends the request the
usual way, where the gate verifies it.

Credentials are never logged: the access log prints no ``Authorization``
header, and no error message repeats a password or a token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET, Request

from nixeryd.errors import RegistryError

#: Seconds a verified ``Authorization`` header is believed without verifying it again:
#: a bcrypt check costs about 0.2 s of a core, and a pull sends the header a dozen times.
VERIFIED_SECONDS = 30.0

#: How many verified headers are remembered (least recently used go first).
VERIFIED_KEPT = 10_000

POLICIES = ("everything", "builds")


class Unauthorized(RegistryError):
    """The request needs credentials it lacks or that are not valid (HTTP 401)."""

    code = "UNAUTHORIZED"
    status = 401

    def __init__(self, message: str, challenge: bytes) -> None:
        super().__init__(message)
        self.headers = [(b"WWW-Authenticate", challenge)]


@dataclass(frozen=True)
class Identity:
    """Who sent a request: a verified user, or (``subject`` None) an anonymous client
    holding a token issued to nobody in particular."""

    subject: str | None
    #: Repositories the credentials may pull, None for every one (Basic credentials).
    repositories: frozenset[str] | None = None
    #: Wall-clock time the credentials stop being valid (a token's ``exp``).
    expires: float = float("inf")

    @property
    def anonymous(self) -> bool:
        return self.subject is None

    def may_pull(self, repository: str) -> bool:
        return self.repositories is None or repository in self.repositories


#: A request without credentials; what it may do is the policy's decision.
ANONYMOUS = Identity(None)


class Authenticator(Protocol):
    """What an authentication provider does (built-ins: ``htpasswd``, ``token``, ``jwks``)."""

    def verify(self, scheme: str, credentials: str) -> Deferred[Identity | None]:
        """The identity ``credentials`` prove (``scheme`` is ``basic`` or ``bearer``, lower
        case; ``credentials`` the rest of the header), or None if they prove nothing.
        Must not log the credentials nor put them in an exception."""
        ...

    def challenge(self, host: str, scope: str | None, error: str | None) -> bytes:
        """The ``WWW-Authenticate`` value for a request to ``host`` (its ``Host`` header)
        that needs ``scope`` (``repository:<name>:pull``, None for ``/v2/``); ``error``
        is ``invalid_token`` or ``insufficient_scope`` when the request had credentials."""
        ...

    def endpoints(self) -> Mapping[bytes, IResource]:
        """Resources this provider serves itself, by path (the token endpoint)."""
        ...


@dataclass
class _Verified:
    identity: Identity
    until: float


@dataclass
class Gate:
    """The site's authentication policy, applied before routing and before memory."""

    authenticator: Authenticator
    policy: str
    clock: Any = field(default=None)
    _verified: OrderedDict[bytes, _Verified] = field(default_factory=OrderedDict)

    log = Logger()

    def _now(self) -> float:
        return time.time() if self.clock is None else float(self.clock.seconds())

    def permits_remembered(self, path: bytes, authorization: bytes | None) -> bool:
        """May the remembered answer to ``path`` be written without asking anything?

        Only when the decision is already known: the policy lets anonymous
        clients have it (everything remembered is built), or the header was
        verified lately and allows the repository. Otherwise the request goes
        the usual way, where :meth:`identify` verifies it.
        """
        repository = repository_of(path)
        if authorization is None:
            return self.policy == "builds" and repository is not None
        identity = self._remembered(authorization)
        if identity is None or repository is None:
            return False
        return identity.may_pull(repository) and (not identity.anonymous or self.policy == "builds")

    def subject_of(self, authorization: bytes) -> str | None:
        """Who the lately verified ``authorization`` belongs to, for the access log of an
        answer written from memory; None for an anonymous token or one not verified."""
        identity = self._remembered(authorization)
        return None if identity is None else identity.subject

    def _remembered(self, authorization: bytes) -> Identity | None:
        key = hashlib.sha256(authorization).digest()
        verified = self._verified.get(key)
        if verified is None:
            return None
        if verified.until <= self._now():
            del self._verified[key]
            return None
        self._verified.move_to_end(key)
        return verified.identity

    def identify(self, authorization: bytes | None) -> Deferred[Identity | None]:
        """The identity of a request's ``Authorization`` header: ANONYMOUS without one,
        None when it is malformed or proves nothing."""
        if authorization is None:
            return succeed(ANONYMOUS)
        remembered = self._remembered(authorization)
        if remembered is not None:
            return succeed(remembered)
        scheme, _, credentials = authorization.decode("latin-1").partition(" ")
        scheme = scheme.lower()
        if scheme not in ("basic", "bearer") or not credentials.strip():
            return succeed(None)
        verifying = maybeDeferred(self.authenticator.verify, scheme, credentials.strip())

        def verified(identity: Identity | None) -> Identity | None:
            if identity is not None:
                until = min(self._now() + VERIFIED_SECONDS, identity.expires)
                self._verified[hashlib.sha256(authorization).digest()] = _Verified(identity, until)
                while len(self._verified) > VERIFIED_KEPT:
                    self._verified.popitem(last=False)
            return identity

        def failed(failure: Failure) -> None:
            # The reason only: a provider's exception might quote what it was given.
            kind = failure.type.__name__ if failure.type is not None else "error"
            self.log.warn("credentials could not be verified: {kind}", kind=kind)
            return None

        return verifying.addCallbacks(verified, failed)

    def check(self, request: Request) -> Deferred[Identity]:
        """The request's identity if the policy lets it through to routing; fails with
        :class:`Unauthorized` otherwise. Klein's routes read it from ``request.identity``."""
        authorization = request.getHeader(b"authorization")
        path = request.path

        def decide(identity: Identity | None) -> Identity:
            repository = repository_of(path)
            scope = None if repository is None else f"repository:{repository}:pull"
            what = "this registry" if repository is None else f"pulling {repository}"
            if identity is None:
                raise self.unauthorized(
                    request,
                    scope,
                    "invalid_token",
                    "the credentials sent are not valid (a wrong password, or a token that "
                    "expired or was issued for another registry); log in again",
                )
            open_page = self.policy == "builds" and shows_only_built(path)
            if (
                identity.anonymous
                and not open_page
                and (self.policy == "everything" or repository is None)
            ):
                raise self.unauthorized(
                    request, scope, None, f"credentials are required for {what}; log in"
                )
            if repository is not None and not identity.may_pull(repository):
                raise self.unauthorized(
                    request,
                    scope,
                    "insufficient_scope",
                    f"the token sent does not allow {what}; ask for one with scope {scope}",
                )
            request.identity = identity  # type: ignore[attr-defined]
            return identity

        return self.identify(authorization).addCallback(decide)

    def unauthorized(
        self, request: Request, scope: str | None, error: str | None, message: str
    ) -> Unauthorized:
        """A 401 telling the client how to get credentials for ``scope``."""
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        return Unauthorized(message, self.authenticator.challenge(host, scope, error))


#: Web pages that show what was built and start no Nix work (``/search`` evaluates the
#: package set, so it is not one): under the ``builds`` policy anonymous clients may see
#: them, as they may pull what was built.
_PAGES_OF_BUILT = (b"/images/", b"/builds/", b"/errors/")


def shows_only_built(path: bytes) -> bool:
    """Is ``path`` a web page of what was built (the index, image and build pages)?"""
    return path in (b"/", b"/images") or path.startswith(_PAGES_OF_BUILT)


def repository_of(path: bytes) -> str | None:
    """The repository a ``/v2/<name>/...`` path names, or None (``/v2/``, ``/``)."""
    if not path.startswith(b"/v2/"):
        return None
    for marker in (b"/manifests/", b"/blobs/", b"/tags/list", b"/referrers/"):
        name, found, _ = path[4:].rpartition(marker)
        if found and name:
            return name.decode("latin-1")
    return None


def basic_credentials(credentials: str) -> tuple[str, str] | None:
    """The user and password of a Basic ``Authorization`` value, or None if malformed."""
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon and user else None


def refuse(request: Request, error: RegistryError) -> bytes:
    """Answer ``request`` with ``error`` as registry JSON, with its headers."""
    body = json.dumps(error.as_json()).encode()
    request.setResponseCode(error.status)
    for name, value in getattr(error, "headers", ()):
        request.setHeader(name, value)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    return body


def gated(gate: Gate, request: Request, render: Any) -> Any:
    """Render ``request`` with ``render`` once ``gate`` lets it through; the refusal if not.

    ``render`` is a resource's render: its bytes are written here, or it
    returns NOT_DONE_YET and finishes the request itself.
    """
    endpoint: Any = gate.authenticator.endpoints().get(request.path)
    if endpoint is not None:
        return endpoint.render(request)
    # The decision may take a worker thread's time (a bcrypt check): then the answer is
    # written when it comes. A callback that only noted the outcome, and so turned a
    # refusal into a success for the callbacks after it, once let any password through.
    answered: list[Any] = []
    waiting = False

    def decided(result: Any) -> None:
        body = _refusal(request, result) if isinstance(result, Failure) else render(request)
        if waiting:
            _write(request, body)
        else:
            answered.append(body)

    gate.check(request).addBoth(decided).addErrback(_unanswered, request)
    if answered:
        # Known at once (no header, or one verified lately): answer in this turn.
        return answered[0]
    waiting = True
    return NOT_DONE_YET


def _unanswered(failure: Failure, request: Request) -> None:
    """A decision that failed other than by refusing: logged, answered as the registry's
    own error; never a request left open or let through."""
    Gate.log.failure("deciding on {path} failed", failure, path=request.path)
    _write(request, refuse(request, RegistryError(_INTERNAL_ERROR)))


def _refusal(request: Request, failure: Failure) -> bytes:
    failure.trap(RegistryError)
    return refuse(request, failure.value)  # type: ignore[arg-type]


_INTERNAL_ERROR = "internal error; the registry's log has the details"


def _write(request: Request, result: Any) -> None:
    if result is NOT_DONE_YET or request.finished or request._disconnected:
        return
    request.write(result)
    request.finish()
