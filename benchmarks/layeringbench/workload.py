"""Image requests of several traffic shapes, seeded.

**nixery** is shaped like Nixery's traffic: most images start with ``shell``
(Nixery's documentation and users lead with ``shell/...``), then name one to
three tools drawn from a skewed (Zipf) distribution over the corpus's curated
tools, most requested first. The other shapes are what a busy site also sees,
with closures of hundreds of store paths, where a layer budget binds:

* **many tools**: six to fifteen curated tools per image (a team's toolbox);
* **whole corpus**: one to five tools, each either a curated one (Zipf) or any
  package of the corpus (uniformly: desktop programs, Perl and Python
  applications, TeX, with big closures among them);
* **CI**: a language toolchain (Zipf over the corpus's toolchains) and eight to
  sixteen curated tools, as a CI job's image holds;
* **mixed**: the same images pulled again and again, by a Zipf distribution
  over a pool of 200 images, of which 70% are small (one to three curated
  tools) and 30% large (ten to thirty tools from the whole corpus);
* **huge**: thirty to sixty tools from the whole corpus (closures of 1,000 to
  2,000 store paths): the worst case for the layering time.

Every image also gets the corpus's implicit packages, as nixeryd adds
``cacert`` and ``iana-etc``. An image's roots are ordered as nixeryd orders
them: the requested packages sorted, then the implicit ones.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from benchmarks.layeringbench.corpus import Corpus

#: Share of images that start with ``shell``.
SHELL_SHARE = 0.85
#: Zipf exponent of tool popularity (and of image popularity in the mixed shape).
ZIPF_EXPONENT = 1.0
#: How many tools an image of the nixery shape names: one, two or three, with these weights.
TOOL_COUNT_WEIGHTS = (0.5, 0.3, 0.2)
#: The mixed shape's pool of images and its share of large ones.
MIXED_POOL = 200
MIXED_LARGE_SHARE = 0.3

Image = tuple[str, ...]


class _Draw:
    """Seeded draws of tools from a corpus."""

    def __init__(self, corpus: Corpus, seed: int) -> None:
        self.corpus = corpus
        self.rng = random.Random(seed)
        self._weights = zipf_weights(len(corpus.tools))

    def curated(self) -> str:
        return self.rng.choices(self.corpus.tools, self._weights)[0]

    def anything(self) -> str:
        """A curated tool (Zipf) or, as often, any package of the corpus (uniformly)."""
        if self.rng.random() < 0.5:
            return self.curated()
        return self.rng.choice(self.corpus.everything)

    def tools(self, how_many: int, draw: Callable[[], str]) -> set[str]:
        how_many = min(how_many, len(set(self.corpus.everything) | set(self.corpus.tools)))
        chosen: set[str] = set()
        while len(chosen) < how_many:
            chosen.add(draw())
        return chosen

    def image(self, requested: set[str]) -> Image:
        if self.rng.random() < SHELL_SHARE:
            requested = requested | set(self.corpus.shell)
        return image_roots(self.corpus, sorted(requested))


def zipf_weights(count: int) -> list[float]:
    return [1 / (rank + 1) ** ZIPF_EXPONENT for rank in range(count)]


def nixery(corpus: Corpus, count: int, seed: int) -> list[Image]:
    draw = _Draw(corpus, seed)
    sizes = range(1, len(TOOL_COUNT_WEIGHTS) + 1)
    return [
        draw.image(
            draw.tools(
                min(len(corpus.tools), draw.rng.choices(sizes, TOOL_COUNT_WEIGHTS)[0]),
                draw.curated,
            )
        )
        for _ in range(count)
    ]


def many_tools(corpus: Corpus, count: int, seed: int) -> list[Image]:
    draw = _Draw(corpus, seed)
    return [
        draw.image(draw.tools(min(len(corpus.tools), draw.rng.randint(6, 15)), draw.curated))
        for _ in range(count)
    ]


def whole_corpus(corpus: Corpus, count: int, seed: int) -> list[Image]:
    draw = _Draw(corpus, seed)
    return [draw.image(draw.tools(draw.rng.randint(1, 5), draw.anything)) for _ in range(count)]


def ci(corpus: Corpus, count: int, seed: int) -> list[Image]:
    draw = _Draw(corpus, seed)
    toolchains = corpus.toolchains or tuple((tool,) for tool in corpus.tools)
    weights = zipf_weights(len(toolchains))
    images = []
    for _ in range(count):
        toolchain = set(draw.rng.choices(toolchains, weights)[0])
        tools = draw.tools(min(len(corpus.tools), draw.rng.randint(8, 16)), draw.curated)
        images.append(draw.image(toolchain | tools))
    return images


def mixed(corpus: Corpus, count: int, seed: int) -> list[Image]:
    draw = _Draw(corpus, seed)
    pool = []
    for _ in range(MIXED_POOL):
        if draw.rng.random() < MIXED_LARGE_SHARE:
            pool.append(draw.image(draw.tools(draw.rng.randint(10, 30), draw.anything)))
        else:
            pool.append(
                draw.image(draw.tools(min(len(corpus.tools), draw.rng.randint(1, 3)), draw.curated))
            )
    return draw.rng.choices(pool, zipf_weights(len(pool)), k=count)


def huge(corpus: Corpus, count: int, seed: int) -> list[Image]:
    draw = _Draw(corpus, seed)
    return [draw.image(draw.tools(draw.rng.randint(30, 60), draw.anything)) for _ in range(count)]


#: The traffic shapes, by name, in the benchmark's order.
WORKLOADS: dict[str, Callable[[Corpus, int, int], list[Image]]] = {
    "nixery": nixery,
    "many tools": many_tools,
    "whole corpus": whole_corpus,
    "ci": ci,
    "mixed": mixed,
    "huge": huge,
}


def workload(corpus: Corpus, count: int, seed: int, shape: str = "nixery") -> list[Image]:
    """``count`` image requests of ``shape``, each the package names of one image, in pull order."""
    return WORKLOADS[shape](corpus, count, seed)


def image_roots(corpus: Corpus, requested: Sequence[str]) -> Image:
    requested = sorted(set(requested))
    return (*requested, *(name for name in corpus.implicit if name not in requested))
