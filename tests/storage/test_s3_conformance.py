"""The storage contract, run against the S3 backend on SeaweedFS and on Ceph RGW."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_twisted

from nixeryd.builtin.s3 import S3Storage
from nixeryd.testing.conformance import StorageConformance
from tests.storage.conftest import PART_SIZE, StorageFactory

pytestmark = pytest.mark.storage


class TestS3Storage(StorageConformance):
    # Three parts: the multipart path, its last short part included.
    large_blob_size = 2 * PART_SIZE + 17

    @pytest_twisted.async_yield_fixture
    async def storage(self, make_s3_storage: StorageFactory) -> AsyncIterator[S3Storage]:
        backend = make_s3_storage()
        await backend.start()
        yield backend
        await backend.stop()


class TestProxiedS3Storage(TestS3Storage):
    """The same, with blob bytes streamed through nixeryd rather than redirected."""

    @pytest_twisted.async_yield_fixture
    async def storage(self, make_s3_storage: StorageFactory) -> AsyncIterator[S3Storage]:
        backend = make_s3_storage(proxy=True)
        await backend.start()
        yield backend
        await backend.stop()
