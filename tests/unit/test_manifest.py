import json

from hypothesis import given
from hypothesis import strategies as st

from nixeryd.manifest import (
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Choice,
    IndexEntry,
    LayerDescriptor,
    accepted_media_types,
    choose,
    image_config,
    image_index,
    image_manifest,
)
from nixeryd.platform import AMD64, ARM64

LAYERS = [LayerDescriptor("sha256:" + "a" * 64, 10, "sha256:" + "b" * 64)]

#: What the Docker engine 20.10 sends, one type per header line, in random order.
DOCKER_ENGINE = [
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    OCI_INDEX,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
]
#: containerd 1.6 sends one comma-separated line ending in */*.
CONTAINERD = [", ".join([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX, "*/*"])]


@given(st.permutations(DOCKER_ENGINE), st.booleans())
def test_accept_lines_are_all_read_in_any_order(lines: list[str], multi: bool) -> None:
    assert choose(lines, multi_platform=multi) == Choice("docker", index=multi)


@given(st.permutations(DOCKER_ENGINE))
def test_lines_and_comma_lists_are_the_same(lines: list[str]) -> None:
    assert accepted_media_types(lines) == accepted_media_types([", ".join(lines)])


def test_containerd_gets_a_manifest_list_or_a_docker_manifest() -> None:
    assert choose(CONTAINERD, multi_platform=True) == Choice("docker", index=True)
    assert choose(CONTAINERD, multi_platform=False) == Choice("docker", index=False)


def test_oci_only_clients_get_oci() -> None:
    assert choose([b"application/vnd.oci.image.manifest.v1+json; q=0.9"], multi_platform=True) == (
        Choice("oci", index=False)
    )
    assert choose([f"text/html, {OCI_MANIFEST}, {OCI_INDEX}"], multi_platform=True) == (
        Choice("oci", index=True)
    )
    assert choose([OCI_INDEX, OCI_MANIFEST], multi_platform=False) == Choice("oci", index=False)


def test_docker_manifests_with_an_oci_index_get_the_oci_index() -> None:
    # Choosing the Docker form would lose the platform choice; the OCI one keeps it.
    accept = [DOCKER_MANIFEST, OCI_MANIFEST, OCI_INDEX]
    assert choose(accept, multi_platform=True) == Choice("oci", index=True)


def test_q_zero_refuses_a_type() -> None:
    accept = [f"{DOCKER_MANIFEST_LIST};q=0", DOCKER_MANIFEST]
    assert choose(accept, multi_platform=True) == Choice("docker", index=False)
    assert accepted_media_types([f"{OCI_INDEX}; q=bogus"]) == {OCI_INDEX}


def test_no_or_unknown_accept_gets_docker_schema_2() -> None:
    for accept in ([], [b"*/*"], [b"application/x-unknown"], [b""], [b";;,,"]):
        assert choose(accept, multi_platform=True) == Choice("docker", index=False)


def test_manifest_forms_use_matching_media_types() -> None:
    docker = json.loads(image_manifest("docker", "sha256:" + "c" * 64, 5, LAYERS))
    oci = json.loads(image_manifest("oci", "sha256:" + "c" * 64, 5, LAYERS))
    assert docker["mediaType"] == DOCKER_MANIFEST
    assert docker["layers"][0]["mediaType"] == DOCKER_LAYER
    assert oci["mediaType"] == OCI_MANIFEST
    assert oci["layers"][0]["mediaType"] == OCI_LAYER
    assert docker["schemaVersion"] == oci["schemaVersion"] == 2


def test_index_lists_each_platform() -> None:
    entries = [
        IndexEntry(AMD64, OCI_MANIFEST, "sha256:" + "1" * 64, 100),
        IndexEntry(ARM64, OCI_MANIFEST, "sha256:" + "2" * 64, 101),
    ]
    index = json.loads(image_index("oci", entries))
    assert index["mediaType"] == OCI_INDEX
    assert index["schemaVersion"] == 2
    assert [m["platform"] for m in index["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    assert index["manifests"][1] == {
        "mediaType": OCI_MANIFEST,
        "size": 101,
        "digest": "sha256:" + "2" * 64,
        "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
    }
    assert json.loads(image_index("docker", entries))["mediaType"] == DOCKER_MANIFEST_LIST


def test_config_follows_nixery() -> None:
    config = json.loads(image_config(AMD64, LAYERS, ["bashInteractive", "cacert", "hello"]))
    assert config["config"] == {
        "Env": ["SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"],
        "Cmd": ["bash"],
    }
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "b" * 64]}
    assert config["os"] == "linux"
    assert config["architecture"] == "amd64"
    assert "variant" not in config
    bare = json.loads(image_config(ARM64, LAYERS, ["hello"]))
    assert bare["config"] == {}
    assert (bare["architecture"], bare["variant"]) == ("arm64", "v8")


def test_config_is_reproducible() -> None:
    assert image_config(AMD64, LAYERS, ["b", "a"]) == image_config(AMD64, LAYERS, ["a", "b"])
