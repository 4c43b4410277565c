import gzip
import hashlib
import io
import os
import random
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from nixeryd.compression import BLOCK_SIZE, COMPRESSORS, Compression
from nixeryd.tarball import (
    LayerDigests,
    TreeEntry,
    member_order,
    write_store_layer,
    write_tree_layer,
)

LONG_DIR = "d" * 60
LONG_FILE = "f" * 60
ODD_NAME = "naïve file ü.txt"
BIG = random.Random(0).randbytes(2 * (1 << 20) + 123)  # more than one 1 MiB chunk


def _directory(path: Path, mode: int, mtime: int) -> None:
    path.mkdir()
    path.chmod(mode)
    os.utime(path, (mtime, mtime))


def _file(path: Path, data: bytes, mode: int, mtime: int) -> None:
    path.write_bytes(data)
    path.chmod(mode)
    os.utime(path, (mtime, mtime))


def make_store(root: Path, *, reverse: bool = False, mtime: int = 1000) -> list[str]:
    """Two fake store paths with every kind of entry a layer must carry.

    ``reverse`` creates everything in the opposite order (so directory order
    and inode numbers differ), ``mtime`` stamps every file differently.
    """
    store = root / "store"
    pkg = store / "aaaa-pkg"
    other = store / "bbbb-other"
    contents: list[Callable[[], None]] = [
        lambda: _file(pkg / "bin" / "hello", b"#!/bin/sh\necho hello\n", 0o555, mtime),
        lambda: _file(pkg / "lib" / "libfoo.so.1", b"\x7fELF library", 0o444, mtime + 1),
        lambda: (pkg / "lib" / "libfoo.so").symlink_to("libfoo.so.1"),
        lambda: (pkg / "abs-link").symlink_to("/etc/hostname"),
        lambda: (pkg / "dir-link").symlink_to("bin"),
        lambda: _directory(pkg / "share" / "empty", 0o555, mtime + 2),
        lambda: _file(pkg / "share" / ODD_NAME, b"odd", 0o444, mtime),
        lambda: _file(pkg / "share" / LONG_DIR / LONG_FILE, b"long", 0o444, mtime),
        lambda: _file(pkg / "share" / "big.bin", BIG, 0o444, mtime + 3),
        lambda: _file(other / "etc" / "config", b"config", 0o644, mtime),
    ]
    for directory in (pkg / "bin", pkg / "lib", pkg / "share" / LONG_DIR, other / "etc"):
        directory.mkdir(parents=True)
    for step in reversed(contents) if reverse else contents:
        step()
    os.link(pkg / "lib" / "libfoo.so.1", pkg / "lib" / "libfoo-copy.so")
    # A hard link across store paths, as nix-store --optimise makes them.
    os.link(pkg / "bin" / "hello", other / "etc" / "hello-copy")
    for directory in (pkg / "bin", pkg / "lib", pkg / "share", pkg, other):
        directory.chmod(0o555)
        os.utime(directory, (mtime + 5, mtime + 5))
    return [str(pkg), str(other)]


def remove_store(root: Path) -> None:
    for directory, _, _ in os.walk(root / "store"):
        os.chmod(directory, 0o755)
    shutil.rmtree(root / "store")


def store_blob(paths: list[str], **kwargs: Compression) -> tuple[bytes, LayerDigests]:
    out = io.BytesIO()
    digests = write_store_layer(paths, out, **kwargs)
    return out.getvalue(), digests


def members(blob: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        return {member.name: member for member in tar.getmembers()}


def member_name(path: Path | str) -> str:
    return str(path).lstrip("/")


@pytest.fixture
def store(tmp_path: Path) -> list[str]:
    return make_store(tmp_path)


def test_digests_describe_the_blob_and_the_tar(store: list[str]) -> None:
    blob, digests = store_blob(store)
    tar = gzip.decompress(blob)
    assert digests.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert digests.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert digests.size == len(blob)
    assert digests.uncompressed_size == len(tar)
    assert len(tar) % tarfile.RECORDSIZE == 0


def test_gzip_header_is_fixed(store: list[str]) -> None:
    # Magic, deflate, no flags (no file name), mtime 0, XFL 0, OS "unknown".
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    assert store_blob(store, compression=Compression("zlib", 6))[0][:10] == header
    assert store_blob(store, compression=Compression("isal", 2))[0][:10] == header
    assert store_blob(store, compression=Compression("zlib", 9))[0][8] == 2
    assert store_blob(store, compression=Compression("zlib", 1))[0][8] == 4
    assert store_blob(store, compression=Compression("isal", 1))[0][8] == 4


def test_compression_level_changes_only_the_blob(store: list[str]) -> None:
    _, fast = store_blob(store, compression=Compression("zlib", 1))
    _, best = store_blob(store, compression=Compression("zlib", 9))
    assert fast.diff_id == best.diff_id
    assert fast.digest != best.digest


def decompress(blob: bytes, compression: Compression) -> bytes:
    if compression.format == "zstd":
        # A frame without a content size needs the streaming decoder.
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return gzip.decompress(blob)


ALL_COMPRESSIONS = [
    Compression(name, level)
    for name, info in COMPRESSORS.items()
    for level in sorted({info.lowest, info.default, info.highest})
]


@pytest.mark.parametrize("compression", ALL_COMPRESSIONS, ids=lambda c: c.key)
def test_every_compressor_is_deterministic_and_carries_the_same_tar(
    tmp_path: Path, compression: Compression
) -> None:
    paths = make_store(tmp_path / "a")
    blob, digests = store_blob(paths, compression=compression)
    again, _ = store_blob(paths, compression=compression)
    assert blob == again
    tar = decompress(blob, compression)
    reference, _ = store_blob(paths, compression=Compression("zlib", 6))
    assert tar == gzip.decompress(reference)
    assert digests.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert digests.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert (digests.size, digests.uncompressed_size) == (len(blob), len(tar))
    tree = tree_blob(TREE, compression=compression)
    assert decompress(tree, compression) == gzip.decompress(
        tree_blob(TREE, compression=Compression("zlib", 6))
    )


@pytest.mark.parametrize("compression", ALL_COMPRESSIONS, ids=lambda c: c.key)
def test_parallel_compression_gives_the_same_bytes(
    tmp_path: Path, compression: Compression
) -> None:
    paths = make_store(tmp_path)  # more than two 1 MiB blocks of tar
    alone, digests = store_blob(paths, compression=compression)
    for workers in (1, 3):
        out = io.BytesIO()
        with ThreadPoolExecutor(workers) as executor:
            parallel = write_store_layer(paths, out, compression=compression, executor=executor)
        assert (out.getvalue(), parallel) == (alone, digests)
    assert digests.uncompressed_size > 2 * BLOCK_SIZE


def test_zstd_blobs_are_zstd_frames_with_a_checksum(store: list[str]) -> None:
    blob, _ = store_blob(store, compression=Compression("zstd", 3))
    parameters = zstandard.get_frame_parameters(blob)
    assert blob[:4] == b"\x28\xb5\x2f\xfd"
    assert parameters.has_checksum


def test_gzip_blobs_decode_with_gnu_gzip(tmp_path: Path, store: list[str]) -> None:
    blob, digests = store_blob(store, compression=Compression("isal", 2))
    tar = subprocess.run(["gzip", "-dc"], input=blob, capture_output=True, check=True).stdout
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == digests.diff_id


@pytest.mark.parametrize(
    ("compressor", "level", "message"),
    [("zlib", 10, "0 to 9"), ("isal", 4, "0 to 3"), ("zstd", 0, "1 to 19"), ("lz4", 1, "unknown")],
)
def test_compression_levels_are_checked(compressor: str, level: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Compression(compressor, level)


def test_isal_is_the_default_compressor_and_keys_name_compressor_and_level() -> None:
    assert Compression.default() == Compression("isal", 2)
    assert Compression.default("zstd").key == "zstd-3"


def test_same_bytes_every_time_and_however_the_tree_was_made(tmp_path: Path) -> None:
    paths = make_store(tmp_path)
    first, _ = store_blob(paths)
    assert store_blob(paths)[0] == first
    remove_store(tmp_path)
    assert make_store(tmp_path, reverse=True, mtime=2_000_000) == paths
    os.utime(paths[0], (5, 6))
    assert store_blob(paths)[0] == first
    assert store_blob(list(reversed(paths)) + paths[:1])[0] == first


def test_ancestors_come_first_and_members_are_in_order(tmp_path: Path, store: list[str]) -> None:
    names = list(members(store_blob(store)[0]))
    ancestors = Path(store[0]).parent.parts[1:]
    expected_ancestors = ["/".join(ancestors[: depth + 1]) for depth in range(len(ancestors))]
    assert names[: len(expected_ancestors)] == expected_ancestors
    assert names == sorted(names, key=member_order)
    pkg = member_name(store[0])
    # Depth first: the whole of lib/ comes before lib-free siblings sorting after "lib".
    assert names.index(f"{pkg}/lib/libfoo.so.1") < names.index(f"{pkg}/share")


def test_entries_keep_kinds_modes_and_targets(store: list[str]) -> None:
    tar = members(store_blob(store)[0])
    pkg, other = (member_name(path) for path in store)
    assert tar[pkg].isdir() and tar[pkg].mode == 0o555
    assert tar[f"{pkg}/bin/hello"].isreg() and tar[f"{pkg}/bin/hello"].mode == 0o555
    assert tar[f"{pkg}/lib/libfoo.so.1"].mode == 0o444
    assert tar[f"{other}/etc/config"].mode == 0o644
    assert tar[f"{pkg}/share/empty"].isdir()
    assert not any(name.startswith(f"{pkg}/share/empty/") for name in tar)
    assert tar[f"{pkg}/lib/libfoo.so"].issym()
    assert tar[f"{pkg}/lib/libfoo.so"].linkname == "libfoo.so.1"
    assert tar[f"{pkg}/abs-link"].linkname == "/etc/hostname"
    # A symlink to a directory is archived as a symlink, not followed.
    assert tar[f"{pkg}/dir-link"].issym()
    assert not any(name.startswith(f"{pkg}/dir-link/") for name in tar)
    for ancestor in ("tmp", str(Path(store[0]).parent).lstrip("/")):
        assert tar[ancestor].isdir() and tar[ancestor].mode == 0o755


def test_every_member_is_anonymous_and_dated_1(store: list[str]) -> None:
    for member in members(store_blob(store)[0]).values():
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
        assert member.mtime == 1


def test_hard_links_point_at_the_first_name(store: list[str]) -> None:
    tar = members(store_blob(store)[0])
    pkg, other = (member_name(path) for path in store)
    # libfoo-copy.so sorts first, so it carries the data.
    assert tar[f"{pkg}/lib/libfoo-copy.so"].isreg()
    assert tar[f"{pkg}/lib/libfoo.so.1"].islnk()
    assert tar[f"{pkg}/lib/libfoo.so.1"].linkname == f"{pkg}/lib/libfoo-copy.so"
    assert tar[f"{other}/etc/hello-copy"].islnk()
    assert tar[f"{other}/etc/hello-copy"].linkname == f"{pkg}/bin/hello"


def test_long_and_non_ascii_names_survive_with_only_the_pax_records_they_need(
    store: list[str],
) -> None:
    blob, _ = store_blob(store)
    tar = members(blob)
    pkg = member_name(store[0])
    long_name = f"{pkg}/share/{LONG_DIR}/{LONG_FILE}"
    assert len(long_name) > 100
    assert tar[long_name].isreg()
    assert tar[f"{pkg}/share/{ODD_NAME}"].isreg()
    for name, member in tar.items():
        needed = set()
        if len(name) + member.isdir() > 100 or not name.isascii():
            needed.add("path")
        if len(member.linkname) > 100 or not member.linkname.isascii():
            needed.add("linkpath")
        assert set(member.pax_headers) == needed, name
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as archive:
        for name, data in ((f"{pkg}/share/big.bin", BIG), (f"{pkg}/share/{ODD_NAME}", b"odd")):
            extracted = archive.extractfile(name)
            assert extracted is not None
            assert extracted.read() == data


def test_gnu_tar_extracts_hard_links_and_modes(tmp_path: Path, store: list[str]) -> None:
    blob, _ = store_blob(store)
    (tmp_path / "layer.tar.gz").write_bytes(blob)
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "-xzf", str(tmp_path / "layer.tar.gz"), "-C", str(root)], check=True)
    pkg = root / member_name(store[0])
    first, second = pkg / "lib" / "libfoo-copy.so", pkg / "lib" / "libfoo.so.1"
    assert first.stat().st_nlink == 2
    assert first.stat().st_ino == second.stat().st_ino
    assert second.read_bytes() == b"\x7fELF library"
    assert stat.S_IMODE(first.stat().st_mode) == 0o444
    assert stat.S_IMODE((pkg / "bin" / "hello").stat().st_mode) == 0o555
    assert stat.S_IMODE(pkg.stat().st_mode) == 0o555
    assert os.readlink(pkg / "dir-link") == "bin"
    assert (pkg / "share" / f"{LONG_DIR}/{LONG_FILE}").read_bytes() == b"long"
    for directory, _, _ in os.walk(root):
        os.chmod(directory, 0o755)


def test_a_missing_store_path_is_named_before_anything_is_written(
    tmp_path: Path, store: list[str]
) -> None:
    missing = str(tmp_path / "store" / "cccc-missing")
    out = io.BytesIO()
    with pytest.raises(FileNotFoundError, match="cccc-missing"):
        write_store_layer([*store, missing], out)
    assert out.getvalue() == b""


def test_relative_and_nested_store_paths_are_refused(store: list[str]) -> None:
    with pytest.raises(ValueError, match="absolute"):
        store_blob(["nix/store/aaaa-pkg"])
    with pytest.raises(ValueError, match="inside"):
        store_blob([store[0], f"{store[0]}/bin"])


def test_a_store_path_may_be_a_single_file_or_symlink(tmp_path: Path) -> None:
    (tmp_path / "eeee-file").write_bytes(b"data")
    (tmp_path / "ffff-link").symlink_to("eeee-file")
    tar = members(store_blob([str(tmp_path / "eeee-file"), str(tmp_path / "ffff-link")])[0])
    assert tar[member_name(tmp_path / "eeee-file")].size == 4
    assert tar[member_name(tmp_path / "ffff-link")].linkname == "eeee-file"


def test_sockets_cannot_be_archived(tmp_path: Path) -> None:
    pkg = tmp_path / "gggg-fifo"
    pkg.mkdir()
    os.mkfifo(pkg / "fifo")
    with pytest.raises(ValueError, match="fifo"):
        store_blob([str(pkg)])


TREE = [
    TreeEntry("usr/bin/env", "symlink", 0o777, target="/bin/env"),
    TreeEntry("tmp", "dir", 0o1777),
    TreeEntry("usr", "dir", 0o755),
    TreeEntry("usr/bin", "dir", 0o755),
    TreeEntry("etc/motd", "file", 0o444, data=b"hello\n"),
    TreeEntry("bin/" + "h" * 120, "symlink", 0o777, target="/nix/store/" + "x" * 120),
]


def tree_blob(entries: list[TreeEntry], **kwargs: Compression) -> bytes:
    out = io.BytesIO()
    digests = write_tree_layer(entries, out, **kwargs)
    assert digests.digest == "sha256:" + hashlib.sha256(out.getvalue()).hexdigest()
    return out.getvalue()


def test_tree_layer_is_sorted_and_independent_of_entry_order() -> None:
    blob = tree_blob(TREE)
    assert tree_blob(list(reversed(TREE))) == blob
    tar = members(blob)
    assert list(tar) == sorted((entry.name for entry in TREE), key=member_order)
    assert tar["tmp"].isdir() and tar["tmp"].mode == 0o1777
    assert tar["usr/bin/env"].issym() and tar["usr/bin/env"].linkname == "/bin/env"
    assert tar["etc/motd"].mode == 0o444 and tar["etc/motd"].size == 6
    assert tar["bin/" + "h" * 120].linkname == "/nix/store/" + "x" * 120
    for member in tar.values():
        assert (member.uid, member.gid, member.uname, member.gname, member.mtime) == (
            0,
            0,
            "",
            "",
            1,
        )


def test_tree_layer_is_what_tarfile_would_write() -> None:
    ours = gzip.decompress(tree_blob(TREE))
    theirs = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(ours)) as source,
        tarfile.TarFile(fileobj=theirs, mode="w", format=tarfile.PAX_FORMAT) as target,
    ):
        for member in source.getmembers():
            target.addfile(member, source.extractfile(member) if member.isreg() else None)
    assert theirs.getvalue() == ours


def test_tree_layer_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        tree_blob([TreeEntry("tmp", "dir", 0o755), TreeEntry("tmp", "dir", 0o1777)])


@pytest.mark.parametrize(
    ("name", "kind", "mode", "target", "message"),
    [
        ("/etc", "dir", 0o755, "", "relative"),
        ("etc/../..", "dir", 0o755, "", "relative"),
        ("etc//motd", "dir", 0o755, "", "relative"),
        ("", "dir", 0o755, "", "relative"),
        ("etc", "fifo", 0o755, "", "kind"),
        ("etc", "dir", 0o100755, "", "mode"),
        ("bin/sh", "symlink", 0o777, "", "target"),
    ],
)
def test_tree_entries_are_checked(
    name: str, kind: str, mode: int, target: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        TreeEntry(name, kind, mode, target=target)  # type: ignore[arg-type]
