"""Layer compressors: gzip deflated by ISA-L or by zlib, and zstd.

A cold pull of a large image waits for its layers to be tarred, hashed and
compressed, and compression is nearly all of that work: zlib's deflate at
level 6 manages about 25 MB/s per core, ISA-L's (the PyPI package ``isal``)
about 450 MB/s at its level 2, for blobs some 10% larger. So ISA-L is the
default where it is installed, zlib the fallback, and zstd (OCI
``tar+zstd`` layers, the PyPI package ``zstandard``) an option for sites whose
clients all read it: it is as fast as ISA-L and smaller than gzip -6.

The blob's bytes depend on the compressor, its level and the library's
version; :attr:`Compression.key` (compressor and level) is part of the layer
and manifest cache keys, so that changing either in the configuration takes
effect. A library upgrade that changes the bytes needs no new key: a cached
blob is still a valid blob of its digest.

Every compressor here releases the GIL while it works, as ``hashlib`` does
for large buffers, so layers written on a thread pool use every core.
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

isal_zlib: ModuleType | None
try:
    from isal import isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; this is the fallback
    isal_zlib = None

zstandard: ModuleType | None
try:
    import zstandard
except ImportError:  # pragma: no cover - the zstd option then reports it is missing
    zstandard = None

#: What encoders take: the tar stream's pieces, some of them views of a reused buffer.
Chunk = bytes | bytearray | memoryview

#: gzip's OS byte for "unknown"; what CPython's gzip and Go's compress/gzip write.
_GZIP_OS_UNKNOWN = 255


@dataclass(frozen=True)
class CompressorInfo:
    """What one compressor offers: its layer format, levels and default level."""

    #: The layer format: ``gzip`` or ``zstd`` (the media type's ``tar+<format>``).
    format: str
    lowest: int
    highest: int
    default: int
    summary: str

    def available(self, name: str) -> bool:
        return {"isal": isal_zlib, "zstd": zstandard}.get(name, zlib) is not None


#: The compressors by configuration name. ISA-L's level 2 is the default: at
#: level 1 it is barely faster but its blobs are some 14% larger than gzip -6's
#: on store contents (ELF binaries, text), at level 2 some 11%, at level 3 some
#: 9% at two thirds of the speed.
COMPRESSORS: dict[str, CompressorInfo] = {
    "isal": CompressorInfo("gzip", 0, 3, 2, "gzip by ISA-L (PyPI isal): fast"),
    "zlib": CompressorInfo("gzip", 0, 9, 6, "gzip by zlib: slow, the fallback"),
    "zstd": CompressorInfo("zstd", 1, 19, 3, "OCI tar+zstd (PyPI zstandard): OCI clients only"),
}


def default_compressor() -> str:
    """ISA-L where it is installed, zlib otherwise."""
    return "isal" if isal_zlib is not None else "zlib"


class Encoder(Protocol):
    """One blob's compressor: ``compress`` the tar stream piece by piece, then ``finish``.

    The framing (gzip header and trailer, zstd frame) is part of what these
    return, so the concatenated output is the whole blob.
    """

    def compress(self, data: Chunk) -> bytes: ...

    def finish(self) -> bytes: ...


@dataclass(frozen=True)
class Compression:
    """A compressor and its level: everything besides the tar that a blob's bytes depend on."""

    compressor: str
    level: int

    def __post_init__(self) -> None:
        info = COMPRESSORS.get(self.compressor)
        if info is None:
            raise ValueError(
                f"unknown compressor {self.compressor!r}; use one of {', '.join(COMPRESSORS)}"
            )
        if not info.lowest <= self.level <= info.highest:
            raise ValueError(
                f"{self.compressor} compression level must be {info.lowest} to {info.highest},"
                f" not {self.level}"
            )
        if not info.available(self.compressor):
            package = {"isal": "isal", "zstd": "zstandard"}[self.compressor]
            raise ValueError(f"compressor {self.compressor!r} needs the Python package {package}")

    @classmethod
    def default(cls, compressor: str | None = None) -> Compression:
        """``compressor`` (the default one if None) at its default level."""
        name = compressor or default_compressor()
        info = COMPRESSORS.get(name)
        return cls(name, info.default if info else 0)

    @property
    def format(self) -> str:
        """``gzip`` or ``zstd``: what a client must be able to decompress."""
        return COMPRESSORS[self.compressor].format

    @property
    def key(self) -> str:
        """The part of a cache key that changes whenever the blob bytes would."""
        return f"{self.compressor}-{self.level}"

    def encoder(self, executor: Executor | None = None) -> Encoder:
        """A fresh encoder for one blob; gzip blocks are deflated on ``executor`` if given.

        The bytes are the same with or without an executor, whatever its size.
        """
        if self.compressor == "zstd":
            assert zstandard is not None
            return _ZstdEncoder(zstandard, self.level)
        if self.compressor == "isal":
            assert isal_zlib is not None
            # ISA-L's levels are all fast: 0 and 1 are its fastest.
            return _BlockGzipEncoder(
                _deflater(isal_zlib, self.level), 4 if self.level <= 1 else 0, executor
            )
        # XFL: 2 for the slowest, best compression, 4 for the fastest, as gzip writes it.
        extra_flags = {9: 2, 1: 4}.get(self.level, 0)
        return _BlockGzipEncoder(_deflater(zlib, self.level), extra_flags, executor)


#: The CRC-32 of the gzip trailer; ISA-L's is several times faster than zlib's.
_crc32: Callable[[Any, int], int] = isal_zlib.crc32 if isal_zlib is not None else zlib.crc32

#: gzip streams are deflated in blocks of this much tar, independently, as pigz does.
BLOCK_SIZE = 1 << 20
#: Each block is primed with this much of the stream before it: deflate's whole window,
#: so back-references reach as far as in one continuous stream and sizes stay the same.
_WINDOW = 32 * 1024
#: Blocks of one blob being deflated at once, at most: a bound on memory per blob.
_IN_FLIGHT = 8

#: Deflates one block: (block, the window before it, whether it is the last) -> raw deflate.
_Deflater = Callable[[bytes, bytes, bool], bytes]


def _deflater(module: Any, level: int) -> _Deflater:
    """A block deflater over ``module`` (``isal_zlib`` or ``zlib``, which share an API)."""

    def deflate(block: bytes, window: bytes, last: bool) -> bytes:
        primed = {"zdict": window} if window else {}
        stream = module.compressobj(level, module.DEFLATED, -module.MAX_WBITS, **primed)
        # A sync flush ends the block on a byte boundary without ending the stream,
        # so the blocks concatenate into one deflate stream.
        end = module.Z_FINISH if last else module.Z_SYNC_FLUSH
        compressed: bytes = stream.compress(block) + stream.flush(end)
        return compressed

    return deflate


class _BlockGzipEncoder:
    """gzip whose deflate stream is made of independently compressed 1 MiB blocks.

    Each block is primed with the 32 KiB before it and ends with a sync flush,
    so the blocks concatenate into one valid deflate stream, within a fraction
    of a percent of a continuous one's size (pigz's scheme). Blocks are
    deflated on ``executor`` (every compressor releases the GIL), so one large
    layer uses every core; the caller's thread keeps the checksums and order.
    The bytes depend only on the data, compressor and level: not on the
    executor, its size or the timing.

    The gzip framing is written here so that every header byte is fixed
    whatever the library: no file name, mtime 0, OS byte "unknown".
    """

    def __init__(self, deflate: _Deflater, extra_flags: int, executor: Executor | None) -> None:
        self._deflate = deflate
        self._executor = executor
        self._crc32 = 0
        self._size = 0
        self._pending = bytearray()
        self._window = b""
        self._blocks: deque[Future[bytes]] = deque()
        # Magic, deflate, no flags (so no file name), mtime 0, XFL, OS.
        self._header: bytes | None = struct.pack(
            "<BBBBIBB", 0x1F, 0x8B, 8, 0, 0, extra_flags, _GZIP_OS_UNKNOWN
        )

    def compress(self, data: Chunk) -> bytes:
        self._crc32 = _crc32(data, self._crc32)
        self._size += len(data)
        self._pending += data
        out = []
        while len(self._pending) >= BLOCK_SIZE:
            block = bytes(self._pending[:BLOCK_SIZE])
            del self._pending[:BLOCK_SIZE]
            out.append(self._submit(block, last=False))
        return b"".join(out)

    def finish(self) -> bytes:
        tail = self._submit(bytes(self._pending), last=True)
        self._pending = bytearray()
        out = [tail]
        while self._blocks:
            out.append(self._blocks.popleft().result())
        trailer = struct.pack("<II", self._crc32, self._size & 0xFFFFFFFF)
        return self._take_header() + b"".join(out) + trailer

    def _submit(self, block: bytes, *, last: bool) -> bytes:
        """Start deflating ``block``; return whatever earlier blocks are done, in order."""
        window, self._window = self._window, block[-_WINDOW:]
        if self._executor is None:
            return self._take_header() + self._deflate(block, window, last)
        self._blocks.append(self._executor.submit(self._deflate, block, window, last))
        done = []
        while self._blocks and (self._blocks[0].done() or len(self._blocks) > _IN_FLIGHT):
            done.append(self._blocks.popleft().result())
        if last:
            return b"".join(done)
        return self._take_header() + b"".join(done) if done else b""

    def _take_header(self) -> bytes:
        header, self._header = self._header or b"", None
        return header


class _ZstdEncoder:
    """One zstd frame with a content checksum, single-threaded (zstd's multi-threaded
    mode writes different bytes); layers are compressed in parallel instead."""

    def __init__(self, module: ModuleType, level: int) -> None:
        compressor = module.ZstdCompressor(level=level, write_checksum=True, threads=0)
        self._stream = compressor.compressobj()

    def compress(self, data: Chunk) -> bytes:
        compressed: bytes = self._stream.compress(data)
        return compressed

    def finish(self) -> bytes:
        tail: bytes = self._stream.flush()
        return tail
