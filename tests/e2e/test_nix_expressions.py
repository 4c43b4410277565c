"""End-to-end tests of nix/nixeryd.nix and the test package set, through real Nix.

They run ``nix-instantiate`` exactly as the daemon does, against ``tests/pkgs`` (a
``path`` source) and against small self-contained package sets written to a tmp dir
(``path`` to a file, ``git`` and ``tarball`` sources). Only ``hello`` and ``fancy``
are built.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPR = ROOT / "nix" / "nixeryd.nix"
TEST_PKGS = ROOT / "tests" / "pkgs"
BUSYBOX = Path("/usr/bin/busybox")
TIMEOUT = 120

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("nix-instantiate") is None, reason="needs Nix"),
    pytest.mark.skipif(not BUSYBOX.is_file(), reason="needs a static busybox at /usr/bin/busybox"),
]


def nix_env() -> dict[str, str]:
    """The environment for Nix: no binary cache (there is no network)."""
    env = dict(os.environ)
    env["NIX_CONFIG"] = (env.get("NIX_CONFIG", "") + "\nsubstituters =").lstrip()
    return env


def instantiate(
    src_type: str,
    src_args: dict[str, str],
    packages: list[str],
    optional: list[str] | None = None,
    system: str = "x86_64-linux",
) -> subprocess.CompletedProcess[str]:
    argv = [
        "nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", str(EXPR),
        "--argstr", "srcType", src_type,
        "--argstr", "srcArgs", json.dumps(src_args),
        "--argstr", "packages", json.dumps(packages),
        "--argstr", "optionalPackages", json.dumps(optional or []),
        "--argstr", "system", system,
    ]  # fmt: skip
    return subprocess.run(
        argv, capture_output=True, text=True, env=nix_env(), timeout=TIMEOUT, check=False
    )


def evaluate(
    packages: list[str],
    optional: list[str] | None = None,
    src_type: str = "path",
    src_args: dict[str, str] | None = None,
    system: str = "x86_64-linux",
) -> dict[str, Any]:
    """Evaluate against tests/pkgs (by default); the result must be a success."""
    if src_args is None:
        src_args = {"path": str(TEST_PKGS)}
    proc = instantiate(src_type, src_args, packages, optional, system)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    assert set(result) == {"missing", "packages"}
    for pkg in result["packages"]:
        assert set(pkg) == {"name", "attrPath", "drvPath", "outputPath"}
    return result


def attr_paths(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["name"], p["attrPath"]) for p in result["packages"]]


def realise(drv_path: str) -> str:
    proc = subprocess.run(
        ["nix-store", "--realise", drv_path],
        capture_output=True, text=True, env=nix_env(), timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=nixeryd", "-c", "user.email=t@nixeryd",
         "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *args],
        capture_output=True, text=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    return proc.stdout.strip()


# A package set that does not need ../../nix/example/lib.nix: it is only
# instantiated, never built. Strict formals, like nixpkgs' (no `...`): nixeryd.nix
# must pass exactly system, config and overlays. It has no cacert nor iana-etc.
TINY_SET = """\
{ system, config, overlays }:
let
  pkg = name: derivation {
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" "echo > $out" ];
  };
in {
  hello = pkg "tiny-hello-@VERSION@";
  nested = { innerCamel = pkg "tiny-inner-@VERSION@"; };
}
"""


# --- tests/pkgs through a path source ---------------------------------------------


def test_exact_names() -> None:
    result = evaluate(["hello", "coreutils", "bashInteractive", "iana-etc", "tools.greeter"])
    assert result["missing"] == []
    assert attr_paths(result) == [
        ("hello", "hello"),
        ("coreutils", "coreutils"),
        ("bashInteractive", "bashInteractive"),
        ("iana-etc", "iana-etc"),
        ("tools.greeter", "tools.greeter"),
    ]
    hello = result["packages"][0]
    assert hello["drvPath"].startswith("/nix/store/")
    assert hello["drvPath"].endswith("-hello-2.12.1.drv")
    assert hello["outputPath"].endswith("-hello-2.12.1")
    # --read-write-mode: the derivation is in the store, ready for nix-store --realise.
    assert Path(hello["drvPath"]).is_file()


def test_nested_and_lower_cased_names() -> None:
    result = evaluate(
        ["helloworld", "bashinteractive", "HelloWorld", "haskellpackages.greeter", "Tools.Greeter"]
    )
    assert result["missing"] == []
    # helloworld and HelloWorld resolve to one attribute: listed once, the first name.
    assert attr_paths(result) == [
        ("helloworld", "helloWorld"),
        ("bashinteractive", "bashInteractive"),
        ("haskellpackages.greeter", "haskellPackages.greeter"),
        ("Tools.Greeter", "tools.greeter"),
    ]


def test_digit_leading_names() -> None:
    result = evaluate(["9lives"])
    assert attr_paths(result) == [("9lives", "_9lives")]
    assert result["packages"][0]["outputPath"].endswith("-9lives-9.0")
    assert attr_paths(evaluate(["_9lives"])) == [("_9lives", "_9lives")]
    assert attr_paths(evaluate(["9LIVES"])) == [("9LIVES", "_9lives")]


def test_attr_path_names_the_selected_attribute_without_evaluating_it() -> None:
    """``attrPath`` (what the nixpkgs name tests compare) follows the rule, but does not
    force the value: a package that throws, or a set that is no package, has a path."""
    names = ["helloworld", "9LIVES", "Tools.Greeter", "evalerror", "notAPackage", "nosuch"]
    expression = (
        f'let nixeryd = import {EXPR} {{ srcType = "path"; '
        f'srcArgs = builtins.toJSON {{ path = "{TEST_PKGS}"; }}; }}; '
        f"in map nixeryd.attrPath (builtins.fromJSON ''{json.dumps(names)}'')"
    )
    proc = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "-E", expression],
        capture_output=True, text=True, env=nix_env(), timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [
        "helloWorld", "_9lives", "tools.greeter", "evalError", "notAPackage", None,
    ]  # fmt: skip


def test_optional_packages_follow_requested_ones() -> None:
    result = evaluate(["hello"], optional=["cacert", "no-such-optional", "iana-etc", "hello"])
    assert result["missing"] == []
    assert attr_paths(result) == [
        ("hello", "hello"),
        ("cacert", "cacert"),
        ("iana-etc", "iana-etc"),
    ]


def test_all_missing_names_are_reported_in_order() -> None:
    names = ["nosuch", "hello", "tools.nosuch", "notAPackage", "notapackage.foo", "hello.out2", "x"]
    result = evaluate(names, optional=["cacert"])
    assert result == {
        "missing": ["nosuch", "tools.nosuch", "notAPackage", "notapackage.foo", "hello.out2", "x"],
        "packages": [],
    }


def test_nothing_is_instantiated_when_a_name_is_missing(tmp_path: Path) -> None:
    token = uuid.uuid4().hex[:12]
    set_file = tmp_path / "set.nix"
    # A plain attribute set, not a function.
    set_file.write_text(
        TINY_SET.replace("@VERSION@", token).replace(
            "{ system, config, overlays }:", "let system = builtins.currentSystem; in"
        )
    )
    # Without --read-write-mode Nix computes the .drv path but does not write it.
    drv_path = subprocess.run(
        ["nix-instantiate", "--eval", "--json", "-E", f"(import {set_file}).hello.drvPath"],
        capture_output=True, text=True, env=nix_env(), timeout=TIMEOUT, check=True,
    ).stdout.strip().strip('"')  # fmt: skip
    assert not Path(drv_path).exists()

    result = evaluate(["hello", "nosuch"], src_args={"path": str(set_file)})
    assert result == {"missing": ["nosuch"], "packages": []}
    assert not Path(drv_path).exists()

    result = evaluate(["hello"], optional=["cacert"], src_args={"path": str(set_file)})
    assert [p["drvPath"] for p in result["packages"]] == [drv_path]
    assert Path(drv_path).is_file()


def test_eval_error_reaches_stderr() -> None:
    proc = instantiate("path", {"path": str(TEST_PKGS)}, ["hello", "evalError"])
    assert proc.returncode != 0
    assert "error: nixeryd-test: this package fails to evaluate" in proc.stderr


def test_unknown_source_type_is_an_error() -> None:
    proc = instantiate("svn", {"url": "x"}, ["hello"])
    assert proc.returncode != 0
    assert "unknown srcType 'svn'" in proc.stderr


def test_hello_builds_and_runs() -> None:
    (hello,) = evaluate(["hello"])["packages"]
    out = realise(hello["drvPath"])
    assert out == hello["outputPath"]
    # The #! line is the store's static busybox, so it runs on the host as it would
    # in a chroot of the image.
    proc = subprocess.run(
        [f"{out}/bin/hello"], capture_output=True, text=True, env={}, timeout=30, check=True
    )
    assert proc.stdout == "Hello, world!\n"
    refs = subprocess.run(
        ["nix-store", "--query", "--references", out],
        capture_output=True, text=True, env=nix_env(), timeout=TIMEOUT, check=True,
    ).stdout.split()  # fmt: skip
    assert any(r.endswith("-libgreet-1.0") for r in refs)
    assert any(r.endswith("-busybox-static") for r in refs)


def test_fancy_builds_with_its_awkward_contents() -> None:
    (fancy,) = evaluate(["fancy"])["packages"]
    out = Path(realise(fancy["drvPath"]))

    data = out / "data" / "file.txt"
    link = out / "data" / "hardlink.txt"
    assert data.stat().st_nlink == 2
    assert data.stat().st_ino == link.stat().st_ino
    assert stat.S_IMODE((out / "data" / "readonly.txt").stat().st_mode) == 0o444
    assert stat.S_IMODE((out / "data" / "exec.sh").stat().st_mode) == 0o555
    assert os.readlink(out / "rel-link") == "data/file.txt"
    assert os.readlink(out / "abs-link") == f"{out}/data/file.txt"
    assert os.readlink(out / "greeting-link").endswith("-libgreet-1.0/share/greeting")
    assert list((out / "empty").iterdir()) == []
    assert (out / "ünïcødé-名前.txt").is_file()
    assert (out / "name with spaces.txt").is_file()
    (long_file,) = (out / "deep").rglob("*.txt")
    assert len(str(long_file.parent.relative_to(out))) > 100
    assert len(str(long_file.relative_to(out))) > 150

    proc = subprocess.run(
        [f"{out}/bin/fancy-check"], capture_output=True, text=True,
        env={"FANCY_CHECK_HARDLINK": "1"}, timeout=30, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "fancy ok\n", "")


# --- self-contained package sets through git and tarball sources -------------------


@pytest.fixture
def tiny_repo(tmp_path: Path) -> dict[str, str]:
    """A git repo: main at version 1, tag v1; branch other at version 2.

    Returns the paths of the working repo and of a bare clone (which Nix fetches
    from with `git fetch`, as it does a remote), and both commits.
    """
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "default.nix").write_text(TINY_SET.replace("@VERSION@", "1"))
    git(repo, "add", "default.nix")
    git(repo, "commit", "-q", "-m", "version 1")
    git(repo, "tag", "v1")
    rev1 = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "-b", "other")
    (repo / "default.nix").write_text(TINY_SET.replace("@VERSION@", "2"))
    git(repo, "commit", "-q", "-a", "-m", "version 2")
    rev2 = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "main")
    bare = tmp_path / "bare.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(bare))
    return {"repo": str(repo), "bare": f"file://{bare}", "rev1": rev1, "rev2": rev2}


def test_git_source(tiny_repo: dict[str, str]) -> None:
    def names(src_args: dict[str, str]) -> list[str]:
        result = evaluate(
            ["hello", "nested.innercamel"],
            optional=["cacert", "iana-etc"],
            src_type="git",
            src_args=src_args,
        )
        assert result["missing"] == []
        assert [p["attrPath"] for p in result["packages"]] == ["hello", "nested.innerCamel"]
        return [p["outputPath"].split("-", 1)[1] for p in result["packages"]]

    v1 = ["tiny-hello-1", "tiny-inner-1"]
    v2 = ["tiny-hello-2", "tiny-inner-2"]
    repo, bare = tiny_repo["repo"], tiny_repo["bare"]
    assert names({"url": repo}) == v1
    assert names({"url": repo, "ref": "other"}) == v2
    assert names({"url": bare}) == v1
    assert names({"url": bare, "ref": "other"}) == v2
    assert names({"url": bare, "ref": "refs/tags/v1"}) == v1
    # A rev that is on a non-default branch only (allRefs = true).
    assert names({"url": bare, "rev": tiny_repo["rev2"]}) == v2
    assert names({"url": bare, "ref": "refs/tags/v1", "rev": tiny_repo["rev1"]}) == v1


def test_git_source_missing_names(tiny_repo: dict[str, str]) -> None:
    result = evaluate(
        ["cacert", "hello", "nested"], src_type="git", src_args={"url": tiny_repo["repo"]}
    )
    assert result == {"missing": ["cacert", "nested"], "packages": []}


def test_tarball_source_and_system(tmp_path: Path) -> None:
    top = tmp_path / "tiny-set"
    top.mkdir()
    # A function without named formals gets { system; } only.
    (top / "default.nix").write_text(
        'args: { hello = derivation { name = "tiny-hello-${args.system}"; '
        'system = args.system; builder = "/bin/sh"; }; }\n'
    )
    tarball = tmp_path / "tiny-set.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(top, arcname="tiny-set")
    url = f"file://{tarball}"

    result = evaluate(["hello"], ["cacert"], "tarball", {"url": url}, system="aarch64-linux")
    (hello,) = result["packages"]
    assert hello["outputPath"].endswith("-tiny-hello-aarch64-linux")

    sha256 = subprocess.run(
        ["nix-prefetch-url", "--unpack", url],
        capture_output=True, text=True, env=nix_env(), timeout=TIMEOUT, check=True,
    ).stdout.strip()  # fmt: skip
    pinned = evaluate(["hello"], [], "tarball", {"url": url, "sha256": sha256})
    assert pinned["packages"][0]["outputPath"].endswith("-tiny-hello-x86_64-linux")

    proc = instantiate("tarball", {"url": url, "sha256": "0" * 52}, ["hello"])
    assert proc.returncode != 0
    assert "hash mismatch" in proc.stderr
