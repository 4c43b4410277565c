"""The build hub and the web pages, in memory: the registry's routes under StubTreq with an
expectation fake standing in for Nix (the browser tests are tests/e2e/test_browser.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from nixeryd import builds
from nixeryd.builds import BuildHub, LogLine
from nixeryd.metrics import route_of
from nixeryd.registry import EVENT_STREAM_HEARTBEAT
from nixeryd.testing.harness import FakeNix, RegistryFactory, building, header
from nixeryd.testing.processes import Expect


def test_lines_are_numbered_on_past_the_ring() -> None:
    hub = BuildHub()
    build = hub.start("linux/amd64:hello", "latest", "linux/amd64")
    for number in range(builds.LINES_KEPT + 10):
        hub.event(build, "build", f"line {number}")
    assert build.lines[0].number == 11
    assert [line.number for line in build.since(builds.LINES_KEPT + 8)] == [
        builds.LINES_KEPT + 9,
        builds.LINES_KEPT + 10,
    ]
    assert build.as_json()["linesDropped"] == 10


def test_listeners_hear_each_line_then_the_end() -> None:
    hub = BuildHub()
    build = hub.start("linux/amd64:hello", "latest", "linux/amd64")
    heard: list[LogLine | None] = []
    stop = build.listen(heard.append)
    hub.line("linux/amd64:hello", "build", "building '/nix/store/x.drv'...")
    hub.line("linux/amd64:other", "build", "not this build's")
    hub.finish(build, "failed", error={"code": "MANIFEST_UNKNOWN", "message": "no"})
    stop()
    assert heard == [LogLine(1, "build", "building '/nix/store/x.drv'..."), None]
    hub.line("linux/amd64:hello", "build", "after the end")
    assert build.next_line == 2


def test_the_oldest_finished_builds_go_first_and_running_ones_stay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(builds, "BUILDS_KEPT", 3)
    monkeypatch.setattr(builds, "BYTES_KEPT", 100)
    hub = BuildHub()
    running = hub.start("linux/amd64:slow", "latest", "linux/amd64")
    hub.event(running, "build", "x" * 60)
    done = []
    for number in range(4):
        build = hub.start(f"linux/amd64:p{number}", "latest", "linux/amd64")
        hub.finish(build, "built", manifest=f"sha256:{number}")
        done.append(build.id)
    assert [build.id for build in hub.recent()] == [done[3], done[2], running.id]
    hub.event(hub.recent()[0], "build", "too late: finished")
    big = hub.start("linux/amd64:big", "latest", "linux/amd64")
    hub.event(big, "build", "y" * 60)  # over the bytes: finished builds make room
    assert {build.id for build in hub.recent()} == {running.id, big.id}
    assert hub.latest("linux/amd64:p0", "latest") is None


def test_pages_show_a_build_its_layers_and_its_log(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(*building(nix))
    assert registry.get("/v2/hello/manifests/latest")[0].code == 200
    response, body = registry.get("/?format=json", headers={"Host": ["nix.example:5000"]})
    index = json.loads(body)
    assert header(response, "Content-Type") == "application/json"
    assert index["pull"]["docker"] == "docker pull nix.example:5000/shell/hello"
    [build] = index["builds"]
    assert (build["name"], build["status"], build["page"]) == (
        "hello",
        "built",
        "/images/hello:latest",
    )
    assert build["size"] > 0
    _, body = registry.get("/images/hello", headers={"Accept": ["application/json"]})
    image = json.loads(body)
    [platform] = image["platforms"]
    assert platform["manifest"].startswith("sha256:")
    assert any(path == nix.hello for layer in platform["layers"] for path in layer["paths"] or ())
    assert [entry["id"] for entry in image["history"]] == [build["id"]]
    response, page = registry.get("/images/hello:latest")
    assert header(response, "Content-Type") == "text/html; charset=utf-8"
    assert b'<meta name="viewport"' in page
    assert b"<main>" in page
    assert b"http" not in page.split(b"<main>")[0].replace(b"http-equiv", b""), (
        "no outside resource"
    )


def test_the_event_stream_resumes_after_the_last_event_id(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    registry = registry_with(*building(nix, stderr=["one", "two", "three"]))
    registry.get("/v2/hello/manifests/latest")
    response, body = registry.get("/builds/1/events", headers={"Last-Event-ID": ["2"]})
    assert header(response, "Content-Type") == "text/event-stream"
    events = [event for event in body.decode().split("\n\n") if event.startswith(("id:", "event:"))]
    numbers = [int(event.split("\n")[0][4:]) for event in events if event.startswith("id:")]
    assert numbers[0] == 3
    assert numbers == list(range(3, 3 + len(numbers)))
    assert events[-1].startswith("event: result\n")
    assert json.loads(events[-1].split("data: ", 1)[1])["status"] == "built"
    _, resumed = registry.get("/builds/1/events?after=100")
    assert "id:" not in resumed.decode()


def test_a_failed_pull_names_its_build_page(registry_with: RegistryFactory, nix: FakeNix) -> None:
    registry = registry_with(nix.evaluation(exit_code=1, stderr=["error: nixeryd-test: no"]))
    _, body = registry.get("/v2/nope/manifests/latest", headers={"Host": ["r.example"]})
    [error] = json.loads(body)["errors"]
    assert error["detail"]["buildPage"] == "http://r.example/images/nope:latest"
    assert error["message"].endswith("(build log: http://r.example/images/nope:latest)")
    _, again = registry.get("/v2/nope/manifests/latest", headers={"Host": ["r.example"]})
    assert again == body, "the remembered error is not changed by naming the page"
    _, page = registry.get("/images/nope")
    assert b"Why it failed" in page
    assert page.index(b"nixeryd-test: no") < page.index(b"<ol class=log")


def test_request_text_is_escaped_and_bad_names_are_registry_errors(
    registry_with: RegistryFactory,
) -> None:
    registry = registry_with()
    _, page = registry.get("/", headers={"Host": ["<script>x</script>"]})
    assert b"<script>x" not in page
    assert b"&lt;script&gt;x&lt;/script&gt;" in page
    response, page = registry.get("/images/Bad%3Cb%3E")
    assert response.code == 400
    assert b"NAME_INVALID" in page
    assert b"<b>" not in page.split(b"<main>")[1]
    response, body = registry.get("/images/hello:bad%20tag?format=json")
    assert response.code == 404
    assert json.loads(body)["errors"][0]["code"] == "TAG_INVALID"
    response, body = registry.get("/builds/7?format=json")
    assert response.code == 404
    assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
    response, _ = registry.get("/images?name=shell/hello", allow_redirects=False)
    assert (response.code, header(response, "Location")) == (302, "/images/shell/hello")


def test_the_package_search_evaluates_once_per_query(
    registry_with: RegistryFactory, nix: FakeNix
) -> None:
    found = [
        {"attrPath": "hello", "derivation": True, "description": "Says <hello>"},
        {"attrPath": "_9hello", "derivation": True, "description": None},
        {"attrPath": "helloPackages", "derivation": False, "description": None},
    ]
    search = Expect(["nix-instantiate"], stdout=json.dumps(found).encode())
    registry = registry_with(search)
    _, body = registry.get("/search?q=hel&format=json", headers={"Host": ["r.example"]})
    results = json.loads(body)["results"]
    assert [r["image"] for r in results] == ["hello", "9hello", None]
    assert results[0]["pull"] == "docker pull r.example/hello:latest"
    assert search.calls[0][search.calls[0].index("search") + 1] == "hel"
    _, page = registry.get("/search?q=hel")
    assert b"Says &lt;hello&gt;" in page
    assert b'<a href="/images/hello:latest">hello</a>' in page
    assert len(search.calls) == 1, "answered again from memory"
    response, body = registry.get("/search?q=a%2A&format=json")
    assert response.code == 400
    assert json.loads(body)["errors"][0]["code"] == "NAME_INVALID"


@pytest.mark.parametrize(
    ("path", "route"),
    [
        (b"/images/shell/hello:latest", "image_page"),
        (b"/images", "image_page"),
        (b"/builds/3", "build_page"),
        (b"/builds/3/events", "build_events"),
        (b"/search", "search"),
    ],
)
def test_pages_have_routes_of_their_own(path: bytes, route: str) -> None:
    assert route_of(path) == route


def test_a_running_build_s_event_stream_has_a_heartbeat_until_the_build_ends(
    registry_with: RegistryFactory,
) -> None:
    # A proxy cuts a response silent for a minute (nginx's proxy_read_timeout), and Nix may
    # print nothing for longer: comment lines keep the stream open while the build runs.
    harness = registry_with()
    app = harness.registry
    hub = app._builder.builds
    build = hub.start("linux/amd64:hello", "latest", "linux/amd64")
    request = DummyRequest([b""])
    request._disconnected = False
    assert app.build_events(request, build.id) is NOT_DONE_YET
    harness.daemon_clock.pump([EVENT_STREAM_HEARTBEAT] * 2)
    hub.line("linux/amd64:hello", "build", "compiling")
    assert b"".join(request.written).count(b": still building\n\n") == 2
    assert _heartbeats(harness), "a heartbeat is due while the build runs"
    hub.finish(build, "failed", error={"code": "MANIFEST_UNKNOWN", "message": "no"})
    assert request.finished
    assert b"".join(request.written).split(b"\n\n")[-2].startswith(b"event: result")
    assert _heartbeats(harness) == [], "the heartbeat stopped with the build"


def _heartbeats(harness: Any) -> list[Any]:
    return [call for call in harness.daemon_clock.getDelayedCalls() if "heartbeat" in repr(call)]
