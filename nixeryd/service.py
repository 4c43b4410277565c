"""The composition root: the one place that builds nixeryd's object graph.

:func:`make_service` takes the configuration and the reactor and wires
everything else (plugins, Nix, builder, HTTP routes, listening endpoints)
into a Twisted service tree. Nothing else imports a reactor or builds a
client; tests call it with fakes.

Wiring starts nothing: every thread pool, connection pool, process and
backend is a step of the :class:`~nixeryd.lifecycle.Lifecycle` it is added
to, started with the tree in the order added and stopped in the reverse
(see :mod:`nixeryd.lifecycle` for why that order).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import IResource

from nixeryd.accesslog import AccessLog
from nixeryd.auth import Gate
from nixeryd.builder import ImageBuilder
from nixeryd.builds import BuildHub
from nixeryd.config import Config, ConfigError
from nixeryd.evaluator import EvaluatorLimits, EvaluatorPool, Repl
from nixeryd.fanout import PlatformFanOut
from nixeryd.gc import GcReport, PeriodicCollection, telling
from nixeryd.gcroots import ProcessRoots, remove_stale_roots
from nixeryd.layerstore import LayerStore
from nixeryd.lifecycle import Drain, Lifecycle, Listener
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
from nixeryd.search import PackageSearch
from nixeryd.site import RegistrySite
from nixeryd.systemd import Notifier, Watchdog
from nixeryd.tls import tls_endpoint
from nixeryd.web import describe_source

log = Logger()


def make_registry(
    config: Config,
    reactor: Any,
    *,
    lifecycle: Lifecycle | None = None,
    plugins: Plugins | None = None,
    http: Any = None,
    processes: ProcessRunner | None = None,
    run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
    metrics: Metrics | None = None,
) -> RegistryApp:
    """The registry application, with every dependency built from ``config`` unless given.

    Every stage counts what it does in ``metrics`` (a new set when not given).

    What it builds that must be started and stopped is added to ``lifecycle``
    (:func:`make_service`'s tree), storage included; without one, starting
    storage is the caller's (tests, which pass fakes that need nothing else).
    Given ``run_in_thread`` (tests) runs every blocking call, layer writes
    included; otherwise short blocking calls go to a pool of threads, layer
    writes to a pool of ``layer_workers`` threads, and the compression of
    blocks of each layer to another pool as large.
    """
    steps = lifecycle if lifecycle is not None else Lifecycle(reactor)
    plugins = plugins or Plugins(make_plugin_manager())
    compress_pool = None
    if run_in_thread is not None:
        write_in_thread = run_in_thread
    else:
        run_in_thread = _thread_pool(steps, reactor, "nixeryd-io", IO_THREADS)
        workers = layer_pool_size(config.layer_workers)
        write_in_thread = _thread_pool(steps, reactor, "nixeryd-layers", workers)
        log.info("writing up to {size} layers at once", size=workers)
        compress_pool = ThreadPoolExecutor(workers, thread_name_prefix="nixeryd-deflate")
        steps.add("compression threads", stop=compress_pool.shutdown)
    if http is None:
        connections = HTTPConnectionPool(reactor, persistent=True)
        steps.add("HTTP client", stop=connections.closeCachedConnections)
        http = _http_client(reactor, connections)
    if processes is None:
        processes = ReactorProcessRunner(reactor)
    runtime = Runtime(
        config=config,
        reactor=reactor,
        http=http,
        processes=processes,
        run_in_thread=run_in_thread,
    )
    metrics = metrics or Metrics()
    storage = MeasuredStorage(
        plugins.storage_backend(config.storage_backend).create_with(runtime),
        config.storage_backend,
        metrics,
    )
    if lifecycle is not None:
        lifecycle.add("storage backend", storage.start, storage.stop)
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
    # One Nix command per core, by the layer writers' rule: more would only interleave.
    slots = NixSlots(layer_pool_size(config.nix_jobs), config.nix_queue)
    builds = BuildHub()
    metrics.watch_nix(lambda: slots.running, lambda: slots.waiting)
    gc_roots = ProcessRoots(config.gc_roots_dir)
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
        on_line=builds.line,
    )
    # Roots a killed daemon left would keep its store paths from Nix's GC for good; this
    # daemon's own are dropped once the steps after this one have stopped its Nix.
    steps.add(
        "Nix garbage collector roots",
        lambda: remove_stale_roots(config.gc_roots_dir),
        gc_roots.drop,
    )
    if isinstance(processes, ReactorProcessRunner):
        # Builds, closure queries and evaluators alike: none outlives the daemon, nor the
        # nix-store that started it (when something else kills nix-store).
        runner = processes
        steps.add(
            "Nix commands",
            lambda: _adopt_orphans(runner),
            lambda: runner.stop().addTimeout(PROCESS_EXIT_WAIT, reactor),
        )
    if evaluators is not None:
        steps.add("Nix evaluators", stop=evaluators.stop)
    popularity = PopularitySource(PopularityLoader(runtime.http), config.popularity_url)
    steps.add("popularity data", popularity.start, popularity.stop)
    manifests = ManifestStore(storage, config.compression, metrics)
    builder = ImageBuilder(
        nix=nix,
        source=source,
        layering=layering,
        layering_name=config.layering_strategy,
        layer_budget=config.layer_budget,
        popularity=popularity,
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
        builds=builds,
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
        images,
        builder,
        storage,
        source,
        metrics,
        gate,
        metrics_page=page,
        build_limit=build_limit,
        source_description=describe_source(config),
        search=PackageSearch(nix, source, config.platforms[0], reactor),
        clock=reactor,
    )


#: Threads for short blocking calls (file I/O, hashing, a blocking library): the
#: reactor's own pool's size, in a pool the lifecycle stops after storage.
IO_THREADS = 10

#: Seconds the Nix commands killed at shutdown may take to be reaped.
PROCESS_EXIT_WAIT = 10.0

#: Idle connections kept per host: an object store is asked many small things at once
#: (a pull of a large image stats dozens of blobs).
HTTP_CONNECTIONS_PER_HOST = 16


def _http_client(reactor: Any, pool: HTTPConnectionPool) -> HTTPClient:
    """treq's client on a pool that keeps connections open: every request to an object
    store would otherwise pay for a new connection, and a TLS handshake on AWS."""
    pool.maxPersistentPerHost = HTTP_CONNECTIONS_PER_HOST
    return HTTPClient(Agent(reactor, pool=pool))  # type: ignore[arg-type]


def _adopt_orphans(runner: ReactorProcessRunner) -> None:
    if not runner.adopt_orphans():
        log.warn("cannot adopt orphaned processes (no PR_SET_CHILD_SUBREAPER here)")


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


def _thread_pool(
    steps: Lifecycle, reactor: Any, name: str, size: int
) -> Callable[[Callable[[], Any]], Deferred[Any]]:
    """A pool of ``size`` threads, a step of ``steps``; runs work in it from the reactor."""
    pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
    steps.add(f"{name} threads", pool.start, pool.stop)

    def run(work: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(reactor, pool, work)

    return run


def make_service(
    config: Config, reactor: Any, *, notifier: Notifier | None = None, **overrides: Any
) -> Lifecycle:
    """The daemon's service tree: threads, storage, Nix, then one listener per configured
    endpoint (and per ``metrics_listen`` endpoint), the periodic garbage collection when
    ``gc_interval`` is set, and ``READY=1`` to ``notifier`` (systemd) and its watchdog.
    The access log goes to standard output, where :func:`nixeryd.logs.start_logging`
    sends the rest of the log."""
    notifier = notifier or Notifier(None)
    root = Lifecycle(reactor, notifier)
    watchdog = Watchdog(notifier, reactor)
    root.add("systemd watchdog", watchdog.start, watchdog.stop)
    metrics = Metrics()
    plugins = overrides.pop("plugins", None) or Plugins(make_plugin_manager())
    processes = overrides.pop("processes", None)
    if processes is None:
        processes = ReactorProcessRunner(reactor)
    registry = make_registry(
        config,
        reactor,
        lifecycle=root,
        metrics=metrics,
        plugins=plugins,
        processes=processes,
        **overrides,
    )
    access_log = None
    if config.access_log:
        access_log = AccessLog(sys.stdout, config.log_format, reactor)
    site = RegistrySite(
        registry.resource(), registry.answers, metrics, access_log=access_log, gate=registry.gate
    )
    drain = Drain(reactor)
    site.requestFactory = drain.request  # type: ignore[assignment]
    root.add("requests in flight", stop=drain.stop)
    listeners = [
        Listener(description, _endpoint(description, reactor), site)
        for description in config.listen
    ]
    if config.metrics_listen:
        scrapes = MetricsSite(metrics)
        listeners += [
            Listener(description, _endpoint(description, reactor), scrapes)
            for description in config.metrics_listen
        ]
    for listener in listeners:
        root.add(f"listener {listener.description}", listener.start, listener.stop)
    if config.gc_interval > 0:
        tell = telling(plugins)

        def finished(result: str, report: GcReport | None) -> None:
            metrics.gc_run(result)
            tell(result, report)

        collection = PeriodicCollection(config, registry.storage, reactor, finished)
        root.add("periodic garbage collection", collection.startService, collection.stopService)

    def ready() -> None:
        notifier.ready("serving on " + ", ".join(listener.address for listener in listeners))

    def stopping() -> None:
        running = processes.running if isinstance(processes, ReactorProcessRunner) else 0
        status = f"stopping: {drain.in_flight} requests in flight, {running} Nix commands running"
        log.info("{status}", status=status)
        notifier.stopping(status)

    root.add("systemd notification", ready, stopping)
    return root


def _endpoint(description: str, reactor: Any) -> Any:
    """The endpoint a ``listen`` description names; ConfigError for a socket systemd did
    not pass (a ``name=`` or ``index=`` not in ``LISTEN_FDNAMES`` / ``LISTEN_FDS``) or
    one of another address family than ``domain=`` says."""
    if description.startswith("ssl:"):
        # Twisted's own ssl: endpoint reads its certificate once; this one reloads it.
        return tls_endpoint(description, reactor)
    try:
        endpoint = serverFromString(reactor, description)
    except (KeyError, IndexError):
        passed = os.environ.get("LISTEN_FDNAMES") or os.environ.get("LISTEN_FDS") or "none"
        raise ConfigError(
            f"listen {description!r}: systemd passed no such socket (sockets passed: "
            f"{passed}); start nixeryd through its .socket unit, whose FileDescriptorName= "
            "is the name"
        ) from None
    if isinstance(endpoint, AdoptedStreamServerEndpoint):
        _check_family(description, endpoint.fileno, endpoint.addressFamily)
    return endpoint


def _check_family(description: str, fileno: int, declared: int) -> None:
    """A socket adopted as another family than its own serves, but Twisted reads its
    addresses wrongly (``ListenStream=8080`` is IPv6: an IPv4 reading of its address is
    garbage), so the mismatch is refused with the ``domain=`` to write."""
    with socket.socket(fileno=os.dup(fileno)) as passed:
        family = passed.family
    if family != declared:
        raise ConfigError(
            f"listen {description!r}: systemd passed an {family.name} socket; write "
            f"domain={family.name.removeprefix('AF_')}"
        )
