"""One long-running evaluator answers several nixpkgs images as nix-instantiate would."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import Logger, formatEvent

from nixeryd.errors import BuildFailed
from nixeryd.evaluator import Evaluator, EvaluatorLimits, EvaluatorPool, Repl
from nixeryd.imagename import ImageTarget, parse_image_name
from nixeryd.nixbuild import Nix, ResolvedPackage, repl_argv
from nixeryd.platform import AMD64
from nixeryd.process import ReactorProcessRunner
from nixeryd.sources import SourceRef
from tests.nixinstalls import NixInstallation

IMAGES = ("hello", "shell/git/htop", "python3packages.numpy")


def target(name: str) -> ImageTarget:
    return parse_image_name(name).targets([AMD64])[0]


def drv_paths(packages: list[ResolvedPackage]) -> list[tuple[str, str]]:
    return [(package.attr_path, package.drv_path) for package in packages]


@pytest_twisted.inlineCallbacks
def test_one_evaluator_answers_images_as_nix_instantiate_does(
    modern_nix: NixInstallation, nixpkgs: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(Evaluator, "log", Logger(observer=cast(Any, events.append)))
    processes = ReactorProcessRunner(reactor)
    options: dict[str, Any] = {
        "builder_timeout": 60,
        "step_timeout": 300,
        "bin_dir": str(modern_nix.bin_dir),
        "env": modern_nix.env(),
    }
    limits = EvaluatorLimits(capacity=1, memory=4 * 2**30, idle=600, request_timeout=300)
    pool = EvaluatorPool(Repl(processes, reactor, repl_argv(str(modern_nix.bin_dir)), limits))
    reused = Nix(processes, evaluators=pool, **options)
    one_shot = Nix(processes, **options)
    source = SourceRef("path", {"path": str(nixpkgs)}, pin="snapshot")
    try:
        for name in IMAGES:
            answered = yield reused.resolve(source, target(name))
            expected = yield one_shot.resolve(source, target(name))
            assert drv_paths(answered) == drv_paths(expected), name
        with pytest.raises(BuildFailed) as refused:
            yield reused.resolve(source, target("unrar"))
        assert "has an unfree license" in refused.value.message.splitlines()[1]
        after_error = yield reused.resolve(source, target("hello"))
        assert after_error[0].attr_path == "hello"
    finally:
        pool.stop()
    started = [formatEvent(event) for event in events if "evaluator started" in event["log_format"]]
    assert len(started) == 1, started
