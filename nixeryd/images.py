"""What the build stages hand each other and the registry serves: manifests and images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nixeryd.manifest import Choice
from nixeryd.platform import Platform


@dataclass(frozen=True)
class StoredManifest:
    """A manifest as served: its bytes, digest and media type."""

    media_type: str
    digest: str
    data: bytes


@dataclass(frozen=True)
class BuiltImage:
    """One platform's image: its manifests, one per form (``docker``, ``oci``)."""

    platform: Platform
    manifests: Mapping[str, StoredManifest]
    #: The tag itself names the source's content (a commit): every later request for it
    #: gets the same answer. A branch, a git tag or ``latest`` can move, so is not pinned.
    pinned: bool = False


@dataclass(frozen=True)
class TaggedImage:
    """What an image name and tag stand for: one image per platform that could be built,
    the default platform's first, and their indexes (one per form) when the name
    left the platform to the configuration and several are configured."""

    images: Sequence[BuiltImage]
    indexes: Mapping[str, StoredManifest]
    #: Every platform built, each from a pinned source: the answers may be cached.
    pinned: bool = False

    def answer(self, choice: Choice) -> StoredManifest:
        """The manifest or index a client gets, per :func:`nixeryd.manifest.choose`."""
        if choice.index and self.indexes:
            return self.indexes[choice.form]
        return self.images[0].manifests[choice.form]
