"""Storage in a Google Cloud Storage bucket (Nixery's production backend, ``GCS_BUCKET``).

Layout under the optional key prefix::

    <prefix>blobs/sha256/<hex>   a blob, with the object's contentType = its media type
    <prefix>records/<name>       a record such as records/builds/<key>

Everything goes through the JSON API with treq on the reactor: no blocking
call runs on the reactor thread, and google-auth's token refresh (which
blocks) runs in a worker thread (:mod:`nixeryd.builtin.gcsauth`).

Writes are create-only: a blob is uploaded with ``ifGenerationMatch=0``, so
GCS refuses (412) to replace an existing object, and a 412 means another
writer, perhaps another instance on the same bucket, stored the same bytes
first: a success. An object appears only once its upload is complete, so no
staging object or server-side copy is needed. A staged blob is written to a
local temporary file (unlinked at once, so a crash leaves nothing behind)
and uploaded at commit: in one request up to ``chunk_size``, else through a
resumable upload, one chunk in memory at a time. Failed requests (a
connection error, 429, 5xx) are retried with backoff; a resumable upload
asks GCS how much it kept and goes on from there.

GETs of large blobs are redirected (303, as Nixery does) to a V4 signed URL,
cached for half its lifetime so that a redirect costs a dictionary look-up;
with ``proxy`` set, nixeryd streams the bytes itself instead, forwarding a
single byte Range, one network buffer in memory at a time.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import tempfile
import warnings
from collections import OrderedDict
from functools import partial
from typing import IO, Any
from urllib.parse import quote, urlsplit

import google.auth
import google.auth.exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.oauth2 import service_account
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestTransmissionFailed
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from nixeryd.blobserving import Request, error_body, refused_method, requested_range
from nixeryd.builtin import gcsauth
from nixeryd.config import ConfigError
from nixeryd.errors import BlobUnknown, DigestInvalid, RangeNotSatisfiable
from nixeryd.hookspecs import hookimpl
from nixeryd.runtime import Provider, Runtime, ThreadRunner
from nixeryd.settings import Setting, parse_boolean, parse_duration
from nixeryd.singleflight import SingleFlight
from nixeryd.storage import (
    Blob,
    BlobAnswer,
    BlobInfo,
    RecordInfo,
    Redirect,
    Storage,
    digest_hex,
    record_parts,
)

NAME = "gcs"
DEFAULT_ENDPOINT = "https://storage.googleapis.com"

#: Resumable uploads move whole multiples of 256 KiB per request.
CHUNK_QUANTUM = 256 * 1024
#: Staged blobs up to this size go up in one request; larger ones in chunks of this size.
DEFAULT_CHUNK_SIZE = 32 * CHUNK_QUANTUM
# Signed URLs remembered (one per recently served blob); a few hundred bytes each.
_SIGNED_URLS_KEPT = 10_000
# Attempts of one request before its error is final, and the first backoff (doubling).
_ATTEMPTS = 5
_FIRST_BACKOFF = 0.5
_RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# A request that hears nothing for this long failed (and is retried).
_REQUEST_TIMEOUT = 120.0

_log = Logger()


class GcsError(Exception):
    """GCS answered something nixeryd cannot take as success; the message says what."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Retryable(GcsError):
    """GCS was busy (408, 429, 5xx): worth another attempt, as a failed connection is."""


_CONNECTION_ERRORS = (
    ConnectError,
    DNSLookupError,
    ConnectionLost,
    defer.TimeoutError,
    ResponseFailed,
    RequestTransmissionFailed,
)


class GcsStorage:
    """A :class:`nixeryd.storage.Storage` over one GCS bucket, through the JSON API."""

    def __init__(
        self,
        *,
        bucket: str,
        http: Any,
        tokens: gcsauth.AccessTokens,
        reactor: Any,
        run_in_thread: ThreadRunner,
        endpoint: str = DEFAULT_ENDPOINT,
        prefix: str = "",
        signer: gcsauth.UrlSigner | None = None,
        link_expiration: float = 300.0,
        redirect_status: int = 303,
        proxy: bool = False,
        staging_dir: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if chunk_size % CHUNK_QUANTUM:
            raise ValueError(f"chunk_size must be a multiple of {CHUNK_QUANTUM}")
        self.bucket = bucket
        self._http = http
        self._tokens = tokens
        self._reactor = reactor
        self._run = run_in_thread
        self._endpoint = endpoint.rstrip("/")
        self._prefix = prefix
        self._signer = signer
        self._lifetime = int(link_expiration)
        self._redirect_status = redirect_status
        self._proxy = proxy
        self._staging_dir = staging_dir
        self.chunk_size = chunk_size
        self._bucket_url = f"{self._endpoint}/storage/v1/b/{quote(bucket, safe='')}"
        self._upload_url = f"{self._endpoint}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
        # digest -> (URL, when to sign a new one), least recently served first.
        self._signed_urls: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._signing: SingleFlight[str] = SingleFlight()

    def start(self) -> Deferred[None]:
        """Check that the bucket is there and ours, and that URLs can be signed."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        where = f"GCS bucket {self.bucket!r} at {self._endpoint}"
        # Listing rather than reading the bucket's metadata: storage.buckets.get is not
        # in roles/storage.objectAdmin, and listing is what garbage collection needs.
        params = {"prefix": self._prefix, "maxResults": "1", "fields": "items(name)"}
        try:
            response = await self._call("GET", f"{self._bucket_url}/o", params=params, retry=False)
        except _CONNECTION_ERRORS as error:
            raise GcsError(f"cannot reach {where}: {error}") from error
        content = await response.content()
        if response.code == 404:
            raise GcsError(f"{where} does not exist; create it or fix GCS_BUCKET", 404)
        if response.code in (401, 403):
            raise GcsError(
                f"{where}: access denied ({gcsauth.error_message(content)}); give the "
                "credentials roles/storage.objectAdmin on the bucket, or point "
                "GOOGLE_APPLICATION_CREDENTIALS at a service account key that has it",
                response.code,
            )
        if response.code != 200:
            raise GcsError(
                f"{where} answered {response.code}: {gcsauth.error_message(content)}",
                response.code,
            )
        if self._signer is not None and not self._proxy:
            # signBlob needs a permission that reading the bucket does not: ask now.
            await self._signer.sign(b"nixeryd start-up check")

    def stop(self) -> Deferred[None]:
        """Forget signed URLs; requests in flight finish on their own or fail."""
        self._signed_urls.clear()
        return succeed(None)

    # Blobs

    def stage_blob(self) -> GcsStagedBlob:
        return GcsStagedBlob(self, tempfile.TemporaryFile(dir=self._staging_dir))

    def put_blob(self, data: bytes, media_type: str) -> Deferred[BlobInfo]:
        # Hashing a manifest or config of a few KiB is faster than a thread hop.
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        return Deferred.fromCoroutine(self._put_blob(digest, data, media_type))

    async def _put_blob(self, digest: str, data: bytes, media_type: str) -> BlobInfo:
        await self._upload(self._blob_key(digest_hex(digest)), data, media_type, create_only=True)
        return BlobInfo(digest, len(data), media_type)

    def stat_blob(self, digest: str) -> Deferred[BlobInfo | None]:
        try:
            key = self._blob_key(digest_hex(digest))
        except DigestInvalid:
            return fail()
        return Deferred.fromCoroutine(self._stat_blob(digest, key))

    async def _stat_blob(self, digest: str, key: str) -> BlobInfo | None:
        params = {"fields": "name,size,contentType"}
        response = await self._call("GET", self._object_url(key), params=params)
        if response.code == 404:
            await response.content()
            return None
        metadata = json.loads(await self._expect(response, 200))
        return BlobInfo(digest, int(metadata["size"]), _media_type(metadata.get("contentType")))

    def read_blob(self, digest: str) -> Deferred[Blob | None]:
        try:
            key = self._blob_key(digest_hex(digest))
        except DigestInvalid:
            return fail()
        return Deferred.fromCoroutine(self._read_blob(digest, key))

    async def _read_blob(self, digest: str, key: str) -> Blob | None:
        response = await self._call("GET", self._object_url(key), params={"alt": "media"})
        if response.code == 404:
            await response.content()
            return None
        data = await self._expect(response, 200)
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0].decode()
        return Blob(BlobInfo(digest, len(data), _media_type(content_type)), data)

    def serve_blob(self, info: BlobInfo) -> BlobAnswer:
        """A redirect to a signed URL, or with ``proxy`` a resource streaming the object."""
        key = self._blob_key(digest_hex(info.digest))
        if self._proxy:
            return IResource(_ProxiedBlobResource(self, key, info))
        if self._signer is None:
            url = gcsauth.unsigned_url(self._endpoint, self.bucket, key)
            return Redirect(url, self._redirect_status)
        # (url, until): a wall-clock time, the reactor's, as Redirect.until is.
        cached = self._signed_urls.get(info.digest)
        if cached is not None and self._reactor.seconds() < cached[1]:
            self._signed_urls.move_to_end(info.digest)
            return Redirect(cached[0], self._redirect_status, until=cached[1])
        now = self._reactor.seconds()
        signing = self._signing.run(info.digest, lambda: self._sign(info.digest, key, now))
        outcome: list[str | Failure] = []

        def note(result: Any) -> Any:
            outcome.append(result)
            return result

        signing.addBoth(note)
        if not outcome:  # signed remotely (IAM signBlob): answer once it is done
            return IResource(_PendingRedirect(info.digest, signing, self._redirect_status))
        signing.addErrback(lambda _: None)  # a failure is raised here instead
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        # Signed with a key: at once.
        return Redirect(str(outcome[0]), self._redirect_status, until=now + self._lifetime / 2)

    def _sign(self, digest: str, key: str, now: float) -> Deferred[str]:
        """Sign a URL valid from ``now``, and remember it for half its lifetime: the
        registry and this cache may hand it out until then, and a client that got it
        at the last moment still has the other half to start its download."""
        assert self._signer is not None

        def remember(url: str) -> str:
            self._signed_urls[digest] = (url, now + self._lifetime / 2)
            self._signed_urls.move_to_end(digest)
            while len(self._signed_urls) > _SIGNED_URLS_KEPT:
                self._signed_urls.popitem(last=False)
            return url

        signing = gcsauth.signed_url(
            self._signer, self._endpoint, self.bucket, key, self._lifetime, now
        )
        return signing.addCallback(remember)

    def list_blobs(self) -> Deferred[list[BlobInfo]]:
        return Deferred.fromCoroutine(self._list_blobs())

    async def _list_blobs(self) -> list[BlobInfo]:
        blobs = self._prefix + "blobs/sha256/"
        found = []
        for item in await self._list(blobs):
            digest = "sha256:" + item["name"][len(blobs) :]
            with contextlib.suppress(DigestInvalid):  # not ours: ignored
                digest_hex(digest)
                size = int(item["size"])
                media_type = _media_type(item.get("contentType"))
                found.append(BlobInfo(digest, size, media_type, modified=_updated(item)))
        return found

    def delete_blob(self, digest: str) -> Deferred[None]:
        try:
            key = self._blob_key(digest_hex(digest))
        except DigestInvalid:
            return fail()
        self._signed_urls.pop(digest, None)
        return Deferred.fromCoroutine(self._delete(key))

    def _blob_key(self, hex_digest: str) -> str:
        return f"{self._prefix}blobs/sha256/{hex_digest}"

    # Records

    def get_record(self, name: str) -> Deferred[bytes | None]:
        try:
            key = self._record_key(name)
        except ValueError:
            return fail()
        return Deferred.fromCoroutine(self._get_record(key))

    async def _get_record(self, key: str) -> bytes | None:
        response = await self._call("GET", self._object_url(key), params={"alt": "media"})
        if response.code == 404:
            await response.content()
            return None
        return await self._expect(response, 200)

    def put_record(self, name: str, data: bytes) -> Deferred[None]:
        """Overwrite the record: a GCS upload replaces an object whole, atomically."""
        try:
            key = self._record_key(name)
        except ValueError:
            return fail()
        upload = self._upload(key, data, "application/octet-stream", create_only=False)
        return Deferred.fromCoroutine(upload)

    def list_records(self, prefix: str) -> Deferred[list[RecordInfo]]:
        return Deferred.fromCoroutine(self._list_records(prefix))

    async def _list_records(self, prefix: str) -> list[RecordInfo]:
        records = self._prefix + "records/"
        found = [
            RecordInfo(item["name"][len(records) :], _updated(item))
            for item in await self._list(records + prefix)
        ]
        return sorted(found, key=lambda record: record.name)

    def delete_record(self, name: str) -> Deferred[None]:
        try:
            key = self._record_key(name)
        except ValueError:
            return fail()
        return Deferred.fromCoroutine(self._delete(key))

    def _record_key(self, name: str) -> str:
        return f"{self._prefix}records/{'/'.join(record_parts(name))}"

    # The JSON API

    def _object_url(self, key: str) -> str:
        return f"{self._bucket_url}/o/{quote(key, safe='')}"

    async def _list(self, prefix: str) -> list[dict[str, Any]]:
        """Every object under ``prefix``, page after page."""
        items: list[dict[str, Any]] = []
        params = {"prefix": prefix, "fields": "items(name,size,contentType,updated),nextPageToken"}
        while True:
            response = await self._call("GET", f"{self._bucket_url}/o", params=params)
            listing = json.loads(await self._expect(response, 200))
            items.extend(listing.get("items", []))
            if not listing.get("nextPageToken"):
                return items
            params["pageToken"] = listing["nextPageToken"]

    async def _delete(self, key: str) -> None:
        response = await self._call("DELETE", self._object_url(key))
        await self._expect(response, 200, 204, 404)

    async def _upload(self, key: str, data: bytes, media_type: str, *, create_only: bool) -> None:
        """Upload an object in one request; with ``create_only``, one that exists (412)
        holds the same bytes, content addressing says, and counts as uploaded."""
        params = {"uploadType": "media", "name": key}
        if create_only:
            params["ifGenerationMatch"] = "0"
        headers = {b"Content-Type": [media_type.encode()]}
        response = await self._call(
            "POST", self._upload_url, params=params, data=data, headers=headers
        )
        await self._expect(response, 200, 201, *((412,) if create_only else ()))

    async def _expect(self, response: Any, *statuses: int) -> bytes:
        """The body of an answer with one of ``statuses``; GcsError otherwise."""
        content: bytes = await response.content()
        if response.code in statuses:
            return content
        kind = _Retryable if response.code in _RETRIED_STATUSES else GcsError
        message = gcsauth.error_message(content)
        raise kind(f"GCS answered {response.code} for {self.bucket}: {message}", response.code)

    async def _call(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, str] | None = None,
        data: bytes | None = None,
        headers: dict[bytes, list[bytes]] | None = None,
        unbuffered: bool = False,
        retry: bool = True,
    ) -> Any:
        """One API request with a valid token; retried while GCS is busy or unreachable.

        The response is returned whatever its status (callers know which
        statuses are fine), except that a busy answer (429, 5xx) is retried
        first. Every request nixeryd makes may be repeated: reads and deletes
        are idempotent, a create-only upload that already succeeded answers 412.
        """
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                response = await self._send(method, url, params, data, headers, unbuffered)
                if response.code not in _RETRIED_STATUSES:
                    return response
                await self._expect(response)  # raises _Retryable
            except (_Retryable, *_CONNECTION_ERRORS) as error:
                if not retry or attempt == _ATTEMPTS:
                    raise
                await self._back_off(attempt, error)
        raise AssertionError("unreachable")

    async def _send(
        self,
        method: str,
        url: str,
        params: dict[str, str] | None,
        data: bytes | None,
        headers: dict[bytes, list[bytes]] | None,
        unbuffered: bool = False,
    ) -> Any:
        """One request, with the Authorization header and a timeout."""
        all_headers = dict(headers or {})
        token = await self._tokens.token()
        if token is not None:
            all_headers[b"Authorization"] = [f"Bearer {token}".encode()]
        sent: Deferred[Any] = self._http.request(
            method,
            url,
            params=params,
            data=data,
            headers=all_headers,
            unbuffered=unbuffered,
            # A resumable upload's 308 means "go on", not "go elsewhere".
            allow_redirects=False,
        )
        return await sent.addTimeout(_REQUEST_TIMEOUT, self._reactor)

    async def _back_off(self, attempt: int, error: Exception) -> None:
        delay = _FIRST_BACKOFF * 2 ** (attempt - 1)
        _log.warn("GCS request failed ({error}); retrying in {delay}s", error=error, delay=delay)
        await deferLater(self._reactor, delay)

    # Staged blobs: one request, or a resumable upload in chunks

    async def _upload_file(self, file: IO[bytes], size: int, key: str, media_type: str) -> None:
        """Upload ``size`` bytes of ``file`` as a new object, one chunk in memory at a time."""
        descriptor = file.fileno()
        if size <= self.chunk_size:
            data = await self._run(partial(os.pread, descriptor, size, 0))
            await self._upload(key, data, media_type, create_only=True)
            return
        session = await self._open_session(key, media_type, size)
        if session is None:
            return  # already stored
        offset: int | None = 0  # None: unknown since a chunk failed; ask GCS
        failures = 0
        while True:
            try:
                if offset is None:
                    # How much did GCS keep? A status query is a PUT of no bytes.
                    offset = await self._put_chunk(session, b"", f"bytes */{size}")
                    if offset is None:
                        return  # it had it all
                length = min(self.chunk_size, size - offset)
                chunk = await self._run(partial(os.pread, descriptor, length, offset))
                content_range = f"bytes {offset}-{offset + length - 1}/{size}"
                offset = await self._put_chunk(session, chunk, content_range)
                if offset is None:
                    return
                failures = 0
            except (_Retryable, *_CONNECTION_ERRORS) as error:
                failures += 1
                if failures == _ATTEMPTS:
                    raise
                await self._back_off(failures, error)
                offset = None

    async def _open_session(self, key: str, media_type: str, size: int) -> str | None:
        """A resumable upload session's URL; None if the object already exists."""
        params = {"uploadType": "resumable", "name": key, "ifGenerationMatch": "0"}
        headers = {
            b"Content-Type": [b"application/json; charset=UTF-8"],
            b"X-Upload-Content-Type": [media_type.encode()],
            b"X-Upload-Content-Length": [str(size).encode()],
        }
        body = json.dumps({"name": key, "contentType": media_type}).encode()
        response = await self._call(
            "POST", self._upload_url, params=params, data=body, headers=headers
        )
        await self._expect(response, 200, 412)
        if response.code == 412:
            return None
        return str(response.headers.getRawHeaders(b"location")[0].decode())

    async def _put_chunk(self, session: str, chunk: bytes, content_range: str) -> int | None:
        """PUT to an upload session: the offset to go on from (308), or None once complete."""
        response = await self._send(
            "PUT", session, None, chunk, {b"Content-Range": [content_range.encode()]}
        )
        await self._expect(response, 200, 201, 308, 412)
        if response.code != 308:
            return None  # complete; or 412: another writer created the object meanwhile
        # "bytes=0-<last byte kept>", absent when nothing was kept.
        kept = response.headers.getRawHeaders(b"range", [b""])[0].decode()
        return int(kept.rpartition("-")[2]) + 1 if kept else 0


def _media_type(content_type: str | None) -> str:
    """A media type from an object's contentType (which GCS always sets)."""
    return content_type or "application/octet-stream"


def _updated(item: dict[str, Any]) -> float:
    """Seconds since the epoch of an object's ``updated`` (RFC 3339); +inf if missing or
    unreadable, so that an object of unknown age counts as new and is left alone."""
    try:
        return datetime.datetime.fromisoformat(item["updated"].replace("Z", "+00:00")).timestamp()
    except (KeyError, AttributeError, ValueError):
        return float("inf")


class GcsStagedBlob:
    """A blob written to an anonymous local file, uploaded to GCS at commit.

    The digest given to ``commit`` is trusted, as the filesystem backend
    trusts it: the writer computed it while writing.
    """

    file: IO[bytes]

    def __init__(self, storage: GcsStorage, file: IO[bytes]) -> None:
        self.file = file
        self._storage = storage
        self._finished = False

    def commit(self, digest: str, media_type: str) -> Deferred[BlobInfo]:
        if self._finished:
            return fail(ValueError("staged blob already committed or discarded"))
        try:
            key = self._storage._blob_key(digest_hex(digest))
        except DigestInvalid:
            self.discard()
            return fail()
        self._finished = True
        return Deferred.fromCoroutine(self._commit(digest, key, media_type))

    async def _commit(self, digest: str, key: str, media_type: str) -> BlobInfo:
        file = self.file

        def flushed_size() -> int:
            file.flush()
            return os.fstat(file.fileno()).st_size

        try:
            size = await self._storage._run(flushed_size)
            await self._storage._upload_file(file, size, key, media_type)
        finally:
            file.close()
        return BlobInfo(digest, size, media_type)

    def discard(self) -> None:
        if self._finished:
            return
        self._finished = True
        with contextlib.suppress(OSError):
            self.file.close()


class _PendingRedirect(Resource):
    """The redirect of a blob whose URL is being signed remotely (IAM signBlob).

    Renders (a client may retry on a new connection) wait for the one signature.
    """

    isLeaf = True

    def __init__(self, digest: str, signing: Deferred[str], status: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._digest = digest
        self._status = status
        self._outcome: list[str | Failure] = []
        self._waiting: list[Request] = []
        signing.addBoth(self._signed)

    def _signed(self, outcome: str | Failure) -> None:
        if isinstance(outcome, Failure):
            _log.failure("signing a GCS URL", outcome)
        self._outcome.append(outcome)
        waiting, self._waiting = self._waiting, []
        for request in waiting:
            self._answer(request, outcome)

    def render(self, request: Request) -> int:
        if self._outcome:
            self._answer(request, self._outcome[0])
            return NOT_DONE_YET
        self._waiting.append(request)
        # The signature is shared with other requests: a client that leaves does not cancel it.
        request.notifyFinish().addErrback(lambda _: self._forget(request))
        return NOT_DONE_YET

    def _forget(self, request: Request) -> None:
        if request in self._waiting:
            self._waiting.remove(request)

    def _answer(self, request: Request, outcome: str | Failure) -> None:
        if isinstance(outcome, Failure):
            _unavailable(request, "cannot sign a URL for the blob")
            return
        request.setResponseCode(self._status)
        request.setHeader(b"location", outcome.encode())
        request.setHeader(b"docker-content-digest", self._digest.encode())
        request.setHeader(b"content-length", b"0")
        request.finish()


class _ProxiedBlobResource(Resource):
    """GET of one blob streamed from GCS through nixeryd, with a single byte Range.

    The Range is answered from the blob's known size (as
    :class:`~nixeryd.blobserving.FileBlobResource` does) and forwarded to
    GCS as a plain ``bytes=start-end``. The object's body is relayed as it
    arrives; the client connection pauses the GCS connection when it cannot
    keep up, so memory stays at a network buffer per download.
    """

    isLeaf = True

    def __init__(self, storage: GcsStorage, key: str, info: BlobInfo) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._storage = storage
        self._key = key
        self._info = info

    def render(self, request: Request) -> bytes | int:
        refused = refused_method(request)
        if refused is not None:
            return refused
        size = self._info.size
        etag = f'"{self._info.digest}"'
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"etag", etag.encode())
        request.setHeader(b"docker-content-digest", self._info.digest.encode())
        try:
            byte_range = requested_range(request, size, etag)
        except RangeNotSatisfiable as error:
            request.setHeader(b"content-range", f"bytes */{size}".encode())
            return error_body(request, error)
        request.setHeader(b"content-type", self._info.media_type.encode())
        offset, end = (0, size) if byte_range is None else byte_range
        if request.method == b"HEAD" or end == offset:
            request.setHeader(b"content-length", str(end - offset).encode())
            if byte_range is not None:
                request.setResponseCode(206)
                request.setHeader(b"content-range", f"bytes {offset}-{end - 1}/{size}".encode())
            return b""
        gone: list[bool] = []
        fetching = Deferred.fromCoroutine(self._proxy(request, byte_range, offset, end, gone))

        def client_left(_: Failure) -> None:
            gone.append(True)
            fetching.cancel()

        request.notifyFinish().addErrback(client_left)
        return NOT_DONE_YET

    async def _proxy(
        self,
        request: Request,
        byte_range: tuple[int, int] | None,
        offset: int,
        end: int,
        gone: list[bool],
    ) -> None:
        """Fetch the object (its range) from GCS and relay it; ``gone`` once the client left."""
        headers = {}
        if byte_range is not None:
            headers[b"Range"] = [f"bytes={offset}-{end - 1}".encode()]
        url = self._storage._object_url(self._key)
        try:
            response = await self._storage._call(
                "GET", url, params={"alt": "media"}, headers=headers, unbuffered=True
            )
            if response.code not in (200, 206, 404):
                await self._storage._expect(response, 200)  # raises, with GCS's message
        except Exception:
            if not gone:
                _log.failure("proxying a blob from GCS")
                _unavailable(request, "blob storage is unavailable")
            return
        if gone:
            response.deliverBody(_Discard())
            return
        if response.code == 404:
            response.deliverBody(_Discard())
            missing = BlobUnknown(f"blob {self._info.digest} is not stored")
            request.write(error_body(request, missing))
            request.finish()
            return
        if byte_range is not None:
            request.setResponseCode(206)
            request.setHeader(
                b"content-range", f"bytes {offset}-{end - 1}/{self._info.size}".encode()
            )
        request.setHeader(b"content-length", str(end - offset).encode())
        # A 200 to a ranged request is the whole object: skip to the range.
        skip = offset if response.code == 200 else 0
        response.deliverBody(_Relay(request, skip, end - offset))


def _unavailable(request: Request, message: str) -> None:
    """End ``request`` with a 503: GCS failed, and the client may try again later."""
    request.setResponseCode(503)
    request.setHeader(b"content-type", b"application/json")
    request.write(json.dumps({"errors": [{"code": "UNAVAILABLE", "message": message}]}).encode())
    request.finish()


class _Discard(Protocol):
    """Reads a response body nobody wants, so that its connection can be reused."""

    def dataReceived(self, data: bytes) -> None:
        pass


class _Relay(Protocol):
    """Writes a GCS response body to the client's request as it arrives.

    The GCS connection's transport is registered as the request's streaming
    producer: twisted.web pauses it while the client's send buffer is full.
    """

    def __init__(self, request: Request, skip: int, length: int) -> None:
        self._request: Request | None = request
        self._skip = skip
        self._remaining = length
        request.notifyFinish().addErrback(lambda _: self._client_gone())

    def connectionMade(self) -> None:
        if self._request is not None and self.transport is not None:
            self._request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if self._request is None:
            return
        if self._skip:
            data, self._skip = data[self._skip :], max(self._skip - len(data), 0)
        data = data[: self._remaining]
        if data:
            self._remaining -= len(data)
            self._request.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        reason = reason or Failure(ResponseDone())
        request, self._request = self._request, None
        if request is None:
            return
        request.unregisterProducer()
        if reason.check(ResponseDone) and self._remaining == 0:
            request.finish()
        else:
            # Content-Length promised more: end the connection so the client does not wait.
            _log.error(
                "GCS body ended {missing} bytes early: {reason}",
                missing=self._remaining,
                reason=reason.getErrorMessage(),
            )
            request.loseConnection()

    def _client_gone(self) -> None:
        if self._request is not None and self.transport is not None:
            self._request = None
            self.transport.stopProducing()


# Settings and the provider


def _parse_status(text: str) -> int:
    if text.strip() not in ("303", "307"):
        raise ValueError("must be 303 (Nixery's) or 307 (the distribution registry's)")
    return int(text)


def _parse_lifetime(text: str) -> float:
    seconds = parse_duration(text)
    if not 1 <= seconds <= gcsauth.MAX_URL_LIFETIME:
        raise ValueError("must be between 1s and 7 days (168h), the limit of a V4 signed URL")
    return seconds


def _parse_prefix(text: str) -> str:
    if text and not text.endswith("/"):
        text += "/"
    if text:
        record_parts(text[:-1])  # the same rules as record names; ValueError otherwise
    return text


def _parse_endpoint(text: str) -> str:
    url = text if "://" in text else f"http://{text}"  # STORAGE_EMULATOR_HOST may be host:port
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise ValueError("must be a URL such as https://storage.googleapis.com")
    return url.rstrip("/")


SETTINGS = (
    Setting(
        "bucket", "the GCS bucket to store blobs and records in", ("GCS_BUCKET",), required=True
    ),
    Setting(
        "credentials",
        "a credentials file (a service account key); unset: Application Default Credentials",
        ("GOOGLE_APPLICATION_CREDENTIALS",),
    ),
    Setting(
        "signing_key",
        "a PEM private key of signing_account to sign URLs with (Nixery's older variable)",
        ("GCS_SIGNING_KEY",),
    ),
    Setting(
        "signing_account",
        "the service account signed URLs are signed as (with signing_key, or via IAM signBlob)",
        ("GCS_SIGNING_ACCOUNT",),
    ),
    Setting(
        "endpoint",
        "the GCS endpoint (an emulator, a private endpoint)",
        ("NIXERYD_GCS_ENDPOINT",),
        parse=_parse_endpoint,
    ),
    Setting(
        "emulator_host",
        "a GCS emulator to use without credentials, as google's libraries read it",
        ("STORAGE_EMULATOR_HOST",),
        parse=_parse_endpoint,
    ),
    Setting(
        "anonymous",
        "send no credentials (an emulator or a public bucket)",
        ("NIXERYD_GCS_ANONYMOUS",),
        parse=parse_boolean,
        default=False,
    ),
    Setting(
        "link_expiration",
        "how long a signed URL is valid (a Go duration)",
        ("NIXERYD_GCS_LINK_EXPIRATION",),
        parse=_parse_lifetime,
        default=300.0,
    ),
    Setting(
        "redirect_status",
        "the status of a redirect to a signed URL: 303 (Nixery's) or 307",
        ("NIXERYD_GCS_REDIRECT_STATUS",),
        parse=_parse_status,
        default=303,
    ),
    Setting(
        "proxy",
        "serve blob bytes through nixeryd instead of redirecting clients to GCS",
        ("NIXERYD_GCS_PROXY",),
        parse=parse_boolean,
        default=False,
    ),
    Setting(
        "prefix",
        "a key prefix, to share a bucket (such as nixeryd/)",
        ("NIXERYD_GCS_PREFIX",),
        parse=_parse_prefix,
        default="",
    ),
    Setting(
        "staging_dir",
        "where staged layers are written before upload (default: the system's temp directory)",
        ("NIXERYD_GCS_STAGING_DIR",),
    ),
)


def load_credentials(settings: Any) -> Credentials:
    """The credentials the settings name; ConfigError with what to fix otherwise.

    Reading a key file or probing for Application Default Credentials happens
    once, at start-up, before the reactor runs.
    """
    if settings["anonymous"] or settings["emulator_host"]:
        return AnonymousCredentials()
    try:
        if settings["credentials"]:
            credentials = _credentials_file(settings["credentials"])
        else:
            credentials, _project = google.auth.default(scopes=gcsauth.SCOPES)
    except (google.auth.exceptions.DefaultCredentialsError, ValueError) as error:
        raise ConfigError(
            f"gcs: no usable credentials ({error}); set GOOGLE_APPLICATION_CREDENTIALS "
            "to a service account key, or run where Application Default Credentials exist"
        ) from error
    return credentials  # type: ignore[no-any-return]


def _credentials_file(path: str) -> Credentials:
    """The credentials in a JSON file: a service account key (what Nixery reads), or
    any other type google-auth knows (a user's, workload identity federation)."""
    try:
        with open(path) as file:
            kind = json.load(file).get("type")
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(
            f"gcs: cannot read credentials file {path} (GOOGLE_APPLICATION_CREDENTIALS): {error}"
        ) from error
    if kind == "service_account":
        return service_account.Credentials.from_service_account_file(  # type: ignore[no-any-return]
            path, scopes=gcsauth.SCOPES
        )
    # google-auth warns that the generic loader accepts any credential type from
    # any source; this file is the operator's own configuration.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        credentials, _project = google.auth.load_credentials_from_file(path, scopes=gcsauth.SCOPES)
    return credentials  # type: ignore[no-any-return]


def choose_signer(
    settings: Any, credentials: Credentials, http: Any, tokens: gcsauth.AccessTokens
) -> gcsauth.UrlSigner | None:
    """How redirect URLs are signed; None: unsigned URLs, for a publicly readable bucket.

    A key named by ``signing_key`` first (Nixery's ``GCS_SIGNING_KEY``), then
    the credentials' own key (a service account key file), then the IAM
    signBlob API as ``signing_account`` or the credentials' service account.
    """
    account = settings["signing_account"] or None
    if settings["signing_key"]:
        if not account:
            raise ConfigError("gcs: signing_key (GCS_SIGNING_KEY) needs GCS_SIGNING_ACCOUNT too")
        try:
            with open(settings["signing_key"]) as file:
                return gcsauth.KeySigner.from_pem(file.read(), account)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"gcs: cannot load signing key {settings['signing_key']}: {error}"
            ) from error
    signer = getattr(credentials, "signer", None)
    email = getattr(credentials, "signer_email", None)
    if signer is not None and email:
        return gcsauth.KeySigner(signer, account or email)
    if isinstance(credentials, AnonymousCredentials):
        return None
    return gcsauth.IamSigner(http, tokens, account)


def create(runtime: Runtime) -> GcsStorage:
    settings = runtime.settings
    credentials = load_credentials(settings)
    tokens = gcsauth.AccessTokens(credentials, runtime.run_in_thread, runtime.reactor.seconds)
    endpoint = settings["emulator_host"] or settings["endpoint"] or DEFAULT_ENDPOINT
    signer = (
        None if settings["proxy"] else choose_signer(settings, credentials, runtime.http, tokens)
    )
    return GcsStorage(
        bucket=settings["bucket"],
        http=runtime.http,
        tokens=tokens,
        reactor=runtime.reactor,
        run_in_thread=runtime.run_in_thread,
        endpoint=endpoint,
        prefix=settings["prefix"],
        signer=signer,
        link_expiration=settings["link_expiration"],
        redirect_status=settings["redirect_status"],
        proxy=settings["proxy"],
        staging_dir=settings["staging_dir"],
    )


@hookimpl
def nixeryd_storage_backends() -> list[Provider[Storage]]:
    return [
        Provider(
            NAME,
            "blobs and records in a Google Cloud Storage bucket (GCS_BUCKET)",
            create,
            settings=SETTINGS,
        )
    ]
