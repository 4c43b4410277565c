"""nixeryd.plugin, the public plugin API: complete, resolvable, and all the examples use.

Site plugins import only nixeryd.plugin (and nixeryd.testing in their tests),
so every type a hook, a provider or a contract mentions must be there, and
the example plugins must not reach past it. That they type-check with mypy
--strict is the lint's job: pyproject.toml's mypy configuration includes them.
"""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path
from types import UnionType
from typing import Any

import pytest

from nixeryd import hookspecs, plugin

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "plugins").glob("*/*.py"))


@pytest.mark.parametrize("name", plugin.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(plugin, name) is not None


def test_the_exports_are_listed_once_and_nothing_public_is_left_out() -> None:
    assert len(set(plugin.__all__)) == len(plugin.__all__)
    public = {
        name
        for name, value in vars(plugin).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert public == set(plugin.__all__)


def _nixeryd_types(hint: Any) -> set[type]:
    """The classes defined by nixeryd that a type hint mentions, however nested."""
    if isinstance(hint, type) and hint.__module__.startswith("nixeryd."):
        return {hint}
    if isinstance(hint, UnionType) or typing.get_origin(hint) is not None:
        return {found for arg in typing.get_args(hint) for found in _nixeryd_types(arg)}
    return set()


def _hints(owner: Any) -> list[Any]:
    """The type hints of a class's fields and methods, or of a function."""
    if inspect.isfunction(owner):
        return list(typing.get_type_hints(owner).values())
    hints = list(typing.get_type_hints(owner).values())
    for name, member in vars(owner).items():
        if inspect.isfunction(member) and not (name.startswith("_") and name != "__call__"):
            hints += typing.get_type_hints(member).values()
        elif isinstance(member, property) and member.fget is not None:
            hints += typing.get_type_hints(member.fget).values()
    return hints


CONTRACTS = [
    plugin.Storage,
    plugin.StagedBlob,
    plugin.PackageSource,
    plugin.LayeringStrategy,
    plugin.ProcessRunner,
    plugin.InteractiveProcess,
    plugin.ThreadRunner,
    plugin.Runtime,
    plugin.Provider,
    plugin.Setting,
    plugin.Authenticator,
    hookspecs.nixeryd_storage_backends,
    hookspecs.nixeryd_package_sources,
    hookspecs.nixeryd_layering_strategies,
    hookspecs.nixeryd_authenticators,
    hookspecs.nixeryd_image_built,
    hookspecs.nixeryd_gc_finished,
]


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda contract: contract.__name__)
def test_every_type_a_contract_mentions_is_exported(contract: Any) -> None:
    mentioned = {found for hint in _hints(contract) for found in _nixeryd_types(hint)}
    exported = {value for value in vars(plugin).values() if isinstance(value, type)}
    missing = sorted(f"{kind.__module__}.{kind.__qualname__}" for kind in mentioned - exported)
    assert not missing, f"{contract.__name__} mentions types nixeryd.plugin lacks: {missing}"


def _nixeryd_imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return {module for module in modules if module.split(".")[0] == "nixeryd"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_the_example_plugins_import_only_the_public_api(path: Path) -> None:
    allowed = {"nixeryd.plugin"}
    if path.name.startswith("test_"):
        allowed |= {"nixeryd.testing"} | {
            f"nixeryd.testing.{module.stem}"
            for module in (ROOT / "nixeryd" / "testing").glob("*.py")
            if module.stem != "__init__"
        }
    assert _nixeryd_imports(path) <= allowed


def test_there_are_example_plugins() -> None:
    assert {path.parent.name for path in EXAMPLES} >= {
        "nixeryd-single-layer",
        "nixeryd-memory-storage",
    }
