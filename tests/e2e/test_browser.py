"""The web pages in a real browser: Debian's chromium, driven by Playwright, against a real
daemon building with real Nix.

One daemon for the module, with a build timeout short enough that the test package
``ticker`` (a line twice a second for 30 s) fails on it: its page streams Nix's lines while
it runs, resumes after a reload, and then shows why it failed; the builder is killed.
Every page is checked with axe-core (no serious or critical violation) and photographed at
a desktop and a phone width into
``$NIXERYD_SCREENSHOTS`` (``tests/artifacts/screenshots`` by default).
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ROOT, Daemon
from tests.e2e.processes import Descendants, kill, runs

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
AXE = Path(os.environ.get("NIXERYD_AXE_CORE", "/var/tmp/nixeryd-axe/package/axe.min.js"))
SCREENSHOTS = Path(os.environ.get("NIXERYD_SCREENSHOTS", ROOT / "tests/artifacts/screenshots"))
SIZES = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
#: Long enough for hello and brokenBuild, far shorter than ticker's 30 s.
BUILD_TIMEOUT = 12


@pytest.fixture(scope="module")
def web_daemon(tmp_path_factory: pytest.TempPathFactory, nix_installation: Any) -> Iterator[Daemon]:
    instance = Daemon(
        tmp_path_factory.mktemp("web"),
        NIXERYD_BUILD_TIMEOUT=str(BUILD_TIMEOUT),
        NIX_TIMEOUT="60",
    )
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() or not AXE.exists():
        pytest.fail("the browser tests need chromium and axe-core: run scripts/setup")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=SIZES["desktop"])
    opened = context.new_page()
    yield opened
    context.close()


def _ticker(daemon: Daemon) -> Descendants:
    """The processes of ticker's builder under ``daemon``, sampled until stopped, so that
    none is left to finish and register ticker in the shared store."""
    return Descendants(
        daemon.process.pid, lambda command: "ticker: tick" in command or runs("sleep")(command)
    )


def pull(daemon: Daemon, name: str) -> int:
    request = urllib.request.Request(
        f"{daemon.url}/v2/{name}/manifests/latest",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def check(page: Any, name: str) -> None:
    """No serious accessibility violation; the page photographed at both widths."""
    page.add_script_tag(path=str(AXE))
    results = page.evaluate("async () => await axe.run(document)")
    serious = [
        f"{violation['id']}: {violation['help']} ({len(violation['nodes'])} nodes)"
        for violation in results["violations"]
        if violation["impact"] in ("serious", "critical")
    ]
    assert serious == [], serious
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for label, size in SIZES.items():
        page.set_viewport_size(size)
        page.screenshot(path=str(SCREENSHOTS / f"{name}-{label}.png"), full_page=True)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{name} scrolls sideways at {label} width"
    page.set_viewport_size(SIZES["desktop"])


def log_numbers(page: Any) -> list[int]:
    return [
        int(n)
        for n in page.eval_on_selector_all("ol.log li", "items => items.map(i => i.dataset.n)")
    ]


def test_the_index_names_the_host_and_lists_builds(web_daemon: Daemon, page: Any) -> None:
    assert pull(web_daemon, "shell/hello") == 200
    page.goto(web_daemon.url + "/")
    assert page.title() == "nixeryd"
    assert f"docker pull {web_daemon.host}/shell/hello" in page.inner_text("main")
    assert "tests/pkgs" in page.inner_text("main")
    page.get_by_role("link", name="shell/hello:latest").first.click()
    page.wait_for_url("**/images/shell/hello:latest")
    check(page, "image")
    page.goto(web_daemon.url + "/")
    check(page, "index")


def test_a_package_search_leads_to_the_image_page(web_daemon: Daemon, page: Any) -> None:
    page.goto(web_daemon.url + "/")
    page.get_by_role("textbox", name="Package").fill("hello")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url("**/search?q=hello")
    assert page.get_by_role("link", name="helloWorld").count() == 1
    assert f"docker pull {web_daemon.host}/helloworld:latest" in page.inner_text("main")
    check(page, "search")
    page.get_by_role("link", name="hello", exact=True).click()
    page.wait_for_url("**/images/hello:latest")
    assert page.get_by_role("heading", name="hello:latest").count() == 1


def test_the_image_page_shows_layers_and_what_they_share(web_daemon: Daemon, page: Any) -> None:
    assert pull(web_daemon, "shell/hello") == 200
    assert pull(web_daemon, "hello") == 200
    page.goto(web_daemon.url + "/")
    page.get_by_label("Image name").fill("hello")
    page.get_by_role("button", name="Open").click()
    page.wait_for_url("**/images/hello")
    text = page.inner_text("main")
    assert "Manifest sha256:" in text
    assert "-hello-" in text, "the layers' store paths"
    assert page.get_by_role("link", name="shell/hello:latest").count() > 0, "shared layers"
    document = json.loads(
        urllib.request.urlopen(web_daemon.url + "/images/hello?format=json").read()
    )
    assert document["platforms"][0]["manifest"].startswith("sha256:")


def test_a_build_streams_its_log_resumes_after_a_reload_and_shows_why_it_failed(
    web_daemon: Daemon, page: Any
) -> None:
    builders = _ticker(web_daemon)
    try:
        page.goto(web_daemon.url + "/images/ticker")
        page.get_by_role("button", name="Build ticker:latest now").click()
        # The page reloads onto the running build, then streams lines as Nix prints them.
        page.wait_for_selector("ol.log[data-live] li.new", timeout=30_000)
        page.wait_for_function(
            "document.querySelector('ol.log').innerText.includes('ticker: tick 3')"
        )
        assert page.locator(".status.building").count() > 0, "still building"
        check(page, "live-log")
        before = log_numbers(page)
        page.reload()
        # Lines rendered by the server, then streamed from after the last of them.
        page.wait_for_selector("ol.log[data-live] li.new")
        after = log_numbers(page)
        assert page.locator(".status.building").count() > 0, "still building"
        assert after[: len(before)] == before
        assert len(after) > len(before)
        assert after == list(range(1, len(after) + 1)), "no line twice, none missing"
        # The build timeout stops it; the page shows the cause first, the log below.
        cause = page.wait_for_selector(".cause", timeout=(BUILD_TIMEOUT + 20) * 1000)
        assert "took longer than the build timeout" in cause.inner_text()
        numbers = log_numbers(page)
        assert numbers == list(range(1, len(numbers) + 1))
        check(page, "failed-build")
    finally:
        left = builders.left_after()
        kill(left)
    assert builders.seen, "ticker's builder never ran"
    assert left == {}, f"the stopped build left its builder running: {left}"


def test_a_failed_build_names_its_page_and_shows_nix_s_cause(web_daemon: Daemon, page: Any) -> None:
    request = urllib.request.Request(f"{web_daemon.url}/v2/brokenbuild/manifests/latest")
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(request, timeout=120)
    error = json.loads(failed.value.read())["errors"][0]
    page_url = f"{web_daemon.url}/images/brokenbuild:latest"
    assert error["detail"]["buildPage"] == page_url
    assert page_url in error["message"]
    page.goto(page_url)
    cause = page.locator(".cause").inner_text()
    assert "this build fails on purpose" in cause
    assert "broken-build: compiling" in page.locator("ol.log").inner_text()


def test_a_bad_name_is_the_registry_s_error_as_a_page(web_daemon: Daemon, page: Any) -> None:
    answer = page.goto(web_daemon.url + "/images/Not_A<Name>")
    assert answer.status == 400
    assert "NAME_INVALID" in page.inner_text("main")
    assert page.locator("script").count() == 0
    check(page, "error")


def test_the_host_header_is_escaped(web_daemon: Daemon) -> None:
    request = urllib.request.Request(web_daemon.url + "/", headers={"Host": "<b>evil</b>"})
    body = urllib.request.urlopen(request).read()
    assert b"<b>evil</b>" not in body
    assert b"&lt;b&gt;evil&lt;/b&gt;" in body
