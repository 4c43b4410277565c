import json
from pathlib import Path
from typing import Any, cast

import pytest
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.popularity import Popularity, PopularityLoader, PopularitySource, parse_popularity

STORE = "/nix/store/" + "a" * 32


def loaded(deferred: Any, treq: Any = None) -> Any:
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    if treq is not None:
        treq.flush()
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


def test_counts_are_looked_up_by_store_path_name() -> None:
    popularity = Popularity({"glibc-2.38": 300_000})
    assert popularity.of(f"{STORE}-glibc-2.38") == 300_000
    assert popularity.of(f"{STORE}-nss-cacert-3.92") == 500_000
    assert popularity.of(f"{STORE}-iana-etc-20230316") == 500_000
    assert popularity.of(f"{STORE}-unknown-1.0") == 1
    assert Popularity({"a": 1}).fingerprint != Popularity({"a": 2}).fingerprint


def test_files_and_plain_paths_for_air_gapped_sites(tmp_path: Path) -> None:
    file = tmp_path / "popularity.json"
    file.write_text(json.dumps({"hello-2.12": 7}))
    loader = PopularityLoader(http_client=None)
    assert loaded(loader.load(f"file://{file}")).of(f"{STORE}-hello-2.12") == 7
    assert loaded(loader.load(str(file))).of(f"{STORE}-hello-2.12") == 7
    assert len(loaded(loader.load(None))) == 0


def test_http_through_the_injected_client() -> None:
    app = Klein()

    @app.route("/popularity.json")
    def data(request: Any) -> bytes:
        return json.dumps({"hello-2.12": 9}).encode()

    treq = StubTreq(app.resource())
    popularity = loaded(PopularityLoader(treq).load("http://cache/popularity.json"), treq)
    assert popularity.of(f"{STORE}-hello-2.12") == 9
    with pytest.raises(ValueError, match="HTTP 404"):
        loaded(PopularityLoader(treq).load("http://cache/missing.json"), treq)


def test_malformed_data_is_refused_with_its_origin() -> None:
    with pytest.raises(ValueError, match="from here is not JSON"):
        parse_popularity(b"{", "here")
    with pytest.raises(ValueError, match="name-version to integer"):
        parse_popularity(b'{"a": "x"}', "here")


def test_a_failed_load_falls_back_and_is_retried(tmp_path: Path) -> None:
    file = tmp_path / "later.json"
    source = PopularitySource(PopularityLoader(None), str(file))
    assert len(loaded(source.get())) == 0
    file.write_text('{"x-1": 3}')
    assert len(loaded(source.get())) == 1


def test_starting_loads_the_data_and_stopping_abandons_a_load_in_progress() -> None:
    answered: Deferred[Popularity] = Deferred()

    class Slow:
        fetches = 0

        def load(self, location: str | None) -> Deferred[Popularity]:
            Slow.fetches += 1
            return answered

    source = PopularitySource(cast(Any, Slow()), "https://example.test/popularity.json")
    events: list[Any] = []
    source.log = Logger(observer=events.append)
    source.start()
    waiting = source.get()
    assert Slow.fetches == 1 and not waiting.called
    source.stop()
    # The build waiting for it goes on without popularity data, and nothing is logged.
    assert len(SynchronousTestCase().successResultOf(waiting)) == 0
    assert events == []
