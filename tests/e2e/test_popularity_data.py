"""``nixeryd popcount`` on the test package set and on a file:// cache made from it, and
the daemon layering by its output."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest

from nixeryd.manifest import DOCKER_MANIFEST
from tests.e2e.conftest import ROOT, TEST_PACKAGES, Daemon, nix_env, require
from tests.nixinstalls import NixInstallation

pytestmark = pytest.mark.e2e

#: hello, tools.greeter and fancy all refer to libgreet (and to busybox, via their scripts).
COUNTED = ["hello", "tools.greeter", "fancy"]


def popcount(*argv: str) -> dict[str, int]:
    result = subprocess.run(
        [sys.executable, "-m", "nixeryd", "popcount", *argv],
        capture_output=True, text=True, env=nix_env(), cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    counts: dict[str, int] = json.loads(result.stdout)
    return counts


def outputs(*attributes: str) -> list[str]:
    expression = (
        f"let p = import {TEST_PACKAGES} {{}}; in [ {' '.join(f'p.{a}' for a in attributes)} ]"
    )
    built = subprocess.run(
        ["nix-build", "--no-out-link", "-E", expression],
        capture_output=True, text=True, env=nix_env(), check=True, timeout=300,
    )  # fmt: skip
    return built.stdout.split()


@pytest.fixture(scope="module")
def popularity_file(
    tmp_path_factory: pytest.TempPathFactory, nix_installation: NixInstallation | None
) -> Path:
    """Popularity of the test package set's greeting programs, from the package set."""
    path = tmp_path_factory.mktemp("popcount") / "popularity.json"
    argv = [f"--attr={attribute}" for attribute in COUNTED]
    counts = popcount("--pkgs-path", str(TEST_PACKAGES), "--build", *argv, "-o", "/dev/stdout")
    assert counts["libgreet-1.0"] == 3
    path.write_text(json.dumps(counts))
    return path


def test_the_whole_package_set_is_counted_from_what_is_built(popularity_file: Path) -> None:
    # Without --build nothing is built (the set has a build that fails and one that sleeps):
    # what is not in the store is skipped, and the rest counted.
    counts = popcount("--pkgs-path", str(TEST_PACKAGES))
    assert counts["libgreet-1.0"] >= 1
    assert counts["busybox-static"] >= 5


def test_a_file_binary_cache_counts_the_same(popularity_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "copy",
         "--to", f"file://{cache}", *outputs(*COUNTED)],
        check=True, capture_output=True, env=nix_env(), timeout=120,
    )  # fmt: skip
    assert popcount("--cache", f"file://{cache}") == json.loads(popularity_file.read_text())


def layer_contents(daemon: Daemon, image: str) -> list[set[str]]:
    """The store path names in each layer of the image, in manifest order."""
    request = urllib.request.Request(
        f"{daemon.url}/v2/{image}/manifests/latest", headers={"Accept": DOCKER_MANIFEST}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        manifest = json.load(response)
    contents = []
    for layer in manifest["layers"]:
        with urllib.request.urlopen(f"{daemon.url}/v2/{image}/blobs/{layer['digest']}") as blob:
            data = gzip.decompress(blob.read())
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            contents.append(
                {
                    member.name.split("/")[2].split("-", 1)[1]
                    for member in tar.getmembers()
                    if member.name.startswith("nix/store/") and member.name.count("/") >= 2
                }
            )
    return contents


def test_popularity_data_drives_the_layering(popularity_file: Path, tmp_path: Path) -> None:
    # Without popularity data libgreet (and busybox), which only hello refers to in the
    # image, travel with hello; with it, the daemon knows greeter and fancy use libgreet too, so
    # libgreet gets a layer of its own that images of greeter and fancy share.
    without = Daemon(tmp_path / "without")
    try:
        plain = layer_contents(without, "hello")
    finally:
        without.stop()
    informed = Daemon(tmp_path / "with", NIX_POPULARITY_URL=f"file://{popularity_file}")
    try:
        layered = layer_contents(informed, "hello")
        greeter = layer_contents(informed, "tools.greeter")
    finally:
        informed.stop()
    assert any({"hello-2.12.1", "libgreet-1.0"} <= layer for layer in plain)
    assert {"libgreet-1.0"} in layered
    assert {"libgreet-1.0"} in greeter
    assert len(layered) > len(plain)


def skopeo_layers(daemon: Daemon, image: str) -> list[str]:
    """The layer digests of the image as skopeo reads them from the daemon."""
    require("skopeo")
    inspected = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{daemon.host}/{image}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert inspected.returncode == 0, inspected.stderr
    layers: list[str] = json.loads(inspected.stdout)["Layers"]
    return layers


def test_the_default_layering_gives_images_the_same_base_prefix(
    popularity_file: Path, tmp_path: Path
) -> None:
    # The prefix strategy (the default): the closure of cacert and iana-etc, then what
    # shell's packages add, each part in layers of its own, the same in a small image and
    # a large one (budget 94: up to 4 per part), before the image's own layers.
    daemon = Daemon(tmp_path / "prefix", NIX_POPULARITY_URL=f"file://{popularity_file}")
    try:
        small = skopeo_layers(daemon, "shell/hello")
        large = skopeo_layers(daemon, "shell/9lives/fancy/hello/helloworld/tools.greeter")
        contents = layer_contents(daemon, "shell/hello")
    finally:
        daemon.stop()
    always = {"nss-cacert-3.92", "iana-etc-20230316"}
    shell = {"bash-interactive-5.2-p15", "coreutils-9.1", "moreutils-0.67", "nano-7.2"}
    base = always | shell | {"busybox-static"}  # which cacert refers to
    count = next(i for i, layer in enumerate(contents) if not layer <= base)
    assert set().union(*contents[:count]) == base
    # The first part's layers, then the second's.
    assert max(i for i, layer in enumerate(contents) if layer & always) < min(
        i for i, layer in enumerate(contents) if layer & shell
    )
    assert large[:count] == small[:count]
    assert len(large) > len(small)
