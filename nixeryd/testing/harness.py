"""An in-memory registry: the whole of nixeryd with a fake Nix, for a plugin's end-to-end tests.

:class:`Harness` builds the registry the way the daemon does (the
composition root, :func:`nixeryd.service.make_registry`: the real klein
resource, builder, layer writing and storage backend) and talks to it with
treq's client through :class:`~nixeryd.testing.memoryhttp.MemoryHTTP`: no
socket, no reactor, no Nix. Where the daemon would run Nix, an
:class:`~nixeryd.testing.processes.ExpectingProcessRunner` answers with what
:class:`FakeNix` describes: three small packages whose files are real files
under a temporary directory, so layers are written from them for real::

    def test_my_strategy_builds(tmp_path, monkeypatch):
        nix = FakeNix(tmp_path)
        registry = Harness(
            tmp_path, monkeypatch, *building(nix),
            plugins=[my_plugin], layering_strategy="mine",
        )
        response, body = registry.get("/v2/hello/manifests/latest")
        assert response.code == 200, body

Configuration options (:class:`nixeryd.config.Config` fields, such as
``storage_backend`` or ``plugin_options``) are keyword arguments; the storage
defaults to the filesystem backend under ``tmp_path / "storage"``. Blocking
work runs inline (``run_in_thread`` is ``maybeDeferred``), so a request's
whole build happens while :meth:`MemoryHTTP.settle` drives it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from nixeryd.config import Config
from nixeryd.platform import AMD64, Platform
from nixeryd.plugins import Plugins, builtin_plugins, make_plugin_manager
from nixeryd.service import make_registry
from nixeryd.storage import Storage
from nixeryd.testing.memoryhttp import MemoryHTTP
from nixeryd.testing.processes import Expect, ExpectingProcessRunner

__all__ = ["FakeNix", "Harness", "RegistryFactory", "building", "header"]


class FakeNix:
    """A fake Nix store of real files under ``root``, and the Nix answers that describe it.

    Three packages: ``hello`` (which references ``libgreet``, so its closure
    has two paths) and ``cacert`` (which every image gets, as Nixery adds
    it). Each is a directory of a file or two: small enough that a build
    takes milliseconds, real enough that layer tarballs are written from it.
    """

    def __init__(self, root: Path) -> None:
        self.store = root / "store"
        self.hello = self._package("a", "hello-2.12", {"bin/hello": b"#!/bin/sh\necho hi\n"})
        self.lib = self._package("b", "libgreet-1.0", {"share/greeting": b"hello"})
        self.cacert = self._package("c", "nss-cacert-3.9", {"etc/ssl/certs/ca-bundle.crt": b"x"})

    def _package(self, letter: str, name: str, files: dict[str, bytes]) -> str:
        path = self.store / f"{letter * 32}-{name}"
        for relative, data in files.items():
            (path / relative).parent.mkdir(parents=True, exist_ok=True)
            (path / relative).write_bytes(data)
        return str(path)

    def evaluation(self, missing: list[str] | None = None, **extra: Any) -> Expect:
        """The ``nix-instantiate`` of an image of ``hello`` (with ``cacert``), or, given
        ``missing`` names, its answer that those packages do not exist. ``extra`` is
        passed to :class:`Expect` (``exit_code``, ``stderr``, ``gate``...)."""
        packages = [
            {"name": name, "attrPath": name, "drvPath": f"/{name}.drv", "outputPath": path}
            for name, path in (("hello", self.hello), ("cacert", self.cacert))
        ]
        report = {"missing": missing or [], "packages": [] if missing else packages}
        return Expect(["nix-instantiate"], stdout=json.dumps(report).encode(), **extra)

    def path_info(self) -> Expect:
        """The closure query (``nix path-info``) of the built image: sizes and references."""
        report = [
            {"path": self.hello, "narSize": 1000, "references": [self.hello, self.lib]},
            {"path": self.lib, "narSize": 500, "references": []},
            {"path": self.cacert, "narSize": 200, "references": []},
        ]
        return Expect(["nix", "--extra-experimental-features"], stdout=json.dumps(report).encode())


class Harness(MemoryHTTP):
    """The registry built by the composition root, with a fake Nix and real everything else.

    ``expect`` are the Nix commands it may run (:func:`building` gives those
    of one image); any other command fails the request and is recorded in
    ``processes.unexpected``. ``plugins`` are registered after the built-in
    ones, as installed plugins are (entry points are not loaded, so the
    test sees only what it names). ``options`` are
    :class:`~nixeryd.config.Config` fields. The storage backend is started
    before the harness is returned.
    """

    def __init__(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        *expect: Expect,
        platforms: tuple[Platform, ...] = (AMD64,),
        plugins: Sequence[object] = (),
        **options: Any,
    ) -> None:
        self.processes = ExpectingProcessRunner(*expect)
        #: The reactor the registry schedules on (timeouts, cache expiry): advance it.
        self.daemon_clock = Clock()
        # A nix-instantiate per image: the evaluators have tests of their own.
        options.setdefault("evaluators", 0)
        # Not the machine's shared roots directory, which the registry sweeps at start.
        options.setdefault("gc_roots", str(tmp_path / "gcroots"))
        config = Config(
            pkgs_path=str(tmp_path),
            storage_path=str(tmp_path / "storage"),
            platforms=platforms,
            **options,
        )
        manager = make_plugin_manager(
            plugins=(*builtin_plugins(), *plugins), load_entrypoints=False
        )
        self.registry = make_registry(
            config,
            self.daemon_clock,
            plugins=Plugins(manager),
            http=object(),
            processes=self.processes,
            run_in_thread=maybeDeferred,
        )
        super().__init__(self.registry.resource(), monkeypatch)
        self.settle(self.storage.start())

    @property
    def storage(self) -> Storage:
        """The storage backend the configuration selected, started."""
        return self.registry.storage

    def get(self, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        """GET ``path`` (``/v2/...``): the response and its whole body."""
        return self.request("GET", "http://registry" + path, **kwargs)


#: A fixture's factory of harnesses: ``registry_with(*expect, **options)``.
RegistryFactory = Callable[..., Harness]


def building(nix: FakeNix, **extra: Any) -> list[Expect]:
    """The Nix commands of building one image of ``nix``'s packages: evaluate, realise,
    query the closure. ``extra`` goes to the evaluation (see :meth:`FakeNix.evaluation`)."""
    return [nix.evaluation(**extra), Expect(["nix-store", "--realise"]), nix.path_info()]


def header(response: Any, name: str) -> str | None:
    """The first value of the response header ``name``, or None."""
    values = response.headers.getRawHeaders(name.encode())
    return values[0].decode() if values else None
