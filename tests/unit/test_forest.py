import io
import tarfile
from pathlib import Path

import pytest
from twisted.logger import capturedLogs

from nixeryd.forest import symlink_forest
from nixeryd.tarball import TreeEntry, member_order, write_tree_layer

EXTRAS = [
    TreeEntry("tmp", "dir", 0o1777),
    TreeEntry("usr", "dir", 0o755),
    TreeEntry("usr/bin", "dir", 0o755),
    TreeEntry("usr/bin/env", "symlink", 0o777, target="/bin/env"),
]


def dir_(name: str) -> TreeEntry:
    return TreeEntry(name, "dir", 0o755)


def link(name: str, package: Path, path: str | None = None) -> TreeEntry:
    return TreeEntry(name, "symlink", 0o777, target=f"{package}/{path or name}")


def make_files(root: Path, *names: str) -> Path:
    """Files (or directories, for names ending in /) below ``root``."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir()
        else:
            path.write_text(name)
    return root


@pytest.fixture
def first(tmp_path: Path) -> Path:
    pkg = make_files(
        tmp_path / "aaaa-first",
        "bin/hello",
        "bin/common",
        "share/man/man1/hello.1",
        "conflict/inside",
        "file-then-dir",
        "empty/",
    )
    (pkg / "lib64").mkdir()
    (pkg / "lib").symlink_to("lib64")
    return pkg


@pytest.fixture
def second(tmp_path: Path) -> Path:
    pkg = make_files(
        tmp_path / "bbbb-second",
        "bin/common",
        "bin/second",
        "conflict",
        "file-then-dir/below",
        "lib/libsecond.so",
        "share/man/man1/second.1",
        "tmp/cache/x",
        "usr/bin/env",
        "usr/bin/python",
    )
    (pkg / "bin" / "abs").symlink_to("/etc/passwd")
    return pkg


def test_packages_are_joined_first_one_winning(first: Path, second: Path) -> None:
    forest = symlink_forest([str(first), str(second)])
    assert forest == sorted(
        [
            *EXTRAS,
            dir_("bin"),
            link("bin/hello", first),
            link("bin/common", first),
            link("bin/second", second),
            # A symlink is linked (to the symlink's own store path), not followed.
            link("bin/abs", second),
            dir_("conflict"),
            link("conflict/inside", first),
            dir_("empty"),
            link("file-then-dir", first),
            dir_("lib64"),
            link("lib", first),
            dir_("share"),
            dir_("share/man"),
            dir_("share/man/man1"),
            link("share/man/man1/hello.1", first),
            link("share/man/man1/second.1", second),
            dir_("tmp/cache"),
            link("tmp/cache/x", second),
            link("usr/bin/python", second),
        ],
        key=lambda entry: member_order(entry.name),
    )


def test_order_of_packages_decides_conflicts(first: Path, second: Path) -> None:
    forest = {entry.name: entry for entry in symlink_forest([str(second), str(first)])}
    assert forest["bin/common"] == link("bin/common", second)
    # Now second's file keeps first's directory (and its contents) out...
    assert forest["conflict"] == link("conflict", second)
    assert "conflict/inside" not in forest
    # ...and second's directory wins over first's file and symlink.
    assert forest["file-then-dir"] == dir_("file-then-dir")
    assert forest["lib"] == dir_("lib")
    assert forest["lib/libsecond.so"] == link("lib/libsecond.so", second)


def test_extras_are_always_there(tmp_path: Path, second: Path) -> None:
    forest = {entry.name: entry for entry in symlink_forest([str(second)])}
    assert forest["tmp"] == TreeEntry("tmp", "dir", 0o1777)
    assert forest["usr/bin/env"] == TreeEntry("usr/bin/env", "symlink", 0o777, target="/bin/env")
    assert symlink_forest([]) == EXTRAS


def test_a_package_that_is_not_a_directory_adds_nothing(tmp_path: Path, first: Path) -> None:
    single = tmp_path / "cccc-single-file"
    single.write_text("#!/bin/sh\n")
    linked = tmp_path / "dddd-link-to-dir"
    linked.symlink_to(first)
    with capturedLogs() as events:
        assert symlink_forest([str(single), str(linked)]) == EXTRAS
    assert [event["package"] for event in events] == [str(single), str(linked)]


def test_a_missing_package_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="eeee-missing"):
        symlink_forest([str(tmp_path / "eeee-missing")])


def test_forest_becomes_a_layer(first: Path, second: Path) -> None:
    out = io.BytesIO()
    write_tree_layer(symlink_forest([str(first), str(second)]), out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:gz") as tar:
        members = {member.name: member for member in tar.getmembers()}
    assert list(members)[:3] == ["bin", "bin/abs", "bin/common"]
    assert members["tmp"].mode == 0o1777
    assert members["usr/bin/env"].linkname == "/bin/env"
    assert members["bin/hello"].linkname == f"{first}/bin/hello"
    assert members["bin"].mode == 0o755
