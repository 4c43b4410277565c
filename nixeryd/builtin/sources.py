"""The built-in package sources: a local path, a git repository, a nixpkgs channel.

They follow Nixery's variables (``NIXERY_PKGS_PATH``, ``NIXERY_PKGS_REPO``,
``NIXERY_CHANNEL``) and go further in one place: a git source resolves every
tag to a commit with ``git ls-remote`` before Nix sees it, so branches *and*
git tags work as image tags (Nixery #89), and every build is pinned to a
commit, which makes its manifest cacheable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed

from nixeryd.errors import BuildFailed, ManifestUnknown
from nixeryd.hookspecs import hookimpl
from nixeryd.imagename import is_valid_tag
from nixeryd.process import ProcessResult, ProcessRunner, ProcessTimedOut
from nixeryd.runtime import Provider, Runtime
from nixeryd.singleflight import SingleFlight
from nixeryd.sources import PackageSource, SourceRef

_COMMIT = re.compile(r"^[0-9a-f]{40}$")

NIXPKGS_COMMIT_URL = "https://github.com/NixOS/nixpkgs/archive/{channel}.tar.gz"
NIXOS_CHANNEL_URL = "https://nixos.org/channels/{channel}/nixexprs.tar.xz"


def _answer(
    tag: str, valid: Sequence[str], accept_any_tag: bool, ref: SourceRef
) -> Deferred[SourceRef]:
    """Refuse a tag the source cannot tell apart, so that a pull agrees with tags/list.

    Nixery answered any tag with the same image; ``accept_any_tag`` keeps that.
    """
    if accept_any_tag or tag in valid:
        return succeed(ref)
    return fail(
        ManifestUnknown(f"tag {tag!r} is unknown; this package source has: {', '.join(valid)}")
    )


class PathSource:
    """A package set in a local directory or file; ``latest`` names its current content."""

    def __init__(self, path: str, accept_any_tag: bool = False) -> None:
        self._path = str(Path(path).resolve())
        self._accept_any_tag = accept_any_tag
        if not Path(self._path).exists():
            raise ValueError(f"package set {self._path} does not exist")

    def resolve(self, tag: str) -> Deferred[SourceRef]:
        return _answer(
            tag, ["latest"], self._accept_any_tag, SourceRef("path", {"path": self._path})
        )

    def tags(self) -> Deferred[list[str]]:
        return succeed(["latest"])


class ChannelSource:
    """A nixpkgs channel by name (moving) or commit (pinned), fetched as a tarball.

    ``url_template`` (``{channel}`` replaced) points at a mirror for air-gapped
    sites; by default commits come from GitHub and names from nixos.org.
    """

    def __init__(
        self, channel: str, url_template: str | None = None, accept_any_tag: bool = False
    ) -> None:
        self._channel = channel
        self._accept_any_tag = accept_any_tag
        pinned = _COMMIT.match(channel) is not None
        template = url_template or (NIXPKGS_COMMIT_URL if pinned else NIXOS_CHANNEL_URL)
        self._ref = SourceRef(
            "tarball", {"url": template.format(channel=channel)}, channel if pinned else None
        )

    def resolve(self, tag: str) -> Deferred[SourceRef]:
        return _answer(tag, sorted({"latest", self._channel}), self._accept_any_tag, self._ref)

    def tags(self) -> Deferred[list[str]]:
        return succeed(sorted({"latest", self._channel}))


class GitSource:
    """A package set in a git repository; image tags are its branches, tags and commits.

    ``latest`` is the repository's HEAD. Each tag is resolved to a commit with
    ``git ls-remote`` (the host's git credentials apply), so Nix always
    fetches a commit and the manifest cache can key on it. The resolved ref
    goes to Nix with the commit, so that Nix fetches that one ref: fetching
    all of a nixpkgs-sized repository's refs takes about a minute.

    The ref list is kept ``refs_ttl`` seconds (0: not kept), so that a page of
    tags/list, or many ``latest`` pulls, run one ls-remote rather than one
    each; callers arriving while it runs share it. ``clock`` is the reactor
    (its ``seconds()``), or a test's clock.
    """

    def __init__(
        self,
        url: str,
        processes: ProcessRunner,
        timeout: float,
        clock: Any,
        refs_ttl: float = 30.0,
    ) -> None:
        self._url = url
        self._processes = processes
        self._timeout = timeout
        self._clock = clock
        self._refs_ttl = refs_ttl
        self._listing: SingleFlight[_Refs] = SingleFlight()
        self._listed: _Refs | None = None
        self._listed_at = 0.0

    def _refs(self) -> Deferred[_Refs]:
        """The repository's refs, listed at most ``refs_ttl`` seconds ago."""
        if self._listed is not None and self._clock.seconds() < self._listed_at + self._refs_ttl:
            return succeed(self._listed)
        return self._listing.run("refs", self._list_refs)

    @inlineCallbacks
    def _list_refs(self) -> Any:
        # The listing is as old as its start: a push during ls-remote may be missing.
        started = self._clock.seconds()
        try:
            result: ProcessResult = yield self._processes.run(
                ["git", "ls-remote", "--", self._url],
                timeout=self._timeout,
                on_stderr_line=lambda line: None,
            )
        except ProcessTimedOut as error:
            raise BuildFailed(f"git ls-remote {self._url} timed out") from error
        if result.exit_code != 0:
            raise BuildFailed(
                f"cannot list the refs of {self._url}: " + " ".join(result.stderr_tail[-3:])
            )
        refs = _Refs(result.stdout.decode("utf-8", "replace"))
        self._listed, self._listed_at = refs, started
        return refs

    @inlineCallbacks
    def resolve(self, tag: str) -> Any:
        refs: _Refs = yield self._refs()
        if _COMMIT.match(tag):
            # A commit at a ref's tip is fetched through that ref; any other commit
            # only through all refs (nixeryd.nix adds allRefs when no ref is given).
            ref = refs.ref_at(tag)
            args = {"url": self._url, "rev": tag} | ({"ref": ref} if ref else {})
            return SourceRef("git", args, pin=tag)
        candidates: Sequence[str] = (
            ["HEAD"] if tag == "latest" else [f"refs/tags/{tag}", f"refs/heads/{tag}"]
        )
        for candidate in candidates:
            if candidate in refs.commits:
                commit = refs.commits[candidate]
                return SourceRef(
                    "git", {"url": self._url, "ref": candidate, "rev": commit}, pin=commit
                )
        raise ManifestUnknown(
            f"tag {tag!r} is neither a branch, a tag nor a commit of the package repository"
        )

    @inlineCallbacks
    def tags(self) -> Any:
        refs: _Refs = yield self._refs()
        names = {"latest"}
        for name in refs.commits:
            for prefix in ("refs/heads/", "refs/tags/"):
                # Refs that are no image tag (feature/x) cannot be pulled, so are not listed.
                if name.startswith(prefix) and is_valid_tag(name[len(prefix) :]):
                    names.add(name[len(prefix) :])
        return sorted(names)


class _Refs:
    """``git ls-remote`` output: ``{ref name: commit}``, annotated tags peeled."""

    def __init__(self, listing: str) -> None:
        self.commits: dict[str, str] = {}
        for line in listing.splitlines():
            commit, _, name = line.partition("\t")
            if name.endswith("^{}"):
                self.commits[name[:-3]] = commit  # the commit an annotated tag points at
            else:
                self.commits.setdefault(name, commit)
        self._tips: dict[str, str] | None = None

    def ref_at(self, commit: str) -> str | None:
        """A ref whose tip is ``commit``: HEAD, else a branch, a tag, then any other ref."""
        if self._tips is None:
            order = {"HEAD": 0, "refs/heads/": 1, "refs/tags/": 2}
            ranked = sorted(
                self.commits.items(),
                key=lambda item: min(
                    (rank for prefix, rank in order.items() if item[0].startswith(prefix)),
                    default=3,
                ),
                reverse=True,
            )
            self._tips = {tip: name for name, tip in ranked}  # the best-ranked ref wins
        return self._tips.get(commit)


def _path_source(runtime: Runtime) -> PackageSource:
    if not runtime.config.pkgs_path:
        raise ValueError("the path source needs NIXERY_PKGS_PATH (--pkgs-path)")
    return PathSource(runtime.config.pkgs_path, runtime.config.accept_any_tag)


def _git_source(runtime: Runtime) -> PackageSource:
    if not runtime.config.pkgs_repo:
        raise ValueError("the git source needs NIXERY_PKGS_REPO (--pkgs-repo)")
    return GitSource(
        runtime.config.pkgs_repo,
        runtime.processes,
        runtime.config.nix_timeout,
        runtime.reactor,
        runtime.config.git_refs_ttl,
    )


def _channel_source(runtime: Runtime) -> PackageSource:
    if not runtime.config.channel:
        raise ValueError("the channel source needs NIXERY_CHANNEL (--channel)")
    return ChannelSource(
        runtime.config.channel, runtime.config.channel_url, runtime.config.accept_any_tag
    )


@hookimpl
def nixeryd_package_sources() -> list[Provider[PackageSource]]:
    return [
        Provider("path", "a package set in a local directory (NIXERY_PKGS_PATH)", _path_source),
        Provider("git", "a package set in a git repository (NIXERY_PKGS_REPO)", _git_source),
        Provider("channel", "a nixpkgs channel or commit (NIXERY_CHANNEL)", _channel_source),
    ]
