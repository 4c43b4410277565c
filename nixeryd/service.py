"""The composition root: the one place that builds nixeryd's object graph.

:func:`make_service` takes the configuration and the reactor and wires
everything else (plugins, Nix, builder, HTTP routes, listening endpoints)
into a Twisted service tree. Nothing else imports a reactor or builds a
client; tests call it with fakes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.application.strports import service as endpoint_service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.client import Agent

from nixeryd.builder import ImageBuilder
from nixeryd.config import Config
from nixeryd.nixbuild import Nix
from nixeryd.plugins import Plugins, make_plugin_manager
from nixeryd.popularity import PopularityLoader, PopularitySource
from nixeryd.process import ProcessRunner, ReactorProcessRunner
from nixeryd.registry import RegistryApp
from nixeryd.runtime import Runtime
from nixeryd.site import RegistrySite

log = Logger()


def make_registry(
    config: Config,
    reactor: Any,
    *,
    plugins: Plugins | None = None,
    http: Any = None,
    processes: ProcessRunner | None = None,
    run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
) -> RegistryApp:
    """The registry application, with every dependency built from ``config`` unless given."""
    plugins = plugins or Plugins(make_plugin_manager())
    processes = processes or ReactorProcessRunner(reactor)
    if run_in_thread is None:
        pool = reactor.getThreadPool()

        def run_in_thread(work: Callable[[], Any]) -> Deferred[Any]:
            return deferToThreadPool(reactor, pool, work)

    runtime = Runtime(
        config=config,
        reactor=reactor,
        http=http or HTTPClient(Agent(reactor)),  # type: ignore[arg-type]
        processes=processes,
        run_in_thread=run_in_thread,
    )
    storage = plugins.storage_backend(config.storage_backend).create(runtime)
    source = plugins.package_source(config.package_source).create(runtime)
    layering = plugins.layering_strategy(config.layering_strategy).create(runtime)
    builder = ImageBuilder(
        nix=Nix(
            processes,
            timeout=config.nix_timeout,
            bin_dir=config.nix_bin_dir,
            gc_roots=Path(tempfile.gettempdir()) / "nixeryd-gcroots",
        ),
        source=source,
        storage=storage,
        layering=layering,
        layering_name=config.layering_strategy,
        layer_budget=config.layer_budget,
        platforms=config.platforms,
        popularity=PopularitySource(PopularityLoader(runtime.http), config.popularity_url),
        run_in_thread=run_in_thread,
        clock=reactor,
        on_built=plugins.image_built,
    )
    log.info(
        "serving {source} source for {platforms}, {storage} storage, "
        "{layering} layering (budget {budget})",
        source=config.package_source,
        platforms=",".join(platform.name for platform in config.platforms),
        storage=config.storage_backend,
        layering=config.layering_strategy,
        budget=config.layer_budget,
    )
    return RegistryApp(builder, storage, source)


def make_service(config: Config, reactor: Any, **overrides: Any) -> MultiService:
    """The daemon's service tree: one listening service per configured endpoint."""
    registry = make_registry(config, reactor, **overrides)
    site = RegistrySite(registry.resource())
    root = MultiService()
    for endpoint in config.listen:
        endpoint_service(endpoint, site, reactor=reactor).setServiceParent(root)  # type: ignore[arg-type]
    return root
