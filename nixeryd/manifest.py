"""Image config and manifests, in Docker schema 2 and OCI forms, and which one a client gets.

One build yields one config and one list of layers; both manifest forms are
made from them and stored as blobs, so whichever form a client receives by tag
it can fetch again by digest, also after a restart.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

MANIFEST_MEDIA_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)

#: Form name -> (manifest, config, layer) media types.
FORMS = {
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
}

CA_BUNDLE = "/etc/ssl/certs/ca-bundle.crt"


@dataclass(frozen=True)
class LayerDescriptor:
    """A layer blob as the manifest and config refer to it."""

    digest: str
    size: int
    diff_id: str


def accepted_media_types(accept_headers: Iterable[bytes | str]) -> set[str]:
    """Media types from every ``Accept`` header line (clients send several, in any order)."""
    types: set[str] = set()
    for header in accept_headers:
        text = header.decode("latin-1") if isinstance(header, bytes) else header
        for item in text.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type:
                types.add(media_type)
    return types


def choose_form(accept_headers: Iterable[bytes | str]) -> str:
    """``oci`` when the client accepts OCI manifests and not Docker schema 2, else ``docker``.

    Docker schema 2 is the default, as every client of the last decade reads
    it and it is what Nixery serves; tag and digest answers stay consistent
    because each form has its own digest.
    """
    accepted = accepted_media_types(accept_headers)
    if OCI_MANIFEST in accepted and DOCKER_MANIFEST not in accepted:
        return "oci"
    return "docker"


def canonical_json(document: Any) -> bytes:
    """Compact JSON with keys in insertion order: the same document gives the same digest."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def image_config(
    architecture: str, layers: Sequence[LayerDescriptor], package_names: Iterable[str]
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
            "architecture": architecture,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "config": config,
        }
    )


def image_manifest(
    form: str, config_digest: str, config_size: int, layers: Sequence[LayerDescriptor]
) -> bytes:
    """The image manifest in ``form`` (``docker`` or ``oci``)."""
    manifest_type, config_type, layer_type = FORMS[form]
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
