"""The plugin manager factory and the typed facade nixeryd uses to reach plugins.

Built-in plugins are registered first, explicitly; then every plugin
installed under the entry-point group ``nixeryd``; then the registrations
are checked against :mod:`nixeryd.hookspecs`. Tests build a manager with
``load_entrypoints=False`` and exactly the plugins they need.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import pluggy
from twisted.logger import Logger

from nixeryd import hookspecs
from nixeryd.config import ConfigError
from nixeryd.runtime import Provider

T = TypeVar("T")

_log = Logger()


def builtin_plugins() -> tuple[object, ...]:
    """The plugins nixeryd ships: filesystem, S3 and GCS storage, path, git and channel
    sources, stable and popularity (Nixery's) layering, htpasswd, token and JWKS
    authentication."""
    from nixeryd.builtin import auth, filesystem, gcs, layering, s3, sources, stable_layering

    return (filesystem, s3, gcs, sources, stable_layering, layering, auth)


def make_plugin_manager(
    *, plugins: Iterable[object] | None = None, load_entrypoints: bool = True
) -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for plugin in builtin_plugins() if plugins is None else plugins:
        manager.register(plugin)
    if load_entrypoints:
        manager.load_setuptools_entrypoints(hookspecs.PROJECT)
    manager.check_pending()
    return manager


class Plugins:
    """What the installed plugins provide, looked up by the names configuration gives."""

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self._hook: Any = manager.hook

    def storage_backend(self, name: str) -> Provider[Any]:
        return _choose("storage backend", name, self._hook.nixeryd_storage_backends())

    def package_source(self, name: str) -> Provider[Any]:
        return _choose("package source", name, self._hook.nixeryd_package_sources())

    def layering_strategy(self, name: str) -> Provider[Any]:
        return _choose("layering strategy", name, self._hook.nixeryd_layering_strategies())

    def authenticator(self, name: str) -> Provider[Any]:
        return _choose("authentication provider", name, self._hook.nixeryd_authenticators())

    def image_built(self, image: str, tag: str, digest: str, seconds: float) -> None:
        """Tell every plugin; one that raises is logged (a line, no traceback) and the
        others are still told. An event is news for plugins, not part of the pull: the
        image is built whatever a plugin does with the news."""
        for implementation in self._hook.nixeryd_image_built.get_hookimpls():
            try:
                implementation.function(image=image, tag=tag, digest=digest, seconds=seconds)
            except Exception as error:
                _log.error(
                    "plugin {plugin} failed on nixeryd_image_built for {image}:{tag}: "
                    "{error_type}: {error}",
                    plugin=implementation.plugin_name,
                    image=image,
                    tag=tag,
                    error_type=type(error).__name__,
                    error=error,
                )

    def gc_finished(
        self, result: str, blobs_deleted: int, bytes_deleted: int, seconds: float
    ) -> None:
        """Tell every plugin a garbage collection run ended; one that raises is logged."""
        for implementation in self._hook.nixeryd_gc_finished.get_hookimpls():
            try:
                implementation.function(
                    result=result,
                    blobs_deleted=blobs_deleted,
                    bytes_deleted=bytes_deleted,
                    seconds=seconds,
                )
            except Exception as error:
                _log.error(
                    "plugin {plugin} failed on nixeryd_gc_finished: {error_type}: {error}",
                    plugin=implementation.plugin_name,
                    error_type=type(error).__name__,
                    error=error,
                )


def _choose(kind: str, name: str, answers: Sequence[Sequence[Provider[T]]]) -> Provider[T]:
    """The provider called ``name``. An unknown name is a start-up error listing the
    choices; so is a name two plugins offer, whichever is chosen: which one wins
    would depend on installation order."""
    providers: dict[str, Provider[T]] = {}
    for provider in (provider for answer in answers for provider in answer):
        if provider.name in providers:
            raise ConfigError(
                f"two plugins offer a {kind} called {provider.name!r} "
                f"({providers[provider.name].summary!r} and {provider.summary!r}); uninstall one"
            )
        providers.setdefault(provider.name, provider)
    if name not in providers:
        available = ", ".join(
            f"{provider.name} ({provider.summary})" for provider in providers.values()
        )
        raise ConfigError(f"unknown {kind} {name!r}; available: {available or 'none'}")
    return providers[name]
