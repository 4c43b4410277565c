"""A package set in git: its branches and tags are tags of every image (Nixery #89)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, Daemon, free_port
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
    daemon = Daemon(
        tmp_path / "daemon",
        NIXERY_PKGS_PATH="",
        NIXERY_PKGS_REPO=f"file://{repo}",
        NIXERYD_GIT_REFS_TTL="0",
    )
    try:
        before = fetch(daemon, "/v2/hello/manifests/main")[1]["Docker-Content-Digest"]
        assert fetch(daemon, "/v2/hello/manifests/main")[1]["Docker-Content-Digest"] == before
        commit_version(repo, "1.1")
        after = fetch(daemon, "/v2/hello/manifests/main")[1]["Docker-Content-Digest"]
    finally:
        daemon.stop()
    assert after != before


JUNK_REFS = 5000


@pytest.fixture(scope="module")
def served_repo(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> Iterator[tuple[str, str]]:
    """The repository, bare, with many more refs (at the tip of an unrelated history,
    as a nixpkgs clone's pull requests are), served by ``git daemon``: Nix fetches
    from git:// as from any remote (a file:// URL it may read in place). Yields its
    URL and a commit at no ref's tip (version "old", the unrelated tip's parent)."""
    root = tmp_path_factory.mktemp("served")
    bare = root / "pkgs.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    junk = root / "junk"
    git(junk.parent, "init", "-q", str(junk))
    commit_version(junk, "old")
    commit_version(junk, "junk")
    git(bare, "fetch", "-q", str(junk), "HEAD:refs/junk/0")
    junk_commit = git(bare, "rev-parse", "refs/junk/0")
    updates = "".join(f"create refs/pull/{n}/head {junk_commit}\n" for n in range(JUNK_REFS))
    subprocess.run(
        ["git", "-C", str(bare), "update-ref", "--stdin"], input=updates, text=True, check=True
    )
    port = free_port()
    server = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={root}",
         "--listen=127.0.0.1", f"--port={port}", str(root)],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"git://127.0.0.1:{port}/pkgs.git"
    deadline = time.monotonic() + 10
    while subprocess.run(["git", "ls-remote", url, "HEAD"], capture_output=True).returncode:
        assert time.monotonic() < deadline, "git daemon did not start"
        time.sleep(0.1)
    yield url, git(junk, "rev-parse", "HEAD~1")
    server.terminate()
    server.wait()


def nix_git_caches(cache_home: Path) -> list[Path]:
    return sorted(path for path in (cache_home / "nix" / "gitv3").iterdir() if path.is_dir())


def test_a_repository_with_many_refs_is_fetched_by_the_ref_pulled(
    served_repo: tuple[str, str], repo: Path, tmp_path: Path
) -> None:
    url, _ = served_repo
    cache_home = tmp_path / "cache"
    daemon = Daemon(
        tmp_path / "daemon",
        NIXERY_PKGS_PATH="",
        NIXERY_PKGS_REPO=url,
        XDG_CACHE_HOME=str(cache_home),
    )
    try:
        (tmp_path / "pull").mkdir()
        rootfs = pull_and_unpack(daemon, "hello:2.0", tmp_path / "pull")
        assert in_chroot(rootfs, "/bin/hello") == "hello 2.0\n"
        for tag in ("main", git(repo, "rev-parse", "main")):  # a commit at main's tip
            status, _, body = fetch(daemon, f"/v2/hello/manifests/{tag}")
            assert status == 200, body
    finally:
        daemon.stop()
    [cache] = nix_git_caches(cache_home)
    fetched = git(cache, "for-each-ref", "--format=%(refname)").split()
    assert "refs/tags/2.0" in fetched
    assert not any(ref.startswith("refs/pull/") for ref in fetched), fetched[:5]


def test_a_commit_at_no_refs_tip_is_found_among_all_refs(
    served_repo: tuple[str, str], repo: Path, tmp_path: Path
) -> None:
    url, old = served_repo
    daemon = Daemon(
        tmp_path / "daemon",
        NIXERY_PKGS_PATH="",
        NIXERY_PKGS_REPO=url,
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    try:
        annotated = git(repo, "rev-parse", "1.0^{commit}")  # the tip of tag 1.0, peeled
        for tag, version in ((annotated, "1.0"), (old, "old")):
            (tmp_path / version).mkdir()
            rootfs = pull_and_unpack(daemon, f"hello:{tag}", tmp_path / version)
            assert in_chroot(rootfs, "/bin/hello") == f"hello {version}\n"
    finally:
        daemon.stop()


def test_a_shallow_clone_is_a_package_repository(repo: Path, tmp_path: Path) -> None:
    """A checkout, which Nix reads in place. (Nix 2.8 and 2.18 cannot fetch from a
    shallow repository, a bare one or a remote: their ``git fetch`` lacks
    ``--update-shallow``, so the parents' absence breaks the copy.)"""
    shallow = tmp_path / "shallow"
    subprocess.run(
        ["git", "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow)], check=True
    )
    assert git(shallow, "rev-parse", "--is-shallow-repository") == "true"
    daemon = Daemon(
        tmp_path / "daemon",
        NIXERY_PKGS_PATH="",
        NIXERY_PKGS_REPO=f"file://{shallow}",
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    try:
        (tmp_path / "pull").mkdir()
        rootfs = pull_and_unpack(daemon, "hello:latest", tmp_path / "pull")
        assert in_chroot(rootfs, "/bin/hello") == "hello 3.0\n"
    finally:
        daemon.stop()
