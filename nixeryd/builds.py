"""Recent builds and their live logs: what the web pages (:mod:`nixeryd.web`) show.

Every image the builder resolves (one image, tag and platform) becomes a
:class:`Build` with an id: a build that reaches Nix, or an answer from a
cache (kept so that an image page can show its manifest and layers). What
Nix prints for it arrives here line by line (:class:`nixeryd.nixbuild.Nix`
hands each line on as its process protocol reads it), and the builder adds
its stage events (evaluation done, layers written) and the result.

The lines of a build are numbered from 1 and kept in a ring of
:data:`LINES_KEPT`: the numbers go on when older lines are dropped, so a
reader that resumes from a number (Server-Sent Events' ``Last-Event-ID``)
gets each line once, and learns how many it missed. Listeners are told of
each line as it is added; the page's event stream is one.

The hub keeps :data:`BUILDS_KEPT` builds and at most :data:`BYTES_KEPT` bytes
of log text over all of them, dropping the oldest finished builds first: a
daemon serving for months keeps a bounded few megabytes. Running builds are
never dropped (the Nix slots bound how many run).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Lines kept per build; a nixpkgs image prints about one per derivation.
LINES_KEPT = 5000
#: Builds kept, running or finished.
BUILDS_KEPT = 200
#: Bytes of log text kept over all builds.
BYTES_KEPT = 16 * 1024 * 1024

#: What became of a build: running, built by Nix, answered from a cache, failed.
STATUSES = ("building", "built", "cached", "failed")


@dataclass(frozen=True)
class LogLine:
    """One numbered line of a build's log: Nix's output for a step, or a stage event
    of nixeryd's own (``step`` is ``nixeryd``)."""

    number: int
    step: str
    text: str

    def as_json(self) -> dict[str, Any]:
        return {"n": self.number, "step": self.step, "text": self.text}


@dataclass(frozen=True)
class LayerInfo:
    """A layer of a built image: its blob, and the store paths in it (empty for the
    symlink forest; None when not known, for an image answered from a cache)."""

    digest: str
    size: int
    paths: Sequence[str] | None


@dataclass
class Build:
    """One image (packages and platform) and tag being or having been built."""

    id: int
    #: The image's canonical form (:attr:`nixeryd.imagename.ImageTarget.canonical`).
    image: str
    tag: str
    platform: str
    started: float
    ended: float | None = None
    status: str = "building"
    #: The registry error a failed build answered: its code and message.
    error: dict[str, Any] | None = None
    #: The platform's docker manifest digest, once built.
    manifest: str | None = None
    layers: Sequence[LayerInfo] = ()
    lines: deque[LogLine] = field(default_factory=lambda: deque(maxlen=LINES_KEPT))
    #: The number the next line gets.
    next_line: int = 1
    bytes: int = 0
    _listeners: list[Callable[[LogLine | None], None]] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        """How long the build took, or has taken so far."""
        return (self.ended if self.ended is not None else time.time()) - self.started

    @property
    def size(self) -> int | None:
        """The bytes of its layers, once built."""
        return sum(layer.size for layer in self.layers) if self.layers else None

    @property
    def finished(self) -> bool:
        return self.status != "building"

    def since(self, number: int) -> list[LogLine]:
        """The kept lines numbered after ``number``, oldest first."""
        return [line for line in self.lines if line.number > number]

    def listen(self, listener: Callable[[LogLine | None], None]) -> Callable[[], None]:
        """Call ``listener`` with each new line, and with None once the build finishes;
        returns what stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def add(self, step: str, text: str) -> int:
        """Append a line; the bytes it added (less those of a line it pushed out)."""
        if self.finished:
            return 0
        added = len(text)
        if len(self.lines) == self.lines.maxlen:
            added -= len(self.lines[0].text)
        line = LogLine(self.next_line, step, text)
        self.next_line += 1
        self.lines.append(line)
        self.bytes += added
        for listener in list(self._listeners):
            listener(line)
        return added

    def as_json(self, *, log: bool = False) -> dict[str, Any]:
        document: dict[str, Any] = {
            "id": self.id,
            "image": self.image,
            "tag": self.tag,
            "platform": self.platform,
            "status": self.status,
            "started": self.started,
            "seconds": self.seconds,
            "error": self.error,
            "manifest": self.manifest,
            "size": self.size,
            "layers": [
                {"digest": layer.digest, "size": layer.size, "paths": layer.paths}
                for layer in self.layers
            ],
            "lines": self.next_line - 1,
            "linesDropped": self.next_line - 1 - len(self.lines),
        }
        if log:
            document["log"] = [line.as_json() for line in self.lines]
        return document


class BuildHub:
    """The recent builds, by id, oldest first."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._builds: OrderedDict[int, Build] = OrderedDict()
        #: The running build of each canonical image, which Nix's lines go to.
        self._running: dict[str, Build] = {}
        #: The latest build of each canonical image and tag.
        self._latest: dict[tuple[str, str], Build] = {}
        self._started = 0
        self._bytes = 0

    def start(self, image: str, tag: str, platform: str) -> Build:
        """A new build of ``image:tag`` (canonical image) on ``platform``."""
        self._started += 1
        build = Build(self._started, image, tag, platform, self._clock())
        self._builds[build.id] = build
        self._running[image] = build
        self._latest[(image, tag)] = build
        self._trim()
        return build

    def line(self, image: str, step: str, text: str) -> None:
        """A line Nix printed for the running build of ``image``; dropped if none runs
        (``nixeryd build`` without a hub, or a line after the build was given up)."""
        build = self._running.get(image)
        if build is not None:
            self.event(build, step, text)

    def event(self, build: Build, step: str, text: str) -> None:
        """A line of ``build``'s log."""
        self._bytes += build.add(step, text)
        if self._bytes > BYTES_KEPT:
            self._trim()

    def finish(
        self,
        build: Build,
        status: str,
        *,
        error: dict[str, Any] | None = None,
        manifest: str | None = None,
        layers: Sequence[LayerInfo] = (),
    ) -> None:
        """``build`` is over: ``status`` is one of :data:`STATUSES` but ``building``."""
        if self._running.get(build.image) is build:
            del self._running[build.image]
        if build.finished:
            return
        build.ended = self._clock()
        build.error = error
        build.manifest = manifest
        known = self._known_layers(manifest)
        if known and all(layer.paths is None for layer in layers):
            layers = known
        build.layers = tuple(layers)
        build.status = status
        for listener in list(build._listeners):
            listener(None)
        build._listeners.clear()

    def _known_layers(self, manifest: str | None) -> Sequence[LayerInfo]:
        """The layers of an earlier build of the same manifest, store paths and all."""
        for other in reversed(self._builds.values()):
            if manifest is not None and other.manifest == manifest and other.status == "built":
                return other.layers
        return ()

    def build(self, number: int) -> Build | None:
        return self._builds.get(number)

    def latest(self, image: str, tag: str) -> Build | None:
        """The latest build kept of ``image`` (canonical) and ``tag``."""
        return self._latest.get((image, tag))

    def recent(self) -> list[Build]:
        """The builds kept, newest first."""
        return list(reversed(self._builds.values()))

    def of(self, images: Sequence[str], tag: str) -> list[Build]:
        """The builds kept of any of ``images`` (canonical) with ``tag``, newest first."""
        wanted = set(images)
        return [b for b in self.recent() if b.image in wanted and b.tag == tag]

    def sharing(self, digest: str, besides: Sequence[str]) -> Iterator[tuple[str, str]]:
        """The other images (canonical, tag) whose latest build has layer ``digest``."""
        seen: set[tuple[str, str]] = set()
        for build in self.recent():
            key = (build.image, build.tag)
            if key in seen or build.image in besides or build.status == "failed":
                continue
            seen.add(key)
            if any(layer.digest == digest for layer in build.layers):
                yield key

    def _trim(self) -> None:
        """Drop the oldest finished builds while over either bound."""
        for number in list(self._builds):
            if len(self._builds) <= BUILDS_KEPT and self._bytes <= BYTES_KEPT:
                return
            build = self._builds[number]
            if build.finished:
                del self._builds[number]
                self._bytes -= build.bytes
                if self._latest.get((build.image, build.tag)) is build:
                    del self._latest[(build.image, build.tag)]
