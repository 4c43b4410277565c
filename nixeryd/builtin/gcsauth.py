"""Talking to Google Cloud as the GCS backend: access tokens and V4 signed URLs.

Access tokens come from google-auth credentials, whose ``refresh`` is a
blocking HTTP call (to the metadata server or Google's token endpoint): it
runs in a worker thread, a few minutes before the token expires, once at a
time however many requests need a token meanwhile.

Signed URLs let a client download a blob straight from the bucket, without
credentials, until they expire. google-auth signs bytes but builds no URLs,
and google-cloud-storage, which does, would pull in a client library and its
dependencies for one function; so the V4 query-string signature
(``GOOG4-RSA-SHA256``, https://cloud.google.com/storage/docs/access-control/signed-urls)
is built here over a google-auth signer: a service account's private key
(offline, about a millisecond) or the IAM Credentials ``signBlob`` API (one
HTTP round trip, for credentials without a key such as a VM's service
account).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import google.auth.transport.requests
from google.auth import crypt, exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from nixeryd.runtime import ThreadRunner
from nixeryd.singleflight import SingleFlight

#: Reading and writing objects, and signing blobs as a service account.
SCOPES = (
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/iam",
)
IAM_CREDENTIALS_ENDPOINT = "https://iamcredentials.googleapis.com"
#: The longest a V4 signed URL may live.
MAX_URL_LIFETIME = 7 * 24 * 60 * 60
# Refresh a token this long before it expires: requests in flight keep a valid
# token, and google-auth itself treats a token as expired 3m45s early.
_REFRESH_MARGIN = 5 * 60.0
_ALGORITHM = "GOOG4-RSA-SHA256"

_log = Logger()


class GcsAuthError(Exception):
    """Credentials could not produce a token or a signature; the message says what to fix."""


class AccessTokens:
    """Bearer tokens from google-auth credentials, refreshed off the reactor thread.

    The token and its expiry are copied out of the credentials by the thread
    that refreshed them, so the reactor thread never reads credentials that a
    worker thread is writing. While a refresh is running, callers that have
    no valid token wait for it; callers whose token is still valid (but
    close to expiry) use it and let the refresh finish in the background.
    """

    def __init__(
        self,
        credentials: Credentials,
        run_in_thread: ThreadRunner,
        now: Callable[[], float],
        *,
        make_transport: Callable[[], Any] = google.auth.transport.requests.Request,
    ) -> None:
        self.credentials = credentials
        self._run = run_in_thread
        self._now = now
        self._make_transport = make_transport
        self._token: str | None = None
        self._expires_at = 0.0
        self._refresh_flight: SingleFlight[str] = SingleFlight()

    @property
    def anonymous(self) -> bool:
        return isinstance(self.credentials, AnonymousCredentials)

    def token(self) -> Deferred[str | None]:
        """A valid access token; None for anonymous credentials (an emulator)."""
        if self.anonymous:
            return succeed(None)
        remaining = self._expires_at - self._now()
        if self._token is not None and remaining > _REFRESH_MARGIN:
            return succeed(self._token)
        refreshed: Deferred[str | None] = self._refresh_flight.run("token", self._refresh)  # type: ignore[assignment]
        if self._token is not None and remaining > 0:
            refreshed.addErrback(
                lambda failure: _log.failure("refreshing the GCS access token", failure)
            )
            return succeed(self._token)
        return refreshed

    def _refresh(self) -> Deferred[str]:
        credentials, make_transport = self.credentials, self._make_transport

        def work() -> tuple[str, datetime | None]:
            try:
                credentials.refresh(make_transport())
            except exceptions.GoogleAuthError as error:
                raise GcsAuthError(f"cannot get a GCS access token: {error}") from error
            return str(credentials.token), credentials.expiry

        def store(result: tuple[str, datetime | None]) -> str:
            token, expiry = result
            self._token = token
            # google-auth's expiry is a naive UTC datetime; no expiry means it lasts.
            self._expires_at = (
                float("inf") if expiry is None else expiry.replace(tzinfo=UTC).timestamp()
            )
            return token

        return self._run(work).addCallback(store)


class UrlSigner(Protocol):
    """Signs the string a V4 URL signature covers, as the service account ``email``."""

    @property
    def email(self) -> str: ...

    def sign(self, payload: bytes) -> Deferred[bytes]:
        """RSA-SHA256 of ``payload``; a signer with a key fires the Deferred at once."""
        ...


class KeySigner:
    """Signs offline with a service account's private key (google-auth's RSA signer)."""

    def __init__(self, signer: crypt.Signer, email: str) -> None:
        self._signer = signer
        self.email = email

    @classmethod
    def from_pem(cls, pem: str, email: str) -> KeySigner:
        return cls(crypt.RSASigner.from_string(pem), email)

    def sign(self, payload: bytes) -> Deferred[bytes]:
        return succeed(self._signer.sign(payload))


class IamSigner:
    """Signs through the IAM Credentials API's ``signBlob``, for credentials without a key.

    The account needs ``iam.serviceAccounts.signBlob`` on itself (the role
    Service Account Token Creator). One HTTP round trip through treq, on the
    reactor; a signed URL is then cached for part of its lifetime. Without an
    ``account``, the credentials' own service account is used: a VM's
    credentials learn its address when first refreshed.
    """

    def __init__(
        self,
        http: Any,
        tokens: AccessTokens,
        account: str | None = None,
        endpoint: str = IAM_CREDENTIALS_ENDPOINT,
    ) -> None:
        self._http = http
        self._tokens = tokens
        self._account = account
        self._endpoint = endpoint

    @property
    def email(self) -> str:
        """The account signed as; GcsAuthError while it is not known."""
        email = self._account or getattr(self._tokens.credentials, "service_account_email", None)
        if not email or email == "default":
            raise GcsAuthError(
                "no service account to sign URLs as: set GCS_SIGNING_ACCOUNT, point "
                "GOOGLE_APPLICATION_CREDENTIALS at a service account key, or set "
                "NIXERYD_GCS_PROXY=true"
            )
        return str(email)

    def sign(self, payload: bytes) -> Deferred[bytes]:
        return Deferred.fromCoroutine(self._sign(payload))

    async def _sign(self, payload: bytes) -> bytes:
        email = self.email
        url = f"{self._endpoint}/v1/projects/-/serviceAccounts/{quote(email, safe='@')}:signBlob"
        headers = {b"Content-Type": [b"application/json"]}
        token = await self._tokens.token()
        if token is not None:
            headers[b"Authorization"] = [f"Bearer {token}".encode()]
        body = json.dumps({"payload": base64.b64encode(payload).decode()}).encode()
        response = await self._http.post(url, data=body, headers=headers)
        content: bytes = await response.content()
        if response.code != 200:
            raise GcsAuthError(
                f"IAM signBlob as {email} answered {response.code}: {error_message(content)};"
                " the account needs roles/iam.serviceAccountTokenCreator on itself"
            )
        return base64.b64decode(json.loads(content)["signedBlob"])


def error_message(content: bytes) -> str:
    """The message of a Google API error body, or the body itself."""
    try:
        return str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return content.decode(errors="replace")[:200] or "(no message)"


def object_path(bucket: str, name: str) -> str:
    """The path of an object in a download URL, percent-encoded as V4 signing expects."""
    return f"/{bucket}/{quote(name, safe='/~')}"


def unsigned_url(endpoint: str, bucket: str, name: str) -> str:
    """The URL of an object of a publicly readable bucket (Nixery's answer without a key)."""
    return endpoint + object_path(bucket, name)


def string_to_sign(
    endpoint: str, bucket: str, name: str, email: str, lifetime: int, now: float
) -> tuple[str, bytes]:
    """A V4 signed GET URL without its signature, and the string the signature covers.

    Append ``&X-Goog-Signature=<hex of the RSA-SHA256 signature>`` to the URL.
    """
    moment = datetime.fromtimestamp(now, UTC)
    timestamp = moment.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{timestamp[:8]}/auto/storage/goog4_request"
    host = urlsplit(endpoint).netloc
    query = {
        "X-Goog-Algorithm": _ALGORITHM,
        "X-Goog-Credential": f"{email}/{scope}",
        "X-Goog-Date": timestamp,
        "X-Goog-Expires": str(lifetime),
        "X-Goog-SignedHeaders": "host",
    }
    canonical_query = "&".join(
        sorted(f"{quote(key, safe='')}={quote(value, safe='')}" for key, value in query.items())
    )
    path = object_path(bucket, name)
    canonical_request = "\n".join(
        ["GET", path, canonical_query, f"host:{host}\n", "host", "UNSIGNED-PAYLOAD"]
    )
    digest = hashlib.sha256(canonical_request.encode()).hexdigest()
    signed = "\n".join([_ALGORITHM, timestamp, scope, digest]).encode()
    return f"{endpoint}{path}?{canonical_query}", signed


def signed_url(
    signer: UrlSigner, endpoint: str, bucket: str, name: str, lifetime: int, now: float
) -> Deferred[str]:
    """A V4 signed URL to GET ``name`` for ``lifetime`` seconds from ``now`` (Unix time)."""
    url, payload = string_to_sign(endpoint, bucket, name, signer.email, lifetime, now)
    return signer.sign(payload).addCallback(
        lambda signature: f"{url}&X-Goog-Signature={signature.hex()}"
    )
