"""The filesystem backend against the storage contract's conformance suite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted

from nixeryd.builtin.filesystem import FilesystemStorage
from nixeryd.testing.conformance import StorageConformance


class TestFilesystemStorage(StorageConformance):
    @pytest_twisted.async_yield_fixture
    async def storage(self, tmp_path: Path) -> AsyncIterator[FilesystemStorage]:
        backend = FilesystemStorage(tmp_path / "storage")
        await backend.start()
        yield backend
        await backend.stop()
