"""The GCS backend against the storage contract's conformance suite, on fake-gcs-server.

Each test gets a key prefix of its own in one session-wide bucket. Blobs
are served once through signed redirects (fake-gcs-server ignores the
signature but serves the URL's object, ranges included) and once through
nixeryd itself (``proxy``). Staged blobs go up in 1 MiB chunks so that the
suite's 3 MiB blob takes the resumable upload path.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
import treq
from google.auth.credentials import AnonymousCredentials
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from nixeryd.builtin.gcs import CHUNK_QUANTUM, GcsStorage
from nixeryd.builtin.gcsauth import AccessTokens, KeySigner
from nixeryd.testing.conformance import StorageConformance
from tests.gcsfixtures import FakeGCS, ServiceAccount, fake_gcs, service_account

__all__ = ["fake_gcs", "service_account"]  # fixtures, used by name

_prefixes = itertools.count()


async def _started(
    fake_gcs: FakeGCS, service_account: ServiceAccount, **options: Any
) -> GcsStorage:
    clock: Any = reactor
    storage = GcsStorage(
        bucket=fake_gcs.bucket,
        http=treq,
        tokens=AccessTokens(AnonymousCredentials(), deferToThread, clock.seconds),
        reactor=reactor,
        run_in_thread=deferToThread,
        endpoint=fake_gcs.endpoint,
        prefix=f"conformance-{next(_prefixes)}/",
        signer=KeySigner.from_pem(service_account.pem, service_account.email),
        chunk_size=4 * CHUNK_QUANTUM,
        **options,
    )
    await storage.start()
    return storage


class TestGcsStorage(StorageConformance):
    @pytest_twisted.async_yield_fixture
    async def storage(
        self, fake_gcs: FakeGCS, service_account: ServiceAccount
    ) -> AsyncIterator[GcsStorage]:
        backend = await _started(fake_gcs, service_account)
        yield backend
        await backend.stop()


class TestGcsStorageProxied(StorageConformance):
    @pytest_twisted.async_yield_fixture
    async def storage(
        self, fake_gcs: FakeGCS, service_account: ServiceAccount
    ) -> AsyncIterator[GcsStorage]:
        backend = await _started(fake_gcs, service_account, proxy=True)
        yield backend
        await backend.stop()


@pytest_twisted.ensureDeferred
async def test_fake_gcs_server_ignores_create_only_preconditions(fake_gcs: FakeGCS) -> None:
    """fake-gcs-server does not answer 412 to a second ``ifGenerationMatch=0`` upload: it
    replaces the object. The concurrent-writers test above therefore cannot see the 412
    path here; ``test_storage_gcs.py`` checks it against a fake that answers 412. Should
    this start failing, fake-gcs-server enforces preconditions and the docs can say so."""
    url = f"{fake_gcs.endpoint}/upload/storage/v1/b/{fake_gcs.bucket}/o"
    params = {"uploadType": "media", "name": "precondition-probe", "ifGenerationMatch": "0"}
    codes = []
    for body in (b"first", b"second"):
        response = await treq.post(url, params=params, data=body)
        await treq.content(response)
        codes.append(response.code)
    assert codes == [200, 200]
