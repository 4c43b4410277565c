"""Storage in an S3 bucket (Nixery's ``S3_*`` variables), on AWS or any S3-compatible server.

Key layout, under an optional prefix (``NIXERYD_S3_PREFIX``) so that several
registries can share a bucket::

    <prefix>blobs/sha256/<hex>   a blob; Content-Type is its media type
    <prefix>records/<name>       a record such as records/builds/<key>

Several instances on one bucket. Every blob is written straight to its
final key with ``If-None-Match: *``: the server refuses (412) to replace an
existing object, and since a key names its content, a 412 means another
instance stored the same bytes, which is success. There is no staging key
and no copy, so nothing is ever visible half-written and no two writers
race (Nixery stages an object and copies it, and two instances can
interleave there). A large blob goes up as a multipart upload, which S3
makes visible only when it is completed, whole. What is not coordinated:
each instance builds an image it has not seen itself (the bucket then holds
one copy of each layer), and records are last-writer-wins.

Crashes. An upload interrupted by a crash (even ``kill -9`` mid-multipart)
leaves no object under the final key; its parts stay in the bucket, invisible
and billed, until they are aborted. Give the bucket a lifecycle rule with
``AbortIncompleteMultipartUpload`` (a day is plenty); ``start`` also aborts
this prefix's uploads older than a day, and ``stop`` those still in flight
at an orderly shutdown.

Requests are signed with botocore's own SigV4 signer (``S3SigV4Auth``) and
sent with the runtime's treq client, so nothing blocks the reactor; the
signer is told a payload's SHA-256 rather than reading the body: a blob's
digest *is* that hash, which lets servers that check it verify the upload.
Blob GETs are redirected to presigned URLs (``S3SigV4QueryAuth``), kept per
blob for half their lifetime so that a redirect costs no signing. With
``NIXERYD_S3_PROXY`` nixeryd streams the bytes itself instead, for buckets its
clients cannot reach.

Credentials: ``S3_ACCESS_KEY``/``S3_SECRET_KEY``, or else botocore's standard
chain (``AWS_ACCESS_KEY_ID``..., shared files, instance metadata), resolved in
a worker thread at start; credentials that expire are refreshed in a worker
thread as well, ahead of their expiry.

Servers seen to work: SeaweedFS (``weed mini``) and Ceph RGW 16.2. RGW 16.2
ignores ``If-None-Match`` on CompleteMultipartUpload (a concurrent writer of
the same large blob overwrites it with the same bytes: harmless), returns an
empty ETag from it, serves path-style addressing only (set
``S3_USE_PATH_STYLE``) and wants buckets created without a
LocationConstraint.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import ipaddress
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import IO, Any
from urllib.parse import quote, urlencode, urlsplit
from xml.etree import ElementTree

import botocore.session  # type: ignore[import-untyped]
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import (  # type: ignore[import-untyped]
    Credentials,
    ReadOnlyCredentials,
    RefreshableCredentials,
)
from twisted.internet.defer import (
    Deferred,
    DeferredSemaphore,
    fail,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Cooperator, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from nixeryd.blobserving import Request, blob_headers, error_body, refused_method, requested_range
from nixeryd.config import ConfigError
from nixeryd.errors import (
    BlobUnknown,
    DigestInvalid,
    RangeNotSatisfiable,
    RegistryError,
)
from nixeryd.hookspecs import hookimpl
from nixeryd.runtime import Provider, Runtime, ThreadRunner
from nixeryd.settings import Setting, parse_boolean, parse_duration
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

NAME = "s3"

#: Staged blobs larger than this go up as multipart uploads (S3 takes at most 5 GiB in
#: one PUT, and a part can be retried alone).
MULTIPART_THRESHOLD = 64 * 1024 * 1024
#: The size of each part but the last (S3's minimum is 5 MiB; its maximum count 10,000).
PART_SIZE = 64 * 1024 * 1024
#: Tries of one request that failed on the way (connection lost, 5xx, throttling).
ATTEMPTS = 3
#: Seconds before the first retry; doubled for each later one.
RETRY_DELAY = 0.5
#: Seconds after which a multipart upload of ours is abandoned (a crash's) and aborted
#: at start.
STALE_UPLOAD_AGE = 24 * 60 * 60.0

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Blobs described at once by list_blobs (a HEAD each: a listing has no content type).
_LIST_HEADS = 16
# How much of a file FileBodyProducer reads per turn of the reactor.
_READ_SIZE = 256 * 1024
_AWS_ENDPOINT = "https://s3.{region}.amazonaws.com"

_log = Logger()


class S3Error(RegistryError):
    """S3 refused or failed a request: the registry's trouble, not the client's (502)."""

    code = "UNKNOWN"
    status = 502

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


# -- settings ----------------------------------------------------------------------------


def _endpoint(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise ValueError("must be an http(s) URL such as http://127.0.0.1:8333")
    return text.strip().rstrip("/")


def _redirect_status(text: str) -> int:
    if text.strip() not in ("303", "307"):
        raise ValueError("must be 307 (the distribution registry's) or 303 (Nixery's)")
    return int(text)


def _part_size(text: str) -> int:
    """MiB, from S3's minimum part size up (a 5 GiB layer then takes 1,024 parts of 5 MiB)."""
    mib = int(text)
    if mib < 5:
        raise ValueError("must be at least 5 (MiB): S3 refuses smaller parts")
    return mib * 1024 * 1024


def _prefix(text: str) -> str:
    """A key prefix as a folder: ``nixery`` and ``nixery/`` both give ``nixery/``."""
    prefix = text.strip().strip("/")
    if prefix:
        record_parts(prefix)  # ValueError for anything but safe key segments
    return f"{prefix}/" if prefix else ""


SETTINGS = (
    Setting("bucket", "the S3 bucket", ("S3_BUCKET",), required=True),
    Setting(
        "endpoint",
        "the S3 server's URL (unset: AWS)",
        ("S3_ENDPOINT",),
        parse=_endpoint,
    ),
    Setting(
        "region", "the bucket's region", ("AWS_REGION", "AWS_DEFAULT_REGION"), default="us-east-1"
    ),
    Setting("access_key", "access key id (unset: the AWS credential chain)", ("S3_ACCESS_KEY",)),
    Setting("secret_key", "secret access key", ("S3_SECRET_KEY",), secret=True),
    Setting(
        "link_expiration",
        "lifetime of presigned blob URLs",
        ("S3_LINK_EXPIRATION",),
        parse=parse_duration,
        default=300.0,
    ),
    Setting(
        "path_style",
        "address the bucket as <endpoint>/<bucket> rather than <bucket>.<host>",
        ("S3_USE_PATH_STYLE",),
        parse=parse_boolean,
        default=False,
    ),
    Setting(
        "redirect_status",
        "status of blob redirects: 307, or 303 as Nixery",
        ("NIXERYD_S3_REDIRECT_STATUS",),
        parse=_redirect_status,
        default=307,
    ),
    Setting(
        "proxy",
        "serve blob bytes through nixeryd rather than redirecting clients to the bucket",
        ("NIXERYD_S3_PROXY",),
        parse=parse_boolean,
        default=False,
    ),
    Setting(
        "prefix", "key prefix, to share a bucket", ("NIXERYD_S3_PREFIX",), parse=_prefix, default=""
    ),
    Setting(
        "part_size",
        "MiB per part of a multipart upload; layers larger than one part go up in parts",
        ("NIXERYD_S3_PART_SIZE",),
        parse=_part_size,
        default=PART_SIZE,
    ),
    Setting(
        "staging_dir",
        "local directory for layers being written (unset: the system's temp directory)",
        ("NIXERYD_S3_STAGING_DIR",),
    ),
)


# -- signing -----------------------------------------------------------------------------


class _KnownPayloadSigner(S3SigV4Auth):  # type: ignore[misc]
    """botocore's S3 SigV4 signer, told the payload's SHA-256 instead of reading the body.

    The body is a file streamed later by treq (botocore would read it whole
    to hash it), and a blob's digest already is that hash.
    """

    def payload(self, request: AWSRequest) -> str:
        return str(request.context["payload_sha256"])


class _CredentialSource:
    """The credentials requests are signed with; never resolved or refreshed on the reactor.

    Static keys are used as given. Otherwise botocore's chain is resolved in a
    worker thread at start. Credentials that expire (a role's, an instance
    profile's) are refreshed in a worker thread once botocore says a refresh
    is due, which is minutes before they expire, so signing keeps the
    previous ones meanwhile and never waits.
    """

    def __init__(self, static: Credentials | None, run_in_thread: ThreadRunner) -> None:
        self._run = run_in_thread
        self._refreshable: RefreshableCredentials | None = None
        self._frozen = static.get_frozen_credentials() if static is not None else None
        self._refreshing = False

    def load(self) -> Deferred[None]:
        if self._frozen is not None:
            return succeed(None)

        def resolve() -> tuple[Credentials | None, ReadOnlyCredentials | None]:
            found = botocore.session.get_session().get_credentials()
            return found, found.get_frozen_credentials() if found is not None else None

        def keep(result: tuple[Credentials | None, ReadOnlyCredentials | None]) -> None:
            found, frozen = result
            if found is None or frozen is None:
                raise ConfigError(
                    "s3: no credentials: set S3_ACCESS_KEY and S3_SECRET_KEY, or give the "
                    "AWS credential chain some (AWS_ACCESS_KEY_ID, ~/.aws, an instance role)"
                )
            if isinstance(found, RefreshableCredentials):
                self._refreshable = found
            self._frozen = frozen

        return self._run(resolve).addCallback(keep)

    def current(self) -> ReadOnlyCredentials:
        assert self._frozen is not None, "credentials used before start()"
        refreshable = self._refreshable
        if refreshable is not None and not self._refreshing and refreshable.refresh_needed():
            self._refreshing = True
            self._run(refreshable.get_frozen_credentials).addCallbacks(
                self._refreshed, self._refresh_failed
            )
        return self._frozen

    def _refreshed(self, frozen: ReadOnlyCredentials) -> None:
        self._frozen = frozen
        self._refreshing = False

    def _refresh_failed(self, failure: Failure) -> None:
        self._refreshing = False
        _log.error("s3: refreshing credentials failed: {error}", error=failure.getErrorMessage())


# -- responses ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """A response from S3, its body read."""

    status: int
    headers: Any  # twisted.web.http_headers.Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode("latin-1") if values else None


def _local(tag: str) -> str:
    """An XML tag without its namespace: S3's documents use one, some servers none."""
    return tag.rpartition("}")[2]


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ElementTree.Element, name: str) -> str | None:
    found = _children(element, name)
    return found[0].text or "" if found else None


def _parse(body: bytes, what: str) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError as error:
        raise S3Error(f"{what}: S3 answered with malformed XML ({error})") from None


def _error_detail(body: bytes) -> str:
    """``Code: Message`` of an S3 error document, or "" (a HEAD has no body)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return ""
    if _local(root.tag) != "Error":
        return ""
    return ": ".join(part for part in (_text(root, "Code"), _text(root, "Message")) if part)


def _retryable(status: int, detail: str) -> bool:
    """Worth trying again: the server's trouble, throttling, a conflicting conditional write."""
    return status >= 500 or status in (408, 429) or detail.startswith("ConditionalRequestConflict")


class _FileSlice:
    """``length`` bytes of ``file`` from ``offset``, as a file FileBodyProducer can stream.

    FileBodyProducer learns a body's length by seeking to the end, and reads
    until a read returns nothing; this ends both at the slice's end, so one
    part of a multipart upload streams from the staged file.
    """

    def __init__(self, file: IO[bytes], offset: int, length: int) -> None:
        self._file = file
        self._offset = offset
        self._length = length
        self._position = 0
        file.seek(offset)

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._position
        data = self._file.read(left if size < 0 else min(size, left))
        self._position += len(data)
        return data

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length}[whence]
        self._position = max(0, min(base + offset, self._length))
        self._file.seek(self._offset + self._position)
        return self._position

    def close(self) -> None:
        self._file.close()


def _iso_time(text: str | None) -> float:
    """Seconds since the epoch of an ISO 8601 time (an upload's ``Initiated``, an object's
    ``LastModified``); +inf if unreadable, so that an upload or object of unknown age
    counts as new and is left alone."""
    try:
        return datetime.datetime.fromisoformat((text or "").replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("inf")


def _addressed_by_ip(endpoint: str) -> bool:
    """Whether the endpoint is an IP address or localhost, where only path-style addressing
    can work (``<bucket>.127.0.0.1`` names no host), as botocore decides too."""
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _file_sha256(path: str, offset: int, length: int) -> str:
    """The SHA-256 of ``length`` bytes of the file from ``offset`` (in a worker thread)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(offset)
        left = length
        while left:
            chunk = file.read(min(left, 1024 * 1024))
            if not chunk:
                raise OSError(f"{path} ended {left} bytes early")
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


# -- the backend -------------------------------------------------------------------------


class S3Storage:
    """A :class:`nixeryd.storage.Storage` over an S3 bucket (see the module docstring)."""

    def __init__(
        self,
        *,
        bucket: str,
        http: Any,
        reactor: Any,
        run_in_thread: ThreadRunner,
        endpoint: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        link_expiration: float = 300.0,
        path_style: bool = False,
        redirect_status: int = 307,
        proxy: bool = False,
        prefix: str = "",
        staging_dir: str | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        retry_delay: float = RETRY_DELAY,
        stale_upload_age: float = STALE_UPLOAD_AGE,
    ) -> None:
        if (access_key is None) != (secret_key is None):
            raise ConfigError("s3: set both S3_ACCESS_KEY and S3_SECRET_KEY, or neither")
        self._bucket = bucket
        self._http = http
        self._reactor = reactor
        self._run = run_in_thread
        self._endpoint = endpoint or _AWS_ENDPOINT.format(region=region)
        self._region = region
        self._path_style = path_style or _addressed_by_ip(self._endpoint)
        self._link_expiration = max(1, min(int(link_expiration), 7 * 24 * 3600))
        self._redirect_status = redirect_status
        self._proxy = proxy
        self._prefix = prefix
        self._staging_dir = staging_dir
        self._multipart_threshold = multipart_threshold
        self._part_size = part_size
        self._retry_delay = retry_delay
        self._stale_upload_age = stale_upload_age
        static = Credentials(access_key, secret_key) if access_key and secret_key else None
        self._credentials = _CredentialSource(static, run_in_thread)
        # Presigned URLs by blob hex, oldest first, with when to sign them again.
        self._presigned: OrderedDict[str, tuple[str, float]] = OrderedDict()
        # Multipart uploads in flight (upload id -> key), aborted at stop.
        self._uploads: dict[str, str] = {}
        # Streams staged files on this runtime's reactor rather than the global one.
        self._cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))

    def __repr__(self) -> str:
        return f"S3Storage(s3://{self._bucket}/{self._prefix} at {self._endpoint})"

    # Addressing and requests

    def _url(self, key: str, query: Iterable[tuple[str, str]] = ()) -> str:
        encoded = urlencode(list(query), quote_via=quote, safe="-_.~")
        suffix = f"?{encoded}" if encoded else ""
        path = quote(key, safe="/-_.~")
        if self._path_style:
            return f"{self._endpoint}/{self._bucket}/{path}{suffix}"
        parts = urlsplit(self._endpoint)
        return f"{parts.scheme}://{self._bucket}.{parts.netloc}/{path}{suffix}"

    def _where(self, key: str) -> str:
        return f"s3://{self._bucket}/{key} at {self._endpoint}"

    def _send(
        self,
        method: str,
        key: str,
        *,
        query: Iterable[tuple[str, str]] = (),
        headers: dict[str, str] | None = None,
        body: bytes | FileBodyProducer = b"",
        payload_sha256: str | None = None,
        unbuffered: bool = False,
    ) -> Deferred[Any]:
        """Sign and send one request; the Deferred fires with treq's response.

        ``payload_sha256`` is required for a body producer (a streamed file);
        for bytes it is computed here.
        """
        url = self._url(key, query)
        if payload_sha256 is None:
            assert isinstance(body, bytes)
            payload_sha256 = hashlib.sha256(body).hexdigest() if body else _EMPTY_SHA256
        request = AWSRequest(method=method, url=url, headers=dict(headers or {}))
        request.context["payload_sha256"] = payload_sha256
        _KnownPayloadSigner(self._credentials.current(), "s3", self._region).add_auth(request)
        signed = {name: [str(value)] for name, value in request.headers.items()}
        producer: FileBodyProducer | None = None
        if not isinstance(body, bytes):
            producer = body
        elif body:
            producer = FileBodyProducer(io.BytesIO(body), cooperator=self._cooperator)
        sent: Deferred[Any] = self._http.request(
            method, url, headers=signed, data=producer, unbuffered=unbuffered
        )

        return sent.addErrback(self._unreachable, method, key)

    def _unreachable(self, failure: Failure, method: str, key: str) -> Failure:
        """A request that got no (whole) answer, as an S3Error worth retrying."""
        if failure.check(S3Error):
            return failure
        what = f"{method} {self._where(key)}"
        raise S3Error(f"S3 {what}: {failure.getErrorMessage()}", retryable=True)

    @inlineCallbacks
    def _call(self, method: str, key: str, **options: Any) -> Any:
        """:meth:`_send`, its body read: an :class:`_Answer`."""
        response = yield self._send(method, key, **options)
        body = yield response.content().addErrback(self._unreachable, method, key)
        return _Answer(response.code, response.headers, body)

    def _refused(self, what: str, key: str, answer: _Answer) -> S3Error:
        detail = _error_detail(answer.body)
        shown = f" {detail}" if detail else ""
        message = f"S3 {what} {self._where(key)}: HTTP {answer.status}{shown}"
        return S3Error(message, retryable=_retryable(answer.status, detail))

    def _answered(
        self, operation: str, method: str, key: str, accepted: tuple[int, ...], **options: Any
    ) -> Deferred[Any]:
        """The :class:`_Answer` to ``method`` on ``key``, if its status is ``accepted``;
        tried again while it fails in a way worth retrying, then an S3Error naming
        ``operation``."""

        def attempt() -> Deferred[Any]:
            def check(answer: _Answer) -> _Answer:
                if answer.status not in accepted:
                    raise self._refused(operation, key, answer)
                return answer

            return self._call(method, key, **options).addCallback(check)

        return self._retrying(f"{operation} {key}", attempt)

    @inlineCallbacks
    def _retrying(self, what: str, attempt: Callable[[], Deferred[Any]]) -> Any:
        """``attempt()``, tried again (after a pause) while it fails in a way worth retrying."""
        for number in range(1, ATTEMPTS + 1):
            try:
                result = yield attempt()
            except S3Error as error:
                if not error.retryable or number == ATTEMPTS:
                    raise
                delay = self._retry_delay * 2 ** (number - 1)
                _log.warn(
                    "{what}: {error}; trying again in {delay}s", what=what, error=error, delay=delay
                )
                yield deferLater(self._reactor, delay, lambda: None)
            else:
                return result
        raise AssertionError("unreachable")

    def _logged(self, deferred: Deferred[Any]) -> Deferred[Any]:
        """Log an S3 failure once, without a traceback, where it leaves the backend."""

        def log(failure: Failure) -> Failure:
            if failure.check(S3Error):
                _log.error("{message}", message=failure.getErrorMessage())
            return failure

        return deferred.addErrback(log)

    # Lifecycle

    def start(self) -> Deferred[None]:
        return self._credentials.load().addCallback(lambda _: self._check_bucket())

    @inlineCallbacks
    def _check_bucket(self) -> Any:
        where = f"bucket {self._bucket!r} at {self._endpoint}"
        try:
            answer = yield self._call("HEAD", "")
        except S3Error as error:
            raise ConfigError(f"s3: cannot reach {where}: {error}") from None
        if answer.status == 404:
            raise ConfigError(f"s3: {where} does not exist (S3_BUCKET, S3_ENDPOINT)")
        if answer.status in (301, 400) and answer.header("x-amz-bucket-region"):
            region = answer.header("x-amz-bucket-region")
            raise ConfigError(f"s3: {where} is in region {region}: set AWS_REGION={region}")
        if answer.status == 403:
            raise ConfigError(
                f"s3: access to {where} denied (HTTP 403): check the keys and the bucket policy"
            )
        if answer.status != 200:
            raise ConfigError(f"s3: {where} answered HEAD with HTTP {answer.status}")
        _log.info("s3: using {where}, prefix {prefix!r}", where=where, prefix=self._prefix)
        yield self._abort_stale_uploads()

    @inlineCallbacks
    def _abort_stale_uploads(self) -> Any:
        """Abort this prefix's multipart uploads older than ``stale_upload_age``.

        What a crash left behind (a lifecycle rule does the same, and should
        be there anyway). Old enough that no live instance is still sending
        it. A failure here, a missing permission say, is logged and start-up
        goes on.
        """
        prefix = self._blob_key("")
        cutoff = self._reactor.seconds() - self._stale_upload_age
        # One page (up to 1000 uploads) per start: crashes do not leave more between two.
        query = [("uploads", ""), ("prefix", prefix)]
        try:
            answer = yield self._call("GET", "", query=query)
            if answer.status != 200:
                raise self._refused("ListMultipartUploads", prefix, answer)
            root = _parse(answer.body, "listing multipart uploads")
        except S3Error as error:
            _log.warn("s3: not aborting stale multipart uploads: {error}", error=error)
            return
        stale = [
            (_text(upload, "Key") or "", _text(upload, "UploadId") or "")
            for upload in _children(root, "Upload")
            if _iso_time(_text(upload, "Initiated")) < cutoff
        ]
        for key, upload_id in stale:
            if key.startswith(prefix) and upload_id:
                _log.info("s3: aborting a stale multipart upload of {key}", key=key)
                yield self._abort(key, upload_id)

    def stop(self) -> Deferred[None]:
        """Abort the multipart uploads still in flight and forget presigned URLs."""
        self._presigned.clear()
        aborts = [self._abort(key, upload) for upload, key in list(self._uploads.items())]
        return gatherResults(aborts).addCallback(lambda _: None)

    # Blobs

    def _blob_key(self, hex_digest: str) -> str:
        return f"{self._prefix}blobs/sha256/{hex_digest}"

    def stage_blob(self) -> S3StagedBlob:
        fd, path = tempfile.mkstemp(prefix="nixeryd-s3-", dir=self._staging_dir)
        return S3StagedBlob(self, os.fdopen(fd, "wb"), path)

    def put_blob(self, data: bytes, media_type: str) -> Deferred[BlobInfo]:
        hex_digest = hashlib.sha256(data).hexdigest()
        key = self._blob_key(hex_digest)
        info = BlobInfo(f"sha256:{hex_digest}", len(data), media_type)
        return self._logged(
            self._retrying(
                f"storing {key}",
                lambda: self._put_new(key, data, hex_digest, media_type).addCallback(
                    lambda _: info
                ),
            )
        )

    @inlineCallbacks
    def _put_new(
        self, key: str, body: bytes | FileBodyProducer, payload_sha256: str, media_type: str
    ) -> Any:
        """PUT ``key`` unless it exists; either way it then holds these bytes."""
        headers = {"Content-Type": media_type, "If-None-Match": "*"}
        answer = yield self._call(
            "PUT", key, headers=headers, body=body, payload_sha256=payload_sha256
        )
        # 412: another writer stored it first, and the key names the content.
        if answer.status not in (200, 412):
            raise self._refused("PUT", key, answer)

    def stat_blob(self, digest: str) -> Deferred[BlobInfo | None]:
        try:
            hex_digest = digest_hex(digest)
        except DigestInvalid:
            return fail()
        return self._logged(self._stat(hex_digest))

    @inlineCallbacks
    def _stat(self, hex_digest: str) -> Any:
        key = self._blob_key(hex_digest)
        answer = yield self._answered("HEAD", "HEAD", key, (200, 404))
        if answer.status == 404:
            return None
        return self._info(hex_digest, answer)

    def _info(self, hex_digest: str, answer: _Answer) -> BlobInfo:
        size = answer.header("content-length")
        if size is None or not size.isdigit():
            raise S3Error(f"S3 HEAD {self._where(self._blob_key(hex_digest))}: no Content-Length")
        media_type = answer.header("content-type") or "application/octet-stream"
        return BlobInfo(f"sha256:{hex_digest}", int(size), media_type)

    def read_blob(self, digest: str) -> Deferred[Blob | None]:
        try:
            hex_digest = digest_hex(digest)
        except DigestInvalid:
            return fail()
        return self._logged(self._read(hex_digest))

    @inlineCallbacks
    def _read(self, hex_digest: str) -> Any:
        key = self._blob_key(hex_digest)
        answer = yield self._answered("GET", "GET", key, (200, 404))
        if answer.status == 404:
            return None
        media_type = answer.header("content-type") or "application/octet-stream"
        return Blob(BlobInfo(f"sha256:{hex_digest}", len(answer.body), media_type), answer.body)

    def serve_blob(self, info: BlobInfo) -> BlobAnswer:
        hex_digest = digest_hex(info.digest)
        if self._proxy:
            return IResource(_ProxiedBlob(self, info))
        url, until = self.presigned_url(hex_digest)
        return Redirect(url, self._redirect_status, until=until)

    def presigned_url(self, hex_digest: str) -> tuple[str, float]:
        """A URL that GETs the blob without credentials, and until when to hand it out.

        Kept and handed out again until half of ``link_expiration`` has
        passed (the time is the reactor's: wall-clock time on a real one), so
        a client redirected just before then still has half the lifetime to
        follow it.
        """
        now = self._reactor.seconds()
        cached = self._presigned.get(hex_digest)
        if cached is not None and cached[1] > now:
            return cached
        request = AWSRequest(method="GET", url=self._url(self._blob_key(hex_digest)))
        signer = S3SigV4QueryAuth(
            self._credentials.current(), "s3", self._region, expires=self._link_expiration
        )
        signer.add_auth(request)
        signed = (str(request.url), now + self._link_expiration / 2)
        self._presigned.pop(hex_digest, None)
        self._presigned[hex_digest] = signed
        # Every URL is kept equally long, so the oldest are the first to go stale.
        while self._presigned:
            oldest = next(iter(self._presigned.values()))
            if oldest[1] > now:
                break
            self._presigned.popitem(last=False)
        return signed

    def list_blobs(self) -> Deferred[list[BlobInfo]]:
        return self._logged(self._list_blobs())

    @inlineCallbacks
    def _list_blobs(self) -> Any:
        start = self._blob_key("")
        listed: list[tuple[str, float]] = yield self._list(start)
        modified = {key[len(start) :]: when for key, when in listed}
        heads = DeferredSemaphore(_LIST_HEADS)
        # A listing carries no content type: HEAD each blob, a few at a time.
        infos = yield gatherResults(
            [
                heads.run(self._stat, hex_digest)
                for hex_digest in modified
                if len(hex_digest) == 64 and all(c in "0123456789abcdef" for c in hex_digest)
            ],
            consumeErrors=True,
        )
        return [
            replace(info, modified=modified[digest_hex(info.digest)])
            for info in infos
            if info is not None
        ]

    def delete_blob(self, digest: str) -> Deferred[None]:
        try:
            hex_digest = digest_hex(digest)
        except DigestInvalid:
            return fail()
        self._presigned.pop(hex_digest, None)
        return self._logged(self._delete(self._blob_key(hex_digest)))

    @inlineCallbacks
    def _delete(self, key: str) -> Any:
        yield self._answered("DELETE", "DELETE", key, (200, 204, 404))

    @inlineCallbacks
    def _list(self, prefix: str) -> Any:
        """Every key under ``prefix`` with its ``LastModified`` (ListObjectsV2, page by page)."""
        keys: list[tuple[str, float]] = []
        token: str | None = None
        while True:
            query = [("list-type", "2"), ("prefix", prefix)]
            if token is not None:
                query.append(("continuation-token", token))
            answer = yield self._answered("ListObjectsV2", "GET", "", (200,), query=query)
            root = _parse(answer.body, f"listing {prefix}")
            keys += [
                (_text(item, "Key") or "", _iso_time(_text(item, "LastModified")))
                for item in _children(root, "Contents")
            ]
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated") != "true" or not token:
                return keys

    # Staged blobs

    @inlineCallbacks
    def _upload_file(self, path: str, hex_digest: str, media_type: str, size: int) -> Any:
        """Store the staged file under its digest unless the bucket has it already."""
        existing = yield self._stat(hex_digest)
        if existing is not None:
            return existing
        key = self._blob_key(hex_digest)
        if size <= self._multipart_threshold:

            def put() -> Deferred[Any]:
                # FileBodyProducer closes the file once it is sent or stopped.
                file = open(path, "rb")  # noqa: SIM115
                body = FileBodyProducer(file, cooperator=self._cooperator, readSize=_READ_SIZE)
                return self._put_new(key, body, hex_digest, media_type)

            yield self._retrying(f"storing {key}", put)
        else:
            yield self._multipart(key, path, media_type, size)
        return BlobInfo(f"sha256:{hex_digest}", size, media_type)

    @inlineCallbacks
    def _multipart(self, key: str, path: str, media_type: str, size: int) -> Any:
        """Upload the file in parts, then complete the upload create-only; abort on failure."""
        what = f"multipart upload of {key}"
        answer = yield self._answered(
            "CreateMultipartUpload",
            "POST",
            key,
            (200,),
            query=[("uploads", "")],
            headers={"Content-Type": media_type},
        )
        upload = _text(_parse(answer.body, what), "UploadId")
        if not upload:
            raise S3Error(f"S3 CreateMultipartUpload {self._where(key)}: no UploadId")
        self._uploads[upload] = key
        try:
            parts: list[tuple[int, str]] = []
            for number, offset in enumerate(range(0, size, self._part_size), start=1):
                length = min(self._part_size, size - offset)
                part_sha256 = yield self._run(partial(_file_sha256, path, offset, length))
                etag = yield self._retrying(
                    f"{what}, part {number}",
                    partial(self._put_part, key, upload, number, path, offset, length, part_sha256),
                )
                parts.append((number, etag))
            yield self._retrying(f"completing {what}", lambda: self._complete(key, upload, parts))
        except BaseException:
            yield self._abort(key, upload)
            raise
        finally:
            self._uploads.pop(upload, None)

    @inlineCallbacks
    def _put_part(
        self, key: str, upload: str, number: int, path: str, offset: int, length: int, sha: str
    ) -> Any:
        file = open(path, "rb")  # noqa: SIM115 (FileBodyProducer closes it)
        body = FileBodyProducer(
            _FileSlice(file, offset, length),
            cooperator=self._cooperator,
            readSize=_READ_SIZE,
        )
        query = [("partNumber", str(number)), ("uploadId", upload)]
        answer = yield self._call("PUT", key, query=query, body=body, payload_sha256=sha)
        etag = answer.header("etag")
        if answer.status != 200 or not etag:
            raise self._refused(f"UploadPart {number}", key, answer)
        return etag

    @inlineCallbacks
    def _complete(self, key: str, upload: str, parts: list[tuple[int, str]]) -> Any:
        document = "".join(
            f"<Part><PartNumber>{number}</PartNumber><ETag>{_xml_escape(etag)}</ETag></Part>"
            for number, etag in parts
        )
        body = f"<CompleteMultipartUpload>{document}</CompleteMultipartUpload>".encode()
        answer = yield self._call(
            "POST",
            key,
            query=[("uploadId", upload)],
            headers={"Content-Type": "application/xml", "If-None-Match": "*"},
            body=body,
        )
        if answer.status == 412:
            # Another writer completed the same blob first; ours is not needed.
            yield self._abort(key, upload)
            return
        if answer.status != 200:
            raise self._refused("CompleteMultipartUpload", key, answer)
        # S3 may answer 200 and report an error in the body (its headers went out before
        # the parts were assembled); AWS asks for a retry then.
        if _error_detail(answer.body):
            refused = self._refused("CompleteMultipartUpload", key, answer)
            raise S3Error(refused.message, retryable=True)

    @inlineCallbacks
    def _abort(self, key: str, upload: str) -> Any:
        """Abort an upload; a failure is logged (the lifecycle rule cleans up), not raised."""
        self._uploads.pop(upload, None)
        try:
            answer = yield self._call("DELETE", key, query=[("uploadId", upload)])
        except S3Error as error:
            _log.warn("aborting the multipart upload of {key}: {error}", key=key, error=error)
            return
        if answer.status not in (200, 204, 404):
            refused = self._refused("AbortMultipartUpload", key, answer)
            _log.warn("aborting the multipart upload of {key}: {error}", key=key, error=refused)

    # Records

    def _record_key(self, name: str) -> str:
        return f"{self._prefix}records/{'/'.join(record_parts(name))}"

    def get_record(self, name: str) -> Deferred[bytes | None]:
        try:
            key = self._record_key(name)
        except ValueError:
            return fail()
        return self._logged(self._get_record(key))

    @inlineCallbacks
    def _get_record(self, key: str) -> Any:
        answer = yield self._answered("GET", "GET", key, (200, 404))
        return None if answer.status == 404 else answer.body

    def put_record(self, name: str, data: bytes) -> Deferred[None]:
        try:
            key = self._record_key(name)
        except ValueError:
            return fail()
        return self._logged(self._retrying(f"PUT {key}", lambda: self._put_record(key, data)))

    @inlineCallbacks
    def _put_record(self, key: str, data: bytes) -> Any:
        headers = {"Content-Type": "application/octet-stream"}
        answer = yield self._call("PUT", key, headers=headers, body=data)
        if answer.status != 200:
            raise self._refused("PUT", key, answer)

    def list_records(self, prefix: str) -> Deferred[list[RecordInfo]]:
        start = f"{self._prefix}records/"

        def names(keys: list[tuple[str, float]]) -> list[RecordInfo]:
            found = [RecordInfo(key[len(start) :], when) for key, when in keys]
            return sorted(
                (record for record in found if _is_record(record.name)),
                key=lambda record: record.name,
            )

        return self._logged(self._list(start + prefix)).addCallback(names)

    def delete_record(self, name: str) -> Deferred[None]:
        try:
            key = self._record_key(name)
        except ValueError:
            return fail()
        return self._logged(self._delete(key))


def _is_record(name: str) -> bool:
    try:
        record_parts(name)
    except ValueError:
        return False
    return True


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class S3StagedBlob:
    """A blob being written to a local file, uploaded under its digest at commit.

    Local rather than uploaded while written, so a failed upload can be
    retried part by part and the writer is never slowed by the network. The
    file is removed once committed or discarded. The digest given to
    ``commit`` is sent as the payload's SHA-256, which servers that check it
    verify.
    """

    file: IO[bytes]

    def __init__(self, storage: S3Storage, file: IO[bytes], path: str) -> None:
        self.file = file
        self._storage = storage
        self._path = path
        self._finished = False

    def commit(self, digest: str, media_type: str) -> Deferred[BlobInfo]:
        if self._finished:
            return fail(ValueError("staged blob already committed or discarded"))
        try:
            hex_digest = digest_hex(digest)
        except DigestInvalid:
            self.discard()
            return fail()
        self._finished = True

        def close() -> int:
            self.file.close()
            return os.stat(self._path).st_size

        def remove(result: Any) -> Any:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            return result

        storage = self._storage
        uploaded = storage._run(close).addCallback(
            lambda size: storage._upload_file(self._path, hex_digest, media_type, size)
        )
        return storage._logged(uploaded.addBoth(remove))

    def discard(self) -> None:
        if self._finished:
            return
        self._finished = True
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


# -- proxied blobs -----------------------------------------------------------------------


class _ProxiedBlob(Resource):
    """GET of one blob streamed from S3 through nixeryd, with a single byte Range.

    The Range is checked here (as :mod:`nixeryd.blobserving` does for files)
    and forwarded; the S3 connection is paused whenever the client's is full,
    so memory stays bounded whatever the blob's size.
    """

    isLeaf = True

    def __init__(self, storage: S3Storage, info: BlobInfo) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._storage = storage
        self._info = info

    def render(self, request: Request) -> bytes | int:
        info = self._info
        refused = refused_method(request)
        if refused is not None:
            return refused
        etag = f'"{info.digest}"'
        try:
            byte_range = requested_range(request, info.size, etag)
        except RangeNotSatisfiable as error:
            request.setHeader(b"content-range", f"bytes */{info.size}".encode())
            return error_body(request, error)
        if request.method == b"HEAD":
            for name, value in blob_headers(info):
                request.setHeader(name, value)
            return b""
        headers = {}
        if byte_range is not None:
            headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
        key = self._storage._blob_key(digest_hex(info.digest))
        sent = self._storage._send("GET", key, headers=headers, unbuffered=True)
        sent.addCallback(self._answer, request, byte_range, key)
        sent.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _answer(
        self, response: Any, request: Request, byte_range: tuple[int, int] | None, key: str
    ) -> Deferred[None] | None:
        info = self._info
        expected = 200 if byte_range is None else 206
        if response.code != expected:
            read: Deferred[None] = response.content().addCallback(
                self._refused, response, request, key
            )
            return read
        for name, value in blob_headers(info):
            request.setHeader(name, value)
        if byte_range is not None:
            start, end = byte_range
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {start}-{end - 1}/{info.size}".encode())
            request.setHeader(b"content-length", str(end - start).encode())
        response.deliverBody(_Relay(request))
        return None

    def _refused(self, body: bytes, response: Any, request: Request, key: str) -> None:
        if response.code == 404:
            error: RegistryError = BlobUnknown(f"blob {self._info.digest} is not stored")
        else:
            error = self._storage._refused(
                "GET", key, _Answer(response.code, response.headers, body)
            )
            _log.error("{message}", message=error.message)
        request.write(error_body(request, error))
        request.finish()

    def _failed(self, failure: Failure, request: Request) -> None:
        _log.error("proxying a blob from S3: {error}", error=failure.getErrorMessage())
        error = failure.value if failure.check(S3Error) else S3Error(failure.getErrorMessage())
        assert isinstance(error, RegistryError)
        request.write(error_body(request, error))
        request.finish()


class _Relay(Protocol):
    """Writes an S3 response body to the client's request as it arrives.

    The S3 response's transport is registered as the request's push
    producer: twisted.web pauses it while the client's buffer is full and
    stops it if the client goes away.
    """

    def __init__(self, request: Request) -> None:
        self._request: Request | None = request

    def connectionMade(self) -> None:
        request = self._request
        assert request is not None
        request.registerProducer(self.transport, True)
        request.notifyFinish().addErrback(self._client_gone)

    def dataReceived(self, data: bytes) -> None:
        if self._request is not None:
            self._request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        request = self._request
        if request is None:
            return
        self._request = None
        request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
        else:
            # Content-Length promised more: end the connection so the client knows.
            _log.error("S3 ended a proxied blob early: {error}", error=reason.getErrorMessage())
            request.loseConnection()

    def _client_gone(self, _: Failure) -> None:
        if self._request is not None:
            self._request = None
            if self.transport is not None:
                self.transport.stopProducing()


def _create(runtime: Runtime) -> Storage:
    settings = runtime.settings
    return S3Storage(
        bucket=settings["bucket"],
        http=runtime.http,
        reactor=runtime.reactor,
        run_in_thread=runtime.run_in_thread,
        endpoint=settings["endpoint"],
        region=settings["region"],
        access_key=settings["access_key"],
        secret_key=settings["secret_key"],
        link_expiration=settings["link_expiration"],
        path_style=settings["path_style"],
        redirect_status=settings["redirect_status"],
        proxy=settings["proxy"],
        prefix=settings["prefix"],
        staging_dir=settings["staging_dir"],
        multipart_threshold=settings["part_size"],
        part_size=settings["part_size"],
    )


@hookimpl
def nixeryd_storage_backends() -> list[Provider[Storage]]:
    return [
        Provider(
            NAME,
            "blobs and records in an S3 bucket (S3_BUCKET), redirecting pulls to presigned URLs",
            _create,
            settings=SETTINGS,
        )
    ]
