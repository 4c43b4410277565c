"""The single-layer strategy: alone, and pulled through a whole registry over a fake Nix.

Written on public API only: the plugin's types from nixeryd.plugin, the
registry and the fake Nix from nixeryd.testing.
"""

from __future__ import annotations

import json
import tarfile
from io import BytesIO
from pathlib import Path

import pytest

import nixeryd_single_layer
from nixeryd.plugin import ClosureGraph, Popularity
from nixeryd.testing.harness import FakeNix, Harness, building
from nixeryd_single_layer import SingleLayer

CLOSURE = ClosureGraph.from_path_info(
    ["/nix/store/a-app"],
    [
        {"path": "/nix/store/a-app", "narSize": 10, "references": ["/nix/store/b-lib"]},
        {"path": "/nix/store/b-lib", "narSize": 5, "references": []},
    ],
)


def test_the_whole_closure_is_one_layer() -> None:
    [layer] = SingleLayer().group(CLOSURE, Popularity(), budget=94)
    assert layer.paths == ("/nix/store/a-app", "/nix/store/b-lib")
    assert layer.merge_rating == 15


def test_a_budget_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SingleLayer().group(CLOSURE, Popularity(), budget=0)


def test_an_image_pulled_through_the_registry_has_one_layer_of_store_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nix = FakeNix(tmp_path)
    registry = Harness(
        tmp_path,
        monkeypatch,
        *building(nix),
        plugins=[nixeryd_single_layer],
        layering_strategy="single-layer",
    )
    response, body = registry.get("/v2/hello/manifests/latest")
    assert response.code == 200, body
    layers = json.loads(body)["layers"]
    # The store paths' layer, then the symlink forest nixeryd adds to every image.
    assert len(layers) == 2
    blob, data = registry.get(f"/v2/hello/blobs/{layers[0]['digest']}")
    assert blob.code == 200
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        names = set(tar.getnames())
    # Layer paths are the store paths without their leading "/".
    assert {nix.hello[1:], nix.lib[1:], nix.cacert[1:]} <= names
