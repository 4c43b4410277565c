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
from collections.abc import Callable
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

    def encoder(self) -> Encoder:
        """A fresh encoder for one blob."""
        if self.compressor == "zstd":
            assert zstandard is not None
            return _ZstdEncoder(zstandard, self.level)
        if self.compressor == "isal":
            assert isal_zlib is not None
            deflate = isal_zlib.compressobj(self.level, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)
            # ISA-L's levels are all fast: 0 and 1 are its fastest.
            return _GzipEncoder(deflate, 4 if self.level <= 1 else 0)
        deflate = zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS)
        # XFL: 2 for the slowest, best compression, 4 for the fastest, as gzip writes it.
        return _GzipEncoder(deflate, {9: 2, 1: 4}.get(self.level, 0))


#: The CRC-32 of the gzip trailer; ISA-L's is several times faster than zlib's.
_crc32: Callable[[Any, int], int] = isal_zlib.crc32 if isal_zlib is not None else zlib.crc32


class _GzipEncoder:
    """Raw deflate framed as gzip here, so every header byte is fixed whatever the library:
    no file name, mtime 0, OS byte "unknown"."""

    def __init__(self, deflate: Any, extra_flags: int) -> None:
        self._deflate = deflate
        self._crc32 = 0
        self._size = 0
        # Magic, deflate, no flags (so no file name), mtime 0, XFL, OS.
        self._header: bytes | None = struct.pack(
            "<BBBBIBB", 0x1F, 0x8B, 8, 0, 0, extra_flags, _GZIP_OS_UNKNOWN
        )

    def compress(self, data: Chunk) -> bytes:
        self._crc32 = _crc32(data, self._crc32)
        self._size += len(data)
        compressed: bytes = self._deflate.compress(data)
        if self._header is not None:
            compressed, self._header = self._header + compressed, None
        return compressed

    def finish(self) -> bytes:
        tail: bytes = self._deflate.flush()
        trailer = struct.pack("<II", self._crc32, self._size & 0xFFFFFFFF)
        return (self._header or b"") + tail + trailer


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
