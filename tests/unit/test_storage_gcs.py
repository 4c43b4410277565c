"""The GCS backend with fakes: create-only uploads, retries, tokens, signed URLs, settings.

GCS is a small twisted.web resource behind StubTreq that answers each request
from a handler the test gives; the reactor is a Clock, so backoffs and URL
lifetimes pass when a test says so. What a real server does is checked in
``test_storage_gcs_conformance.py`` against fake-gcs-server.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pytest
from google.auth.credentials import AnonymousCredentials, Credentials
from google.oauth2 import service_account as google_service_account
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.resource import IResource, Resource

from nixeryd.builtin import gcs, gcsauth
from nixeryd.builtin.gcs import CHUNK_QUANTUM, GcsError, GcsStorage
from nixeryd.builtin.gcsauth import AccessTokens, GcsAuthError, IamSigner, KeySigner
from nixeryd.config import Config, ConfigError
from nixeryd.errors import DigestInvalid
from nixeryd.runtime import Runtime
from nixeryd.storage import BlobInfo, Redirect
from tests.gcsfixtures import ServiceAccount, service_account

__all__ = ["service_account"]  # a fixture, used by name

T = TypeVar("T")
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
BUCKET = "bucket"
ENDPOINT = "https://storage.googleapis.com"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    """One request the fake GCS received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


Answer = tuple[int, dict[str, str], bytes]


class FakeGCS(Resource):
    """Answers every request with ``handler(seen)``, remembering what it saw."""

    isLeaf = True

    def __init__(self, handler: Callable[[Seen], Answer]) -> None:
        super().__init__()
        self.handler = handler
        self.seen: list[Seen] = []

    def render(self, request: Any) -> bytes:
        url = urlsplit(request.uri.decode())
        seen = Seen(
            request.method.decode(),
            url.path,
            parse_qs(url.query),
            {
                name.decode().lower(): values[0].decode()
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            request.content.read(),
        )
        self.seen.append(seen)
        status, headers, body = self.handler(seen)
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name.encode(), value.encode())
        return body


def ok(body: Any = None) -> Answer:
    return 200, {"Content-Type": "application/json"}, json.dumps(body or {}).encode()


@dataclass
class Harness:
    fake: FakeGCS
    http: StubTreq
    clock: Clock
    storage: GcsStorage
    threads: list[Callable[[], Any]] = field(default_factory=list)

    def settle(self, deferred: Deferred[T]) -> T:
        """Run the in-memory connections (and the clock) until ``deferred`` fires."""
        outcome: list[Any] = []
        deferred.addBoth(outcome.append)
        for _ in range(1000):
            if outcome:
                break
            self.http.flush()
            self.clock.advance(1)
        assert outcome, "never fired"
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]  # type: ignore[no-any-return]


def inline(work: Callable[[], T]) -> Deferred[T]:
    return succeed(work())


@pytest.fixture
def make() -> Callable[..., Harness]:
    def build(handler: Callable[[Seen], Answer] = lambda seen: ok(), **options: Any) -> Harness:
        fake = FakeGCS(handler)
        http = StubTreq(fake)
        clock = Clock()
        clock.advance(1_800_000_000)
        options.setdefault("tokens", AccessTokens(AnonymousCredentials(), inline, clock.seconds))
        storage = GcsStorage(
            bucket=BUCKET, http=http, reactor=clock, run_in_thread=inline, **options
        )
        return Harness(fake, http, clock, storage)

    return build


# Create-only uploads


def test_a_blob_is_created_only_if_absent_and_412_means_stored(
    make: Callable[..., Harness],
) -> None:
    harness = make(lambda seen: (412, {}, b'{"error": {"message": "conditionNotMet"}}'))
    info = harness.settle(harness.storage.put_blob(b"config", "application/json"))
    assert info == BlobInfo(digest_of(b"config"), 6, "application/json")
    [upload] = harness.fake.seen
    assert (upload.method, upload.path) == ("POST", "/upload/storage/v1/b/bucket/o")
    assert upload.query["ifGenerationMatch"] == ["0"]
    assert upload.query["name"] == [f"blobs/sha256/{digest_of(b'config')[7:]}"]
    assert upload.headers["content-type"] == "application/json"
    assert upload.body == b"config"


def test_a_record_overwrites_and_412_is_an_error_there(make: Callable[..., Harness]) -> None:
    harness = make(lambda seen: (412, {}, b""))
    with pytest.raises(GcsError):
        harness.settle(harness.storage.put_record("builds/x", b"{}"))
    assert "ifGenerationMatch" not in harness.fake.seen[0].query


def test_a_busy_gcs_is_retried_with_backoff(make: Callable[..., Harness]) -> None:
    answers = iter([(503, {}, b""), (429, {}, b""), ok()])
    harness = make(lambda seen: next(answers))
    harness.settle(harness.storage.put_blob(b"x", "application/json"))
    assert len(harness.fake.seen) == 3


def test_a_refusal_is_not_retried(make: Callable[..., Harness]) -> None:
    harness = make(lambda seen: (403, {}, b'{"error": {"message": "no access"}}'))
    with pytest.raises(GcsError, match=r"403.*no access"):
        harness.settle(harness.storage.stat_blob(digest_of(b"x")))
    assert len(harness.fake.seen) == 1


def test_a_large_staged_blob_resumes_after_a_failed_chunk(make: Callable[..., Harness]) -> None:
    """Three chunks; the second fails once; GCS says it kept none of it; it is sent again."""
    data = bytes(range(256)) * (CHUNK_QUANTUM * 2 // 256) + b"tail"
    failed = []

    def handler(seen: Seen) -> Answer:
        if seen.method == "POST":
            return 200, {"Location": "https://storage.googleapis.com/session/1"}, b""
        content_range = seen.headers["content-range"]
        if content_range.startswith(f"bytes {CHUNK_QUANTUM}-") and not failed:
            failed.append(True)
            return 503, {}, b""
        if content_range.startswith("bytes */"):
            return 308, {"Range": f"bytes=0-{CHUNK_QUANTUM - 1}"}, b""
        last = int(content_range.split("-")[1].split("/")[0])
        if last + 1 < len(data):
            return 308, {"Range": f"bytes=0-{last}"}, b""
        return ok()

    harness = make(handler, chunk_size=CHUNK_QUANTUM)
    staged = harness.storage.stage_blob()
    staged.file.write(data)
    info = harness.settle(staged.commit(digest_of(data), LAYER))
    assert info == BlobInfo(digest_of(data), len(data), LAYER)
    start, *puts = harness.fake.seen
    assert start.query["uploadType"] == ["resumable"]
    assert start.query["ifGenerationMatch"] == ["0"]
    assert start.headers["x-upload-content-type"] == LAYER
    assert json.loads(start.body)["contentType"] == LAYER
    total = len(data)
    assert [put.headers["content-range"] for put in puts] == [
        f"bytes 0-{CHUNK_QUANTUM - 1}/{total}",
        f"bytes {CHUNK_QUANTUM}-{2 * CHUNK_QUANTUM - 1}/{total}",  # 503
        f"bytes */{total}",
        f"bytes {CHUNK_QUANTUM}-{2 * CHUNK_QUANTUM - 1}/{total}",
        f"bytes {2 * CHUNK_QUANTUM}-{total - 1}/{total}",
    ]
    bodies = [put.body for put in puts]
    assert bodies[0] + bodies[3] + bodies[4] == data
    assert (bodies[1], bodies[2]) == (bodies[3], b"")
    assert staged.file.closed


def test_a_resumable_upload_of_an_existing_blob_stops_at_412(
    make: Callable[..., Harness],
) -> None:
    harness = make(lambda seen: (412, {}, b""), chunk_size=CHUNK_QUANTUM)
    data = b"x" * (CHUNK_QUANTUM + 1)
    staged = harness.storage.stage_blob()
    staged.file.write(data)
    assert harness.settle(staged.commit(digest_of(data), LAYER)).size == len(data)
    assert len(harness.fake.seen) == 1


# Bad input


def test_bad_digests_make_no_request(make: Callable[..., Harness]) -> None:
    harness = make()
    for digest in ("sha256:../../x", "sha256:" + "A" * 64, ""):
        with pytest.raises(DigestInvalid):
            harness.settle(harness.storage.stat_blob(digest))
        with pytest.raises(DigestInvalid):
            harness.storage.serve_blob(BlobInfo(digest, 1, LAYER))
        staged = harness.storage.stage_blob()
        with pytest.raises(DigestInvalid):
            harness.settle(staged.commit(digest, LAYER))
        assert staged.file.closed
    with pytest.raises(ValueError):
        harness.settle(harness.storage.get_record("../x"))
    assert harness.fake.seen == []


def test_object_names_are_escaped_in_paths(make: Callable[..., Harness]) -> None:
    harness = make(lambda seen: (404, {}, b""), prefix="site/")
    assert harness.settle(harness.storage.get_record("builds/a.gzip-6")) is None
    [seen] = harness.fake.seen
    assert seen.path == "/storage/v1/b/bucket/o/site%2Frecords%2Fbuilds%2Fa.gzip-6"


# Start-up


@pytest.mark.parametrize(
    ("status", "says"),
    [(404, "does not exist"), (403, "access denied"), (500, "answered 500")],
)
def test_start_says_what_is_wrong_with_the_bucket(
    make: Callable[..., Harness], status: int, says: str
) -> None:
    harness = make(lambda seen: (status, {}, b'{"error": {"message": "why"}}'))
    with pytest.raises(GcsError, match=says):
        harness.settle(harness.storage.start())
    assert harness.fake.seen[0].path == "/storage/v1/b/bucket/o"


# Tokens


class FakeCredentials(Credentials):  # type: ignore[misc]
    """Tokens that last ``lifetime`` seconds; remembers the thread of each refresh."""

    def __init__(self, lifetime: float) -> None:
        super().__init__()
        self.lifetime = lifetime
        self.refresh_threads: list[threading.Thread] = []

    def refresh(self, request: Any) -> None:
        self.refresh_threads.append(threading.current_thread())
        self.token = f"token-{len(self.refresh_threads)}"
        self.expiry = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) + datetime.timedelta(
            seconds=self.lifetime
        )


class QueuedThreads:
    """A thread runner that holds work until the test runs it, each in a thread of its own."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], T]) -> Deferred[T]:
        done: Deferred[T] = Deferred()
        self.pending.append((work, done))
        return done

    def run_all(self) -> None:
        pending, self.pending = self.pending, []
        for work, done in pending:
            results: list[Any] = []
            thread = threading.Thread(target=lambda: results.append(work()))  # noqa: B023
            thread.start()
            thread.join()
            done.callback(results[0])


def fired(deferred: Deferred[T]) -> list[T | Failure]:
    outcome: list[T | Failure] = []
    deferred.addBoth(outcome.append)
    return outcome


def test_tokens_are_refreshed_in_a_thread_once_for_concurrent_requests() -> None:
    credentials = FakeCredentials(lifetime=3600)
    threads = QueuedThreads()
    tokens = AccessTokens(
        credentials, threads, lambda: datetime.datetime.now(datetime.UTC).timestamp()
    )
    waiting = [fired(tokens.token()) for _ in range(3)]
    assert waiting == [[], [], []] and len(threads.pending) == 1
    threads.run_all()
    assert waiting == [["token-1"]] * 3
    assert credentials.refresh_threads[0] is not threading.current_thread()
    assert fired(tokens.token()) == ["token-1"] and threads.pending == []


def test_a_token_close_to_expiry_is_used_while_it_is_refreshed() -> None:
    now = [datetime.datetime.now(datetime.UTC).timestamp()]
    credentials = FakeCredentials(lifetime=600)
    threads = QueuedThreads()
    tokens = AccessTokens(credentials, threads, lambda: now[0])
    tokens.token()
    threads.run_all()
    now[0] += 400  # 200s left: inside the refresh margin, still valid
    assert fired(tokens.token()) == ["token-1"]
    assert fired(tokens.token()) == ["token-1"]
    assert len(threads.pending) == 1  # one refresh in the background
    threads.run_all()
    assert fired(tokens.token()) == ["token-2"]
    now[0] += 1000  # expired: callers wait for the refresh
    waiting = fired(tokens.token())
    assert waiting == []
    threads.run_all()
    assert waiting == ["token-3"]


def test_a_failed_refresh_says_so_and_the_next_request_tries_again() -> None:
    class Failing(FakeCredentials):
        def refresh(self, request: Any) -> None:
            from google.auth.exceptions import RefreshError

            raise RefreshError("metadata server unreachable")

    tokens = AccessTokens(Failing(60), inline, lambda: 0.0)
    [failure] = fired(tokens.token())
    assert isinstance(failure, Failure) and failure.check(GcsAuthError)
    assert "metadata server unreachable" in failure.getErrorMessage()
    assert fired(tokens.token())[0].check(GcsAuthError)  # type: ignore[union-attr]


def test_requests_carry_the_token(make: Callable[..., Harness]) -> None:
    credentials = FakeCredentials(lifetime=3600)
    harness = make(
        lambda seen: (404, {}, b""),
        tokens=AccessTokens(credentials, inline, lambda: 0.0),
    )
    harness.settle(harness.storage.stat_blob(digest_of(b"x")))
    assert harness.fake.seen[0].headers["authorization"] == "Bearer token-1"


# Signed URLs


class CountingSigner:
    email = "signer@project.iam.gserviceaccount.com"

    def __init__(self, pending: bool = False) -> None:
        self.calls: list[Deferred[bytes]] = []
        self.pending = pending

    def sign(self, payload: bytes) -> Deferred[bytes]:
        done: Deferred[bytes] = Deferred()
        self.calls.append(done)
        if not self.pending:
            done.callback(b"\x01\x02")
        return done


BIG = BlobInfo(digest_of(b"big"), 10_000_000, LAYER)


def test_a_signed_url_is_reused_for_half_its_lifetime(make: Callable[..., Harness]) -> None:
    signer = CountingSigner()
    harness = make(signer=signer, link_expiration=300)
    first = harness.storage.serve_blob(BIG)
    assert isinstance(first, Redirect) and first.status == 303
    assert first.url.startswith(f"{ENDPOINT}/bucket/blobs/sha256/{BIG.digest[7:]}?")
    assert "X-Goog-Expires=300" in first.url and first.url.endswith("X-Goog-Signature=0102")
    assert first.until == harness.clock.seconds() + 150
    harness.clock.advance(149)
    assert harness.storage.serve_blob(BIG) == first
    assert len(signer.calls) == 1
    harness.clock.advance(2)
    again = harness.storage.serve_blob(BIG)
    assert isinstance(again, Redirect) and again.url != first.url
    assert len(signer.calls) == 2


def test_a_remote_signature_is_shared_and_answered_by_a_resource(
    make: Callable[..., Harness],
) -> None:
    signer = CountingSigner(pending=True)
    harness = make(signer=signer, redirect_status=307)
    answers = [harness.storage.serve_blob(BIG) for _ in range(3)]
    assert all(IResource.providedBy(answer) for answer in answers)
    assert len(signer.calls) == 1
    client = StubTreq(answers[0])
    url = "http://registry/v2/x/blobs/" + BIG.digest
    responding = fired(client.get(url, allow_redirects=False))
    client.flush()
    assert responding == []  # waits for the signature
    signer.calls[0].callback(b"\xff")
    client.flush()
    [response] = responding
    assert not isinstance(response, Failure), response.getTraceback()
    assert response.code == 307
    location = response.headers.getRawHeaders(b"location")[0]  # type: ignore[union-attr]
    assert location.endswith(b"X-Goog-Signature=ff")
    cached = harness.storage.serve_blob(BIG)
    assert isinstance(cached, Redirect) and cached.status == 307
    assert cached.url.endswith("X-Goog-Signature=ff")


def test_without_a_signer_redirects_are_unsigned(make: Callable[..., Harness]) -> None:
    harness = make(endpoint="http://127.0.0.1:4443")
    answer = harness.storage.serve_blob(BIG)
    assert answer == Redirect(f"http://127.0.0.1:4443/bucket/blobs/sha256/{BIG.digest[7:]}", 303)


@pytest.mark.parametrize("endpoint", [ENDPOINT, "http://127.0.0.1:4443"])
@pytest.mark.parametrize("name", ["blobs/sha256/" + "ab" * 32, "site/records/a b+c~d"])
def test_signed_urls_equal_google_cloud_storages(
    service_account: ServiceAccount,
    monkeypatch: pytest.MonkeyPatch,
    endpoint: str,
    name: str,
) -> None:
    """The reference is the signer of google-cloud-storage (a test dependency only)."""
    from google.cloud import storage
    from google.cloud.storage import _signing

    frozen = datetime.datetime(2026, 12, 3, 18, 4, 5, tzinfo=datetime.UTC)
    monkeypatch.setattr(_signing, "_NOW", lambda tz=None: frozen)
    credentials = google_service_account.Credentials.from_service_account_info(service_account.info)
    client = storage.Client(project="test-project", credentials=AnonymousCredentials())
    expected = (
        client.bucket(BUCKET)
        .blob(name)
        .generate_signed_url(
            version="v4",
            expiration=datetime.timedelta(minutes=5),
            credentials=credentials,
            api_access_endpoint=endpoint,
            method="GET",
        )
    )
    signer = KeySigner(credentials.signer, credentials.signer_email)
    url = fired(gcsauth.signed_url(signer, endpoint, BUCKET, name, 300, frozen.timestamp()))
    assert url == [expected]


def test_iam_signer_signs_through_sign_blob() -> None:
    seen: list[Seen] = []

    def handler(request: Seen) -> Answer:
        seen.append(request)
        payload = base64.b64decode(json.loads(request.body)["payload"])
        return ok({"keyId": "k", "signedBlob": base64.b64encode(payload[::-1]).decode()})

    fake = FakeGCS(handler)
    http = StubTreq(fake)
    credentials = FakeCredentials(3600)
    signer = IamSigner(http, AccessTokens(credentials, inline, lambda: 0.0), "sa@p.iam")
    signed = fired(signer.sign(b"abc"))
    http.flush()
    assert signed == [b"cba"]
    [request] = fake.seen
    assert request.path == "/v1/projects/-/serviceAccounts/sa@p.iam:signBlob"
    assert request.headers["authorization"] == "Bearer token-1"


def test_iam_signer_without_an_account_says_what_to_set() -> None:
    signer = IamSigner(None, AccessTokens(FakeCredentials(60), inline, lambda: 0.0))
    with pytest.raises(GcsAuthError, match="GCS_SIGNING_ACCOUNT"):
        signer.email  # noqa: B018


# Settings


def runtime(environment: dict[str, str], **table: Any) -> Runtime:
    config = Config(plugin_options={"gcs": table}, environment=environment)
    return Runtime(config, Clock(), object(), object(), inline)  # type: ignore[arg-type]


def create(environment: dict[str, str], **table: Any) -> GcsStorage:
    [provider] = gcs.nixeryd_storage_backends()
    storage: GcsStorage = provider.create_with(runtime(environment, **table))
    return storage


@pytest.fixture
def key_file(tmp_path: Path, service_account: ServiceAccount) -> Iterator[str]:
    path = tmp_path / "key.json"
    path.write_text(json.dumps(service_account.info))
    yield str(path)


def test_the_bucket_is_required() -> None:
    with pytest.raises(ConfigError, match=r"\$GCS_BUCKET"):
        create({"STORAGE_EMULATOR_HOST": "localhost:4443"})


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("redirect_status", "302", "303"),
        ("link_expiration", "8d", "duration"),
        ("link_expiration", "200h", "7 days"),
        ("prefix", "../x", "invalid"),
        ("endpoint", "ftp://x", "URL"),
        ("proxy", "maybe", "proxy"),
    ],
)
def test_bad_settings_are_start_up_errors(key: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        create({"GCS_BUCKET": "b", "STORAGE_EMULATOR_HOST": "localhost:4443"}, **{key: value})


def test_the_emulator_variable_means_no_credentials_and_unsigned_urls() -> None:
    storage = create({"GCS_BUCKET": "b", "STORAGE_EMULATOR_HOST": "localhost:4443"})
    assert storage._endpoint == "http://localhost:4443"
    assert storage._tokens.anonymous
    answer = storage.serve_blob(BIG)
    assert isinstance(answer, Redirect) and answer.url.startswith("http://localhost:4443/b/")


def test_a_service_account_key_signs_urls_offline(
    key_file: str, service_account: ServiceAccount
) -> None:
    storage = create({"GCS_BUCKET": "b", "GOOGLE_APPLICATION_CREDENTIALS": key_file})
    assert storage._endpoint == ENDPOINT
    assert isinstance(storage._signer, KeySigner)
    assert storage._signer.email == service_account.email
    answer = storage.serve_blob(BIG)
    assert isinstance(answer, Redirect) and answer.status == 303
    assert "X-Goog-Credential=nixeryd%40test-project" in answer.url


def test_nixerys_older_signing_variables_still_work(
    tmp_path: Path, service_account: ServiceAccount
) -> None:
    pem = tmp_path / "key.pem"
    pem.write_text(service_account.pem)
    environment = {"GCS_BUCKET": "b", "NIXERYD_GCS_ANONYMOUS": "true", "GCS_SIGNING_KEY": str(pem)}
    with pytest.raises(ConfigError, match="GCS_SIGNING_ACCOUNT"):
        create(environment)
    storage = create({**environment, "GCS_SIGNING_ACCOUNT": "old@p.iam"})
    assert isinstance(storage._signer, KeySigner) and storage._signer.email == "old@p.iam"


def test_a_proxy_needs_no_signer(key_file: str) -> None:
    storage = create({"GCS_BUCKET": "b", "GOOGLE_APPLICATION_CREDENTIALS": key_file}, proxy=True)
    assert storage._signer is None
    assert IResource.providedBy(storage.serve_blob(BIG))


def test_a_missing_credentials_file_says_which() -> None:
    with pytest.raises(ConfigError, match="GOOGLE_APPLICATION_CREDENTIALS"):
        create({"GCS_BUCKET": "b", "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"})


# Proxying


class FakeClientRequest:
    """The part of a twisted.web request that relaying a GCS body uses."""

    def __init__(self) -> None:
        self.producer: Any = None
        self.written: list[bytes] = []
        self.finished = False
        self.lost = False
        self._finish: Deferred[None] = Deferred()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming and self.producer is None
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def finish(self) -> None:
        self.finished = True

    def loseConnection(self) -> None:
        self.lost = True

    def notifyFinish(self) -> Deferred[None]:
        return self._finish

    def client_leaves(self) -> None:
        self._finish.errback(Failure(ConnectionError("gone")))


class FakeUpstream:
    """The transport of a GCS response body: what pauses or stops the download."""

    def __init__(self) -> None:
        self.stopped = False

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None:
        self.stopped = True


def relaying(skip: int, length: int) -> tuple[Any, FakeClientRequest, FakeUpstream]:
    request, upstream = FakeClientRequest(), FakeUpstream()
    relay = gcs._Relay(request, skip, length)  # type: ignore[arg-type]
    relay.makeConnection(upstream)  # type: ignore[arg-type]
    return relay, request, upstream


def test_the_client_connection_paces_the_gcs_download() -> None:
    relay, request, upstream = relaying(skip=0, length=6)
    assert request.producer is upstream  # twisted.web pauses it while the client is slow
    relay.dataReceived(b"abc")
    relay.dataReceived(b"def")
    relay.connectionLost(Failure(ResponseDone()))
    assert b"".join(request.written) == b"abcdef"
    assert request.finished and request.producer is None


def test_a_whole_object_answering_a_range_is_cut_to_it() -> None:
    relay, request, _ = relaying(skip=2, length=3)
    for piece in (b"a", b"bcd", b"efgh"):
        relay.dataReceived(piece)
    relay.connectionLost(Failure(ResponseDone()))
    assert b"".join(request.written) == b"cde" and request.finished


def test_a_short_gcs_body_ends_the_client_connection() -> None:
    relay, request, _ = relaying(skip=0, length=10)
    relay.dataReceived(b"abc")
    relay.connectionLost(Failure(ResponseFailed([])))
    assert request.lost and not request.finished


def test_a_client_that_leaves_stops_the_gcs_download() -> None:
    relay, request, upstream = relaying(skip=0, length=10)
    relay.dataReceived(b"abc")
    request.client_leaves()
    assert upstream.stopped
    relay.dataReceived(b"def")
    assert request.written == [b"abc"]
