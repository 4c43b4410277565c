import json

from nixeryd.manifest import (
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    OCI_LAYER,
    OCI_MANIFEST,
    LayerDescriptor,
    choose_form,
    image_config,
    image_manifest,
)

LAYERS = [LayerDescriptor("sha256:" + "a" * 64, 10, "sha256:" + "b" * 64)]


def test_several_accept_lines_in_any_order_are_all_read() -> None:
    docker_engine = [
        b"application/vnd.oci.image.index.v1+json",
        b"application/vnd.docker.distribution.manifest.v2+json",
        b"application/vnd.oci.image.manifest.v1+json",
    ]
    assert choose_form(docker_engine) == "docker"
    assert choose_form(list(reversed(docker_engine))) == "docker"


def test_oci_only_clients_get_oci() -> None:
    assert choose_form([b"application/vnd.oci.image.manifest.v1+json; q=0.9"]) == "oci"
    assert choose_form(["text/html, application/vnd.oci.image.manifest.v1+json"]) == "oci"


def test_no_or_unknown_accept_gets_docker_schema_2() -> None:
    assert choose_form([]) == "docker"
    assert choose_form([b"*/*"]) == "docker"
    assert choose_form([b"application/x-unknown"]) == "docker"


def test_manifest_forms_use_matching_media_types() -> None:
    docker = json.loads(image_manifest("docker", "sha256:" + "c" * 64, 5, LAYERS))
    oci = json.loads(image_manifest("oci", "sha256:" + "c" * 64, 5, LAYERS))
    assert docker["mediaType"] == DOCKER_MANIFEST
    assert docker["layers"][0]["mediaType"] == DOCKER_LAYER
    assert oci["mediaType"] == OCI_MANIFEST
    assert oci["layers"][0]["mediaType"] == OCI_LAYER
    assert docker["schemaVersion"] == oci["schemaVersion"] == 2


def test_config_follows_nixery() -> None:
    config = json.loads(image_config("amd64", LAYERS, ["bashInteractive", "cacert", "hello"]))
    assert config["config"] == {
        "Env": ["SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"],
        "Cmd": ["bash"],
    }
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "b" * 64]}
    assert config["os"] == "linux"
    bare = json.loads(image_config("arm64", LAYERS, ["hello"]))
    assert bare["config"] == {}
    assert bare["architecture"] == "arm64"


def test_config_is_reproducible() -> None:
    assert image_config("amd64", LAYERS, ["b", "a"]) == image_config("amd64", LAYERS, ["a", "b"])
