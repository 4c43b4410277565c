"""A package set in git: its branches and tags are tags of every image (Nixery #89)."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, Daemon
from tests.e2e.test_pull import fetch, in_chroot, pull_and_unpack
from tests.nixinstalls import NixInstallation

pytestmark = pytest.mark.e2e

PACKAGE_SET = """\
{{ system ? builtins.currentSystem, ... }}:
let lib = import {lib} {{ }};
in {{
  inherit (import {example} {{ inherit system; }}) bashInteractive coreutils moreutils nano;
  hello = lib.mkPackage {{
    name = "hello";
    version = "{version}";
    bins.hello = ''echo "hello {version}"'';
  }};
}}
"""


def git(repo: Path, *argv: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *argv], check=True, capture_output=True, text=True
    ).stdout.strip()


def commit_version(repo: Path, version: str) -> None:
    text = PACKAGE_SET.format(
        lib=ROOT / "nix" / "example" / "lib.nix", example=ROOT / "nix" / "example", version=version
    )
    (repo / "default.nix").write_text(text)
    git(repo, "add", "default.nix")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", version)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package repository with tags 1.0 (annotated) and 2.0, branches main and
    feature/x (not a valid image tag), and HEAD at 3.0."""
    repo = tmp_path_factory.mktemp("pkgs-repo")
    git(repo, "init", "-q", "-b", "main")
    commit_version(repo, "1.0")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "tag", "-a", "1.0", "-m", "one")
    commit_version(repo, "2.0")
    git(repo, "tag", "2.0")
    git(repo, "branch", "feature/x")
    commit_version(repo, "3.0")
    return repo


@pytest.fixture(scope="module")
def git_daemon(
    tmp_path_factory: pytest.TempPathFactory,
    repo: Path,
    nix_installation: NixInstallation | None,
) -> Iterator[Daemon]:
    instance = Daemon(
        tmp_path_factory.mktemp("git-daemon"),
        NIXERY_PKGS_PATH="",
        NIXERY_PKGS_REPO=f"file://{repo}",
    )
    yield instance
    instance.stop()


def test_tags_list_has_the_repositorys_tags_and_branches(git_daemon: Daemon) -> None:
    with urllib.request.urlopen(f"{git_daemon.url}/v2/shell/hello/tags/list") as response:
        assert json.load(response) == {
            "name": "shell/hello",
            "tags": ["1.0", "2.0", "latest", "main"],
        }
    status, headers, body = fetch(git_daemon, "/v2/hello/tags/list?n=2&last=1.0")
    assert (status, json.loads(body)["tags"]) == (200, ["2.0", "latest"])
    assert headers["Link"] == '</v2/hello/tags/list?n=2&last=latest>; rel="next"'


def test_each_git_tag_is_an_image_tag(git_daemon: Daemon, repo: Path, tmp_path: Path) -> None:
    for tag, expected in (("1.0", "1.0"), ("2.0", "2.0"), ("main", "3.0"), ("latest", "3.0")):
        (tmp_path / tag).mkdir()
        rootfs = pull_and_unpack(git_daemon, f"shell/hello:{tag}", tmp_path / tag)
        assert in_chroot(rootfs, "/bin/hello") == f"hello {expected}\n"
    commit = git(repo, "rev-parse", "2.0^{commit}")
    status, _, body = fetch(git_daemon, f"/v2/hello/manifests/{commit}")
    assert status == 200, body
    status, _, body = fetch(git_daemon, "/v2/hello/manifests/3.0")
    assert status == 404
    assert "neither a branch, a tag nor a commit" in json.loads(body)["errors"][0]["message"]


def test_a_moving_branch_is_not_answered_from_memory(tmp_path: Path) -> None:
    repo = tmp_path / "moving"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    commit_version(repo, "1.0")
    daemon = Daemon(tmp_path / "daemon", NIXERY_PKGS_PATH="", NIXERY_PKGS_REPO=f"file://{repo}")
    try:
        before = fetch(daemon, "/v2/hello/manifests/main")[1]["Docker-Content-Digest"]
        assert fetch(daemon, "/v2/hello/manifests/main")[1]["Docker-Content-Digest"] == before
        commit_version(repo, "1.1")
        after = fetch(daemon, "/v2/hello/manifests/main")[1]["Docker-Content-Digest"]
    finally:
        daemon.stop()
    assert after != before
