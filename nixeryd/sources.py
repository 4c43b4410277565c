"""The package source contract: where the package set comes from, per image tag.

A source turns an image tag into a :class:`SourceRef`, the arguments the Nix
expression (``nix/nixeryd.nix``) needs to load the package set, and says
whether that tag names immutable content (a *pin*), which makes the image's
manifest cacheable. Sources are plugins (see :mod:`nixeryd.hookspecs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred

#: How the Nix expression can load a package set.
SOURCE_TYPES = ("path", "git", "tarball")


@dataclass(frozen=True)
class SourceRef:
    """The package set for one tag, as the Nix expression loads it.

    ``src_type`` is one of :data:`SOURCE_TYPES`; ``src_args`` its arguments
    (``{"path": ...}``, ``{"url", "ref" | "rev"}``, ``{"url", "sha256"?}``).
    ``pin`` is set when the tag names content that never changes (a git
    commit, a channel commit); it keys the manifest cache.
    """

    src_type: str
    src_args: Mapping[str, str] = field(default_factory=dict)
    pin: str | None = None

    def __post_init__(self) -> None:
        if self.src_type not in SOURCE_TYPES:
            raise ValueError(f"unknown source type {self.src_type!r}; use one of {SOURCE_TYPES}")


class PackageSource(Protocol):
    """A package set, addressed by image tag."""

    def resolve(self, tag: str) -> Deferred[SourceRef]:
        """The package set for ``tag``; fails with :class:`nixeryd.errors.ManifestUnknown`
        when the tag names nothing in this source."""
        ...

    def tags(self) -> Deferred[list[str]]:
        """The tags every image of this source can be pulled with."""
        ...
