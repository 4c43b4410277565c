"""Layers compressed with each configured compressor, served through the real registry."""

from __future__ import annotations

import gzip
import hashlib
import json
from typing import Any

import pytest
import zstandard

from nixeryd.manifest import DOCKER_LAYER, OCI_INDEX, OCI_LAYER, OCI_LAYER_ZSTD, OCI_MANIFEST
from nixeryd.platform import AMD64, ARM64
from nixeryd.service import layer_pool_size
from nixeryd.testing.harness import FakeNix, Harness, RegistryFactory, building, header

DOCKER_ACCEPT = {"Accept": ["application/vnd.docker.distribution.manifest.v2+json"]}


def layers_of(registry: Harness, manifest: dict[str, Any]) -> list[tuple[str, str, bytes]]:
    """Each layer's media type in the manifest, as served, and its bytes."""
    blobs = []
    for layer in manifest["layers"]:
        response, data = registry.get(f"/v2/hello/blobs/{layer['digest']}")
        assert response.code == 200
        blobs.append((layer["mediaType"], header(response, "Content-Type") or "", data))
    return blobs


def test_zstd_layers_are_served_in_oci_manifests_to_every_client(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(*building(nix), layer_compressor="zstd")
    response, body = registry.get("/v2/hello/manifests/latest", headers=DOCKER_ACCEPT)
    assert response.code == 200, body
    assert header(response, "Content-Type") == OCI_MANIFEST
    manifest = json.loads(body)
    config = json.loads(registry.get(f"/v2/hello/blobs/{manifest['config']['digest']}")[1])
    blobs = layers_of(registry, manifest)
    assert {(listed, served) for listed, served, _ in blobs} == {(OCI_LAYER_ZSTD, OCI_LAYER_ZSTD)}
    for (_, _, blob), diff_id in zip(blobs, config["rootfs"]["diff_ids"], strict=True):
        tar = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id


def test_zstd_multi_platform_images_get_an_oci_index(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(
        *building(nix), *building(nix), platforms=(AMD64, ARM64), layer_compressor="zstd"
    )
    accept = {"Accept": ["application/vnd.docker.distribution.manifest.list.v2+json"]}
    response, body = registry.get("/v2/hello/manifests/latest", headers=accept)
    assert response.code == 200, body
    assert header(response, "Content-Type") == OCI_INDEX
    assert {entry["mediaType"] for entry in json.loads(body)["manifests"]} == {OCI_MANIFEST}


@pytest.mark.parametrize("compressor", ["isal", "zlib"])
def test_gzip_compressors_serve_docker_manifests(
    registry_with: RegistryFactory, nix: FakeNix, compressor: str
) -> None:
    registry = registry_with(*building(nix), layer_compressor=compressor)
    response, body = registry.get("/v2/hello/manifests/latest", headers=DOCKER_ACCEPT)
    assert response.code == 200, body
    for listed, served, blob in layers_of(registry, json.loads(body)):
        assert (listed, served) == (DOCKER_LAYER, OCI_LAYER)
        gzip.decompress(blob)


def test_the_layer_pool_is_as_large_as_the_cores_unless_configured() -> None:
    assert layer_pool_size(0, cores=8) == 8
    assert layer_pool_size(0, cores=0) == 1
    assert layer_pool_size(3, cores=8) == 3
    assert layer_pool_size(0) >= 1
