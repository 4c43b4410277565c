"""The memory backend: the storage contract's conformance suite, its setting, and a whole
registry serving pulls from it. Written, like the plugin, on public API only."""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import deferToThread

import nixeryd_memory_storage
from nixeryd.plugin import ConfigError, DigestInvalid
from nixeryd.testing.conformance import StorageConformance
from nixeryd.testing.harness import FakeNix, Harness, building
from nixeryd_memory_storage import MemoryStorage, parse_size

CONFIG = "application/vnd.oci.image.config.v1+json"


class TestMemoryStorage(StorageConformance):
    @pytest_twisted.async_yield_fixture
    async def storage(self) -> AsyncIterator[MemoryStorage]:
        # Hashing in real worker threads, as in a server.
        backend = MemoryStorage(run_in_thread=deferToThread)
        await backend.start()
        yield backend
        await backend.stop()


def registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nix: FakeNix, **table: str
) -> Harness:
    return Harness(
        tmp_path,
        monkeypatch,
        *building(nix),
        plugins=[nixeryd_memory_storage],
        storage_backend="memory",
        plugin_options={"memory": table},
    )


def test_a_registry_on_memory_storage_serves_a_pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nix = FakeNix(tmp_path)
    harness = registry(tmp_path, monkeypatch, nix)
    response, body = harness.get("/v2/hello/manifests/latest")
    assert response.code == 200, body
    for layer in json.loads(body)["layers"]:
        blob, data = harness.get(f"/v2/hello/blobs/{layer['digest']}")
        assert blob.code == 200
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
    assert not (tmp_path / "storage").exists()  # nothing went to the filesystem backend


def test_max_size_comes_from_the_plugin_table_and_fails_builds_past_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nix = FakeNix(tmp_path)
    harness = registry(tmp_path, monkeypatch, nix, max_size="1K")
    response, body = harness.get("/v2/hello/manifests/latest")
    # A layer does not fit: the server's problem, not the client's; the log says which.
    assert response.code == 500
    assert json.loads(body)["errors"][0]["code"] == "UNKNOWN"


def test_max_size_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = Harness(
        tmp_path,
        monkeypatch,
        plugins=[nixeryd_memory_storage],
        storage_backend="memory",
        environment={"NIXERYD_MEMORY_MAX_SIZE": "10"},
    )
    with pytest.raises(OSError) as full:
        harness.settle(harness.storage.put_blob(b"more than ten bytes", CONFIG))
    assert full.value.errno == errno.ENOSPC


def test_an_unknown_key_in_the_table_stops_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=r"\[plugin.memory\]: unknown key max_bytes"):
        registry(tmp_path, monkeypatch, FakeNix(tmp_path), max_bytes="1M")


@pytest.mark.parametrize(
    ("text", "size"), [("0", 0), ("1048576", 1048576), ("512M", 512 << 20), ("2GiB", 2 << 30)]
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", "1T", "lots", "5iB"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_a_staged_blob_with_the_wrong_digest_is_refused() -> None:
    storage = MemoryStorage(run_in_thread=maybeDeferred)  # hashes inline: Deferreds have fired
    staged = storage.stage_blob()
    staged.file.write(b"these bytes")
    wrong = "sha256:" + hashlib.sha256(b"other bytes").hexdigest()
    outcome: list[object] = []
    staged.commit(wrong, CONFIG).addErrback(lambda failure: outcome.append(failure.value))
    assert isinstance(outcome[0], DigestInvalid)
    storage.list_blobs().addCallback(outcome.append)
    assert outcome[1] == []
