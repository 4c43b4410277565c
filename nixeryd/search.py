"""Package search: the package set's attribute names (and descriptions), for the web pages.

A query is a piece of an image name (letters, digits, ``.``, ``_``, ``-``), matched
against the lower-cased top-level attribute names of the package set a tag
resolves to, by the same Nix evaluation that resolves images
(:meth:`nixeryd.nixbuild.Nix.search`: in the long-running evaluator when there
is one, so a search costs what listing the names and describing at most 50
matches costs). Results are cached per source pin (a commit gives the same
answer for good) and, for a moving source, for :data:`MOVING_TTL` seconds.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from twisted.internet.defer import inlineCallbacks

from nixeryd.errors import RegistryError
from nixeryd.nixbuild import Nix
from nixeryd.platform import Platform
from nixeryd.singleflight import SingleFlight
from nixeryd.sources import PackageSource, SourceRef

#: What a query may be: a piece of an image name's component.
QUERY = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: Seconds a moving source's (a path's, a branch's) results are answered again.
MOVING_TTL = 60.0
#: Queries whose results are kept.
RESULTS_KEPT = 500


def _image_name(entry: dict[str, Any]) -> str | None:
    """The image name a search result is pulled by; None for what is not a package (an
    attribute set of them, or a value that fails to evaluate)."""
    if not entry["derivation"]:
        return None
    name = str(entry["attrPath"]).lower()
    # "_9lives" is pulled as "9lives" (the Nix side adds the "_" back).
    return name[1:] if re.match(r"^_[0-9]", name) else name


class QueryInvalid(RegistryError):
    code = "NAME_INVALID"
    status = 400


class PackageSearch:
    """Searches the package set of a tag; concurrent equal searches share one evaluation."""

    def __init__(self, nix: Nix, source: PackageSource, platform: Platform, clock: Any) -> None:
        self._nix = nix
        self._source = source
        self._platform = platform
        self._clock = clock
        self._flights: SingleFlight[list[dict[str, Any]]] = SingleFlight()
        #: (pin or source, query) -> (until when, the results); oldest first.
        self._results: OrderedDict[tuple[str, str], tuple[float, list[dict[str, Any]]]] = (
            OrderedDict()
        )

    @inlineCallbacks
    def search(self, query: str, tag: str) -> Any:
        """The packages matching ``query`` in ``tag``'s package set, with the image name
        each is pulled by."""
        if not QUERY.match(query):
            raise QueryInvalid(
                f"{query!r} is not a package name to search for: lower-case letters, "
                "digits, '.', '_' and '-', at most 64"
            )
        source: SourceRef = yield self._source.resolve(tag)
        key = (source.pin or f"{source.src_type} {tag}", query)
        kept = self._results.get(key)
        if kept is not None and kept[0] > self._clock.seconds():
            self._results.move_to_end(key)
            return kept[1]
        found = yield self._flights.run(
            key, lambda: self._nix.search(source, self._platform.system, query)
        )
        results = [{**entry, "image": _image_name(entry)} for entry in found]
        until = float("inf") if source.pin is not None else self._clock.seconds() + MOVING_TTL
        self._results[key] = (until, results)
        while len(self._results) > RESULTS_KEPT:
            self._results.popitem(last=False)
        return results
