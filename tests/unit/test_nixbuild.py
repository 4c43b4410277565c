import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.errors import BuildFailed, BuildTimedOut
from nixeryd.evaluator import EvaluatorLimits, EvaluatorPool, Repl
from nixeryd.imagename import ImageTarget, parse_image_name
from nixeryd.nixbuild import (
    BUILD_LOG_LINES,
    ERROR_EXCERPT_CHARS,
    BuildLog,
    Nix,
    PackagesNotFound,
    ResolvedPackage,
    nix_error_excerpt,
    nix_string,
    repl_argv,
)
from nixeryd.platform import AMD64
from nixeryd.sources import SourceRef
from nixeryd.testing.processes import Expect, ExpectingProcessRunner, ReplReply, ReplScript

DATA = Path(__file__).parent / "data"
failureResultOf = SynchronousTestCase().failureResultOf
successResultOf = SynchronousTestCase().successResultOf


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


def test_a_nix_store_killed_by_someone_else_says_so() -> None:
    """Not the substituter warnings it printed before: those explain nothing."""
    warning = "warning: error: unable to download 'https://cache.nixos.org/x.narinfo'"
    nix, _ = nix_with(Expect(["nix-store", "--realise"], exit_code=137, signal=9, stderr=[warning]))
    package = ResolvedPackage("hello", "hello", "/nix/store/x-hello.drv", "/nix/store/x-hello")
    failure = failureResultOf(nix.realise([package], parse_image_name("hello").targets([AMD64])[0]))
    assert failure.check(BuildFailed)
    assert "nix-store was killed by SIGKILL, not by nixeryd" in failure.value.message
    assert "unable to download" not in failure.value.message


def test_a_build_log_keeps_a_bounded_number_of_lines() -> None:
    build_log = BuildLog("linux/amd64:hello")
    for number in range(BUILD_LOG_LINES + 5):
        build_log.add("build", f"line {number}")
    assert len(build_log.lines) == BUILD_LOG_LINES
    assert build_log.text().endswith("(5 more lines not kept)\n")


def nix_with_evaluators(
    tmp_path: Path, script: ReplScript, *expect: Expect, unpinned_reuse: float = 0.0
) -> tuple[Nix, Clock]:
    """A Nix whose evaluators answer from ``script``."""
    clock = Clock()
    processes = ExpectingProcessRunner(*expect, repl=script)
    limits = EvaluatorLimits(capacity=2, memory=2**40, idle=600.0, request_timeout=30.0)
    pool = EvaluatorPool(Repl(processes, clock, repl_argv(None), limits))
    nix = Nix(
        processes,
        builder_timeout=60,
        step_timeout=30,
        expression=tmp_path / "nixeryd.nix",
        evaluators=pool,
        unpinned_reuse=unpinned_reuse,
    )
    return nix, clock


def report(tmp_path: Path, *names: str) -> str:
    """What nix/nixeryd.nix answers for ``names``, with .drv files that exist."""
    packages = []
    for name in names:
        drv = tmp_path / f"{name}.drv"
        drv.write_text("Derive()")
        packages.append(
            {
                "name": name,
                "attrPath": name,
                "drvPath": str(drv),
                "outputPath": f"/nix/store/{name}",
            }
        )
    return json.dumps({"missing": [], "packages": packages})


PINNED = SourceRef("git", {"url": "https://example.org/pkgs.git", "rev": "a" * 40}, pin="a" * 40)


def image(name: str) -> ImageTarget:
    return parse_image_name(name).targets([AMD64])[0]


def test_images_of_one_pinned_source_share_one_evaluator(tmp_path: Path) -> None:
    script = ReplScript(
        ReplReply(answer=report(tmp_path, "hello")), ReplReply(answer=report(tmp_path, "git"))
    )
    nix, _ = nix_with_evaluators(tmp_path, script)
    hello: list[ResolvedPackage] = successResultOf(nix.resolve(PINNED, image("hello")))
    git: list[ResolvedPackage] = successResultOf(nix.resolve(PINNED, image("git")))
    assert [p.attr_path for p in hello] == ["hello"]
    assert [p.attr_path for p in git] == ["git"]
    [repl] = script.processes
    assert repl.argv[-1] == "repl"
    [setup] = repl.setup
    assert setup.startswith(f'nixeryd = import "{tmp_path}/nixeryd.nix" {{ srcType = "git"; ')
    assert 'system = "x86_64-linux";' in setup and r"\"rev\": \"aaaa" in setup
    assert repl.expressions[1] == (
        'builtins.toJSON (nixeryd.resolve { packages = "[\\"git\\"]"; '
        'optionalPackages = "[\\"cacert\\", \\"iana-etc\\"]"; })'
    )


def test_evaluator_answers_fail_as_nix_instantiate_would(tmp_path: Path) -> None:
    error = ["error:", "       … while evaluating 'hello'", "", "       error: Package is unfree"]
    script = ReplScript(
        ReplReply(answer=json.dumps({"missing": ["nosuch"], "packages": []})),
        ReplReply(stderr=error),
        ReplReply(answer=report(tmp_path, "hello")),
    )
    nix, _ = nix_with_evaluators(tmp_path, script)
    missing = failureResultOf(nix.resolve(PINNED, image("nosuch")), PackagesNotFound)
    assert "nosuch" in missing.value.message
    failed = failureResultOf(nix.resolve(PINNED, image("hello")), BuildFailed)
    assert failed.value.message.splitlines()[1] == "error: Package is unfree"
    assert successResultOf(nix.resolve(PINNED, image("hello")))[0].attr_path == "hello"
    assert len(script.processes) == 1
    build_log = nix.build_log("linux/amd64:hello")
    assert build_log is not None


def test_an_evaluation_past_the_timeout_is_a_timeout(tmp_path: Path) -> None:
    script = ReplScript(ReplReply(answer="never", gate=Deferred()))
    nix, clock = nix_with_evaluators(tmp_path, script)
    running = nix.resolve(PINNED, image("hello"))
    clock.advance(30)
    failureResultOf(running, BuildTimedOut)


def test_an_unpinned_source_gets_nix_instantiate_unless_reuse_is_allowed(tmp_path: Path) -> None:
    moving = SourceRef("path", {"path": str(tmp_path)})
    evaluation = Expect(["nix-instantiate"], stdout=report(tmp_path, "hello").encode())
    script = ReplScript(ReplReply(answer=report(tmp_path, "hello")))
    nix, _ = nix_with_evaluators(tmp_path, script, evaluation)
    successResultOf(nix.resolve(moving, image("hello")))
    assert len(evaluation.calls) == 1 and script.processes == []
    nix, _ = nix_with_evaluators(tmp_path, script, evaluation, unpinned_reuse=60)
    successResultOf(nix.resolve(moving, image("hello")))
    assert len(evaluation.calls) == 1 and len(script.processes) == 1


def test_derivations_collected_since_they_were_evaluated_are_evaluated_afresh(
    tmp_path: Path,
) -> None:
    first = report(tmp_path, "hello")
    (tmp_path / "again").mkdir()
    written_again = report(tmp_path / "again", "hello")
    script = ReplScript(*(ReplReply(answer=answer) for answer in (first, first, written_again)))
    nix, _ = nix_with_evaluators(tmp_path, script)
    successResultOf(nix.resolve(PINNED, image("hello")))
    (tmp_path / "hello.drv").unlink()  # nix-collect-garbage
    again: list[ResolvedPackage] = successResultOf(nix.resolve(PINNED, image("hello")))
    assert Path(again[0].drv_path).exists()
    assert [process.killed for process in script.processes] == [True, False]


@pytest.mark.parametrize("text", ['a"b', "back\\slash", "${not.interpolated}", "new\nline\ttab"])
def test_strings_reach_nix_as_they_are(text: str) -> None:
    """A :func:`nix_string` literal evaluates, in real Nix, to the text it was made from."""
    nix_instantiate = shutil.which("nix-instantiate")
    if nix_instantiate is None:
        pytest.skip("nix-instantiate is not installed")
    result = subprocess.run(
        [nix_instantiate, "--eval", "--json", "--expr", nix_string(text)],
        capture_output=True,
        check=True,
    )
    assert json.loads(result.stdout) == text
