from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from nixeryd.builtin.sources import ChannelSource, GitSource, PathSource
from nixeryd.errors import BuildFailed, ManifestUnknown
from nixeryd.sources import SourceRef
from tests.fakes import Expect, ExpectingProcessRunner

COMMIT = "a" * 40
LS_REMOTE = (
    f"{'1' * 40}\tHEAD\n"
    f"{'1' * 40}\trefs/heads/main\n"
    f"{'2' * 40}\trefs/heads/stable\n"
    f"{'3' * 40}\trefs/tags/v1\n"
    f"{'4' * 40}\trefs/tags/v1^{{}}\n"
    f"{'5' * 40}\trefs/tags/light\n"
    f"{'6' * 40}\trefs/heads/feature/x\n"
    f"{'7' * 40}\trefs/pull/1/head\n"
).encode()


def result(deferred: Deferred[Any]) -> Any:
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


def git(stdout: bytes = LS_REMOTE, exit_code: int = 0) -> GitSource:
    runner = ExpectingProcessRunner(
        Expect(["git", "ls-remote"], stdout=stdout, exit_code=exit_code)
    )
    return GitSource("file:///srv/pkgs.git", runner, 10)


def test_git_tags_resolve_to_pinned_commits() -> None:
    source = git()
    assert result(source.resolve("latest")) == SourceRef(
        "git", {"url": "file:///srv/pkgs.git", "rev": "1" * 40}, pin="1" * 40
    )
    assert result(source.resolve("stable")).pin == "2" * 40
    assert result(source.resolve("v1")).pin == "4" * 40  # annotated tags are peeled
    assert result(source.resolve("light")).pin == "5" * 40
    assert result(source.resolve(COMMIT)).src_args["rev"] == COMMIT


def test_git_unknown_tags_and_failures_are_registry_errors() -> None:
    with pytest.raises(ManifestUnknown, match="'v9'"):
        result(git().resolve("v9"))
    with pytest.raises(BuildFailed, match="cannot list the refs"):
        result(git(b"", 128).resolve("main"))


def test_git_tags_list_branches_and_tags_that_are_image_tags() -> None:
    assert result(git().tags()) == ["latest", "light", "main", "stable", "v1"]


def test_channels_pin_commits_only() -> None:
    pinned = result(ChannelSource(COMMIT).resolve("latest"))
    assert pinned.pin == COMMIT
    assert pinned.src_args["url"] == f"https://github.com/NixOS/nixpkgs/archive/{COMMIT}.tar.gz"
    moving = result(ChannelSource("nixos-unstable").resolve("latest"))
    assert moving.pin is None
    assert "nixos-unstable" in moving.src_args["url"]
    mirror = ChannelSource("nixos-24.05", "file:///mirror/{channel}.tar.gz")
    assert result(mirror.resolve("latest")).src_args["url"] == "file:///mirror/nixos-24.05.tar.gz"


def test_path_sources_must_exist(tmp_path: Any) -> None:
    assert result(PathSource(str(tmp_path)).resolve("latest")).src_args == {"path": str(tmp_path)}
    with pytest.raises(ValueError, match="does not exist"):
        PathSource(str(tmp_path / "missing"))


def test_path_source_answers_latest_only_unless_any_tag_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(ManifestUnknown, match="latest"):
        result(PathSource(str(tmp_path)).resolve("1.0"))
    accepting = PathSource(str(tmp_path), accept_any_tag=True)
    assert result(accepting.resolve("1.0")).src_args == {"path": str(tmp_path)}


def test_channel_source_answers_latest_and_its_own_name() -> None:
    channel = ChannelSource("nixos-24.05")
    assert result(channel.tags()) == ["latest", "nixos-24.05"]
    assert result(channel.resolve("nixos-24.05")) == result(channel.resolve("latest"))
    with pytest.raises(ManifestUnknown, match=r"nixos-24\.05"):
        result(channel.resolve("nixos-unstable"))
