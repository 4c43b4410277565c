"""``nixeryd popcount``: counting, narinfos, crawling a binary cache, a package set via Nix."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from nixeryd.cli import Options
from nixeryd.popcount import (
    BinaryCache,
    PackageSetCounter,
    Progress,
    count_references,
    parse_narinfo,
    read_store_paths,
)
from nixeryd.process import ProcessResult, ProcessTimedOut
from nixeryd.testing.processes import Expect, ExpectingProcessRunner, ReplReply, ReplScript

A = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-app-1.0"
B = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-lib-2.0"
C = "/nix/store/cccccccccccccccccccccccccccccccc-glibc-2.39"


def narinfo(path: str, *references: str) -> str:
    names = " ".join(reference.rsplit("/", 1)[-1] for reference in references)
    return f"StorePath: {path}\nURL: nar/x.nar.xz\nNarSize: 10\nReferences: {names}\n"


def test_references_are_counted_by_name_without_self_references() -> None:
    counts = count_references({A: [A, B, C], B: [B, C], C: [C]})
    assert counts == {"glibc-2.39": 2, "lib-2.0": 1}
    assert list(counts) == sorted(counts)


def test_narinfo_references_become_store_paths() -> None:
    assert parse_narinfo(narinfo(A, B, C), "x") == (A, [B, C])
    assert parse_narinfo(f"StorePath: {C}\nReferences: \n", "x") == (C, [])
    with pytest.raises(ValueError, match="not a narinfo"):
        parse_narinfo("<html>", "http://cache/x.narinfo")


@dataclass
class Response:
    code: int
    body: bytes = b""

    def content(self) -> Deferred[bytes]:
        return succeed(self.body)


class ScriptedHTTP:
    """treq's ``get``, answering each URL from a script and counting what is in flight."""

    def __init__(self, script: dict[str, list[Response | Exception]]) -> None:
        self.script = script
        self.requested: list[str] = []
        self.waiting: list[tuple[Deferred[Response], Response | Exception]] = []

    def get(self, url: str) -> Deferred[Response]:
        self.requested.append(url)
        answers = self.script.get(url, [Response(404)])
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        deferred: Deferred[Response] = Deferred()
        self.waiting.append((deferred, answer))
        return deferred

    def answer_all(self) -> None:
        while self.waiting:
            deferred, answer = self.waiting.pop(0)
            if isinstance(answer, Exception):
                deferred.errback(answer)
            else:
                deferred.callback(answer)


def hash_of(path: str) -> str:
    return path.rsplit("/", 1)[-1].split("-", 1)[0]


def url(path: str) -> str:
    return f"http://cache/{hash_of(path)}.narinfo"


def test_an_http_cache_is_crawled_through_references_with_retries() -> None:
    http = ScriptedHTTP(
        {
            url(A): [Response(200, narinfo(A, A, B).encode())],
            url(B): [
                Response(503),
                ConnectionError("reset"),
                Response(200, narinfo(B, C).encode()),
            ],
            url(C): [Response(404)],
        }
    )
    clock = Clock()
    cache = BinaryCache("http://cache/", http=http, clock=clock, retries=3, backoff=1)
    out = io.StringIO()
    result = cache.references([hash_of(A)], Progress(out, "narinfos"))
    for _ in range(10):
        http.answer_all()
        clock.advance(10)
    assert result.result == {A: [A, B], B: [C]}
    assert http.requested.count(url(B)) == 3
    assert out.getvalue().splitlines()[-1] == "narinfos: 3/3"


def test_an_http_cache_that_keeps_failing_fails_the_count() -> None:
    http = ScriptedHTTP({url(A): [Response(500)]})
    clock = Clock()
    cache = BinaryCache("http://cache", http=http, clock=clock, retries=2, backoff=1)
    result = cache.references([hash_of(A)], Progress(io.StringIO(), "narinfos"))
    for _ in range(5):
        http.answer_all()
        clock.advance(10)
    failure = result.result
    result.addErrback(lambda _: None)
    assert "HTTP 500 (3 attempts)" in failure.getErrorMessage()


def test_no_more_than_the_concurrency_is_in_flight() -> None:
    referrers = [f"/nix/store/{str(i) * 32}-app{i}-1.0" for i in range(10)]
    http = ScriptedHTTP({url(p): [Response(200, narinfo(p).encode())] for p in referrers})
    cache = BinaryCache("http://cache", http=http, clock=Clock(), concurrency=3)
    result = cache.references([hash_of(p) for p in referrers], Progress(io.StringIO(), "n"))
    in_flight = []
    while http.waiting:
        in_flight.append(len(http.waiting))
        deferred, answer = http.waiting.pop(0)
        deferred.callback(answer)  # type: ignore[arg-type]
    assert max(in_flight) == 3
    assert len(result.result) == 10


def test_a_file_cache_is_listed_and_read_from_disk(tmp_path: Path) -> None:
    (tmp_path / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    for path, references in ((A, [B]), (B, [])):
        (tmp_path / f"{hash_of(path)}.narinfo").write_text(narinfo(path, *references))
    cache = BinaryCache(f"file://{tmp_path}", http=None, clock=Clock())
    assert cache.listing() == sorted([hash_of(A), hash_of(B)])
    result = cache.references(cache.listing(), Progress(io.StringIO(), "n"))
    assert result.result == {A: [B], B: []}
    with pytest.raises(ValueError, match="not a binary cache"):
        BinaryCache(f"file://{tmp_path / 'nar'}", http=None, clock=Clock()).listing()
    with pytest.raises(ValueError, match="cannot be listed"):
        BinaryCache("http://cache", http=None, clock=Clock()).listing()
    with pytest.raises(ValueError, match="use http"):
        BinaryCache("s3://bucket", http=None, clock=Clock())


def test_store_path_lists_may_be_xz_compressed(tmp_path: Path) -> None:
    import lzma

    (tmp_path / "store-paths.xz").write_bytes(lzma.compress(f"{A}\n\n{B}\n".encode()))
    assert read_store_paths(tmp_path / "store-paths.xz") == [A, B]


def test_a_package_set_is_evaluated_checked_and_its_closure_counted() -> None:
    evaluated = [
        {"attrPath": "app", "drvPath": "/nix/store/x-app.drv", "outputPath": A},
        {"attrPath": "unbuilt", "drvPath": "/nix/store/y-u.drv", "outputPath": B},
    ]
    report = [
        {"path": A, "references": [A, C]},
        {"path": C, "references": [C]},
    ]
    runner = ExpectingProcessRunner(
        Expect(["nix-instantiate"], stdout=json.dumps(evaluated).encode()),
        Expect(["nix-store", "--check-validity"], stdout=f"{B}\n".encode()),
        Expect(["nix", "--extra-experimental-features"], stdout=json.dumps(report).encode()),
    )
    counter = PackageSetCounter(runner, timeout=10, expression=Path("/popcount.nix"))
    result = counter.references(Path("/pkgs"), ["app", "unbuilt"], build=False, system=None)
    assert result.result.references == {A: [A, C], C: [C]}
    instantiate = runner.expectations[0].calls[0]
    assert instantiate[instantiate.index("attrs") + 1] == '["app", "unbuilt"]'
    assert runner.expectations[2].calls[0][-1] == A


def test_building_is_asked_for() -> None:
    runner = ExpectingProcessRunner(
        Expect(["nix-instantiate"], containing=["names", "true"], stdout=b'["a"]'),
        Expect(
            ["nix-instantiate"],
            containing=["top", '["a"]'],
            stdout=b'[{"attrPath": "a", "drvPath": "/nix/store/x-a.drv", "outputPath": "%s"}]'
            % A.encode(),
        ),
        Expect(["nix-store", "--realise"], exit_code=1),
        Expect(["nix-store", "--check-validity"], stdout=A.encode()),
    )
    counter = PackageSetCounter(runner, timeout=10, expression=Path("/popcount.nix"))
    result = counter.references(Path("/pkgs"), [], build=True, system="aarch64-linux")
    assert result.result.references == {}
    assert runner.expectations[2].calls[0][-1] == "/nix/store/x-a.drv"


def package(name: str) -> dict[str, str]:
    return {
        "attrPath": name,
        "drvPath": f"/nix/store/{'d' * 32}-{name}.drv",
        "outputPath": f"/nix/store/{'o' * 32}-{name}",
    }


class ChunkedNix:
    """Nix over a package set of which nothing is built: the listing, then chunks of it, in
    which the names in ``failing`` fail the whole process the way an uncatchable error does
    (or, given as "timeout", time out)."""

    def __init__(self, names: Sequence[str], failing: dict[str, str]) -> None:
        self.names = list(names)
        self.failing = failing
        self.chunks: list[list[str]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.waiting: list[tuple[Deferred[ProcessResult], ProcessResult]] = []

    def run(
        self, argv: Sequence[str], *, timeout: float, on_stderr_line: Any, env: Any = None
    ) -> Deferred[ProcessResult]:
        if "names" in argv:
            return succeed(ProcessResult(tuple(argv), 0, json.dumps(self.names).encode(), ()))
        if "--check-validity" in argv:
            return succeed(ProcessResult(tuple(argv), 0, "\n".join(argv[3:]).encode(), ()))
        chunk = json.loads(argv[argv.index("top") + 1])
        self.chunks.append(chunk)
        bad = [self.failing[name] for name in chunk if name in self.failing]
        if bad == ["timeout"]:
            return fail(ProcessTimedOut(argv, timeout, ()))
        on_stderr_line("trace: evaluation warning: something was renamed")
        result = (
            ProcessResult(tuple(argv), 1, b"", ("error:", "       … while evaluating", bad[0]))
            if bad
            else ProcessResult(
                tuple(argv), 0, json.dumps([package(name) for name in chunk]).encode(), ()
            )
        )
        deferred: Deferred[ProcessResult] = Deferred()
        self.waiting.append((deferred, result))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return deferred

    def finish_all(self) -> None:
        while self.waiting:
            deferred, result = self.waiting.pop(0)
            self.in_flight -= 1
            deferred.callback(result)


def test_a_package_set_is_evaluated_in_chunks_a_few_at_once() -> None:
    names = [f"p{i:02}" for i in range(10)]
    nix = ChunkedNix(names, {})
    counter = PackageSetCounter(nix, timeout=10, chunk_size=3, jobs=2)
    result = counter.references(Path("/pkgs"), [], build=False, system=None)
    nix.finish_all()
    assert [len(chunk) for chunk in nix.chunks] == [3, 3, 3, 1]
    assert nix.most_in_flight == 2
    count = result.result
    assert (count.listed, count.derivations, count.outputs, count.skipped) == (10, 10, 10, {})


def test_a_failing_chunk_is_evaluated_a_name_at_a_time_and_the_bad_names_skipped() -> None:
    names = [f"p{i:02}" for i in range(8)]
    missing_file = "error: getting status of 'x.nix': No such file"
    nix = ChunkedNix(names, {"p02": missing_file, "p07": missing_file})
    # The repl holding the package set answers each name of the failed chunk in turn.
    answers = [ReplReply(answer=json.dumps([package(name)])) for name in names]
    answers[2] = ReplReply(stderr=["error:", "       … while evaluating", "       " + missing_file])
    answers[7] = ReplReply(gate=Deferred())  # runs past the timeout
    repl = ReplScript(*answers)
    runner = ExpectingProcessRunner(repl=repl)
    runner.run = nix.run  # type: ignore[method-assign]
    reactor = Clock()
    counter = PackageSetCounter(
        runner, timeout=10, expression=Path("/popcount.nix"), chunk_size=8, jobs=1, reactor=reactor
    )
    result = counter.references(Path("/pkgs"), [], build=False, system="x86_64-linux")
    nix.finish_all()
    reactor.advance(10)
    count = result.result
    assert count.skipped == {"p02": missing_file, "p07": "evaluation ran longer than 10 s"}
    assert count.derivations == 6
    assert nix.chunks == [names], "one fresh process for the chunk, then the repl"
    [process] = repl.processes
    assert process.setup == [
        'popcount = import "/popcount.nix" { path = /. + "/pkgs"; evaluator = true;'
        ' system = "x86_64-linux"; }'
    ]
    assert process.expressions[2] == 'builtins.toJSON (popcount.topLevel [ "p02" ])'
    assert process.killed, "stopped when the count is done"
    summary = count.summary()
    assert "8 top-level names listed, 6 evaluated, 2 skipped" in summary
    assert "skipped p02: error: getting status of 'x.nix'" in summary
    assert "6 derivations with 6 outputs, 0 of them in the local store" in summary


def test_nothing_counted_says_so_and_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nixeryd import cli

    nix = ChunkedNix(["a", "b"], {})
    monkeypatch.setattr("nixeryd.process.ReactorProcessRunner", lambda reactor: nix)
    options = Options()
    options.parseOptions(["popcount", "--pkgs-path", "/pkgs"])
    counted = cli._popcount(None, options.subOptions)
    nix.finish_all()
    failure = counted.result
    counted.addErrback(lambda _: None)
    assert isinstance(failure.value, SystemExit) and failure.value.code == 1
    err = capsys.readouterr().err
    assert "2 derivations with 2 outputs, 0 of them in the local store" in err
    assert "nothing counted" in err and "--build" in err and "--cache" in err


@pytest.mark.parametrize(
    "argv",
    [["popcount"], ["popcount", "--pkgs-path", "x", "--cache", "file:///y"],
     ["popcount", "--cache", "file:///y", "--concurrency", "0"],
     ["popcount", "--pkgs-path", "x", "--chunk-size", "0"],
     ["popcount", "--pkgs-path", "x", "--eval-jobs", "0"]],
)  # fmt: skip
def test_the_command_wants_exactly_one_source(argv: Sequence[str]) -> None:
    from twisted.python import usage

    with pytest.raises(usage.UsageError):
        Options().parseOptions(list(argv))


def test_the_command_line() -> None:
    options = Options()
    options.parseOptions(
        ["popcount", "--pkgs-path", "p", "--attr", "a", "--attr", "b.c", "--build"]
    )
    assert options.subOptions["attr"] == ["a", "b.c"]
    assert options.subOptions["build"]


def test_the_outputs_of_a_whole_package_set_are_checked_a_command_line_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nixpkgs has ~30,000 outputs: on one command line they pass the kernel's limit."""
    monkeypatch.setattr("nixeryd.popcount.PATHS_PER_COMMAND", 3)
    nix = ChunkedNix([f"p{i}" for i in range(7)], {})
    checked: list[int] = []
    run = nix.run

    def recording(argv: Sequence[str], **kwargs: Any) -> Deferred[ProcessResult]:
        if "--check-validity" in argv:
            checked.append(len(argv) - 3)
        return run(argv, **kwargs)

    nix.run = recording  # type: ignore[method-assign]
    counter = PackageSetCounter(nix, timeout=10, chunk_size=10)
    result = counter.references(Path("/pkgs"), [], build=False, system=None)
    nix.finish_all()
    assert checked == [3, 3, 1]
    assert result.result.outputs == 7
