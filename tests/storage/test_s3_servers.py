"""What the S3 backend promises beyond the storage contract, checked on real servers.

Presigned URLs a server accepts (and refuses once tampered with), nothing
visible under a blob's key while its multipart upload is unfinished (a
crash), uploads verified by servers that check the payload hash, two
instances on one bucket, and start-up errors an operator can act on.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread

from nixeryd.builtin.s3 import S3Error, S3Storage
from nixeryd.config import ConfigError
from nixeryd.storage import BlobInfo, Redirect
from tests.s3servers import S3Server
from tests.storage.conftest import PART_SIZE, StorageFactory

pytestmark = pytest.mark.storage

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def stage(storage: S3Storage, data: bytes, claimed: str | None = None) -> BlobInfo:
    staged = storage.stage_blob()
    await deferToThread(staged.file.write, data)
    info: BlobInfo = await staged.commit(claimed or digest(data), LAYER)
    return info


def uploads_in_progress(server: S3Server, bucket: str, prefix: str) -> list[str]:
    answer = server.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [upload["Key"] for upload in answer.get("Uploads", [])]


@pytest_twisted.ensureDeferred
async def test_blobs_keep_their_media_type_under_the_documented_key(
    make_s3_storage: StorageFactory, s3_server: S3Server, s3_bucket: str
) -> None:
    storage = make_s3_storage()
    await storage.start()
    info = await stage(storage, os.urandom(2 * PART_SIZE + 1))
    key = f"{storage._prefix}blobs/sha256/{info.digest.removeprefix('sha256:')}"
    head = s3_server.client().head_object(Bucket=s3_bucket, Key=key)
    assert (head["ContentType"], head["ContentLength"]) == (LAYER, info.size)


@pytest_twisted.ensureDeferred
async def test_presigned_urls_work_and_a_tampered_one_is_refused(
    make_s3_storage: StorageFactory,
) -> None:
    storage = make_s3_storage()
    await storage.start()
    data = os.urandom(200_000)
    info = await stage(storage, data)
    answer = storage.serve_blob(info)
    assert isinstance(answer, Redirect)
    whole = await treq.get(answer.url)
    assert (whole.code, await whole.content()) == (200, data)
    ranged = await treq.get(answer.url, headers={"Range": "bytes=10-19"})
    assert (ranged.code, await ranged.content()) == (206, data[10:20])
    other = answer.url.replace(info.digest.removeprefix("sha256:"), "0" * 64)
    assert (await treq.get(other)).code == 403


@pytest_twisted.ensureDeferred
async def test_an_unfinished_multipart_upload_leaves_nothing_under_the_key(
    make_s3_storage: StorageFactory, s3_server: S3Server, s3_bucket: str
) -> None:
    """As after a crash (kill -9) between the parts and the CompleteMultipartUpload."""
    parts_sent: Deferred[None] = Deferred()

    class CompleteNever:
        def request(self, method: str, url: str, **options: Any) -> Any:
            if method == "POST" and "uploadId=" in url:
                parts_sent.callback(None)
                return Deferred()  # the process died here
            return treq.request(method, url, **options)

    storage = make_s3_storage(http=CompleteNever())
    await storage.start()
    data = os.urandom(PART_SIZE + 1)
    committing = Deferred.fromCoroutine(stage(storage, data))
    await parts_sent
    assert await make_s3_storage().stat_blob(digest(data)) is None
    assert len(uploads_in_progress(s3_server, s3_bucket, storage._prefix)) == 1
    await storage.stop()  # an orderly shutdown aborts it; a lifecycle rule after a crash
    assert uploads_in_progress(s3_server, s3_bucket, storage._prefix) == []
    committing.cancel()
    with pytest.raises(Exception):  # noqa: B017 (cancelled, however it surfaces)
        await committing


@pytest_twisted.ensureDeferred
async def test_start_aborts_the_uploads_a_crash_left_behind(
    make_s3_storage: StorageFactory, s3_server: S3Server, s3_bucket: str
) -> None:
    prefix = make_s3_storage()._prefix
    key = f"{prefix}blobs/sha256/{'ab' * 32}"
    s3_server.client().create_multipart_upload(Bucket=s3_bucket, Key=key)
    await make_s3_storage().start()  # a fresh upload may be another instance's: kept
    assert uploads_in_progress(s3_server, s3_bucket, prefix) == [key]
    await make_s3_storage(stale_upload_age=0).start()
    assert uploads_in_progress(s3_server, s3_bucket, prefix) == []


@pytest_twisted.ensureDeferred
async def test_two_instances_on_one_bucket_store_a_large_blob_once(
    make_s3_storage: StorageFactory, s3_server: S3Server, s3_bucket: str
) -> None:
    first, second = make_s3_storage(), make_s3_storage()
    await gatherResults([first.start(), second.start()])
    data = os.urandom(2 * PART_SIZE + 3)
    infos = await gatherResults(
        [Deferred.fromCoroutine(stage(instance, data)) for instance in (first, second)]
    )
    assert infos[0] == infos[1]
    assert await first.list_blobs() == [infos[0]]
    assert uploads_in_progress(s3_server, s3_bucket, first._prefix) == []
    assert (await treq.content(await treq.get(first.presigned_url(digest(data)[7:])[0]))) == data


@pytest_twisted.ensureDeferred
async def test_a_server_that_checks_payload_hashes_refuses_a_wrong_digest(
    make_s3_storage: StorageFactory, s3_server: S3Server
) -> None:
    if s3_server.name == "SeaweedFS":
        pytest.skip("SeaweedFS does not verify x-amz-content-sha256")
    storage = make_s3_storage()
    await storage.start()
    data, wrong = os.urandom(1000), digest(b"other bytes")
    with pytest.raises(S3Error, match="XAmzContentSHA256Mismatch"):
        await stage(storage, data, claimed=wrong)
    assert await storage.stat_blob(wrong) is None


@pytest_twisted.ensureDeferred
async def test_a_missing_bucket_is_a_start_up_error_naming_it(
    make_s3_storage: StorageFactory, s3_server: S3Server
) -> None:
    with pytest.raises(ConfigError, match=rf"'no-such-bucket' at {s3_server.endpoint} does not"):
        await make_s3_storage(bucket="no-such-bucket").start()


@pytest_twisted.ensureDeferred
async def test_wrong_keys_are_a_start_up_error(make_s3_storage: StorageFactory) -> None:
    with pytest.raises(ConfigError, match=r"denied \(HTTP 403\): check the keys"):
        await make_s3_storage(secret_key="wrong").start()


@pytest_twisted.ensureDeferred
async def test_an_unreachable_endpoint_is_a_start_up_error(
    make_s3_storage: StorageFactory,
) -> None:
    with pytest.raises(ConfigError, match=r"cannot reach bucket .* at http://127.0.0.1:9"):
        await make_s3_storage(endpoint="http://127.0.0.1:9").start()


@pytest_twisted.ensureDeferred
async def test_without_keys_the_aws_credential_chain_is_used(
    make_s3_storage: StorageFactory, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    storage = make_s3_storage(access_key=None, secret_key=None)
    await storage.start()
    await storage.put_record("builds/chain", b"signed with the chain's keys")
    assert await storage.get_record("builds/chain") == b"signed with the chain's keys"
