"""S3Storage in memory, against a small fake S3: what real servers cannot be made to do on cue.

A 412 from a create-only write, a part upload failing once or for good,
presigned URLs kept and renewed, credentials refreshed off the reactor,
settings an operator gets wrong. The real servers run the contract in
``tests/storage``.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from xml.etree import ElementTree

import botocore.auth
import botocore.session
import pytest
from botocore.config import Config as BotocoreConfig
from botocore.credentials import RefreshableCredentials
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from zope.interface import implementer

from nixeryd.builtin import s3
from nixeryd.builtin.s3 import S3Error, S3Storage
from nixeryd.config import ConfigError
from nixeryd.errors import DigestInvalid
from nixeryd.settings import resolve
from nixeryd.storage import Redirect
from nixeryd.testing.memoryhttp import MemoryHTTP

T = TypeVar("T")

ENDPOINT = "http://s3.test:8333"
BUCKET = "layers"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def _xml(tag: str, **children: str) -> bytes:
    inner = "".join(f"<{name}>{value}</{name}>" for name, value in children.items())
    return f'<?xml version="1.0"?><{tag} xmlns="{NS}">{inner}</{tag}>'.encode()


@dataclass
class Injected:
    """Answer ``status`` to the next ``times`` requests that ``matches``."""

    matches: Callable[[str, str, dict[str, str]], bool]
    status: int
    times: int = 1


@dataclass
class FakeS3(Resource):
    """Just enough of S3 for the backend: objects, create-only PUTs, multipart, listings.

    Listings come two keys a page, so pagination is exercised. Every request
    is recorded as ``(method, key, query)``.
    """

    objects: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    uploads: dict[str, dict[int, bytes]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    injected: list[Injected] = field(default_factory=list)
    isLeaf = True

    def __post_init__(self) -> None:
        Resource.__init__(self)  # type: ignore[no-untyped-call]

    def inject(self, status: int, method: str, *, times: int = 1, query: str | None = None) -> None:
        self.injected.append(
            Injected(lambda m, _k, q: m == method and (query is None or query in q), status, times)
        )

    def render(self, request: Any) -> bytes:
        bucket, _, key = request.path.decode().lstrip("/").partition("/")
        assert bucket == BUCKET
        method = request.method.decode()
        query = {name.decode(): values[0].decode() for name, values in request.args.items()}
        self.requests.append((method, key, query))
        assert request.getHeader(b"authorization").startswith(b"AWS4-HMAC-SHA256 Credential=")
        for rule in self.injected:
            if rule.times and rule.matches(method, key, query):
                rule.times -= 1
                request.setResponseCode(rule.status)
                return _xml("Error", Code="Injected", Message="as the test asked")
        body: bytes = request.content.read()
        handler = getattr(self, f"_{method.lower()}")
        result: bytes = handler(request, key, query, body)
        return result

    def _head(self, request: Any, key: str, query: dict[str, str], body: bytes) -> bytes:
        if key == "":
            return b""
        return self._get(request, key, query, body)

    def _get(self, request: Any, key: str, query: dict[str, str], body: bytes) -> bytes:
        if key == "" and query.get("list-type") == "2":
            return self._list(query)
        if key == "" and "uploads" in query:
            return _xml("ListMultipartUploadsResult")
        if key not in self.objects:
            request.setResponseCode(404)
            return _xml("Error", Code="NoSuchKey")
        data, media_type = self.objects[key]
        request.setHeader(b"content-type", media_type.encode())
        return data

    def _list(self, query: dict[str, str]) -> bytes:
        keys = sorted(key for key in self.objects if key.startswith(query["prefix"]))
        after = query.get("continuation-token")
        if after is not None:
            keys = [key for key in keys if key > after]
        page, more = keys[:2], len(keys) > 2
        contents = "".join(
            f"<Contents><Key>{key}</Key><Size>{len(self.objects[key][0])}</Size></Contents>"
            for key in page
        )
        token = f"<NextContinuationToken>{page[-1]}</NextContinuationToken>" if more else ""
        truncated = "true" if more else "false"
        return (
            f'<ListBucketResult xmlns="{NS}">{contents}'
            f"<IsTruncated>{truncated}</IsTruncated>{token}</ListBucketResult>"
        ).encode()

    def _put(self, request: Any, key: str, query: dict[str, str], body: bytes) -> bytes:
        if "uploadId" in query:
            self.uploads[query["uploadId"]][int(query["partNumber"])] = body
            request.setHeader(b"etag", f'"{hashlib.md5(body).hexdigest()}"'.encode())
            return b""
        if request.getHeader(b"if-none-match") == b"*" and key in self.objects:
            request.setResponseCode(412)
            return _xml("Error", Code="PreconditionFailed")
        self.objects[key] = (body, (request.getHeader(b"content-type") or b"").decode())
        return b""

    def _post(self, request: Any, key: str, query: dict[str, str], body: bytes) -> bytes:
        if "uploads" in query:
            upload = f"upload-{len(self.uploads) + 1}"
            self.uploads[upload] = {}
            self._types = {
                **getattr(self, "_types", {}),
                upload: request.getHeader(b"content-type"),
            }
            return _xml("InitiateMultipartUploadResult", UploadId=upload)
        upload = query["uploadId"]
        parts = self.uploads[upload]
        numbers = [int(n.text or "") for n in ElementTree.fromstring(body).iter("PartNumber")]
        assert numbers == sorted(parts)
        if request.getHeader(b"if-none-match") == b"*" and key in self.objects:
            request.setResponseCode(412)
            return _xml("Error", Code="PreconditionFailed")
        data = b"".join(parts[number] for number in numbers)
        self.objects[key] = (data, self._types[upload].decode())
        del self.uploads[upload]
        return _xml("CompleteMultipartUploadResult", Key=key)

    def _delete(self, request: Any, key: str, query: dict[str, str], body: bytes) -> bytes:
        if "uploadId" in query:
            self.uploads.pop(query["uploadId"], None)
        else:
            self.objects.pop(key, None)
        request.setResponseCode(204)
        return b""


def run_inline(work: Callable[[], T]) -> Deferred[T]:
    return maybeDeferred(work)


@implementer(IConsumer)
class _Bytes:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


class DrainingTreq:
    """StubTreq takes bytes bodies only: this reads a body producer (a streamed file) first."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    def request(self, method: str, url: str, *, data: Any = None, **options: Any) -> Any:
        if not IBodyProducer.providedBy(data):
            return self._stub.request(method, url, data=data, **options)
        body = _Bytes()
        return data.startProducing(body).addCallback(
            lambda _: self._stub.request(method, url, data=b"".join(body.chunks), **options)
        )


class Harness:
    """An S3Storage over a FakeS3, in memory; :meth:`settle` runs a call to its end."""

    def __init__(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        fake: FakeS3 | None = None,
        **options: Any,
    ) -> None:
        self.s3 = fake or FakeS3()
        self.memory = MemoryHTTP(self.s3, monkeypatch)
        settings: dict[str, Any] = {
            "bucket": BUCKET,
            "http": DrainingTreq(self.memory.treq),
            "reactor": self.memory.clock,
            "run_in_thread": run_inline,
            "endpoint": ENDPOINT,
            "access_key": "AKIDEXAMPLE",
            "secret_key": "secret",
            "path_style": True,
            "prefix": "team/",
            "staging_dir": str(tmp_path),
            "multipart_threshold": 1000,
            "part_size": 400,
            "retry_delay": 0,
        }
        self.storage = S3Storage(**{**settings, **options})
        self.settle(self.storage.start())

    def settle(self, deferred: Deferred[T]) -> T:
        return self.memory.settle(deferred)

    def stage(self, data: bytes, media_type: str = LAYER) -> Any:
        staged = self.storage.stage_blob()
        staged.file.write(data)
        return self.settle(staged.commit("sha256:" + hashlib.sha256(data).hexdigest(), media_type))


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(tmp_path, monkeypatch)


def test_keys_follow_the_layout_under_the_prefix(harness: Harness) -> None:
    info = harness.settle(harness.storage.put_blob(b"{}", "application/json"))
    harness.settle(harness.storage.put_record("builds/abc.gzip-6", b"{}"))
    hex_digest = info.digest.removeprefix("sha256:")
    assert harness.s3.objects == {
        f"team/blobs/sha256/{hex_digest}": (b"{}", "application/json"),
        "team/records/builds/abc.gzip-6": (b"{}", "application/octet-stream"),
    }


def test_a_412_from_a_create_only_put_is_success(harness: Harness) -> None:
    """Another instance stored the same bytes first: the key names the content."""
    info = harness.settle(harness.storage.put_blob(b"config", "application/json"))
    assert harness.settle(harness.storage.put_blob(b"config", "application/json")) == info
    puts = [request for request in harness.s3.requests if request[0] == "PUT"]
    assert len(puts) == 2


def test_a_staged_blob_the_bucket_has_is_not_uploaded_again(harness: Harness) -> None:
    first = harness.stage(b"layer bytes")
    assert harness.stage(b"layer bytes") == first
    assert [r[0] for r in harness.s3.requests[-1:]] == ["HEAD"]


def test_a_large_blob_goes_up_in_parts_from_the_file(harness: Harness, tmp_path: Path) -> None:
    data = os.urandom(1001)
    info = harness.stage(data)
    assert harness.s3.objects[f"team/blobs/{info.digest.replace(':', '/')}"] == (data, LAYER)
    parts = [r[2]["partNumber"] for r in harness.s3.requests if "partNumber" in r[2]]
    assert parts == ["1", "2", "3"]
    assert list(tmp_path.iterdir()) == []  # the staged file is gone


def test_a_failed_part_is_retried_alone(harness: Harness) -> None:
    harness.s3.inject(500, "PUT", query="partNumber")
    data = os.urandom(1500)
    info = harness.stage(data)
    assert harness.settle(harness.storage.read_blob(info.digest)).data == data
    parts = [r[2]["partNumber"] for r in harness.s3.requests if "partNumber" in r[2]]
    assert parts == ["1", "1", "2", "3", "4"]


def test_a_part_that_keeps_failing_aborts_the_upload(harness: Harness, tmp_path: Path) -> None:
    harness.s3.inject(503, "PUT", query="partNumber", times=s3.ATTEMPTS)
    with pytest.raises(S3Error, match="HTTP 503"):
        harness.stage(os.urandom(1500))
    assert harness.s3.uploads == {}  # aborted
    assert harness.s3.objects == {}
    assert list(tmp_path.iterdir()) == []


def test_a_client_error_from_s3_is_not_retried_and_is_the_registrys_error(
    harness: Harness,
) -> None:
    harness.s3.inject(403, "GET", times=5)
    with pytest.raises(S3Error) as raised:
        harness.settle(harness.storage.get_record("builds/x"))
    assert raised.value.status == 502  # S3 refusing nixeryd is not the client's mistake
    assert "HTTP 403 Injected: as the test asked" in raised.value.message
    assert "s3://layers/team/records/builds/x" in raised.value.message
    assert len([r for r in harness.s3.requests if r[0] == "GET" and r[1]]) == 1


def test_listings_follow_continuation_tokens(harness: Harness) -> None:
    infos = [harness.settle(harness.storage.put_blob(bytes([n]), LAYER)) for n in range(5)]
    names = [f"builds/{n}" for n in range(5)]
    for name in names:
        harness.settle(harness.storage.put_record(name, b"x"))
    listed = harness.settle(harness.storage.list_blobs())
    assert sorted(listed, key=lambda i: i.digest) == sorted(infos, key=lambda i: i.digest)
    assert [r.name for r in harness.settle(harness.storage.list_records("builds/"))] == names


def test_presigned_urls_are_kept_for_half_their_lifetime(harness: Harness) -> None:
    info = harness.settle(harness.storage.put_blob(b"x" * 100, LAYER))
    first = harness.storage.serve_blob(info)
    assert isinstance(first, Redirect) and first.status == 307
    assert first.until == harness.memory.clock.seconds() + 150
    harness.memory.clock.advance(149)
    assert harness.storage.serve_blob(info) == first
    harness.memory.clock.advance(1)
    renewed = harness.storage.serve_blob(info)
    assert isinstance(renewed, Redirect) and renewed.until == first.until + 150


def test_presigned_urls_are_botocores_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """At one frozen time, the backend's URL and botocore's client's are the same string."""
    frozen = datetime.datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: frozen)
    for path_style in (True, False):
        storage = S3Storage(
            bucket=BUCKET,
            http=None,
            reactor=Clock(),
            run_in_thread=run_inline,
            endpoint=ENDPOINT,
            access_key="AKIDEXAMPLE",
            secret_key="secret",
            path_style=path_style,
            link_expiration=600,
        )
        hex_digest = "ab" * 32
        url, _ = storage.presigned_url(hex_digest)
        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=ENDPOINT,
            region_name="us-east-1",
            aws_access_key_id="AKIDEXAMPLE",
            aws_secret_access_key="secret",
            config=BotocoreConfig(
                signature_version="s3v4",
                s3={"addressing_style": "path" if path_style else "virtual"},
            ),
        )
        expected = client.generate_presigned_url(
            "get_object",
            Params={"Bucket": BUCKET, "Key": f"blobs/sha256/{hex_digest}"},
            ExpiresIn=600,
        )
        assert url == expected


def test_the_redirect_status_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    harness = Harness(tmp_path, monkeypatch, redirect_status=303)
    info = harness.settle(harness.storage.put_blob(b"x" * 100, LAYER))
    answer = harness.storage.serve_blob(info)
    assert isinstance(answer, Redirect) and answer.status == 303


def test_a_bad_digest_discards_the_staged_file(harness: Harness, tmp_path: Path) -> None:
    staged = harness.storage.stage_blob()
    staged.file.write(b"data")
    with pytest.raises(DigestInvalid):
        harness.settle(staged.commit("sha256:../../etc/passwd", LAYER))
    assert list(tmp_path.iterdir()) == []
    assert [r[1] for r in harness.s3.requests] == ["", ""]  # only start()'s bucket requests


def test_a_missing_bucket_stops_start_up_with_what_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Missing(FakeS3):
        def _head(self, request: Any, key: str, query: dict[str, str], body: bytes) -> bytes:
            request.setResponseCode(404)
            return b""

    memory = MemoryHTTP(Missing(), monkeypatch)
    storage = S3Storage(
        bucket=BUCKET,
        http=DrainingTreq(memory.treq),
        reactor=memory.clock,
        run_in_thread=run_inline,
        endpoint=ENDPOINT,
        access_key="a",
        secret_key="b",
        path_style=True,
    )
    with pytest.raises(ConfigError, match=r"bucket 'layers' at http://s3.test:8333 does not exist"):
        memory.settle(storage.start())


def test_refreshable_credentials_are_refreshed_in_a_worker_thread(
    harness: Harness,
) -> None:
    refreshed: list[str] = []

    def metadata() -> dict[str, str]:
        refreshed.append("called")
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        return {
            "access_key": "new",
            "secret_key": "s",
            "token": "t",
            "expiry_time": expiry.isoformat(),
        }

    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)
    credentials = RefreshableCredentials("old", "s", "t", soon, metadata, "test")
    source = harness.storage._credentials
    ran: list[Callable[[], Any]] = []
    source._run = lambda work: ran.append(work) or Deferred()  # type: ignore[assignment,func-returns-value]
    source._refreshable = credentials
    assert source.current().access_key == "AKIDEXAMPLE"  # signs with what it has meanwhile
    assert refreshed == [] and len(ran) == 1  # the refresh went to the thread runner
    source._refreshed(ran[0]())
    assert refreshed == ["called"] and source.current().access_key == "new"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "s3 needs the S3 bucket: set bucket in [plugin.s3] or $S3_BUCKET"),
        ({"bucket": "b", "redirect_status": "302"}, "must be 307"),
        ({"bucket": "b", "endpoint": "s3.example.com"}, "must be an http(s) URL"),
        ({"bucket": "b", "link_expiration": "five minutes"}, "must be a duration"),
        ({"bucket": "b", "prefix": "../other"}, "invalid record name"),
        ({"bucket": "b", "path_style": "maybe"}, "must be true or false"),
    ],
)
def test_settings_errors_name_what_to_fix(table: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve("s3", s3.SETTINGS, table, {})
    assert message in str(raised.value)


def test_nixerys_variables_configure_it() -> None:
    settings = resolve(
        "s3",
        s3.SETTINGS,
        {},
        {
            "S3_BUCKET": "layers",
            "S3_ENDPOINT": "http://127.0.0.1:8333/",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "S3_LINK_EXPIRATION": "1h30m",
            "S3_USE_PATH_STYLE": "true",
            "NIXERYD_S3_PREFIX": "nixery",
        },
    )
    assert settings["endpoint"] == "http://127.0.0.1:8333"
    assert settings["region"] == "eu-west-1"
    assert settings["link_expiration"] == 5400
    assert (settings["path_style"], settings["prefix"], settings["redirect_status"]) == (
        True,
        "nixery/",
        307,
    )


def test_an_access_key_without_its_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="both S3_ACCESS_KEY and S3_SECRET_KEY"):
        S3Storage(bucket="b", http=None, reactor=None, run_in_thread=run_inline, access_key="only")


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://127.0.0.1:8333", "http://127.0.0.1:8333/layers/blobs/sha256/"),
        ("http://[::1]:8333", "http://[::1]:8333/layers/blobs/sha256/"),
        ("http://localhost:8333", "http://localhost:8333/layers/blobs/sha256/"),
        ("https://s3.example.com", "https://layers.s3.example.com/blobs/sha256/"),
    ],
)
def test_an_endpoint_by_address_is_addressed_path_style(endpoint: str, url: str) -> None:
    storage = S3Storage(
        bucket=BUCKET,
        http=None,
        reactor=Clock(),
        run_in_thread=run_inline,
        endpoint=endpoint,
        access_key="a",
        secret_key="b",
    )
    assert storage.presigned_url("cd" * 32)[0].startswith(url + "cd" * 32 + "?")


def test_a_server_error_is_retried(harness: Harness) -> None:
    harness.settle(harness.storage.put_record("builds/x", b"kept"))
    harness.s3.inject(503, "GET", times=s3.ATTEMPTS - 1)
    assert harness.settle(harness.storage.get_record("builds/x")) == b"kept"
    harness.s3.inject(500, "HEAD", times=s3.ATTEMPTS)
    with pytest.raises(S3Error, match="HTTP 500"):
        harness.settle(harness.storage.stat_blob("sha256:" + "0" * 64))


def test_an_error_inside_a_200_from_complete_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class SlowToFail(FakeS3):
        failed = False

        def _post(self, request: Any, key: str, query: dict[str, str], body: bytes) -> bytes:
            if "uploadId" in query and not self.failed:
                self.failed = True
                return _xml("Error", Code="InternalError", Message="try again")
            return super()._post(request, key, query, body)

    harness = Harness(tmp_path, monkeypatch, fake=SlowToFail())
    data = os.urandom(1001)
    info = harness.stage(data)
    assert harness.settle(harness.storage.read_blob(info.digest)).data == data
    completes = [r for r in harness.s3.requests if r[0] == "POST" and "uploadId" in r[2]]
    assert len(completes) == 2
