"""The image builder: from an image name and tag to stored layers and manifests.

The stages, each in its own module, in the order data flows through them:
package source (:mod:`nixeryd.sources`) -> Nix evaluation, build and closure
query (:mod:`nixeryd.nixbuild`) -> layering (:mod:`nixeryd.layering`) ->
layer blobs (:mod:`nixeryd.tarball`, :mod:`nixeryd.forest`) -> config and
manifests (:mod:`nixeryd.manifest`) -> storage (:mod:`nixeryd.storage`).

Caches, cheapest first:

* manifests of pinned sources (a git commit, a channel commit), keyed by the
  image and the pin: served without running Nix at all;
* manifests keyed by the evaluated output paths: a moving source (a local
  path, a branch) costs one evaluation, and nothing more when it did not
  change, so a HEAD after a GET does not rebuild;
* layers, keyed by their store paths (``builds/<key>``), shared by images;
* failures of Nix (an evaluation error, a missing package, a failed build),
  answered again without running Nix: for good for a pinned source (the same
  commit fails the same way), for ``failure_ttl`` seconds for a moving one, so
  that a HEAD after a failed GET and a client's retries do not rebuild. A
  timeout is not remembered: a busy machine or a slow download may pass.

A whole image is bounded by ``build_timeout`` (``NIXERYD_BUILD_TIMEOUT``): when
it passes, the build's Deferred is cancelled, which kills the Nix command it
is waiting for (see :mod:`nixeryd.process`).

An image name without a platform prefix stands for one image per configured
platform, built concurrently and listed by an index; a platform that cannot be
built (no builder for its Nix system, a package missing there) is left out of
the index, and tried again after :data:`PLATFORM_RETRY_SECONDS`.

Concurrent requests for one image share one build; concurrent builds that
share a layer write it once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import IO, Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, FirstError, gatherResults, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from nixeryd.closure import ClosureGraph
from nixeryd.compression import Compression
from nixeryd.errors import BuildFailed, BuildTimedOut, RegistryError
from nixeryd.forest import symlink_forest
from nixeryd.imagename import ImageName, ImageTarget
from nixeryd.layering import Layer, LayeringStrategy
from nixeryd.manifest import (
    OCI_CONFIG,
    Choice,
    IndexEntry,
    LayerDescriptor,
    forms_for,
    image_config,
    image_index,
    image_manifest,
    index_forms_for,
    layer_media_type,
)
from nixeryd.nixbuild import Nix, ResolvedPackage
from nixeryd.platform import Platform
from nixeryd.popularity import Popularity, PopularitySource
from nixeryd.singleflight import SingleFlight
from nixeryd.sources import PackageSource, SourceRef
from nixeryd.storage import Storage
from nixeryd.tarball import (
    DEFAULT_COMPRESSION,
    LayerDigests,
    write_store_layer,
    write_tree_layer,
)

#: Part of every cache key: bump it when the same inputs would give different bytes.
FORMAT_VERSION = "nixeryd-1"

#: Manifests of pinned images kept in memory, in front of storage.
LOCAL_MANIFEST_CACHE_SIZE = 1024

#: Build failures the index page lists, newest first.
RECENT_ERRORS = 20

#: How long a platform that failed to build is left out of its image's index
#: before it is tried again: a missing builder does not appear within seconds,
#: and every pull would otherwise pay for the failing evaluation.
PLATFORM_RETRY_SECONDS = 300.0


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


@dataclass(frozen=True)
class BuildError:
    """A failed build, kept for the index page (a registry error cannot reach ``docker pull``
    when the client hides it), with what Nix printed for it (None when Nix did not run)."""

    number: int
    when: float
    image: str
    tag: str
    message: str
    log: str | None


class ImageBuilder:
    """Builds images on demand and caches what it can."""

    log = Logger()

    def __init__(
        self,
        *,
        nix: Nix,
        source: PackageSource,
        storage: Storage,
        layering: LayeringStrategy,
        layering_name: str,
        layer_budget: int,
        platforms: Sequence[Platform],
        popularity: PopularitySource,
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]],
        clock: Any,
        on_built: Callable[[str, str, str, float], None] = lambda *_: None,
        compression: Compression = DEFAULT_COMPRESSION,
        write_in_thread: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
        compress_pool: Executor | None = None,
        failure_ttl: float = 60.0,
        build_timeout: float = 3600.0,
    ) -> None:
        """``write_in_thread`` runs layer writes (``run_in_thread`` if None): a pool as
        large as the cores, apart from the pool for short blocking calls;
        ``compress_pool`` compresses blocks of each layer in parallel, so that one
        large layer uses every core too; ``failure_ttl`` is how long a moving source's
        failed image is answered from memory (0: never); ``build_timeout`` bounds
        one image's evaluation, build and layers."""
        self._nix = nix
        self._source = source
        self._storage = storage
        self._layering = layering
        self._layering_name = layering_name
        self._budget = layer_budget
        self._platforms = tuple(platforms)
        self._popularity = popularity
        self._run_in_thread = run_in_thread
        self._clock = clock
        self._on_built = on_built
        self._compression = compression
        self._write_in_thread = write_in_thread or run_in_thread
        self._compress_pool = compress_pool
        self._images: SingleFlight[BuiltImage] = SingleFlight()
        self._layers: SingleFlight[LayerDescriptor] = SingleFlight()
        self._local: OrderedDict[str, BuiltImage] = OrderedDict()
        self._indexes: OrderedDict[tuple[str, ...], Mapping[str, StoredManifest]] = OrderedDict()
        #: (platform image, tag) -> until when it is left out of its index; oldest first.
        self._unbuildable: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.recent_errors: deque[BuildError] = deque(maxlen=RECENT_ERRORS)
        self._errors_recorded = 0
        self._failure_ttl = failure_ttl
        self._build_timeout = build_timeout
        #: (kind, image, tag or pin, ...) -> (until when, the error answered); oldest first.
        self._failures: OrderedDict[tuple[str, ...], tuple[float, RegistryError]] = OrderedDict()

    @inlineCallbacks
    def tagged(self, image: ImageName, tag: str) -> Any:
        """What ``image:tag`` stands for (a :class:`TaggedImage`), built if needed."""
        targets = image.targets(self._platforms)
        if len(targets) == 1:
            built = yield self.image(targets[0], tag)
            return TaggedImage([built], {}, pinned=built.pinned)
        now = self._clock.seconds()
        tried = [
            target
            for target in targets
            if self._unbuildable.get((target.canonical, tag), 0.0) <= now
        ] or targets
        results = yield gatherResults(
            [self.image(target, tag).addErrback(_registry_error) for target in tried],
            consumeErrors=True,
        ).addErrback(_first_error)
        images = [result for result in results if isinstance(result, BuiltImage)]
        if not images:
            raise next(result for result in results if isinstance(result, RegistryError))
        for target, result in zip(tried, results, strict=True):
            key = (target.canonical, tag)
            self._unbuildable.pop(key, None)
            if isinstance(result, RegistryError):
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
        indexes = yield self._indexes_of(images)
        pinned = len(images) == len(targets) and all(image.pinned for image in images)
        return TaggedImage(images, indexes, pinned=pinned)

    @inlineCallbacks
    def _indexes_of(self, images: Sequence[BuiltImage]) -> Any:
        key = tuple(image.manifests["docker"].digest for image in images)
        if key in self._indexes:
            self._indexes.move_to_end(key)
            return self._indexes[key]
        indexes = {}
        for form, media_type in index_forms_for(self._compression.format).items():
            entries = [
                IndexEntry(
                    image.platform,
                    image.manifests[form].media_type,
                    image.manifests[form].digest,
                    len(image.manifests[form].data),
                )
                for image in images
            ]
            data = image_index(form, entries, layer_format=self._compression.format)
            info = yield self._storage.put_blob(data, media_type)
            indexes[form] = StoredManifest(media_type, info.digest, data)
        # The record is what keeps the index blobs from garbage collection.
        record_key = hashlib.sha256("\n".join(key).encode()).hexdigest()
        record = {form: index.digest for form, index in indexes.items()}
        yield self._storage.put_record(f"indexes/{record_key}", json.dumps(record).encode())
        self._indexes[key] = indexes
        while len(self._indexes) > LOCAL_MANIFEST_CACHE_SIZE:
            self._indexes.popitem(last=False)
        return indexes

    def image(self, image: ImageTarget, tag: str) -> Deferred[BuiltImage]:
        """One platform's image, built if needed; concurrent callers share one build."""
        return self._images.run((image.canonical, tag), lambda: self._image(image, tag))

    @inlineCallbacks
    def _image(self, image: ImageTarget, tag: str) -> Any:
        source: SourceRef = yield self._source.resolve(tag)
        popularity: Popularity = yield self._popularity.get()
        pin_key = None
        if source.pin is not None:
            pin_key = self._manifest_key("pin", image.canonical, source.pin, popularity)
            cached = yield self._cached_manifests(pin_key, image.platform)
            if cached is not None:
                return replace(cached, pinned=source.pin == tag)
        failure_key = self._failure_key(image, tag, source)
        remembered = self._failures.get(failure_key)
        if remembered is not None and remembered[0] > self._clock.seconds():
            self._failures.move_to_end(failure_key)
            raise remembered[1]
        try:
            built = yield self._bounded(self._built(image, tag, source, popularity), image)
        except RegistryError as error:
            self._record_error(image, tag, error)
            if not isinstance(error, BuildTimedOut):
                self._remember_failure(failure_key, source, error)
            raise
        if pin_key is not None:
            yield self._remember(pin_key, built)
            return replace(built, pinned=source.pin == tag)
        return built

    def _bounded(self, build: Deferred[BuiltImage], image: ImageTarget) -> Deferred[BuiltImage]:
        """``build``, cancelled (and its Nix killed) once it has run ``build_timeout``."""

        def timed_out(failure: Failure) -> Failure:
            if failure.check(defer.TimeoutError):
                raise BuildTimedOut(
                    f"{image.canonical} took longer than the build timeout "
                    f"(NIXERYD_BUILD_TIMEOUT, {self._build_timeout:g} s) and was stopped; try "
                    "again, or ask the operator to raise NIXERYD_BUILD_TIMEOUT"
                )
            return failure

        return build.addTimeout(self._build_timeout, self._clock).addErrback(timed_out)

    def _record_error(self, image: ImageTarget, tag: str, error: RegistryError) -> None:
        """Keep a new build failure, and what Nix printed for it, for the index page."""
        self._errors_recorded += 1
        build_log = self._nix.build_log(image.canonical)
        self.recent_errors.append(
            BuildError(
                self._errors_recorded,
                time.time(),
                image.canonical,
                tag,
                error.message,
                build_log.text() if build_log is not None else None,
            )
        )

    def recent_error(self, number: int) -> BuildError | None:
        """The recent build failure numbered ``number``, if it is still kept."""
        return next((error for error in self.recent_errors if error.number == number), None)

    def _failure_key(self, image: ImageTarget, tag: str, source: SourceRef) -> tuple[str, ...]:
        """A pinned source's failure is the pin's (any tag naming it); a moving one's, the tag's."""
        if source.pin is not None:
            return ("pin", image.canonical, source.pin, self._nix.evaluation_identity)
        return ("tag", image.canonical, tag)

    def _remember_failure(
        self, key: tuple[str, ...], source: SourceRef, error: RegistryError
    ) -> None:
        """Keep a Nix failure of the image, to answer it again without running Nix."""
        if source.pin is not None:
            until = float("inf")
        elif self._failure_ttl > 0:
            until = self._clock.seconds() + self._failure_ttl
        else:
            return
        self._failures[key] = (until, error)
        self._failures.move_to_end(key)
        while len(self._failures) > LOCAL_MANIFEST_CACHE_SIZE:
            self._failures.popitem(last=False)

    @inlineCallbacks
    def _built(
        self, image: ImageTarget, tag: str, source: SourceRef, popularity: Popularity
    ) -> Any:
        """The image evaluated from ``source``, built unless its outputs were built before."""
        packages: list[ResolvedPackage] = yield self._nix.resolve(source, image)
        outputs = sorted(package.out_path for package in packages)
        eval_key = self._manifest_key("eval", image.canonical, "\n".join(outputs), popularity)
        built = yield self._cached_manifests(eval_key, image.platform)
        if built is None:
            started = self._clock.seconds()
            built = yield self._build(image, packages, popularity)
            yield self._remember(eval_key, built)
            seconds = self._clock.seconds() - started
            self.log.info(
                "built {image}:{tag} in {seconds:.1f}s",
                image=image.canonical,
                tag=tag,
                seconds=seconds,
            )
            self._on_built(image.canonical, tag, built.manifests["docker"].digest, seconds)
        return built

    def _manifest_key(self, kind: str, image: str, identity: str, popularity: Popularity) -> str:
        parts = [
            FORMAT_VERSION,
            kind,
            image,
            identity,
            self._layering_name,
            str(self._budget),
            popularity.fingerprint,
            self._compression.key,
        ]
        if kind == "pin":
            # The pin names the source; the nixpkgs configuration can change what it gives.
            parts.append(self._nix.evaluation_identity)
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    @inlineCallbacks
    def _build(
        self, image: ImageTarget, packages: Sequence[ResolvedPackage], popularity: Popularity
    ) -> Any:
        timings: dict[str, float] = {}
        mark = self._clock.seconds()

        def lap(step: str) -> None:
            nonlocal mark
            now = self._clock.seconds()
            timings[step] = now - mark
            mark = now

        gc_roots = yield self._nix.realise(packages, image)
        try:
            lap("realise")
            closure: ClosureGraph = yield self._nix.closure(packages, image)
            lap("closure")
            # One layer of the budget is the symlink forest's.
            layers: list[Layer] = yield self._run_in_thread(
                lambda: self._layering.group(closure, popularity, self._budget - 1)
            )
            self._check_layering(closure, layers)
            lap("layering")
            roots = [package.out_path for package in packages]
            descriptors: list[LayerDescriptor] = yield gatherResults(
                [self._store_layer(layer) for layer in layers] + [self._forest_layer(roots)],
                consumeErrors=True,
            ).addErrback(_first_error)
            lap("layers")
            config = image_config(
                image.platform, descriptors, (package.name for package in packages)
            )
            config_info = yield self._storage.put_blob(config, OCI_CONFIG)
            manifests = {}
            layer_format = self._compression.format
            for form, (media_type, _, _) in forms_for(layer_format).items():
                data = image_manifest(
                    form,
                    config_info.digest,
                    config_info.size,
                    descriptors,
                    layer_format=layer_format,
                )
                info = yield self._storage.put_blob(data, media_type)
                manifests[form] = StoredManifest(media_type, info.digest, data)
            lap("manifest")
            self.log.info(
                "{image}: {paths} store paths in {layers} layers; {timings}",
                image=image.canonical,
                paths=len(closure.paths),
                layers=len(descriptors),
                timings=", ".join(f"{step} {seconds:.2f}s" for step, seconds in timings.items()),
            )
            return BuiltImage(image.platform, manifests)
        finally:
            self._nix.release(gc_roots)

    def _check_layering(self, closure: ClosureGraph, layers: Sequence[Layer]) -> None:
        """Refuse a plugin's layering that loses or repeats paths or breaks the budget."""
        placed = [path for layer in layers for path in layer.paths]
        if sorted(placed) != sorted(closure.paths) or len(layers) > self._budget - 1:
            raise BuildFailed(
                f"layering strategy {self._layering_name!r} returned {len(layers)} layers holding "
                f"{len(placed)} paths for a closure of {len(closure.paths)} paths and a budget "
                f"of {self._budget - 1}; this is a bug in the strategy"
            )

    def _store_layer(self, layer: Layer) -> Deferred[LayerDescriptor]:
        paths = layer.paths
        return self._layer(
            layer.key,
            lambda out: write_store_layer(
                paths, out, compression=self._compression, executor=self._compress_pool
            ),
        )

    def _forest_layer(self, roots: Sequence[str]) -> Deferred[LayerDescriptor]:
        key = hashlib.sha256(("symlink-forest\n" + "\n".join(roots)).encode()).hexdigest()

        def write(out: IO[bytes]) -> LayerDigests:
            entries = symlink_forest(roots)
            return write_tree_layer(
                entries, out, compression=self._compression, executor=self._compress_pool
            )

        return self._layer(key, write)

    def _layer(
        self, key: str, write: Callable[[IO[bytes]], LayerDigests]
    ) -> Deferred[LayerDescriptor]:
        """A layer from the cache, or written once however many builds want it now."""
        return self._layers.run(key, lambda: self._cached_or_written_layer(key, write))

    @inlineCallbacks
    def _cached_or_written_layer(self, key: str, write: Callable[[IO[bytes]], LayerDigests]) -> Any:
        # Blob bytes depend on the compressor and level, so the record does too.
        record_name = f"builds/{key}.{self._compression.key}"
        record = yield self._storage.get_record(record_name)
        if record is not None:
            cached = LayerDescriptor(**json.loads(record))
            if (yield self._storage.stat_blob(cached.digest)) is not None:
                return cached
        staged = self._storage.stage_blob()
        try:
            digests: LayerDigests = yield self._write_in_thread(lambda: write(staged.file))
        except BaseException:
            staged.discard()
            raise
        info = yield staged.commit(digests.digest, layer_media_type(self._compression.format))
        descriptor = LayerDescriptor(digest=info.digest, size=info.size, diff_id=digests.diff_id)
        yield self._storage.put_record(record_name, json.dumps(descriptor.__dict__).encode())
        return descriptor

    @inlineCallbacks
    def _cached_manifests(self, key: str, platform: Platform) -> Any:
        if key in self._local:
            self._local.move_to_end(key)
            return self._local[key]
        record = yield self._storage.get_record(f"manifests/{key}")
        if record is None:
            return None
        manifests = {}
        for form, digest in json.loads(record).items():
            blob = yield self._storage.read_blob(digest)
            forms = forms_for(self._compression.format)
            if blob is None or form not in forms:
                return None
            manifests[form] = StoredManifest(forms[form][0], digest, blob.data)
        built = BuiltImage(platform, manifests)
        self._keep_local(key, built)
        return built

    @inlineCallbacks
    def _remember(self, key: str, built: BuiltImage) -> Any:
        record = {form: manifest.digest for form, manifest in built.manifests.items()}
        yield self._storage.put_record(f"manifests/{key}", json.dumps(record).encode())
        self._keep_local(key, built)

    def _keep_local(self, key: str, built: BuiltImage) -> None:
        self._local[key] = built
        self._local.move_to_end(key)
        while len(self._local) > LOCAL_MANIFEST_CACHE_SIZE:
            self._local.popitem(last=False)


def _registry_error(failure: Failure) -> RegistryError:
    """A build's registry error as a value, so that one platform's failure does not fail
    the others; anything else is a fault and stays a failure."""
    failure.trap(RegistryError)
    return cast(RegistryError, failure.value)


def _first_error(failure: Failure) -> Failure:
    """The failure of the first layer that failed, rather than gatherResults' wrapper."""
    wrapper = cast(FirstError, failure.value)
    return wrapper.subFailure
