"""An in-memory registry for tests: the real klein resource, storage and layer writing
built by the composition root, under StubTreq, with an expectation fake standing in for Nix."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from nixeryd.config import Config
from nixeryd.platform import AMD64, Platform
from nixeryd.plugins import Plugins, make_plugin_manager
from nixeryd.service import make_registry
from tests.fakes import Expect, ExpectingProcessRunner
from tests.memoryhttp import MemoryHTTP


class FakeNix:
    """A store of real files in a temp dir and the Nix answers that describe it."""

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
        packages = [
            {"name": name, "attrPath": name, "drvPath": f"/{name}.drv", "outputPath": path}
            for name, path in (("hello", self.hello), ("cacert", self.cacert))
        ]
        report = {"missing": missing or [], "packages": [] if missing else packages}
        return Expect(["nix-instantiate"], stdout=json.dumps(report).encode(), **extra)

    def path_info(self) -> Expect:
        report = [
            {"path": self.hello, "narSize": 1000, "references": [self.hello, self.lib]},
            {"path": self.lib, "narSize": 500, "references": []},
            {"path": self.cacert, "narSize": 200, "references": []},
        ]
        return Expect(["nix", "--extra-experimental-features"], stdout=json.dumps(report).encode())


class Harness(MemoryHTTP):
    """The registry built by the composition root, with fake Nix and real everything else."""

    def __init__(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        *expect: Expect,
        platforms: tuple[Platform, ...] = (AMD64,),
        **options: Any,
    ) -> None:
        self.processes = ExpectingProcessRunner(*expect)
        self.daemon_clock = Clock()
        # A nix-instantiate per image: the evaluators have tests of their own.
        options.setdefault("evaluators", 0)
        config = Config(
            pkgs_path=str(tmp_path),
            storage_path=str(tmp_path / "storage"),
            platforms=platforms,
            **options,
        )
        self.registry = make_registry(
            config,
            self.daemon_clock,
            plugins=Plugins(make_plugin_manager(load_entrypoints=False)),
            http=object(),
            processes=self.processes,
            run_in_thread=maybeDeferred,
        )
        super().__init__(self.registry.resource(), monkeypatch)

    def get(self, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        return self.request("GET", "http://registry" + path, **kwargs)


RegistryFactory = Callable[..., Harness]


def building(nix: FakeNix, **extra: Any) -> list[Expect]:
    return [nix.evaluation(**extra), Expect(["nix-store", "--realise"]), nix.path_info()]


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name.encode())
    return values[0].decode() if values else None
