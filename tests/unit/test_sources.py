from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from nixeryd.builtin.sources import ChannelSource, GitSource, PathSource
from nixeryd.errors import BuildFailed, ManifestUnknown
from nixeryd.sources import SourceRef
from nixeryd.testing.processes import Expect, ExpectingProcessRunner

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


def git(stdout: bytes = LS_REMOTE, exit_code: int = 0, refs_ttl: float = 30.0) -> GitSource:
    return git_with(Expect(["git", "ls-remote"], stdout=stdout, exit_code=exit_code), refs_ttl)[0]


def git_with(ls_remote: Expect, refs_ttl: float = 30.0) -> tuple[GitSource, Clock]:
    clock = Clock()
    runner = ExpectingProcessRunner(ls_remote)
    return GitSource("file:///srv/pkgs.git", runner, 10, clock, refs_ttl), clock


def test_git_tags_resolve_to_pinned_commits_with_their_refs() -> None:
    source = git()
    assert result(source.resolve("latest")) == SourceRef(
        "git", {"url": "file:///srv/pkgs.git", "ref": "HEAD", "rev": "1" * 40}, pin="1" * 40
    )
    assert result(source.resolve("stable")).src_args["ref"] == "refs/heads/stable"
    assert result(source.resolve("stable")).pin == "2" * 40
    v1 = result(source.resolve("v1"))
    assert (v1.pin, v1.src_args["ref"]) == ("4" * 40, "refs/tags/v1")  # annotated: peeled
    assert result(source.resolve("light")).pin == "5" * 40


def test_a_commit_tag_is_fetched_through_a_ref_at_its_tip_if_any() -> None:
    source = git()
    refs = {
        "1" * 40: "HEAD",  # also main's tip: HEAD comes first
        "2" * 40: "refs/heads/stable",
        "4" * 40: "refs/tags/v1",  # the annotated tag's commit
        "7" * 40: "refs/pull/1/head",
    }
    for commit, ref in refs.items():
        assert result(source.resolve(commit)) == SourceRef(
            "git", {"url": "file:///srv/pkgs.git", "ref": ref, "rev": commit}, pin=commit
        )
    # Not at a tip: no ref, so Nix fetches every ref.
    assert result(source.resolve(COMMIT)) == SourceRef(
        "git", {"url": "file:///srv/pkgs.git", "rev": COMMIT}, pin=COMMIT
    )


def test_git_unknown_tags_and_failures_are_registry_errors() -> None:
    with pytest.raises(ManifestUnknown, match="'v9'"):
        result(git().resolve("v9"))
    with pytest.raises(BuildFailed, match="cannot list the refs"):
        result(git(b"", 128).resolve("main"))
    with pytest.raises(BuildFailed, match="timed out"):
        result(git_with(Expect(["git", "ls-remote"], timed_out=True))[0].resolve(COMMIT))


def test_git_tags_list_branches_and_tags_that_are_image_tags() -> None:
    assert result(git().tags()) == ["latest", "light", "main", "stable", "v1"]


def test_the_ref_listing_is_reused_for_its_ttl() -> None:
    ls_remote = Expect(["git", "ls-remote"], stdout=LS_REMOTE)
    source, clock = git_with(ls_remote, refs_ttl=30)
    result(source.tags())
    result(source.tags())
    result(source.resolve("latest"))
    result(source.resolve(COMMIT))
    clock.advance(29)
    result(source.resolve("main"))
    assert len(ls_remote.calls) == 1
    clock.advance(1)
    result(source.resolve("latest"))
    assert len(ls_remote.calls) == 2


def test_a_zero_ttl_lists_the_refs_every_time() -> None:
    ls_remote = Expect(["git", "ls-remote"], stdout=LS_REMOTE)
    source, _ = git_with(ls_remote, refs_ttl=0)
    result(source.resolve("latest"))
    result(source.tags())
    assert len(ls_remote.calls) == 2


def test_concurrent_callers_share_one_listing_and_a_failure_is_not_kept() -> None:
    gate: Deferred[None] = Deferred()
    ls_remote = Expect(["git", "ls-remote"], exit_code=128, gate=gate)
    source, _ = git_with(ls_remote)
    waiting = [source.tags(), source.resolve("latest"), source.resolve("main")]
    assert len(ls_remote.calls) == 1
    gate.callback(None)
    for each in waiting:
        with pytest.raises(BuildFailed, match="cannot list the refs"):
            result(each)
    ls_remote.exit_code, ls_remote.stdout, ls_remote.gate = 0, LS_REMOTE, None
    assert result(source.resolve("main")).pin == "1" * 40
    assert len(ls_remote.calls) == 2


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
