"""Corpora of realistic closure graphs for the layering benchmark.

A :class:`Corpus` is one global reference graph (every package of a package
set), from which the benchmark cuts the closure of each requested image, as
``nix path-info --recursive`` would report it.

**Debian** (:func:`debian_corpus`), generated offline from the package lists
apt keeps in ``/var/lib/apt/lists``:

* node = a binary package (the newest version among the lists);
* references = ``Pre-Depends`` + ``Depends``, version constraints dropped; of
  alternatives (``a | b``) the first that names a real package, else the first
  that some package provides; a virtual package (``awk``) resolves to its
  provider of highest ``Priority``, ties by name; unresolvable ones are dropped;
* size = ``Installed-Size`` (KiB) as the nar size; compressed size = the
  ``.deb``'s ``Size``, standing in for a gzipped layer of the path;
* popularity = how many packages reference the package, which is what
  Nixery's popcount counts (references among the closures of a package set).

How this differs from Nix: Debian dependencies may form cycles (``perl`` <->
``perl-modules``, ``libc6`` <-> ``libgcc-s1``) while Nix closures are DAGs, so
each strongly connected component is collapsed into one node (sizes summed,
named after its alphabetically first member); Debian packages are coarser than
Nix store paths (no split ``-lib``/``-man``/``-dev`` outputs everywhere, no
wrappers, no separate Python modules per store path), so closures have fewer,
bigger nodes; and ``Essential`` packages (``coreutils``, ``bash``) are depended
on implicitly, so their counted popularity is lower than in nixpkgs.

**Nix** (:func:`nix_corpus`): the runtime reference graph of a real Nix
package set (the test package set), as ``nix path-info --json --recursive``
reports it, captured once into a JSON file with :func:`capture_nix_corpus`;
compressed sizes are the gzipped nar sizes measured at capture time.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from nixeryd.builtin.prefix_layering import BASE_PARTS
from nixeryd.builtin.stable_layering import BASE_PACKAGE_NAMES
from nixeryd.closure import ClosureGraph, StorePath, store_path_name
from nixeryd.popularity import Popularity

NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"

#: Where apt keeps its package lists; the lz4-compressed ones are read with ``lz4cat``.
APT_LISTS = Path("/var/lib/apt/lists")

#: Debian's stand-ins for nixeryd's ``shell`` meta-package (bashInteractive,
#: coreutils, moreutils, nano) and for the packages added to every image
#: (cacert, iana-etc).
DEBIAN_SHELL = ("bash", "coreutils", "moreutils", "nano")
DEBIAN_IMPLICIT = ("ca-certificates", "netbase")

#: Tools people ask Nixery for, most requested first (Debian package names).
#: The order is what the workload's skewed distribution ranks by.
DEBIAN_TOOLS = (
    "git", "curl", "jq", "htop", "vim", "python3", "wget", "openssh-client", "rsync",
    "nodejs", "tmux", "make", "gcc", "strace", "less", "file", "unzip", "iproute2",
    "iputils-ping", "bind9-dnsutils", "netcat-openbsd", "tcpdump", "gdb", "ripgrep",
    "fd-find", "fzf", "tree", "ncdu", "postgresql-client", "redis-tools", "sqlite3",
    "golang-go", "rustc", "ruby", "php-cli", "openjdk-17-jre-headless", "emacs-nox",
    "neovim", "zsh", "fish", "mercurial", "subversion", "awscli", "ansible", "skopeo",
    "socat", "nmap", "lsof", "psmisc", "xz-utils", "zstd", "p7zip-full", "imagemagick",
    "ffmpeg", "graphviz", "pandoc", "shellcheck", "httpie", "mtr-tiny", "whois", "gnupg",
    "openssl", "bat", "yq", "cargo", "maven", "default-mysql-client", "lua5.4", "gawk",
    "bc", "tar", "zip", "patch", "diffutils", "findutils",
)  # fmt: skip

#: Language toolchains a CI image starts from (Debian package names), most used first.
DEBIAN_TOOLCHAINS = (
    ("python3", "python3-pip", "python3-venv"), ("nodejs", "npm"), ("golang-go",),
    ("openjdk-17-jdk-headless", "maven"), ("gcc", "g++", "make", "cmake"), ("rustc", "cargo"),
    ("ruby", "bundler"), ("php-cli", "composer"), ("clang", "llvm", "ninja-build"),
    ("r-base-core",), ("ghc",), ("elixir", "erlang-nox"), ("texlive-latex-base",),
)  # fmt: skip

#: What the whole-corpus workloads do not draw: packages nobody names as a tool
#: (libraries, development files, documentation, data, kernels).
_NOT_TOOLS = re.compile(r"^(lib|linux-)|-(dev|doc|dbg|data|common|l10n)$")

_PRIORITY_RANK = {"required": 0, "important": 1, "standard": 2, "optional": 3, "extra": 4}


@dataclass(frozen=True)
class Corpus:
    """A package set's global reference graph, and what the workload draws from it."""

    name: str
    #: Every store path of the package set.
    paths: Mapping[str, StorePath]
    #: The compressed (download) size of each store path.
    compressed: Mapping[str, int]
    #: Package name -> its store path (what an image name component resolves to).
    packages: Mapping[str, str]
    #: The popularity data a daemon serving this package set would be given.
    popularity: Popularity
    #: What ``shell`` expands to, and what every image gets.
    shell: tuple[str, ...]
    implicit: tuple[str, ...]
    #: Package names requested as tools, most requested first.
    tools: tuple[str, ...]
    #: Every package a user might name (the whole-corpus workloads draw from it).
    everything: tuple[str, ...]
    #: Language toolchains (package names) a CI image starts from, most used first.
    toolchains: tuple[tuple[str, ...], ...]
    #: Store path names (without versions) of the shell and implicit packages.
    base_names: tuple[str, ...]
    #: The same in the prefix strategy's parts: the implicit packages', then the shell's.
    base_parts: tuple[tuple[str, ...], ...]

    def closure(self, packages: Sequence[str]) -> ClosureGraph:
        """The closure graph of an image of ``packages`` (roots in the order given)."""
        roots = [self.packages[name] for name in packages]
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            path = todo.pop()
            if path not in seen:
                seen.add(path)
                todo.extend(self.paths[path].references)
        return ClosureGraph(roots, {path: self.paths[path] for path in seen})


def fake_store_path(name: str) -> str:
    """A well-formed store path whose hash is derived from ``name``."""
    digest = hashlib.sha256(name.encode()).digest()
    return "/nix/store/" + "".join(NIX_BASE32[byte % 32] for byte in digest[:32]) + "-" + name


# -- Debian ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DebianPackage:
    name: str
    version: str
    priority: str
    installed_size: int
    deb_size: int
    depends: tuple[tuple[str, ...], ...]
    provides: tuple[str, ...]


def apt_package_lists(lists: Path = APT_LISTS) -> list[Path]:
    """The ``Packages`` lists, the release's own first, so that updates override it."""
    found = sorted(lists.glob("*_Packages*"))
    return sorted(found, key=lambda path: ("-security_" in path.name, "-updates_" in path.name))


def read_package_list(path: Path) -> str:
    if path.suffix == ".lz4":
        return subprocess.run(
            ["lz4cat", str(path)], check=True, capture_output=True, text=True
        ).stdout
    return path.read_text()


def parse_packages(text: str) -> Iterator[DebianPackage]:
    """The stanzas of a ``Packages`` file (continuation lines ignored: none we read has any)."""
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if "Package" not in fields:
            continue
        depends = _relations(fields.get("Pre-Depends", "")) + _relations(fields.get("Depends", ""))
        yield DebianPackage(
            name=fields["Package"],
            version=fields.get("Version", "0"),
            priority=fields.get("Priority", "optional"),
            installed_size=int(fields.get("Installed-Size", "0") or 0) * 1024,
            deb_size=int(fields.get("Size", "0") or 0),
            depends=depends,
            provides=tuple(
                alternatives[0] for alternatives in _relations(fields.get("Provides", ""))
            ),
        )


_QUALIFIERS = re.compile(r"\(.*?\)|\[.*?\]|<.*?>")


def _relations(value: str) -> tuple[tuple[str, ...], ...]:
    """``a (>= 1), b:any | c`` -> ``(("a",), ("b", "c"))``."""
    relations = []
    for clause in value.split(","):
        names = tuple(
            _QUALIFIERS.sub("", alternative).strip().split(":")[0]
            for alternative in clause.split("|")
        )
        names = tuple(name for name in names if name)
        if names:
            relations.append(names)
    return tuple(relations)


def debian_corpus(
    texts: Iterable[str] | None = None,
    *,
    tools: Sequence[str] = DEBIAN_TOOLS,
    toolchains: Sequence[Sequence[str]] = DEBIAN_TOOLCHAINS,
    shell: Sequence[str] = DEBIAN_SHELL,
    implicit: Sequence[str] = DEBIAN_IMPLICIT,
) -> Corpus:
    """The Debian corpus from ``Packages`` texts (default: apt's lists on this machine)."""
    if texts is None:
        texts = (read_package_list(path) for path in apt_package_lists())
    packages: dict[str, DebianPackage] = {}
    for text in texts:
        for package in parse_packages(text):
            packages[package.name] = package  # later lists (updates, security) win
    if not packages:
        raise ValueError("no Debian package lists found: run apt-get update")

    providers: dict[str, list[DebianPackage]] = {}
    for package in packages.values():
        for virtual in package.provides:
            providers.setdefault(virtual, []).append(package)

    def resolve(alternatives: Sequence[str]) -> str | None:
        for name in alternatives:
            if name in packages:
                return name
        for name in alternatives:
            if name in providers:
                best = min(
                    providers[name], key=lambda p: (_PRIORITY_RANK.get(p.priority, 5), p.name)
                )
                return best.name
        return None

    graph = nx.DiGraph()
    graph.add_nodes_from(packages)
    for package in packages.values():
        for alternatives in package.depends:
            target = resolve(alternatives)
            if target is not None and target != package.name:
                graph.add_edge(package.name, target)

    # Nix closures are DAGs: collapse each dependency cycle into one node.
    condensed = nx.condensation(graph)
    path_of_component: dict[int, str] = {}
    paths: dict[str, StorePath] = {}
    compressed: dict[str, int] = {}
    package_paths: dict[str, str] = {}
    members_of: dict[int, list[str]] = {}
    for component in condensed.nodes:
        members = sorted(condensed.nodes[component]["members"])
        members_of[component] = members
        first = packages[members[0]]
        label = first.name if len(members) == 1 else f"{first.name}+{len(members) - 1}"
        path = fake_store_path(f"{label}-{_nix_version(first.version)}")
        path_of_component[component] = path
        compressed[path] = sum(packages[name].deb_size for name in members)
        package_paths.update(dict.fromkeys(members, path))
    for component, members in members_of.items():
        path = path_of_component[component]
        references = sorted(path_of_component[c] for c in condensed.successors(component))
        paths[path] = StorePath(
            path=path,
            nar_size=sum(packages[name].installed_size for name in members),
            references=tuple(references),
        )
    counts: dict[str, int] = {}
    for component in condensed.nodes:
        count = condensed.in_degree(component)
        if count:
            counts[store_path_name(path_of_component[component])] = count
    return Corpus(
        name="debian",
        paths=paths,
        compressed=compressed,
        packages=package_paths,
        popularity=Popularity(counts),
        shell=tuple(name for name in shell if name in package_paths),
        implicit=tuple(name for name in implicit if name in package_paths),
        tools=tuple(name for name in tools if name in package_paths),
        everything=tuple(sorted(name for name in package_paths if not _NOT_TOOLS.search(name))),
        toolchains=tuple(
            tuple(toolchain)
            for toolchain in toolchains
            if all(name in package_paths for name in toolchain)
        ),
        base_names=(*shell, *implicit),
        base_parts=(tuple(implicit), tuple(shell)),
    )


def _nix_version(version: str) -> str:
    """A Debian version as it could appear in a store path name (no epoch colon)."""
    return version.split(":", 1)[-1].replace("~", "_")


# -- Nix ------------------------------------------------------------------------------


def capture_nix_corpus(package_set: Path, attributes: Sequence[str], out: Path) -> None:
    """Build ``attributes`` of a Nix package set and save their closure graph to ``out``.

    Needs Nix (and so is not part of the offline benchmark run): the saved file
    is what :func:`nix_corpus` reads. Compressed sizes are measured by gzipping
    each path's nar.
    """
    env_args = ["--option", "substituters", ""]
    outputs = {}
    for attribute in attributes:
        built = subprocess.run(
            ["nix-build", "--no-out-link", *env_args, str(package_set), "-A", attribute],
            check=True, capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        outputs[attribute] = built[0]
    report: Any = json.loads(
        subprocess.run(
            [
                "nix",
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "--json",
                "--recursive",
                *outputs.values(),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    entries = report if isinstance(report, list) else [{"path": p, **i} for p, i in report.items()]
    for entry in entries:
        nar = subprocess.run(
            ["nix-store", "--dump", entry["path"]], check=True, capture_output=True
        ).stdout
        entry["compressedSize"] = len(gzip.compress(nar, compresslevel=6))
    document = {"packages": outputs, "paths": entries}
    out.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def nix_corpus(
    capture: Path,
    *,
    shell: Sequence[str] = ("bashInteractive", "coreutils", "moreutils", "nano"),
    implicit: Sequence[str] = ("cacert", "iana-etc"),
) -> Corpus:
    """The corpus saved by :func:`capture_nix_corpus`; every other package is a tool."""
    document = json.loads(capture.read_text())
    graph = ClosureGraph.from_path_info([], document["paths"])
    compressed = {entry["path"]: int(entry["compressedSize"]) for entry in document["paths"]}
    counts: dict[str, int] = {}
    for info in graph.paths.values():
        for reference in info.references:
            if reference != info.path:
                name = store_path_name(reference)
                counts[name] = counts.get(name, 0) + 1
    packages: dict[str, str] = document["packages"]
    special = set(shell) | set(implicit)
    return Corpus(
        name=f"nix:{capture.stem}",
        paths=graph.paths,
        compressed=compressed,
        packages=packages,
        popularity=Popularity(counts),
        shell=tuple(shell),
        implicit=tuple(name for name in implicit if name in packages),
        tools=tuple(sorted(name for name in packages if name not in special)),
        everything=tuple(sorted(name for name in packages if name not in special)),
        toolchains=(),
        base_names=BASE_PACKAGE_NAMES,
        base_parts=BASE_PARTS,
    )
