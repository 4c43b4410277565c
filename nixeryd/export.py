"""Images written out of storage for local use: an OCI image layout or a docker-archive.

``nixeryd build NAME[:TAG] -o oci:DIR`` builds an image with the daemon's own
builder (:func:`nixeryd.service.make_registry`), then copies what a pull would
fetch from storage into files. Nothing is rebuilt or recompressed here: the
manifests are the bytes the registry serves and the layers are its blobs, so
their digests are the registry's.

Two outputs, as skopeo names them:

``oci:DIR[:REF]``
    an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``);
    ``index.json`` names the image ``REF`` (default: the tag) in its
    ``org.opencontainers.image.ref.name`` annotation, which ``umoci`` and
    ``skopeo`` look images up by. An existing layout keeps its other images,
    and an image of the same ``REF`` is replaced. With several configured
    platforms and none chosen, the entry is the registry's OCI image index.
``docker-archive:FILE[:REF]``
    what ``docker save`` writes and ``docker load`` and ``podman load`` read:
    a tar of ``manifest.json`` (``Config``, ``RepoTags`` with ``REF``, default
    ``NAME:TAG``, and ``Layers``) and the blobs. gzip layers are the
    registry's blobs as they are: both loaders decompress a layer and check
    it against the config's ``diff_ids``, which are those of the
    uncompressed tars. zstd layers (``layer_compressor = "zstd"``) are
    written uncompressed, since Docker 20.10's ``docker load`` cannot read
    zstd (podman can): their digests are then their diff_ids, not the
    registry's blob digests, which is inherent. The format holds one
    platform: the chosen one, else the first configured.

Blobs are read through the storage contract, as the registry serves them
(:meth:`nixeryd.storage.Storage.serve_blob`): a redirect is followed over
HTTP, and a resource (a file, an object proxied from S3, a plugin's) is
rendered with a request whose body goes into the output file
(:class:`_FileResponse`), so every backend works with no code of its own.
Every blob's bytes are hashed as they are written and must match their
digest and size.

These writes block the reactor: the command serves nothing else meanwhile.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, cast

import treq
import zstandard
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET

from nixeryd.errors import BlobUnknown, NameInvalid, RegistryError, StorageFailed, TagInvalid
from nixeryd.fanout import PlatformFanOut
from nixeryd.imagename import ImageName, is_valid_tag, parse_image_name
from nixeryd.images import StoredManifest, TaggedImage
from nixeryd.manifest import OCI_INDEX, OCI_LAYER_ZSTD, Choice
from nixeryd.platform import Platform
from nixeryd.storage import BlobInfo, Redirect, Storage

log = Logger()

#: The output kinds, as skopeo names its transports.
OCI = "oci"
DOCKER_ARCHIVE = "docker-archive"

USAGE = "use oci:DIR[:REF] or docker-archive:FILE[:REF]"

#: The annotation an OCI layout's index names its images by (umoci, skopeo look it up).
REF_NAME = "org.opencontainers.image.ref.name"

#: ``docker load`` refuses a ``RepoTags`` entry that is not ``[host[:port]/]name:tag``.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOCKER_REFERENCE = re.compile(
    rf"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?"
)
#: The OCI image layout's grammar of a ``ref.name``.
_OCI_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_OCI_REFERENCE = re.compile(rf"{_OCI_COMPONENT}(?:/{_OCI_COMPONENT})*")


class OutputFailed(Exception):
    """The output cannot be written (a directory not writable, a full disk, a file in
    the way): the user's to fix, so said without a traceback."""


@dataclass(frozen=True)
class Output:
    """Where an image goes: ``kind`` (:data:`OCI`, :data:`DOCKER_ARCHIVE`), a path, and the
    name the image is given there (None: the default of the kind)."""

    kind: str
    path: Path
    reference: str | None = None


def parse_output(text: str) -> Output:
    """An output from ``oci:DIR[:REF]`` or ``docker-archive:FILE[:REF]``; ValueError with
    what is wrong otherwise. The path ends at its first ``:``, as in skopeo."""
    kind, colon, rest = text.partition(":")
    if not colon or kind not in (OCI, DOCKER_ARCHIVE):
        raise ValueError(f"-o {text!r}: unknown output; {USAGE}")
    path, _, reference = rest.partition(":")
    if not path:
        raise ValueError(f"-o {text!r}: no {'directory' if kind == OCI else 'file'}; {USAGE}")
    grammar = _OCI_REFERENCE if kind == OCI else _DOCKER_REFERENCE
    if reference and grammar.fullmatch(reference) is None:
        raise ValueError(f"-o {text!r}: {reference!r} is not a valid {kind} image reference")
    return Output(kind, Path(path), reference or None)


def parse_reference(text: str) -> tuple[str, str]:
    """``NAME[:TAG]`` as an image name and tag (default ``latest``)."""
    name, _, tag = text.partition(":")
    return name, tag or "latest"


class Exporter:
    """Builds an image with the registry's builder and writes it to an :class:`Output`.

    ``images`` and ``storage`` are the registry's (:attr:`RegistryApp.images`);
    ``http`` (treq's client) follows a backend's redirects; ``clock`` turns a
    backend's pull producer.
    """

    def __init__(self, images: PlatformFanOut, storage: Storage, http: Any, clock: Any) -> None:
        self._images = images
        self._storage = storage
        self._http = http
        self._clock = clock

    @inlineCallbacks
    def export(self, name: str, tag: str, output: Output, platform: Platform | None = None) -> Any:
        """Build ``name:tag`` (for ``platform`` alone if given) and write it to ``output``.

        Fails with the registry's error for what a pull would be refused
        (a bad name or tag, a missing package, a failed build), with
        :class:`OutputFailed` for output that cannot be written."""
        image = self._image_name(name, platform)
        if not is_valid_tag(tag):
            raise TagInvalid(
                f"{tag!r} is not a valid tag (letters, digits, '_', '.', '-'; at most 128)"
            )
        tagged: TaggedImage = yield self._images.tagged(image, tag)
        if output.kind == OCI:
            yield self._write_layout(tagged, output.path, output.reference or tag)
        else:
            if len(tagged.images) > 1:
                log.warn(
                    "a docker-archive holds one platform: writing {platform} (choose another "
                    "with --platform)",
                    platform=tagged.images[0].platform.name,
                )
            reference = output.reference or f"{name}:{tag}"
            if ":" not in reference.rsplit("/", 1)[-1]:
                reference = f"{reference}:{tag}"
            yield self._write_archive(tagged.images[0].manifests["oci"], output.path, reference)

    def _image_name(self, name: str, platform: Platform | None) -> ImageName:
        image = parse_image_name(name)
        if platform is None:
            return image
        if image.platform is not None and image.platform != platform:
            raise NameInvalid(
                f"{name!r} is for {image.platform.name} (its arm64 prefix), not {platform.name}"
            )
        return ImageName(image.packages, platform)

    @inlineCallbacks
    def _write_layout(self, tagged: TaggedImage, directory: Path, reference: str) -> Any:
        top = tagged.answer(Choice("oci", index=bool(tagged.indexes)))
        manifests = [image.manifests["oci"] for image in tagged.images]
        blobs = _blobs_of(manifests)
        with _writing(f"writing the OCI layout {directory}"):
            blob_dir = directory / "blobs" / "sha256"
            blob_dir.mkdir(parents=True, exist_ok=True)
            layout = directory / "oci-layout"
            if not layout.exists():
                _replace_file(layout, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
            index_path = directory / "index.json"
            index = _read_index(index_path)
        small = {manifest.digest: manifest.data for manifest in [top, *manifests]}
        written = 0
        for digest in [*small, *blobs]:
            target = blob_dir / digest.split(":", 1)[1]
            with _writing(f"writing {target}"), _staged(target) as out:
                if digest in small:
                    out.write(small[digest])
                    size = len(small[digest])
                else:
                    info: BlobInfo = yield self._copy(digest, out)
                    size = info.size
            written += size
        entry = {"mediaType": top.media_type, "digest": top.digest, "size": len(top.data)}
        if top.media_type != OCI_INDEX:
            entry["platform"] = tagged.images[0].platform.as_json()
        entry["annotations"] = {REF_NAME: reference}
        index["manifests"] = [
            kept
            for kept in index["manifests"]
            if kept.get("annotations", {}).get(REF_NAME) != reference
        ] + [entry]
        with _writing(f"writing {index_path}"):
            _replace_file(index_path, json.dumps(index, indent=2).encode())
        log.info(
            "wrote {reference} ({digest}, {blobs} blobs, {mib:.1f} MiB) to oci:{directory}",
            reference=reference,
            digest=top.digest,
            blobs=len(small) + len(blobs),
            mib=written / (1024 * 1024),
            directory=directory,
        )

    @inlineCallbacks
    def _write_archive(self, manifest: StoredManifest, path: Path, reference: str) -> Any:
        document = json.loads(manifest.data)
        config = io.BytesIO()
        yield self._copy(document["config"]["digest"], config)
        diff_ids = json.loads(config.getvalue())["rootfs"]["diff_ids"]
        layers = document["layers"]
        # A zstd layer goes in as its tar, named by its diff_id (its digest uncompressed).
        names = [
            _blob_name(diff_id if layer["mediaType"] == OCI_LAYER_ZSTD else layer["digest"])
            for layer, diff_id in zip(layers, diff_ids, strict=True)
        ]
        config_name = _blob_name(document["config"]["digest"])
        entries = [{"Config": config_name, "RepoTags": [reference], "Layers": names}]
        with _writing(f"writing {path}"), _staged(path) as out:
            _tar_member(out, "manifest.json", json.dumps(entries).encode())
            _tar_member(out, config_name, config.getvalue())
            for layer, diff_id, name in zip(layers, diff_ids, names, strict=True):
                if layer["mediaType"] == OCI_LAYER_ZSTD:
                    yield self._copy_decompressed(layer["digest"], diff_id, name, out)
                    continue
                info: BlobInfo = yield self._stat(layer["digest"])
                out.write(_tar_header(name, info.size))
                yield self._copy(layer["digest"], out)
                out.write(_tar_padding(info.size))
            out.write(_tar_end(out.tell()))
            size = out.tell()
        log.info(
            "wrote {reference} ({digest}, {layers} layers, {mib:.1f} MiB) to docker-archive:{path}",
            reference=reference,
            digest=manifest.digest,
            layers=len(layers),
            mib=size / (1024 * 1024),
            path=path,
        )

    @inlineCallbacks
    def _copy_decompressed(self, digest: str, diff_id: str, name: str, out: IO[bytes]) -> Any:
        """Write zstd layer ``digest`` to the archive ``out`` as the tar member ``name``,
        uncompressed: its size is known once it is written, so its header is written last."""
        header_at = out.tell()
        out.write(_tar_header(name, 0))
        start = out.tell()
        tar = _Decompressed(out)
        yield self._copy(digest, tar)
        if tar.digest != diff_id:
            raise StorageFailed(f"layer {digest} does not decompress to its diff_id {diff_id}")
        size = out.tell() - start
        out.write(_tar_padding(size))
        end = out.tell()
        out.seek(header_at)
        out.write(_tar_header(name, size))
        out.seek(end)

    @inlineCallbacks
    def _stat(self, digest: str) -> Any:
        info = yield self._storage.stat_blob(digest)
        if info is None:
            raise BlobUnknown(f"blob {digest} of the image is not in storage; build it again")
        return info

    @inlineCallbacks
    def _copy(self, digest: str, out: _Writer) -> Any:
        """Write blob ``digest`` from storage to ``out``, checked against its digest and size."""
        info: BlobInfo = yield self._stat(digest)
        answer = self._storage.serve_blob(info)
        sink = _FileResponse(out, self._clock)
        if isinstance(answer, Redirect):
            response = yield self._http.get(answer.url, unbuffered=True)
            sink.setResponseCode(response.code)
            yield treq.collect(response, sink.write)
            sink.finish()
        else:
            # zope's IResource.render is declared without self, which mypy misreads.
            resource: Any = answer
            body = resource.render(sink)
            if body is not NOT_DONE_YET:
                sink.write(cast(bytes, body))
                sink.finish()
        yield sink.done
        sink.check(info)
        return info


def _blobs_of(manifests: Sequence[StoredManifest]) -> list[str]:
    """The config and layer digests of ``manifests``, each once, in order."""
    digests: dict[str, None] = {}
    for manifest in manifests:
        document = json.loads(manifest.data)
        for descriptor in [document["config"], *document["layers"]]:
            digests[descriptor["digest"]] = None
    return list(digests)


def _read_index(path: Path) -> dict[str, Any]:
    """An existing layout's index, to add to; a new one when there is none."""
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    except ValueError as error:
        raise OutputFailed(
            f"{path} is not an OCI index ({error}); choose another directory"
        ) from error
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise OutputFailed(f"{path} is not an OCI index; choose another directory")
    return dict(index)


@contextmanager
def _writing(doing: str) -> Iterator[None]:
    """OSErrors of the output as :class:`OutputFailed`, naming what was being written."""
    try:
        yield
    except OSError as error:
        raise OutputFailed(f"{error.strerror or error} while {doing}") from error


@contextmanager
def _staged(path: Path) -> Iterator[IO[bytes]]:
    """A file that becomes ``path`` once written whole; removed if writing fails."""
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    except BaseException:
        os.unlink(staging)
        raise


def _replace_file(path: Path, data: bytes) -> None:
    with _staged(path) as out:
        out.write(data)


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def _tar_header(name: str, size: int) -> bytes:
    """A regular file's ustar header, dated 1970 as the layers are: the same image gives
    the same archive."""
    member = tarfile.TarInfo(name)
    member.size = size
    member.mode = 0o644
    return member.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def _tar_padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def _tar_member(out: IO[bytes], name: str, data: bytes) -> None:
    out.write(_tar_header(name, len(data)) + data + _tar_padding(len(data)))


def _tar_end(offset: int) -> bytes:
    """Two zero blocks, then zeros to the end of a record, as tar writes them."""
    end = offset + 2 * tarfile.BLOCKSIZE
    return b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE))


class _Writer(Protocol):
    """Where a blob's bytes go: a file, or :class:`_Decompressed` in front of one."""

    def write(self, data: bytes, /) -> object: ...


class _Decompressed:
    """Writes a zstd layer's tar into ``out`` as it arrives, hashing the tar: its digest
    must be the layer's diff_id."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._decompressor = zstandard.ZstdDecompressor().decompressobj()
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        tar = self._decompressor.decompress(data)
        self._out.write(tar)
        self._hash.update(tar)

    @property
    def digest(self) -> str:
        return f"sha256:{self._hash.hexdigest()}"


class _FileResponse:
    """A GET of a blob whose response body goes into a file.

    A storage backend's ``serve_blob`` resource is rendered with it: it is
    the part of twisted.web's request that blob serving uses
    (:class:`nixeryd.blobserving.Request`). A pull producer is pulled once
    per reactor turn until the body is finished; a push producer pushes.
    The body is hashed as it is written; an error's body (a registry error's
    JSON) is kept, for :meth:`check` to report.
    """

    method = b"GET"
    sentLength = 0

    def __init__(self, out: _Writer, clock: Any) -> None:
        self.requestHeaders = Headers()
        self.responseHeaders = Headers()
        self.code = 200
        self._out = out
        self._clock = clock
        self._hash = hashlib.sha256()
        self._size = 0
        self._error = bytearray()
        self._producer: Any = None
        self._finishing: list[Deferred[None]] = []
        self._ended = False
        #: Fires once the body is finished (or cut short: then with the failure).
        self.done: Deferred[None] = Deferred()

    def getHeader(self, key: bytes) -> bytes | None:
        values = self.requestHeaders.getRawHeaders(key)
        return values[0] if values else None

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code

    def write(self, data: bytes) -> None:
        if self.code != 200:
            self._error += data[: 64 * 1024 - len(self._error)]
            return
        self._out.write(data)
        self._hash.update(data)
        self._size += len(data)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self._producer = producer
        if not streaming:
            self._clock.callLater(0, self._pull)

    def _pull(self) -> None:
        if self._producer is None or self._ended:
            return
        self._producer.resumeProducing()
        if self._producer is not None and not self._ended:
            self._clock.callLater(0, self._pull)

    def unregisterProducer(self) -> None:
        self._producer = None

    def finish(self) -> None:
        self._end(None)

    def loseConnection(self) -> None:
        self._end(Failure(StorageFailed("storage ended the blob before its end")))

    def notifyFinish(self) -> Deferred[None]:
        if self._ended:
            return succeed(None)
        finishing: Deferred[None] = Deferred()
        self._finishing.append(finishing)
        return finishing

    def _end(self, failure: Failure | None) -> None:
        if self._ended:
            return
        self._ended = True
        for finished in [*self._finishing, self.done]:
            if failure is None:
                finished.callback(None)
            else:
                finished.errback(failure)
        self._finishing.clear()

    def check(self, info: BlobInfo) -> None:
        """Raise unless the body was the whole of ``info``'s blob, byte for byte."""
        if self.code != 200:
            raise _answer_error(self.code, bytes(self._error), info.digest)
        if self._size != info.size or f"sha256:{self._hash.hexdigest()}" != info.digest:
            raise StorageFailed(
                f"storage answered blob {info.digest} with {self._size} bytes that are not it"
            )


def _answer_error(code: int, body: bytes, digest: str) -> RegistryError:
    """The error a backend answered a blob's GET with, as the registry's error."""
    try:
        message = str(json.loads(body)["errors"][0]["message"])
    except (ValueError, KeyError, IndexError, TypeError):
        message = f"HTTP {code}"
    if code == 404:
        return BlobUnknown(f"blob {digest} of the image is not in storage: {message}")
    return StorageFailed(f"reading blob {digest} from storage: {message}")
