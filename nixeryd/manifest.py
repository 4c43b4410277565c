"""Image configs, manifests and indexes, in Docker schema 2 and OCI forms, and which one a
client gets.

One build yields one config and one list of layers; both manifest forms are
made from them and stored as blobs, so whichever form a client receives by tag
it can fetch again by digest, also after a restart. A multi-arch image is an
index in each form (a Docker manifest list, an OCI image index) listing the
same form's manifest of each platform.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from nixeryd.platform import Platform

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

#: Form name -> (manifest, config, layer) media types.
FORMS = {
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
}

#: Form name -> the media type of its multi-platform index.
INDEX_FORMS = {"docker": DOCKER_MANIFEST_LIST, "oci": OCI_INDEX}

#: The forms of images whose layers are zstd: OCI alone, because Docker schema 2 has
#: no zstd layer type. Both slots hold it, so that every client gets it, whatever it
#: asks for; only clients that read OCI manifests and zstd can pull such images.
ZSTD_FORMS = {
    "docker": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_ZSTD),
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_ZSTD),
}
ZSTD_INDEX_FORMS = {"docker": OCI_INDEX, "oci": OCI_INDEX}


def forms_for(layer_format: str) -> dict[str, tuple[str, str, str]]:
    """Form name -> (manifest, config, layer) media types for layers in ``layer_format``."""
    return ZSTD_FORMS if layer_format == "zstd" else FORMS


def index_forms_for(layer_format: str) -> dict[str, str]:
    """Form name -> the index media type for layers in ``layer_format``."""
    return ZSTD_INDEX_FORMS if layer_format == "zstd" else INDEX_FORMS


def layer_media_type(layer_format: str) -> str:
    """The media type a layer blob is stored with: the OCI one, which says how it is compressed."""
    return OCI_LAYER_ZSTD if layer_format == "zstd" else OCI_LAYER


#: Everything served from the ``manifests`` endpoint.
MANIFEST_MEDIA_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX)

CA_BUNDLE = "/etc/ssl/certs/ca-bundle.crt"


@dataclass(frozen=True)
class LayerDescriptor:
    """A layer blob as the manifest and config refer to it."""

    digest: str
    size: int
    diff_id: str


def accepted_media_types(accept_headers: Iterable[bytes | str]) -> set[str]:
    """Media types from every ``Accept`` header line (clients send several, in any order).

    A type with ``q=0`` is one the client refuses, so it is left out.
    """
    types: set[str] = set()
    for header in accept_headers:
        text = header.decode("latin-1") if isinstance(header, bytes) else header
        for item in text.split(","):
            media_type, *parameters = (part.strip() for part in item.split(";"))
            if media_type and not any(_refuses(parameter) for parameter in parameters):
                types.add(media_type.lower())
    return types


def _refuses(parameter: str) -> bool:
    name, _, value = parameter.partition("=")
    if name.strip().lower() != "q":
        return False
    try:
        return float(value) == 0
    except ValueError:
        return False


@dataclass(frozen=True)
class Choice:
    """What to answer a manifest request by tag with: a form, and whether as an index."""

    form: str
    index: bool


def choose(accept_headers: Iterable[bytes | str], *, multi_platform: bool) -> Choice:
    """The answer for a client's ``Accept`` lines.

    The form is OCI when the client accepts OCI types and no Docker ones, else
    Docker schema 2: every client of the last decade reads it, it is what
    Nixery serves, and a client sending no ``Accept`` (curl) gets it too. A
    multi-platform image is answered with an index when the client accepts the
    index type of that form, or of the other form together with its manifests;
    a client accepting no index gets the first configured platform's manifest.
    Tag and digest answers stay consistent because each answer has its own
    digest and every one of them is stored.
    """
    accepted = accepted_media_types(accept_headers)
    oci = {OCI_MANIFEST, OCI_INDEX}
    docker = {DOCKER_MANIFEST, DOCKER_MANIFEST_LIST}
    form = "oci" if accepted & oci and not accepted & docker else "docker"
    if multi_platform:
        other = "docker" if form == "oci" else "oci"
        if INDEX_FORMS[form] in accepted:
            return Choice(form, index=True)
        if INDEX_FORMS[other] in accepted and FORMS[other][0] in accepted:
            return Choice(other, index=True)
    return Choice(form, index=False)


def canonical_json(document: Any) -> bytes:
    """Compact JSON with keys in insertion order: the same document gives the same digest."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def image_config(
    platform: Platform, layers: Sequence[LayerDescriptor], package_names: Iterable[str]
) -> bytes:
    """The image config, as Nixery makes it: ``Env`` with the CA bundle when ``cacert``
    is in the image, ``Cmd ["bash"]`` with ``bashInteractive``; an empty ``config``
    object otherwise (Kubernetes requires one). No timestamps: builds are reproducible."""
    names = set(package_names)
    config: dict[str, Any] = {}
    if "cacert" in names:
        config["Env"] = [f"SSL_CERT_FILE={CA_BUNDLE}"]
    if "bashInteractive" in names:
        config["Cmd"] = ["bash"]
    return canonical_json(
        {
            **platform.as_json(),
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "config": config,
        }
    )


def image_manifest(
    form: str,
    config_digest: str,
    config_size: int,
    layers: Sequence[LayerDescriptor],
    *,
    layer_format: str = "gzip",
) -> bytes:
    """The image manifest in ``form`` (``docker`` or ``oci``) of layers in ``layer_format``."""
    manifest_type, config_type, layer_type = forms_for(layer_format)[form]
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "size": config_size, "digest": config_digest},
            "layers": [
                {"mediaType": layer_type, "size": layer.size, "digest": layer.digest}
                for layer in layers
            ],
        }
    )


@dataclass(frozen=True)
class IndexEntry:
    """One platform's manifest, as an index lists it."""

    platform: Platform
    media_type: str
    digest: str
    size: int


def image_index(form: str, entries: Sequence[IndexEntry], *, layer_format: str = "gzip") -> bytes:
    """The multi-platform index in ``form``: a Docker manifest list or an OCI image index."""
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": index_forms_for(layer_format)[form],
            "manifests": [
                {
                    "mediaType": entry.media_type,
                    "size": entry.size,
                    "digest": entry.digest,
                    "platform": entry.platform.as_json(),
                }
                for entry in entries
            ],
        }
    )
