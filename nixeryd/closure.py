"""The runtime closure of an image: store paths, their sizes and references.

Nix reports the closure with ``nix path-info --json --recursive``; this module
turns that report into a :class:`ClosureGraph` (a networkx digraph from each
path to the paths it references) that the layering strategies work on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx


def store_path_name(path: str) -> str:
    """A store path's name without its hash (``hello-2.12`` for ``/nix/store/<hash>-hello-2.12``).

    It is the key of Nixery's popularity data.
    """
    base = path.rsplit("/", 1)[-1]
    return base.split("-", 1)[1] if "-" in base else base


@dataclass(frozen=True)
class StorePath:
    """One store path of a closure as Nix registered it."""

    path: str
    nar_size: int
    references: tuple[str, ...]

    @property
    def name(self) -> str:
        return store_path_name(self.path)


class ClosureGraph:
    """The runtime closure of an image's packages.

    ``roots`` are the store paths of the requested packages; ``graph`` has one
    node per store path and an edge from each path to each path it references
    (self-references dropped, as they carry no layering information).
    """

    def __init__(self, roots: Sequence[str], paths: Mapping[str, StorePath]) -> None:
        missing = [root for root in roots if root not in paths]
        if missing:
            raise ValueError(f"closure does not contain its roots: {missing}")
        self.roots: tuple[str, ...] = tuple(dict.fromkeys(roots))
        self.paths: Mapping[str, StorePath] = dict(paths)
        self.graph: nx.DiGraph = nx.DiGraph()
        for store_path in self.paths.values():
            self.graph.add_node(store_path.path)
            for reference in store_path.references:
                if reference != store_path.path and reference in self.paths:
                    self.graph.add_edge(store_path.path, reference)

    @classmethod
    def from_path_info(cls, roots: Sequence[str], report: Any) -> ClosureGraph:
        """Build the graph from ``nix path-info --json --recursive`` output.

        Nix up to 2.18 prints a list of objects with a ``path`` key; later
        versions print an object keyed by path. Both are accepted.
        """
        entries: Iterable[tuple[str, Mapping[str, Any]]]
        if isinstance(report, list):
            entries = ((entry["path"], entry) for entry in report)
        elif isinstance(report, dict):
            entries = report.items()
        else:
            raise ValueError("unexpected nix path-info output")
        paths = {
            path: StorePath(
                path=path,
                nar_size=int(info.get("narSize", 0)),
                references=tuple(sorted(info.get("references", ()))),
            )
            for path, info in entries
            if info is not None
        }
        return cls(roots, paths)

    def closure_of(self, path: str) -> set[str]:
        """The path and everything it references, transitively."""
        return {path} | set(nx.descendants(self.graph, path))

    def total_size(self, paths: Iterable[str]) -> int:
        return sum(self.paths[path].nar_size for path in paths)
