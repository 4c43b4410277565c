from twisted.internet.defer import Deferred, succeed

from nixeryd.singleflight import SingleFlight


def test_concurrent_callers_share_one_run() -> None:
    flight: SingleFlight[str] = SingleFlight()
    started: list[Deferred[str]] = []

    def work() -> Deferred[str]:
        started.append(Deferred())
        return started[-1]

    results: list[str] = []
    for _ in range(10):
        flight.run("image", work).addCallback(results.append)
    assert len(started) == 1
    assert "image" in flight
    started[0].callback("manifest")
    assert results == ["manifest"] * 10
    assert "image" not in flight


def test_a_later_caller_starts_a_new_run() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = []

    def work() -> Deferred[int]:
        calls.append(1)
        return succeed(len(calls))

    first: list[int] = []
    flight.run("k", work).addCallback(first.append)
    flight.run("k", work).addCallback(first.append)
    assert first == [1, 2]


def test_failures_reach_every_caller() -> None:
    flight: SingleFlight[int] = SingleFlight()
    gate: Deferred[int] = Deferred()
    errors: list[BaseException] = []
    for _ in range(3):
        flight.run("k", lambda: gate).addErrback(lambda f: errors.append(f.value))
    gate.errback(RuntimeError("nix failed"))
    assert [str(e) for e in errors] == ["nix failed"] * 3


def test_synchronous_exceptions_become_failures() -> None:
    flight: SingleFlight[int] = SingleFlight()

    def work() -> int:
        raise ValueError("bad")

    failures: list[BaseException] = []
    flight.run("k", work).addErrback(lambda f: failures.append(f.value))
    assert isinstance(failures[0], ValueError)
    assert "k" not in flight
