"""The image builder: from one platform's image name and tag to stored layers and manifests.

The stages, each in its own module, in the order data flows through them:
package source (:mod:`nixeryd.sources`) -> Nix evaluation, build and closure
query (:mod:`nixeryd.nixbuild`) -> layering (:mod:`nixeryd.layering`) ->
layer blobs (:mod:`nixeryd.layerstore`) -> config and manifests
(:mod:`nixeryd.manifeststore`) -> storage (:mod:`nixeryd.storage`).
:mod:`nixeryd.fanout` turns a name without a platform into one build per
configured platform.

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
  timeout is not remembered: a busy machine or a slow download may pass;
  nor is a storage failure (a 5xx, such as an object store being down).

A whole image is bounded by ``build_timeout`` (``NIXERYD_BUILD_TIMEOUT``): when
it passes, the build's Deferred is cancelled, which kills the Nix command it
is waiting for (see :mod:`nixeryd.process`).

Concurrent requests for one image share one build; concurrent builds that
share a layer write it once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from nixeryd.builds import Build, BuildHub, LayerInfo
from nixeryd.closure import ClosureGraph
from nixeryd.errors import (
    BuildFailed,
    BuildTimedOut,
    ImageTooLarge,
    ManifestUnknown,
    RegistryError,
    TooManyRequests,
    first_failure,
)
from nixeryd.imagename import ImageTarget
from nixeryd.images import BuiltImage
from nixeryd.layering import Layer, LayeringStrategy
from nixeryd.layerstore import LayerStore
from nixeryd.manifest import LayerDescriptor
from nixeryd.manifeststore import LOCAL_MANIFEST_CACHE_SIZE, ManifestStore
from nixeryd.metrics import Metrics
from nixeryd.nixbuild import Nix, ResolvedPackage
from nixeryd.popularity import Popularity, PopularitySource
from nixeryd.runtime import ThreadRunner
from nixeryd.singleflight import SingleFlight
from nixeryd.sources import PackageSource, SourceRef

#: Part of every cache key: bump it when the same inputs would give different bytes.
FORMAT_VERSION = "nixeryd-1"

#: Build failures the index page lists, newest first.
RECENT_ERRORS = 20


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
        layering: LayeringStrategy,
        layering_name: str,
        layer_budget: int,
        popularity: PopularitySource,
        layers: LayerStore,
        manifests: ManifestStore,
        run_in_thread: ThreadRunner,
        clock: Any,
        on_built: Callable[[str, str, str, float], None] = lambda *_: None,
        failure_ttl: float = 60.0,
        build_timeout: float = 3600.0,
        max_closure_bytes: int = 0,
        max_layer_bytes: int = 0,
        metrics: Metrics,
        builds: BuildHub | None = None,
    ) -> None:
        """``failure_ttl`` is how long a moving source's failed image is answered from
        memory (0: never); ``build_timeout`` bounds one image's evaluation, build and
        layers. ``max_closure_bytes`` and ``max_layer_bytes`` (0: no limit) bound the
        NAR bytes of the image's closure and of each layer, checked before any layer
        is written, so that no storage goes to an image that is refused. What becomes
        of each image that reaches Nix, and each stage's time, is counted in ``metrics``.
        Each image resolved, and its stages, go to ``builds`` for the web pages (a hub
        of its own when not given)."""
        self._nix = nix
        self._source = source
        self._layering = layering
        self._layering_name = layering_name
        self._budget = layer_budget
        self._popularity = popularity
        self._layers = layers
        self._manifests = manifests
        self._run_in_thread = run_in_thread
        self._clock = clock
        self._on_built = on_built
        self._images: SingleFlight[BuiltImage] = SingleFlight()
        self.recent_errors: deque[BuildError] = deque(maxlen=RECENT_ERRORS)
        self._errors_recorded = 0
        self._failure_ttl = failure_ttl
        self._build_timeout = build_timeout
        self._max_closure_bytes = max_closure_bytes
        self._max_layer_bytes = max_layer_bytes
        self._metrics = metrics
        self.builds = builds if builds is not None else BuildHub()
        #: (kind, image, tag or pin, ...) -> (until when, the error answered); oldest first.
        self._failures: OrderedDict[tuple[str, ...], tuple[float, RegistryError]] = OrderedDict()

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
            cached = yield self._manifests.cached(
                pin_key, image.platform, image=image.canonical, tag=tag, kind="pin"
            )
            if cached is not None:
                self._note_cached(image, tag, cached)
                return replace(cached, pinned=source.pin == tag)
        failure_key = self._failure_key(image, tag, source)
        remembered = self._failures.get(failure_key)
        if remembered is not None and remembered[0] > self._clock.seconds():
            self._failures.move_to_end(failure_key)
            self._metrics.cache("failure", hit=True)
            raise remembered[1]
        build = self.builds.start(image.canonical, tag, image.platform.name)
        self.builds.event(build, "nixeryd", f"building {image.canonical}:{tag} ({source.src_type})")
        # Where an operator watching the daemon's log can follow the build (docs/web.md).
        self.log.info(
            "{image}:{tag}: build #{number}, its log live at /builds/{number}",
            image=image.canonical,
            tag=tag,
            number=build.id,
        )
        try:
            built = yield self._bounded(self._built(image, tag, source, popularity, build), image)
        except TooManyRequests as error:
            self._metrics.build("refused")
            self.builds.finish(build, "failed", error=error.as_json()["errors"][0])
            raise  # not the image's failure: the next pull may be admitted
        except RegistryError as error:
            self.builds.finish(build, "failed", error=error.as_json()["errors"][0])
            self._metrics.build(_result(error))
            self._record_error(image, tag, error)
            # Nix's verdict on the source is remembered; a timeout, or a 5xx (storage
            # failing: the registry's own trouble), may pass, so is not.
            if not isinstance(error, BuildTimedOut) and error.status < 500:
                self._remember_failure(failure_key, source, error)
            raise
        except BaseException:
            error_json = {"code": "UNKNOWN", "message": "internal error; see the daemon's log"}
            self.builds.finish(build, "failed", error=error_json)
            raise
        if pin_key is not None:
            yield self._manifests.remember(
                pin_key, built, image=image.canonical, tag=tag, kind="pin"
            )
            return replace(built, pinned=source.pin == tag)
        return built

    def _note_cached(self, image: ImageTarget, tag: str, cached: BuiltImage) -> None:
        """An image answered from a cache, for its page: once per manifest, not per pull."""
        digest = cached.manifests["docker"].digest
        latest = self.builds.latest(image.canonical, tag)
        if latest is None or latest.manifest != digest:
            build = self.builds.start(image.canonical, tag, image.platform.name)
            self.builds.finish(build, "cached", manifest=digest, layers=_layers_of(cached))

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
        self,
        image: ImageTarget,
        tag: str,
        source: SourceRef,
        popularity: Popularity,
        build: Build,
    ) -> Any:
        """The image evaluated from ``source``, built unless its outputs were built before."""
        evaluating = self._clock.seconds()
        packages: list[ResolvedPackage] = yield self._nix.resolve(source, image)
        seconds = self._clock.seconds() - evaluating
        self._metrics.stage("evaluation", seconds)
        self.builds.event(build, "nixeryd", f"evaluation done in {seconds:.2f} s")
        outputs = sorted(package.out_path for package in packages)
        eval_key = self._manifest_key("eval", image.canonical, "\n".join(outputs), popularity)
        built = yield self._manifests.cached(
            eval_key, image.platform, image=image.canonical, tag=tag, kind="eval"
        )
        if built is None:
            started = self._clock.seconds()
            built, layers = yield self._build(image, packages, popularity, build)
            yield self._manifests.remember(
                eval_key, built, image=image.canonical, tag=tag, kind="eval"
            )
            seconds = self._clock.seconds() - started
            self._metrics.build("built")
            self.log.info(
                "built {image}:{tag} in {seconds:.1f}s",
                image=image.canonical,
                tag=tag,
                seconds=seconds,
            )
            self._on_built(image.canonical, tag, built.manifests["docker"].digest, seconds)
            self.builds.finish(
                build, "built", manifest=built.manifests["docker"].digest, layers=layers
            )
        else:
            self.builds.event(build, "nixeryd", "the evaluated outputs were built before")
            self.builds.finish(
                build, "cached", manifest=built.manifests["docker"].digest, layers=_layers_of(built)
            )
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
            self._layers.compression.key,
        ]
        if kind == "pin":
            # The pin names the source; the nixpkgs configuration can change what it gives.
            parts.append(self._nix.evaluation_identity)
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    @inlineCallbacks
    def _build(
        self,
        image: ImageTarget,
        packages: Sequence[ResolvedPackage],
        popularity: Popularity,
        build: Build,
    ) -> Any:
        """The image built and stored, and its layers for the web pages."""
        timings: dict[str, float] = {}
        mark = self._clock.seconds()

        def lap(step: str) -> None:
            nonlocal mark
            now = self._clock.seconds()
            timings[step] = now - mark
            self._metrics.stage(step, now - mark)
            self.builds.event(build, "nixeryd", f"{step} done in {now - mark:.2f} s")
            mark = now

        gc_roots = yield self._nix.realise(packages, image)
        try:
            lap("realise")
            closure: ClosureGraph = yield self._nix.closure(packages, image)
            self._check_closure_size(image, closure)
            lap("closure")
            # One layer of the budget is the symlink forest's.
            layers: list[Layer] = yield self._run_in_thread(
                lambda: self._layering.group(closure, popularity, self._budget - 1)
            )
            self._check_layering(closure, layers)
            self._check_layer_sizes(image, closure, layers)
            lap("layering")
            roots = [package.out_path for package in packages]
            descriptors: list[LayerDescriptor] = yield gatherResults(
                [self._layers.store_paths(layer) for layer in layers]
                + [self._layers.symlink_forest(roots)],
                consumeErrors=True,
            ).addErrback(first_failure)
            lap("layers")
            built = yield self._manifests.write(
                image.platform, descriptors, (package.name for package in packages)
            )
            lap("manifest")
            self.log.info(
                "{image}: {paths} store paths in {layers} layers; {timings}",
                image=image.canonical,
                paths=len(closure.paths),
                layers=len(descriptors),
                timings=", ".join(f"{step} {seconds:.2f}s" for step, seconds in timings.items()),
            )
            stored = [*(layer.paths for layer in layers), ()]  # the symlink forest's last
            infos = [
                LayerInfo(descriptor.digest, descriptor.size, paths)
                for descriptor, paths in zip(descriptors, stored, strict=True)
            ]
            return built, infos
        finally:
            self._nix.release(gc_roots)

    def _check_closure_size(self, image: ImageTarget, closure: ClosureGraph) -> None:
        size = sum(path.nar_size for path in closure.paths.values())
        if self._max_closure_bytes and size > self._max_closure_bytes:
            raise ImageTooLarge(
                f"{image.canonical} is {_mib(size)} of store paths, more than this registry "
                f"builds (NIXERYD_MAX_CLOSURE_SIZE, {_mib(self._max_closure_bytes)}); ask for "
                "fewer packages, or ask the operator to raise NIXERYD_MAX_CLOSURE_SIZE",
                detail={"closureBytes": size, "limitBytes": self._max_closure_bytes},
            )

    def _check_layer_sizes(
        self, image: ImageTarget, closure: ClosureGraph, layers: Sequence[Layer]
    ) -> None:
        if not self._max_layer_bytes:
            return
        for layer in layers:
            size = sum(closure.paths[path].nar_size for path in layer.paths)
            if size > self._max_layer_bytes:
                largest = max(layer.paths, key=lambda path: closure.paths[path].nar_size)
                raise ImageTooLarge(
                    f"a layer of {image.canonical} would be {_mib(size)} (its largest store "
                    f"path: {largest}), more than this registry writes "
                    f"(NIXERYD_MAX_LAYER_SIZE, {_mib(self._max_layer_bytes)}); ask the "
                    "operator to raise NIXERYD_MAX_LAYER_SIZE",
                    detail={"layerBytes": size, "limitBytes": self._max_layer_bytes},
                )

    def _check_layering(self, closure: ClosureGraph, layers: Sequence[Layer]) -> None:
        """Refuse a plugin's layering that loses or repeats paths or breaks the budget."""
        placed = [path for layer in layers for path in layer.paths]
        if sorted(placed) != sorted(closure.paths) or len(layers) > self._budget - 1:
            raise BuildFailed(
                f"layering strategy {self._layering_name!r} returned {len(layers)} layers holding "
                f"{len(placed)} paths for a closure of {len(closure.paths)} paths and a budget "
                f"of {self._budget - 1}; this is a bug in the strategy"
            )


def _layers_of(image: BuiltImage) -> list[LayerInfo]:
    """The layers an image's docker manifest lists (their store paths are not in it)."""
    manifest = json.loads(image.manifests["docker"].data)
    return [LayerInfo(layer["digest"], layer["size"], None) for layer in manifest["layers"]]


def _result(error: RegistryError) -> str:
    """What became of an image that failed with ``error``, as :mod:`nixeryd.metrics`
    counts it: packages not in the package set, Nix's failure, a timeout, a size
    limit, or the registry's own trouble (a 5xx: storage failing)."""
    if isinstance(error, ManifestUnknown):
        return "not_found"
    if isinstance(error, BuildTimedOut):
        return "timed_out"
    if isinstance(error, ImageTooLarge):
        return "too_large"
    return "failed" if error.status < 500 else "error"


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"
