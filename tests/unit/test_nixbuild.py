from pathlib import Path
from typing import Any, cast

import pytest
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.errors import BuildFailed
from nixeryd.imagename import parse_image_name
from nixeryd.nixbuild import (
    BUILD_LOG_LINES,
    ERROR_EXCERPT_CHARS,
    BuildLog,
    Nix,
    ResolvedPackage,
    nix_error_excerpt,
)
from nixeryd.platform import AMD64
from tests.fakes import Expect, ExpectingProcessRunner

DATA = Path(__file__).parent / "data"
failureResultOf = SynchronousTestCase().failureResultOf


def test_evaluation_errors_start_at_the_error_line() -> None:
    stderr = [
        "warning: unknown setting",
        "error: nixeryd-test: this package fails to evaluate",
        "(use '--show-trace' to show detailed location information)",
    ]
    assert nix_error_excerpt(stderr) == "error: nixeryd-test: this package fails to evaluate"


def test_build_failures_carry_the_builders_last_lines() -> None:
    stderr = [
        "this derivation will be built:",
        "  /nix/store/3s80paxnccxkia32a3fvhavjam8c16c7-broken-build-1.0.drv",
        "building '/nix/store/3s80paxnccxkia32a3fvhavjam8c16c7-broken-build-1.0.drv'...",
        "broken-build: configuring",
        "nixeryd-test: this build fails on purpose",
        "error: builder for '/nix/store/3s80p-broken-build-1.0.drv' failed with exit code 1",
    ]
    assert nix_error_excerpt(stderr).splitlines() == [
        "error: builder for '/nix/store/3s80p-broken-build-1.0.drv' failed with exit code 1",
        "last lines of the build log:",
        "broken-build: configuring",
        "nixeryd-test: this build fails on purpose",
    ]


def test_without_an_error_line_the_last_lines_are_shown() -> None:
    assert nix_error_excerpt(["a", "", "b"]) == "a\nb"
    assert nix_error_excerpt([]) == "Nix failed without an error message"


#: Real stderr of failing Nix runs (tests/unit/data/nix-errors/capture.sh), and the
#: cause each excerpt must start with, on every Nix version captured.
CAUSES = {
    "eval-throw": "error: nixeryd-test: this package fails to evaluate",
    "build-failure": "error: builder for '/nix/store/3s80paxnccxkia32a3fvhavjam8c16c7-broken",
    "missing-attribute": "error: attribute 'noSuchAttribute' missing",
    "download-failure": "error: unable to download 'file:///nonexistent/nixeryd-test/",
    "unknown-commit": "error: Cannot find Git revision '0123456789abcdef",
    "unfree": "error: Refusing to evaluate package 'unrar-7.2.6'",
    "broken": "error: Refusing to evaluate package 'libbap-master-2022-07-13'",
    "insecure": "error: Refusing to evaluate package 'python3.13-kerberos-1.3.1'",
    "removed-alias": "error: '_0verkill' has been removed due to lack of maintenance",
}
CAPTURED = sorted((Path(__file__).parent / "data" / "nix-errors").glob("*.txt"))


@pytest.mark.parametrize("capture", CAPTURED, ids=[path.stem for path in CAPTURED])
def test_the_excerpt_starts_with_the_cause_on_every_nix(capture: Path) -> None:
    case = capture.stem.rsplit("-nix-", 1)[0]
    excerpt = nix_error_excerpt(capture.read_text().splitlines())
    assert excerpt.startswith(CAUSES[case])
    assert "nixeryd.nix" not in excerpt
    assert len(excerpt) <= ERROR_EXCERPT_CHARS


def test_every_case_is_captured_on_both_nix_versions() -> None:
    captured = {path.stem for path in CAPTURED}
    for case in CAUSES:
        assert f"{case}-nix-2.18" in captured
    for case in ("eval-throw", "build-failure", "missing-attribute", "download-failure"):
        assert f"{case}-nix-2.8" in captured


def test_package_set_frames_are_kept_and_colours_stripped() -> None:
    stderr = [
        "\x1b[31;1merror:\x1b[0m",
        "       … while evaluating attribute 'packages'",
        "",
        "         at /src/nixeryd/nix/nixeryd.nix:171:3:",
        "       … while evaluating the attribute 'hello'",
        "",
        "         at /nixpkgs/pkgs/top-level/all-packages.nix:12:3:",
        "       \x1b[31;1merror:\x1b[0m attribute 'gettext' missing",
    ]
    assert nix_error_excerpt(stderr).splitlines() == [
        "error: attribute 'gettext' missing",
        "… while evaluating the attribute 'hello'"
        " (at /nixpkgs/pkgs/top-level/all-packages.nix:12:3)",
    ]


def test_the_excerpt_is_bounded() -> None:
    assert len(nix_error_excerpt(["error: " + "x" * 5000])) == ERROR_EXCERPT_CHARS


def test_a_failed_build_is_explained_by_its_first_builder_not_the_consequences() -> None:
    """As Nix 2.18 ends a nixpkgs build that cannot download its sources."""
    stderr = [
        "warning: error: unable to download 'https://ftpmirror.gnu.org/bash/bash-5.3.tar.gz':"
        " Couldn't resolve host name (6); retrying in 260 ms",
        "error: unable to download 'https://ftpmirror.gnu.org/bash/bash-5.3.tar.gz':"
        " Couldn't resolve host name (6)",
        "error: builder for '/nix/store/y84s-bash-5.3.tar.gz.drv' failed with exit code 1",
        "error: 1 dependencies of derivation '/nix/store/v8jl-bash-5.3.drv' failed to build",
        "error: build of '/nix/store/0j6k-hello-2.12.3.drv' failed",
    ]
    assert nix_error_excerpt(stderr).startswith(
        "error: unable to download 'https://ftpmirror.gnu.org/bash/bash-5.3.tar.gz'"
    )


def nix_with(*expect: Expect, builder_timeout: float = 60.0) -> tuple[Nix, list[dict[str, Any]]]:
    """A Nix over the process fake, and the log events it emits."""
    events: list[dict[str, Any]] = []
    nix = Nix(ExpectingProcessRunner(*expect), builder_timeout=builder_timeout, step_timeout=600)
    nix.log = Logger(observer=cast(Any, events.append))
    return nix, events


def test_a_failed_nixpkgs_build_is_summarised_at_info_and_kept_whole() -> None:
    """Nix 2.18 planning 956 derivations for nixpkgs' hello, then refused a download."""
    stderr = (DATA / "nixpkgs-hello-build-nix-2.18.txt").read_text().splitlines()
    nix, events = nix_with(Expect(["nix-store", "--realise"], exit_code=1, stderr=stderr))
    package = ResolvedPackage("hello", "hello", "/nix/store/x-hello.drv", "/nix/store/x-hello")
    failure = failureResultOf(nix.realise([package], parse_image_name("hello").targets([AMD64])[0]))
    assert failure.check(BuildFailed)
    shown = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.info]
    assert sum(text.count("\n") + 1 for text in shown) < 30, "\n".join(shown)
    assert any("these 956 derivations will be built" in text for text in shown)
    assert sum(e["log_level"] == LogLevel.debug for e in events) == len(stderr)
    build_log = nix.build_log("linux/amd64:hello")
    assert build_log is not None and len(build_log.lines) == len(stderr)
    message = failure.value.message
    assert message.splitlines()[1].startswith("error: unable to download")
    assert "dependencies of derivation" not in message
    assert "more errors: the derivations that depend on it were not built" in message


def test_a_build_log_keeps_a_bounded_number_of_lines() -> None:
    build_log = BuildLog("linux/amd64:hello")
    for number in range(BUILD_LOG_LINES + 5):
        build_log.add("build", f"line {number}")
    assert len(build_log.lines) == BUILD_LOG_LINES
    assert build_log.text().endswith("(5 more lines not kept)\n")
