"""Platform fan-out: an image name without a platform prefix stands for one image per
configured platform, built concurrently and listed by an index.

A platform that cannot be built (no builder for its Nix system, a package
missing there) is left out of the index, and tried again after
:data:`PLATFORM_RETRY_SECONDS`; only when no platform builds is the pull an
error.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from nixeryd.errors import RegistryError, first_failure
from nixeryd.imagename import ImageName, ImageTarget
from nixeryd.images import BuiltImage, TaggedImage
from nixeryd.manifeststore import LOCAL_MANIFEST_CACHE_SIZE, ManifestStore
from nixeryd.platform import Platform

#: How long a platform that failed to build is left out of its image's index
#: before it is tried again: a missing builder does not appear within seconds,
#: and every pull would otherwise pay for the failing evaluation.
PLATFORM_RETRY_SECONDS = 300.0

#: Builds one platform's image of a tag (:meth:`nixeryd.builder.ImageBuilder.image`).
BuildOne = Callable[[ImageTarget, str], Deferred[BuiltImage]]


class PlatformFanOut:
    """What ``image:tag`` stands for on the configured platforms."""

    log = Logger()

    def __init__(
        self,
        build_one: BuildOne,
        manifests: ManifestStore,
        platforms: Sequence[Platform],
        clock: Any,
    ) -> None:
        self._build_one = build_one
        self._manifests = manifests
        self._platforms = tuple(platforms)
        self._clock = clock
        #: (platform image, tag) -> until when it is left out of its index; oldest first.
        self._unbuildable: OrderedDict[tuple[str, str], float] = OrderedDict()

    @property
    def platforms(self) -> tuple[Platform, ...]:
        """The configured platforms, in order."""
        return self._platforms

    @inlineCallbacks
    def tagged(self, image: ImageName, tag: str) -> Any:
        """What ``image:tag`` stands for (a :class:`TaggedImage`), built if needed."""
        targets = image.targets(self._platforms)
        if len(targets) == 1:
            built = yield self._build_one(targets[0], tag)
            return TaggedImage([built], {}, pinned=built.pinned)
        now = self._clock.seconds()
        tried = [
            target
            for target in targets
            if self._unbuildable.get((target.canonical, tag), 0.0) <= now
        ] or targets
        results = yield gatherResults(
            [self._build_one(target, tag).addErrback(_registry_error) for target in tried],
            consumeErrors=True,
        ).addErrback(first_failure)
        images = [result for result in results if isinstance(result, BuiltImage)]
        if not images:
            raise next(result for result in results if isinstance(result, RegistryError))
        for target, result in zip(tried, results, strict=True):
            self._note(target, tag, result, now)
        indexes = yield self._manifests.indexes(images)
        pinned = len(images) == len(targets) and all(image.pinned for image in images)
        return TaggedImage(images, indexes, pinned=pinned)

    def forget_blob(self, digest: str) -> bool:
        """A blob was found missing or damaged: rebuild the images naming it when next
        asked; whether any image in memory named it."""
        return self._manifests.forget_blob(digest)

    def _note(
        self, target: ImageTarget, tag: str, result: BuiltImage | RegistryError, now: float
    ) -> None:
        """Leave a platform that failed out of its index for a while; forget one that built."""
        key = (target.canonical, tag)
        self._unbuildable.pop(key, None)
        if not isinstance(result, RegistryError):
            return
        self._unbuildable[key] = now + PLATFORM_RETRY_SECONDS
        while len(self._unbuildable) > LOCAL_MANIFEST_CACHE_SIZE:
            self._unbuildable.popitem(last=False)
        self.log.warn(
            "{image}:{tag}: left out of the index for {seconds:g} s: {reason}",
            image=target.canonical,
            tag=tag,
            seconds=PLATFORM_RETRY_SECONDS,
            reason=result.message,
        )


def _registry_error(failure: Failure) -> RegistryError:
    """A build's registry error as a value, so that one platform's failure does not fail
    the others; anything else is a fault and stays a failure."""
    failure.trap(RegistryError)
    return cast(RegistryError, failure.value)
