"""The hooks nixeryd calls on its plugins: the one contract for site plugins.

Plugins are registered by :func:`nixeryd.plugins.make_plugin_manager`: the
built-ins first, then the entry-point group ``nixeryd``. Being installed does
not enable a plugin's storage backend, source or strategy: the configuration
names the one to use.

Hooks are synchronous (pluggy calls them so). Providers return objects whose
methods may return Deferreds.
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from nixeryd.auth import Authenticator
from nixeryd.layering import LayeringStrategy
from nixeryd.runtime import Provider
from nixeryd.sources import PackageSource
from nixeryd.storage import Storage

PROJECT = "nixeryd"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- Providers: called once at start-up; every plugin's answers are collected. --


@hookspec
def nixeryd_storage_backends() -> Sequence[Provider[Storage]]:
    """Storage backends this plugin offers (``NIXERY_STORAGE_BACKEND`` picks one by name)."""
    raise NotImplementedError


@hookspec
def nixeryd_package_sources() -> Sequence[Provider[PackageSource]]:
    """Package sources this plugin offers (``package_source`` picks one by name; the
    built-in ``path``, ``git`` and ``channel`` sources follow Nixery's variables)."""
    raise NotImplementedError


@hookspec
def nixeryd_layering_strategies() -> Sequence[Provider[LayeringStrategy]]:
    """Layering strategies this plugin offers (``layering_strategy`` picks one by name)."""
    raise NotImplementedError


@hookspec
def nixeryd_authenticators() -> Sequence[Provider[Authenticator]]:
    """Authentication providers this plugin offers (``auth`` picks one by name; the
    built-in ``htpasswd``, ``token`` and ``jwks`` are described in
    :mod:`nixeryd.builtin.auth`)."""
    raise NotImplementedError


# -- Events: called on the reactor thread; must return quickly and not raise. --


@hookspec
def nixeryd_image_built(image: str, tag: str, digest: str, seconds: float) -> None:
    """An image was built (not served from cache): ``image`` is the canonical name
    (``linux/amd64:bashInteractive/hello``), ``digest`` its Docker manifest digest.
    For metrics, audit logs or warming other caches."""


@hookspec
def nixeryd_gc_finished(
    result: str, blobs_deleted: int, bytes_deleted: int, seconds: float
) -> None:
    """A garbage collection run (:mod:`nixeryd.gc`) ended: ``result`` is ``completed``,
    ``dry_run`` or ``failed`` (then the counts are 0). For a "GC runs by result"
    counter or an audit log."""
