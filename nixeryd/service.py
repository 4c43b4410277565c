"""The composition root: the one place that builds nixeryd's object graph.

:func:`make_service` takes the configuration and the reactor and wires
everything else (plugins, Nix, builder, HTTP routes, listening endpoints)
into a Twisted service tree. Nothing else imports a reactor or builds a
client; tests call it with fakes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from treq.client import HTTPClient
from twisted.application.service import MultiService, Service
from twisted.application.strports import service as endpoint_service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import IResource

from nixeryd.accesslog import AccessLog
from nixeryd.auth import Gate
from nixeryd.builder import ImageBuilder
from nixeryd.config import Config
from nixeryd.evaluator import EvaluatorLimits, EvaluatorPool, Repl
from nixeryd.fanout import PlatformFanOut
from nixeryd.gc import GcReport, PeriodicCollection, telling
from nixeryd.gcroots import ProcessRoots, remove_stale_roots
from nixeryd.layerstore import LayerStore
from nixeryd.manifeststore import ManifestStore
from nixeryd.metrics import MeasuredStorage, Metrics, MetricsPage, MetricsSite
from nixeryd.nixbuild import Nix, repl_argv
from nixeryd.nixslots import NixSlots
from nixeryd.plugins import Plugins, make_plugin_manager
from nixeryd.popularity import PopularityLoader, PopularitySource
from nixeryd.process import ProcessRunner, ReactorProcessRunner
from nixeryd.ratelimit import ClientBuckets
from nixeryd.registry import RegistryApp
from nixeryd.runtime import Runtime
from nixeryd.site import RegistrySite
from nixeryd.storage import Storage
from nixeryd.tls import tls_service

log = Logger()


def make_registry(
    config: Config,
    reactor: Any,
    *,
    plugins: Plugins | None = None,
    http: Any = None,
    processes: ProcessRunner | None = None,
    run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
    metrics: Metrics | None = None,
) -> RegistryApp:
    """The registry application, with every dependency built from ``config`` unless given.

    Every stage counts what it does in ``metrics`` (a new set when not given).

    Given ``run_in_thread`` (tests) runs every blocking call, layer writes
    included; otherwise short blocking calls go to the reactor's pool, layer
    writes to a pool of ``layer_workers`` threads, and the compression of
    blocks of each layer to another pool as large.
    """
    plugins = plugins or Plugins(make_plugin_manager())
    gc_roots = ProcessRoots(config.gc_roots_dir)
    if processes is None:
        runner = ReactorProcessRunner(reactor)
        # Builds, closure queries and evaluators alike: none outlives the daemon, nor
        # the nix-store that started it (when something else kills nix-store).
        reactor.addSystemEventTrigger("before", "shutdown", runner.stop)
        # Once they are stopped, no build needs its Nix GC roots.
        reactor.addSystemEventTrigger("during", "shutdown", gc_roots.drop)
        if not runner.adopt_orphans():
            log.warn("cannot adopt orphaned processes (no PR_SET_CHILD_SUBREAPER here)")
        processes = runner
    compress_pool = None
    if run_in_thread is not None:
        write_in_thread = run_in_thread
    else:
        pool = reactor.getThreadPool()

        def run_in_thread(work: Callable[[], Any]) -> Deferred[Any]:
            return deferToThreadPool(reactor, pool, work)

        workers = layer_pool_size(config.layer_workers)
        write_in_thread = _layer_pool_runner(reactor, workers)
        compress_pool = ThreadPoolExecutor(workers, thread_name_prefix="nixeryd-deflate")
        reactor.addSystemEventTrigger("during", "shutdown", compress_pool.shutdown)

    runtime = Runtime(
        config=config,
        reactor=reactor,
        http=http or _http_client(reactor),
        processes=processes,
        run_in_thread=run_in_thread,
    )
    metrics = metrics or Metrics()
    storage = MeasuredStorage(
        plugins.storage_backend(config.storage_backend).create_with(runtime),
        config.storage_backend,
        metrics,
    )
    source = plugins.package_source(config.package_source).create_with(runtime)
    layering = plugins.layering_strategy(config.layering_strategy).create_with(runtime)
    gate = None
    if config.auth is not None:
        authenticator = plugins.authenticator(config.auth).create_with(runtime)
        gate = Gate(authenticator, config.auth_policy)
        log.info("authentication: {auth}, policy {policy}", auth=config.auth, policy=gate.policy)
    selected = {config.storage_backend, config.package_source, config.layering_strategy}
    selected |= {config.auth} if config.auth else set()
    for name in sorted(set(config.plugin_options) - selected):
        # A misspelt name, or a provider the site switched away from: not an error.
        log.warn("[plugin.{name}]: no selected provider is called {name}; ignored", name=name)
    # Roots a killed daemon left would keep its store paths from Nix's GC for good.
    remove_stale_roots(config.gc_roots_dir)
    evaluators = None
    if config.evaluators > 0:
        limits = EvaluatorLimits(
            capacity=config.evaluators,
            memory=config.evaluator_memory * 1024 * 1024,
            idle=config.evaluator_idle,
            request_timeout=config.build_timeout,
        )
        repl = Repl(processes, reactor, repl_argv(config.nix_bin_dir), limits, metrics=metrics)
        evaluators = EvaluatorPool(repl)
        reactor.addSystemEventTrigger("before", "shutdown", evaluators.stop)
    # One Nix command per core, by the layer writers' rule: more would only interleave.
    slots = NixSlots(layer_pool_size(config.nix_jobs), config.nix_queue)
    metrics.watch_nix(lambda: slots.running, lambda: slots.waiting)
    nix = Nix(
        processes,
        builder_timeout=config.nix_timeout,
        step_timeout=config.build_timeout,
        bin_dir=config.nix_bin_dir,
        gc_roots=gc_roots,
        nixpkgs_config=config.nixpkgs_config,
        overlays=config.nixpkgs_overlays,
        evaluators=evaluators,
        unpinned_reuse=config.evaluator_unpinned_ttl,
        slots=slots,
        run_in_thread=run_in_thread,
    )
    manifests = ManifestStore(storage, config.compression, metrics)
    builder = ImageBuilder(
        nix=nix,
        source=source,
        layering=layering,
        layering_name=config.layering_strategy,
        layer_budget=config.layer_budget,
        popularity=PopularitySource(PopularityLoader(runtime.http), config.popularity_url),
        layers=LayerStore(storage, config.compression, write_in_thread, metrics, compress_pool),
        manifests=manifests,
        run_in_thread=run_in_thread,
        clock=reactor,
        on_built=plugins.image_built,
        failure_ttl=config.failure_ttl,
        build_timeout=config.build_timeout,
        max_closure_bytes=config.max_closure_size * 1024 * 1024,
        max_layer_bytes=config.max_layer_size * 1024 * 1024,
        metrics=metrics,
    )
    images = PlatformFanOut(builder.image, manifests, config.platforms, reactor)
    log.info(
        "serving {source} source for {platforms}, {storage} storage, "
        "{layering} layering (budget {budget}), {compression} layers",
        source=config.package_source,
        platforms=",".join(platform.name for platform in config.platforms),
        storage=config.storage_backend,
        layering=config.layering_strategy,
        budget=config.layer_budget,
        compression=config.compression.key,
    )
    page = None
    if config.metrics and not config.metrics_listen:
        page = cast(IResource, MetricsPage(metrics))
    build_limit = None
    if config.build_rate is not None:
        build_limit = ClientBuckets(config.build_rate, reactor)
        log.info("new image names per client: {rate}", rate=config.build_rate)
    return RegistryApp(
        images, builder, storage, source, metrics, gate, metrics_page=page, build_limit=build_limit
    )


#: Idle connections kept per host: an object store is asked many small things at once
#: (a pull of a large image stats dozens of blobs).
HTTP_CONNECTIONS_PER_HOST = 16


def _http_client(reactor: Any) -> HTTPClient:
    """treq's client on a pool that keeps connections open: every request to an object
    store would otherwise pay for a new connection, and a TLS handshake on AWS."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = HTTP_CONNECTIONS_PER_HOST
    reactor.addSystemEventTrigger("before", "shutdown", pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))  # type: ignore[arg-type]


def layer_pool_size(configured: int, cores: int | None = None) -> int:
    """How many layers are written at once: ``configured``, or with 0 one per core this
    process may run on (``cores``, by default from its CPU affinity, which container
    CPU sets restrict). Compression and hashing release the GIL, so each thread
    keeps a core busy; more threads than cores would only interleave the layers."""
    if configured > 0:
        return configured
    if cores is None:
        cores = len(os.sched_getaffinity(0))
    return max(1, cores)


def _layer_pool_runner(reactor: Any, size: int) -> Callable[[Callable[[], Any]], Deferred[Any]]:
    """A thread pool of ``size`` for layer writes, started now and stopped with the reactor."""
    pool = ThreadPool(minthreads=0, maxthreads=size, name="nixeryd-layers")
    pool.start()
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    log.info("writing up to {size} layers at once", size=size)

    def run(work: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(reactor, pool, work)

    return run


def make_service(config: Config, reactor: Any, **overrides: Any) -> StorageFirst:
    """The daemon's service tree: storage, then one listening service per configured endpoint
    (and per ``metrics_listen`` endpoint), and the periodic garbage collection when
    ``gc_interval`` is set. The access log goes to standard output, where
    :func:`nixeryd.logs.start_logging` sends the rest of the log."""
    metrics = Metrics()
    plugins = overrides.pop("plugins", None) or Plugins(make_plugin_manager())
    registry = make_registry(config, reactor, metrics=metrics, plugins=plugins, **overrides)
    access_log = None
    if config.access_log:
        access_log = AccessLog(sys.stdout, config.log_format, reactor)
    site = RegistrySite(
        registry.resource(), registry.answers, metrics, access_log=access_log, gate=registry.gate
    )
    root = StorageFirst(registry.storage, reactor)
    if config.metrics_listen:
        scrapes = MetricsSite(metrics)
        for endpoint in config.metrics_listen:
            endpoint_service(endpoint, scrapes, reactor=reactor).setServiceParent(root)  # type: ignore[arg-type]
    for endpoint in config.listen:
        if endpoint.startswith("ssl:"):
            # Twisted's own ssl: endpoint reads its certificate once; this one reloads it.
            tls_service(endpoint, site, reactor).setServiceParent(root)
            continue
        endpoint_service(endpoint, site, reactor=reactor).setServiceParent(root)  # type: ignore[arg-type]
    if config.gc_interval > 0:
        tell = telling(plugins)

        def finished(result: str, report: GcReport | None) -> None:
            metrics.gc_run(result)
            tell(result, report)

        PeriodicCollection(config, registry.storage, reactor, finished).setServiceParent(root)
    return root


class StorageFirst(MultiService):
    """Starts the storage backend, then the listeners; stops them in the reverse order.

    Nothing is served before storage is ready (a bucket checked, credentials
    loaded): a backend that cannot start stops the daemon with its reason
    rather than answering every pull with an error.
    """

    def __init__(self, storage: Storage, reactor: Any) -> None:
        super().__init__()
        self._storage = storage
        self._reactor = reactor
        self._storage_running = False
        #: Why storage did not start, for the command's exit status; None if it did.
        self.storage_failure: Failure | None = None

    def startService(self) -> None:
        # Marks this service running without starting the children yet.
        Service.startService(self)
        self._storage.start().addCallbacks(self._storage_started, self._storage_failed)

    def _storage_started(self, _: None) -> None:
        self._storage_running = True
        if self.running:
            for child in self:
                child.startService()

    def _storage_failed(self, failure: Failure) -> None:
        self.storage_failure = failure
        log.critical("storage backend did not start: {reason}", reason=failure.getErrorMessage())
        # Start-up may fail before the reactor runs; stopping it then would be refused.
        self._reactor.callWhenRunning(self._reactor.stop)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        stopping = [child.stopService() for child in reversed(list(self)) if child.running]
        stopped = gatherResults([d for d in stopping if d is not None])
        if not self._storage_running:
            return stopped.addCallback(lambda _: None)
        self._storage_running = False
        return stopped.addCallback(lambda _: self._storage.stop())
