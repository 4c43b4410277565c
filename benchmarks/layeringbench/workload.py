"""Image requests shaped like Nixery's traffic, seeded.

Most images start with ``shell`` (Nixery's documentation and users lead with
``shell/...``), then name one to three tools drawn from a skewed (Zipf)
distribution over the corpus's tools, most requested first. Every image also
gets the corpus's implicit packages, as nixeryd adds ``cacert`` and ``iana-etc``.
An image's roots are ordered as nixeryd orders them: the requested packages
sorted, then the implicit ones.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from benchmarks.layeringbench.corpus import Corpus

#: Share of images that start with ``shell``.
SHELL_SHARE = 0.85
#: Zipf exponent of tool popularity.
ZIPF_EXPONENT = 1.0
#: How many tools an image names: one, two or three, with these weights.
TOOL_COUNT_WEIGHTS = (0.5, 0.3, 0.2)


def workload(corpus: Corpus, count: int, seed: int) -> list[tuple[str, ...]]:
    """``count`` image requests, each the package names of one image, in pull order."""
    rng = random.Random(seed)
    tools = corpus.tools
    weights = [1 / (rank + 1) ** ZIPF_EXPONENT for rank in range(len(tools))]
    images = []
    for _ in range(count):
        how_many = min(
            len(tools), rng.choices(range(1, len(TOOL_COUNT_WEIGHTS) + 1), TOOL_COUNT_WEIGHTS)[0]
        )
        chosen: set[str] = set()
        while len(chosen) < how_many:
            chosen.add(rng.choices(tools, weights)[0])
        if rng.random() < SHELL_SHARE:
            chosen.update(corpus.shell)
        images.append(image_roots(corpus, sorted(chosen)))
    return images


def image_roots(corpus: Corpus, requested: Sequence[str]) -> tuple[str, ...]:
    requested = sorted(set(requested))
    return (*requested, *(name for name in corpus.implicit if name not in requested))
