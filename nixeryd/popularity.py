"""Popularity data: how many packages of the package set reference each store path.

The format is Nixery's: a JSON object ``{"<name>-<version>": count}`` keyed by
store path names without their hash. ``NIX_POPULARITY_URL`` points at it:
``http(s)://`` URLs are fetched with treq, ``file://`` URLs and plain paths are
read from disk, so air-gapped sites can ship the file alongside the daemon.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from nixeryd.closure import store_path_name
from nixeryd.singleflight import SingleFlight

#: Store path names of what every image carries (nixpkgs' cacert is ``nss-cacert-<version>``),
#: so they outrank anything else (glibc is ~300k in nixpkgs).
ALWAYS_POPULAR_PREFIXES = ("nss-cacert", "cacert", "iana-etc")
ALWAYS_POPULAR_COUNT = 500_000


class Popularity:
    """Popularity counts, looked up by store path."""

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self._counts = dict(counts or {})
        #: Identifies the data in cache keys: other data may layer an image differently.
        self.fingerprint = hashlib.sha256(
            json.dumps(self._counts, sort_keys=True).encode()
        ).hexdigest()

    def __len__(self) -> int:
        return len(self._counts)

    def of(self, path: str) -> int:
        """The popularity of a store path: its count, 500000 for cacert/iana-etc, else 1."""
        name = store_path_name(path)
        count = self._counts.get(name)
        if count is not None:
            return count
        if name.startswith(ALWAYS_POPULAR_PREFIXES):
            return ALWAYS_POPULAR_COUNT
        return 1


def parse_popularity(data: bytes, origin: str) -> Popularity:
    """Parse Nixery's popularity format, naming ``origin`` in any error."""
    try:
        decoded: Any = json.loads(data)
    except ValueError as error:
        raise ValueError(f"popularity data from {origin} is not JSON: {error}") from error
    if not isinstance(decoded, dict) or not all(
        isinstance(key, str) and isinstance(value, int) for key, value in decoded.items()
    ):
        raise ValueError(
            f"popularity data from {origin} must be an object of name-version to integer counts"
        )
    return Popularity(decoded)


class PopularityLoader:
    """Loads popularity data from an URL or a path; the HTTP client is injected."""

    log = Logger()

    def __init__(self, http_client: Any) -> None:
        self._http = http_client

    def load(self, location: str | None) -> Deferred[Popularity]:
        if not location:
            return succeed(Popularity())
        parsed = urlparse(location)
        if parsed.scheme in ("http", "https"):
            return self._fetch(location)
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
        elif parsed.scheme == "":
            path = Path(location)
        else:
            raise ValueError(
                f"NIX_POPULARITY_URL {location!r}: use http://, https://, file:// or a plain path"
            )
        return succeed(parse_popularity(path.read_bytes(), str(path)))

    @inlineCallbacks
    def _fetch(self, url: str) -> Any:
        response = yield self._http.get(url)
        body = yield response.content()
        if response.code != 200:
            raise ValueError(f"fetching popularity data from {url}: HTTP {response.code}")
        popularity = parse_popularity(body, url)
        self.log.info(
            "loaded {count} popularity entries from {url}", count=len(popularity), url=url
        )
        return popularity


class PopularitySource:
    """The popularity data builds use: loaded once, when the daemon starts (or on first need),
    shared by concurrent builds.

    A failed load is logged and the build goes on without popularity data
    (every path then counts 1, so layering falls back to the dominator tree
    and sizes); the next build tries again.
    """

    log = Logger()

    def __init__(self, loader: PopularityLoader, location: str | None) -> None:
        self._loader = loader
        self._location = location
        self._loaded: Popularity | None = None
        self._flight: SingleFlight[Popularity] = SingleFlight()
        #: The load running now, if any, for :meth:`stop` to abandon.
        self._loading: Deferred[Popularity] | None = None

    def start(self) -> None:
        """Load the data now, in the background, so that the first build need not wait."""
        self.get()

    def stop(self) -> None:
        """Abandon a load still running (an HTTP fetch): the daemon stops."""
        if self._loading is not None:
            self._loading.cancel()

    def get(self) -> Deferred[Popularity]:
        if self._loaded is not None:
            return succeed(self._loaded)
        return self._flight.run(self._location, self._load)

    def _load(self) -> Deferred[Popularity]:
        self._loading = maybeDeferred(self._loader.load, self._location)
        return self._loading.addCallbacks(self._remember, self._fall_back)

    def _remember(self, popularity: Popularity) -> Popularity:
        self._loading = None
        self._loaded = popularity
        return popularity

    def _fall_back(self, failure: Failure) -> Popularity:
        self._loading = None
        if failure.check(CancelledError):
            return Popularity()
        self.log.failure(
            "cannot load popularity data from {location}; layering without it",
            failure,
            location=self._location,
        )
        return Popularity()
