"""Reproducible layer blobs: compressed tarballs of store paths or of synthesised trees.

A layer's digest is its cache key and the address clients pull it by, so the
same input must give the same bytes every time and on every machine: nothing
that varies between builds (timestamps, owners, directory order, the gzip
header's time and file name) may reach the blob. Concretely, every member has
mtime 1 (what Nix gives every store file), uid/gid 0 and empty user and group
names; members are in :func:`member_order`; the tar is PAX, with extended
headers only where a name or link target does not fit ustar (longer than 100
characters or not ASCII); a gzip header has mtime 0, no file name and OS byte
255 ("unknown").

The bytes also depend on CPython's :mod:`tarfile` header encoding and on the
compressor (:mod:`nixeryd.compression`) and its library's version: the same
daemon build gives the same blob, but another ISA-L, zlib or zstd release may
compress the same tar differently. The ``diff_id`` depends only on the tar
stream.

Writing is blocking and meant for a worker thread. The tar stream is produced,
hashed, compressed, hashed again and counted in one pass, file contents in
chunks read into one reused buffer, so a layer is never held in memory whole
and no store file is read twice. Headers and small files are batched into
larger pieces, because each call into the hash and the compressor costs more
than a small piece of data does.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import itertools
import os
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import IO, Literal

from nixeryd.compression import Chunk, Compression, Encoder

#: The mtime of every member: Nix sets every store file's mtime to 1.
_MTIME = 1

#: How much of a file is read and compressed at a time.
_CHUNK_SIZE = 1 << 20

#: Pieces of the tar stream smaller than this are batched (headers, small files)...
_SMALL_PIECE = 64 * 1024
#: ...until the batch is this large.
_BATCH_SIZE = 256 * 1024

#: What layers are written with unless told otherwise: the default compressor.
DEFAULT_COMPRESSION = Compression.default()

_DIR_MODE = 0o755

#: What a regular member's contents are read from: a store file or a tree entry's bytes.
_Source = io.RawIOBase | io.BufferedIOBase

#: A tar member: its header and, for regular files, how to open its contents.
_Member = tuple[tarfile.TarInfo, Callable[[], _Source] | None]


@dataclass(frozen=True)
class LayerDigests:
    """What the image manifest and config need to know about a written layer.

    ``digest`` and ``size`` describe the compressed blob (the manifest's layer
    descriptor); ``diff_id`` is the digest of the uncompressed tar (the image
    config's ``rootfs.diff_ids``), ``uncompressed_size`` its length.
    """

    digest: str
    diff_id: str
    size: int
    uncompressed_size: int


@dataclass(frozen=True)
class TreeEntry:
    """One member of a layer the daemon synthesises rather than copies from the store.

    ``name`` is relative to the image root (``bin/hello``); ``target`` is the
    link target of a symlink, ``data`` the contents of a file. Names are checked
    here so that a bad one fails where it is made, not halfway through a blob.
    """

    name: str
    kind: Literal["dir", "symlink", "file"]
    mode: int
    target: str = ""
    data: bytes = b""

    def __post_init__(self) -> None:
        if self.kind not in ("dir", "symlink", "file"):
            raise ValueError(f"{self.name!r}: unknown kind {self.kind!r}")
        if self.name.startswith("/") or any(
            part in ("", ".", "..") for part in self.name.split("/")
        ):
            raise ValueError(f"{self.name!r} is not a normalised relative path")
        if not 0 <= self.mode <= 0o7777:
            raise ValueError(f"{self.name!r}: mode {self.mode:o} has more than permission bits")
        if self.kind == "symlink" and not self.target:
            raise ValueError(f"symlink {self.name!r} has no target")


def member_order(name: str) -> tuple[bytes, ...]:
    """The sort key layers order their members by.

    Names are compared component by component, bytewise (as the file system
    stores them), so each directory is directly followed by its whole subtree
    with siblings in bytewise order, like GNU ``tar --sort=name`` and nixpkgs'
    ``streamLayeredImage`` order them. Plain string order would not keep a
    subtree together (``a-b`` sorts between ``a`` and ``a/x``).
    """
    return tuple(os.fsencode(part) for part in name.split("/"))


def write_store_layer(
    store_paths: Sequence[str],
    out: IO[bytes],
    *,
    compression: Compression = DEFAULT_COMPRESSION,
    executor: Executor | None = None,
) -> LayerDigests:
    """Write a compressed tarball of ``store_paths`` to ``out``.

    ``executor`` runs the compression of blocks of the stream in parallel
    (see :meth:`nixeryd.compression.Compression.encoder`); the bytes are the
    same without it.

    Each absolute path is archived under its own name without the leading
    ``/`` (``nix/store/<hash>-name/...``), after directory entries (mode 0755)
    for its ancestors (``nix/`` and ``nix/store/``). Symlinks are archived, never
    followed; a regular file already archived under another name in this layer
    (same device and inode) becomes a hard link to the first name. Modes are
    kept as they are on disk.

    Raises :class:`FileNotFoundError` naming a missing path before anything is
    written, :class:`ValueError` for relative or nested paths, or for a socket,
    FIFO or device inside them (a store path cannot contain one). An error
    after writing started leaves ``out`` holding a partial blob to discard.
    """
    roots = _store_roots(store_paths)
    return _write_layer(_store_members(roots), out, compression.encoder(executor))


def write_tree_layer(
    entries: Sequence[TreeEntry],
    out: IO[bytes],
    *,
    compression: Compression = DEFAULT_COMPRESSION,
    executor: Executor | None = None,
) -> LayerDigests:
    """Write a compressed tarball of synthesised ``entries`` to ``out``.

    Entries are written in :func:`member_order` whatever order they come in;
    parent directories are not added, so list them if they need a mode of
    their own (extractors create missing ones with 0755).
    """
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"duplicate tree entries: {duplicates}")
    ordered = sorted(entries, key=lambda entry: member_order(entry.name))
    return _write_layer(map(_tree_member, ordered), out, compression.encoder(executor))


def _store_roots(store_paths: Sequence[str]) -> list[tuple[str, os.stat_result]]:
    """The distinct paths in member order with their lstat, checked before writing starts."""
    roots: dict[str, os.stat_result] = {}
    for path in store_paths:
        normalised = "/" + os.path.normpath(path).lstrip("/")
        if not os.path.isabs(path) or normalised == "/":
            raise ValueError(f"store path {path!r} is not an absolute path below /")
        try:
            roots[normalised] = os.lstat(normalised)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "store path does not exist", path) from None
    ordered = sorted(roots, key=lambda root: member_order(root.lstrip("/")))
    for outer, inner in itertools.pairwise(ordered):
        # In member order a path is directly followed by anything inside it.
        if inner.startswith(outer + "/"):
            raise ValueError(f"store path {inner!r} is inside {outer!r}")
    return [(root, roots[root]) for root in ordered]


def _store_members(roots: Iterable[tuple[str, os.stat_result]]) -> Iterator[_Member]:
    ancestors: set[str] = set()
    first_names: dict[tuple[int, int], str] = {}
    for root, root_stat in roots:
        parts = root.lstrip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/".join(parts[:depth])
            if ancestor not in ancestors:
                ancestors.add(ancestor)
                yield _header(ancestor, tarfile.DIRTYPE, _DIR_MODE), None
        for path, st in _walk(root, root_stat):
            yield _store_member(path, st, first_names)


def _walk(root: str, root_stat: os.stat_result) -> Iterator[tuple[str, os.stat_result]]:
    """``root`` and everything below it with their lstat, depth first in member order."""
    stack = [(root, root_stat)]
    while stack:
        path, st = stack.pop()
        yield path, st
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as scan:
                children = sorted(scan, key=lambda entry: os.fsencode(entry.name), reverse=True)
            # Reversed so that popping the stack visits siblings in ascending order.
            stack.extend((child.path, child.stat(follow_symlinks=False)) for child in children)


def _store_member(
    path: str, st: os.stat_result, first_names: dict[tuple[int, int], str]
) -> _Member:
    """The tar member for one file system object; ``first_names`` tracks hard links."""
    name = path.lstrip("/")
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        return _header(name, tarfile.DIRTYPE, mode), None
    if stat.S_ISLNK(st.st_mode):
        return _header(name, tarfile.SYMTYPE, mode, linkname=os.readlink(path)), None
    if stat.S_ISREG(st.st_mode):
        if st.st_nlink > 1:
            first = first_names.setdefault((st.st_dev, st.st_ino), name)
            if first != name:
                return _header(name, tarfile.LNKTYPE, mode, linkname=first), None
        # Unbuffered: contents are read in large chunks anyway.
        opener = functools.partial(io.FileIO, path)
        return _header(name, tarfile.REGTYPE, mode, size=st.st_size), opener
    raise ValueError(f"cannot archive {path!r}: not a directory, regular file or symlink")


def _tree_member(entry: TreeEntry) -> _Member:
    if entry.kind == "dir":
        return _header(entry.name, tarfile.DIRTYPE, entry.mode), None
    if entry.kind == "symlink":
        return _header(entry.name, tarfile.SYMTYPE, entry.mode, linkname=entry.target), None
    opener = functools.partial(io.BytesIO, entry.data)
    return _header(entry.name, tarfile.REGTYPE, entry.mode, size=len(entry.data)), opener


def _header(
    name: str, kind: bytes, mode: int, *, size: int = 0, linkname: str = ""
) -> tarfile.TarInfo:
    """A member header with everything that could vary between builds pinned."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = linkname
    # An int: a float mtime would add an mtime record to a PAX header.
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_layer(members: Iterable[_Member], out: IO[bytes], encoder: Encoder) -> LayerDigests:
    """The core both layer kinds share: serialise ``members`` as tar, compressed into ``out``.

    The tar framing is written here rather than through :class:`tarfile.TarFile`
    so that contents are copied in large chunks with a size check, and the sink
    needs to be nothing more than ``write``; the bytes are the same as tarfile's.
    """
    sink = _Sink(out, encoder)
    buffer = memoryview(bytearray(_CHUNK_SIZE))
    for info, opener in members:
        sink.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if opener is not None:
            with opener() as source:
                _copy_contents(source, sink, info, buffer)
    sink.write(bytes(2 * tarfile.BLOCKSIZE))
    sink.write(bytes(-sink.uncompressed_size % tarfile.RECORDSIZE))
    return sink.finish()


def _copy_contents(source: _Source, sink: _Sink, info: tarfile.TarInfo, buffer: memoryview) -> None:
    """Copy exactly ``info.size`` bytes and the block padding; a file that shrank is an error."""
    remaining = info.size
    while remaining:
        read = source.readinto(buffer[: min(len(buffer), remaining)])
        if not read:
            raise OSError(f"{info.name!r} changed size while being archived")
        sink.write(buffer[:read])
        remaining -= read
    sink.write(bytes(-info.size % tarfile.BLOCKSIZE))


class _Sink:
    """Hashes and counts the tar stream, compresses it, and hashes, counts and writes the blob.

    Small pieces are collected in a batch first; a large one (file contents)
    goes through as it is, after the batch. ``write`` may be given a view of a
    buffer its caller reuses: nothing keeps a reference to it.
    """

    def __init__(self, out: IO[bytes], encoder: Encoder) -> None:
        self._out = out
        self._encoder = encoder
        self._tar_sha256 = hashlib.sha256()
        self._blob_sha256 = hashlib.sha256()
        self._size = 0
        self._batch = bytearray()
        self.uncompressed_size = 0

    def write(self, data: Chunk) -> None:
        self.uncompressed_size += len(data)
        if len(data) < _SMALL_PIECE:
            self._batch += data
            if len(self._batch) >= _BATCH_SIZE:
                self._flush_batch()
        else:
            self._flush_batch()
            self._process(data)

    def finish(self) -> LayerDigests:
        """Flush the batch and the compressor and report the digests."""
        self._flush_batch()
        self._emit(self._encoder.finish())
        return LayerDigests(
            digest=f"sha256:{self._blob_sha256.hexdigest()}",
            diff_id=f"sha256:{self._tar_sha256.hexdigest()}",
            size=self._size,
            uncompressed_size=self.uncompressed_size,
        )

    def _flush_batch(self) -> None:
        if self._batch:
            self._process(self._batch)
            self._batch = bytearray()

    def _process(self, data: Chunk) -> None:
        self._tar_sha256.update(data)
        self._emit(self._encoder.compress(data))

    def _emit(self, data: bytes) -> None:
        if data:
            self._blob_sha256.update(data)
            self._size += len(data)
            self._out.write(data)
