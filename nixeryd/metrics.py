"""Prometheus metrics: what the daemon does, counted where it happens, scraped at /metrics.

One :class:`Metrics` per daemon, built by the composition root
(:mod:`nixeryd.service`) around a :class:`~prometheus_client.CollectorRegistry`
of its own rather than prometheus_client's global one: tests build many
daemons in one process, and each must count alone. The stages that count
(the HTTP site, the builder, the layer and manifest stores, the evaluators,
storage) are handed it; :class:`MetricsPage` renders it on the reactor, as
any other resource, rather than on prometheus_client's own HTTP server
thread.

Labels are bounded sets: a route template, a method among the few a
registry sees, a status code the registry chose, a build stage, a cache
level, a backend name. None holds an image name, a package name, a digest
or a path, so the number of series does not grow with what clients ask for.
``docs/metrics.md`` lists every metric.

What every request counts is kept in plain Python and made into samples
when scraped (:class:`_HotPath`): about 1 us a request, so that the
in-memory fast path of cached answers (:mod:`nixeryd.site`, 4.4 us
in-process before, 5.5 us now) is counted too.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from nixeryd import __version__
from nixeryd.errors import RegistryError, Unsupported
from nixeryd.storage import Blob, BlobAnswer, BlobInfo, RecordInfo, StagedBlob, Storage

T = TypeVar("T")

#: The route templates requests are counted by.
ROUTES = (
    "manifest", "blob", "tags", "v2", "token", "metrics", "index", "image_page", "build_page",
    "build_events", "search", "other",
)  # fmt: skip
#: Methods counted by name; any other is ``other`` (a client chooses the method).
METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"))
#: Build stages timed, in the order an image goes through them (see nixeryd.builder).
#: Their names are the builder's log's: evaluation (queueing for Nix included), realise
#: (Nix builds), closure (the closure query), layering, layers (layer writes), manifest.
STAGES = ("evaluation", "realise", "closure", "layering", "layers", "manifest")
#: Cache levels, cheapest first: an answer held in memory, an image's manifests in
#: memory, its manifest record in storage, a layer's record (``builds/``), a running
#: evaluator reused, a failure answered again without Nix.
CACHE_LEVELS = ("answers", "manifests", "manifest_record", "layer_record", "evaluator", "failure")
#: What became of an image that got past the caches to Nix.
BUILD_RESULTS = ("built", "not_found", "failed", "timed_out", "too_large", "refused", "error")

#: Request latency buckets, seconds: cached answers take tens of microseconds, a
#: cold build minutes.
REQUEST_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
#: Build stage buckets, seconds: from a cached realisation to an hour-long build.
STAGE_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0,
)  # fmt: skip


def route_of(path: bytes) -> str:
    """The route template of a request path, one of :data:`ROUTES`.

    A repository name may hold any component (``/v2/blobs/manifests/x``), so
    the kind is read from the end, as klein's routes match it.
    """
    if path.startswith(b"/v2/"):
        if path == b"/v2/":
            return "v2"
        if path.endswith(b"/tags/list"):
            return "tags"
        kind = path.rsplit(b"/", 2)
        if len(kind) == 3 and kind[0] != b"/v2":  # a name, then the kind
            if kind[1] == b"manifests":
                return "manifest"
            if kind[1] == b"blobs":
                return "blob"
        return "other"
    if path == b"/v2":
        return "v2"
    if path == b"/":
        return "index"
    if path.startswith(b"/images/") or path == b"/images":
        return "image_page"
    if path == b"/search":
        return "search"
    if path.startswith(b"/builds/"):
        return "build_events" if path.endswith(b"/events") else "build_page"
    if path == b"/metrics":
        return "metrics"
    if path == b"/token":
        return "token"
    return "other"


def method_of(method: bytes) -> str:
    """The method label: its name if it is one a registry sees, else ``other``."""
    return method.decode("ascii") if method in METHODS else "other"


class Metrics:
    """Every metric of one daemon, in its own registry, with a method per event counted."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        info = Gauge(
            "nixeryd_info",
            "The running nixeryd's version (always 1)",
            ["version"],
            registry=registry,
        )
        info.labels(__version__).set(1)
        self._hot = _HotPath()
        registry.register(self._hot)
        self._refused = Counter(
            "nixeryd_http_refused",
            "Requests refused from their headers before routing (408 too slow, 413 and 431 "
            "too large, 405 a body on a push method, 400 TLS on the plain HTTP port)",
            ["code"],
            registry=registry,
        )
        self._builds = Counter(
            "nixeryd_builds",
            "Images that got past the caches to Nix, by what became of them",
            ["result"],
            registry=registry,
        )
        self._stages = Histogram(
            "nixeryd_build_stage_duration_seconds",
            "Seconds each stage of a new image took",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self._nix = Gauge(
            "nixeryd_nix_commands",
            "Nix commands (evaluations, realisations, closure queries) running or queued",
            ["state"],
            registry=registry,
        )
        self._layer_bytes = Counter(
            "nixeryd_layer_bytes_written",
            "Compressed bytes of layer blobs written to storage, by compressor",
            ["compression"],
            registry=registry,
        )
        self._layers = Counter(
            "nixeryd_layers_written",
            "Layer blobs written to storage, by compressor",
            ["compression"],
            registry=registry,
        )
        self._storage_errors = Counter(
            "nixeryd_storage_errors",
            "Storage operations that failed on the registry's side (5xx), by backend, "
            "operation and error class",
            ["backend", "operation", "kind"],
            registry=registry,
        )
        self._gc_runs = Counter(
            "nixeryd_gc_runs",
            "Garbage collection runs, by result",
            ["result"],
            registry=registry,
        )
        self._stage_children = {stage: self._stages.labels(stage) for stage in STAGES}
        for result in BUILD_RESULTS:
            self._builds.labels(result)

    def request(self, route: str, method: bytes, code: int, seconds: float) -> None:
        """An answered request of ``route`` (one of :data:`ROUTES`), on the reactor thread."""
        hot = self._hot
        counted = hot.requests.get((route, method, code))
        if counted is None:
            counted = hot.add(route, method, code)
        counted.count += 1
        latency = counted.latency
        latency.sum += seconds
        latency.buckets[bisect_left(REQUEST_BUCKETS, seconds)] += 1

    def refused(self, code: int) -> None:
        """A request refused with ``code`` before it was routed (:mod:`nixeryd.site`)."""
        self._refused.labels(str(code)).inc()

    def build(self, result: str) -> None:
        """An image that reached Nix ended as ``result``, one of :data:`BUILD_RESULTS`."""
        self._builds.labels(result).inc()

    def stage(self, stage: str, seconds: float) -> None:
        """A new image's ``stage`` (one of :data:`STAGES`) took ``seconds``."""
        self._stage_children[stage].observe(seconds)

    def cache(self, level: str, hit: bool) -> None:
        """A lookup at ``level`` (one of :data:`CACHE_LEVELS`) hit or missed, on the
        reactor thread."""
        (self._hot.hits if hit else self._hot.misses)[level] += 1

    def watch_nix(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Read the Nix commands running and waiting when scraped (see nixeryd.nixslots)."""
        self._nix.labels("running").set_function(running)
        self._nix.labels("queued").set_function(waiting)

    def layer_written(self, compression: str, size: int) -> None:
        """A layer blob of ``size`` compressed bytes was written with ``compression``."""
        self._layers.labels(compression).inc()
        self._layer_bytes.labels(compression).inc(size)

    def storage_error(self, backend: str, operation: str, kind: str) -> None:
        """Storage ``operation`` of ``backend`` failed with the error class ``kind``."""
        self._storage_errors.labels(backend, operation, kind).inc()

    def gc_run(self, result: str) -> None:
        """A garbage collection run ended as ``result`` (``completed``, ``failed``,
        ``dry_run``); for ``nixeryd gc`` to count its runs."""
        self._gc_runs.labels(result).inc()

    def exposition(self, accept: bytes | None) -> tuple[bytes, bytes]:
        """The content type and body of a scrape: OpenMetrics when ``accept`` asks for it,
        else Prometheus's text format."""
        if accept is not None and b"application/openmetrics-text" in accept:
            return OPENMETRICS_TYPE.encode(), openmetrics_latest(self.registry)
        return CONTENT_TYPE_LATEST.encode(), generate_latest(self.registry)


class _Latency:
    """One histogram's counts: per bucket (the last one past every bound), and the sum."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(REQUEST_BUCKETS) + 1)
        self.sum = 0.0


class _Requests:
    """The requests of one route, method and code, and their route and method's latency."""

    __slots__ = ("count", "latency")

    def __init__(self, latency: _Latency) -> None:
        self.count = 0
        self.latency = latency


class _HotPath:
    """What is counted on every request, in plain Python, made into samples when scraped.

    prometheus_client's counters and histograms take a lock per increment and
    walk the buckets in Python: about 3 us a request here, as much as the
    rest of an answer from memory (4 us in-process). Every caller is on the
    reactor thread, as the scrape is, so plain integers suffice: a
    dictionary lookup and three additions, 0.4 us.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, bytes, int], _Requests] = {}
        self._latencies: dict[tuple[str, str], _Latency] = {}
        self.hits = dict.fromkeys(CACHE_LEVELS, 0)
        # Answers in memory count no misses: every request they cannot answer would be one.
        self.misses = dict.fromkeys(CACHE_LEVELS[1:], 0)

    def add(self, route: str, method: bytes, code: int) -> _Requests:
        """The counts of a route, method and code not seen before. A method a client
        invents is counted as ``other``, under the method's own key too, so that the
        keys kept are bounded by the methods a registry sees."""
        label = method_of(method)
        if label == "other":
            method = b"other"
            known = self.requests.get((route, method, code))
            if known is not None:
                return known
        latency = self._latencies.setdefault((route, label), _Latency())
        counted = self.requests[(route, method, code)] = _Requests(latency)
        return counted

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "nixeryd_http_requests",
            "HTTP requests answered, in memory or routed, by route, method and status code",
            labels=["route", "method", "code"],
        )
        for (route, method, code), counted in sorted(self.requests.items()):
            requests.add_metric([route, method_of(method), str(code)], counted.count)
        yield requests
        latency = HistogramMetricFamily(
            "nixeryd_http_request_duration_seconds",
            "Seconds from a request's arrival (its first line) to its answer being written",
            labels=["route", "method"],
        )
        bounds = [*map(floatToGoString, REQUEST_BUCKETS), "+Inf"]
        for labels, observed in sorted(self._latencies.items()):
            cumulative = list(accumulate(observed.buckets))
            latency.add_metric(
                list(labels), list(zip(bounds, cumulative, strict=True)), observed.sum
            )
        yield latency
        for name, counts, what in (
            ("nixeryd_cache_hits", self.hits, "Lookups answered by a cache, by level"),
            ("nixeryd_cache_misses", self.misses, "Lookups a cache could not answer, by level"),
        ):
            family = CounterMetricFamily(name, what, labels=["level"])
            for level, count in counts.items():
                family.add_metric([level], count)
            yield family


class MetricsPage(Resource):
    """``/metrics``: the daemon's metrics in the format the scraper asks for."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            body = json.dumps(Unsupported("/metrics is read with GET").as_json()).encode()
            request.setHeader(b"Content-Type", b"application/json")
        else:
            content_type, body = self._metrics.exposition(request.getHeader(b"accept"))
            request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Content-Length", str(len(body)).encode())
        return b"" if request.method == b"HEAD" else body


class _MetricsRoot(Resource):
    """The root of a metrics listener: ``/metrics``, and a registry error elsewhere."""

    isLeaf = True

    def __init__(self, page: MetricsPage) -> None:
        super().__init__()
        self._page = page

    def render(self, request: Request) -> bytes:
        if request.path == b"/metrics":
            return self._page.render(request)
        body = json.dumps(Unsupported("this listener serves /metrics only").as_json()).encode()
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        return body


class MetricsSite(Site):
    """A ``metrics_listen`` endpoint's site: ``/metrics`` alone, without authentication
    (an operator binds it where only scrapers reach) and without an access log line
    per scrape."""

    displayTracebacks = False

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(_MetricsRoot(MetricsPage(metrics)))

    def log(self, request: Any) -> None:
        """No access log: a scrape every few seconds would only drown the registry's."""


class MeasuredStorage:
    """A storage backend whose failures are counted: every operation that fails on the
    registry's side (a 5xx registry error, or anything that is not a registry error)
    is counted by backend, operation and error class, then passed on unchanged.

    A client's mistake (a malformed digest: a 4xx) and a cancelled operation (a
    build given up) are not storage errors and are not counted.
    """

    def __init__(self, storage: Storage, backend: str, metrics: Metrics) -> None:
        self._storage = storage
        self._backend = backend
        self._metrics = metrics

    def _count(self, operation: str, error: BaseException) -> None:
        if isinstance(error, CancelledError):
            return
        if isinstance(error, RegistryError) and error.status < 500:
            return
        self._metrics.storage_error(self._backend, operation, type(error).__name__)

    def _measured(self, operation: str, result: Deferred[T]) -> Deferred[T]:
        def failed(failure: Failure) -> Failure:
            if failure.value is not None:
                self._count(operation, failure.value)
            return failure

        return result.addErrback(failed)

    def start(self) -> Deferred[None]:
        return self._measured("start", self._storage.start())

    def stop(self) -> Deferred[None]:
        return self._measured("stop", self._storage.stop())

    def stage_blob(self) -> StagedBlob:
        try:
            return _MeasuredStagedBlob(self._storage.stage_blob(), self)
        except Exception as error:
            self._count("stage_blob", error)
            raise

    def put_blob(self, data: bytes, media_type: str) -> Deferred[BlobInfo]:
        return self._measured("put_blob", self._storage.put_blob(data, media_type))

    def stat_blob(self, digest: str) -> Deferred[BlobInfo | None]:
        return self._measured("stat_blob", self._storage.stat_blob(digest))

    def read_blob(self, digest: str) -> Deferred[Blob | None]:
        return self._measured("read_blob", self._storage.read_blob(digest))

    def serve_blob(self, info: BlobInfo) -> BlobAnswer:
        try:
            return self._storage.serve_blob(info)
        except Exception as error:
            self._count("serve_blob", error)
            raise

    def list_blobs(self) -> Deferred[list[BlobInfo]]:
        return self._measured("list_blobs", self._storage.list_blobs())

    def delete_blob(self, digest: str) -> Deferred[None]:
        return self._measured("delete_blob", self._storage.delete_blob(digest))

    def get_record(self, name: str) -> Deferred[bytes | None]:
        return self._measured("get_record", self._storage.get_record(name))

    def put_record(self, name: str, data: bytes) -> Deferred[None]:
        return self._measured("put_record", self._storage.put_record(name, data))

    def list_records(self, prefix: str) -> Deferred[list[RecordInfo]]:
        return self._measured("list_records", self._storage.list_records(prefix))

    def delete_record(self, name: str) -> Deferred[None]:
        return self._measured("delete_record", self._storage.delete_record(name))


class _MeasuredStagedBlob:
    """A staged blob whose commit's failure is counted as its storage's."""

    def __init__(self, staged: StagedBlob, storage: MeasuredStorage) -> None:
        self._staged = staged
        self._storage = storage
        self.file = staged.file

    def commit(self, digest: str, media_type: str) -> Deferred[BlobInfo]:
        return self._storage._measured("commit", self._staged.commit(digest, media_type))

    def discard(self) -> None:
        self._staged.discard()
