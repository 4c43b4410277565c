import pytest

from nixeryd.errors import NameInvalid
from nixeryd.imagename import SHELL_PACKAGES, ImageTarget, parse_image_name
from nixeryd.platform import AMD64, ARM64


def test_packages_are_sorted_so_order_does_not_matter() -> None:
    assert parse_image_name("htop/git") == parse_image_name("git/htop")
    assert parse_image_name("htop/git").packages == ("git", "htop")


def test_shell_meta_package_expands_at_the_front() -> None:
    image = parse_image_name("shell/git")
    assert set(image.packages) == {"git", *SHELL_PACKAGES}
    assert image.platform is None


def test_meta_packages_only_count_at_the_front() -> None:
    image = parse_image_name("git/shell")
    assert image.packages == ("git", "shell")


def test_arm64_selects_the_aarch64_system() -> None:
    image = parse_image_name("arm64/shell/hello")
    assert image.platform == ARM64
    assert "hello" in image.packages
    assert parse_image_name("shell/arm64/hello").platform == ARM64
    [target] = image.targets([AMD64])
    assert target.system == "aarch64-linux"


def test_a_name_without_platform_targets_every_configured_platform() -> None:
    image = parse_image_name("shell/hello")
    targets = image.targets([AMD64, ARM64])
    assert [target.system for target in targets] == ["x86_64-linux", "aarch64-linux"]
    assert all(target.packages == image.packages for target in targets)


def test_shell_alone_is_an_image() -> None:
    assert parse_image_name("shell").packages == tuple(sorted(SHELL_PACKAGES))
    assert parse_image_name("arm64/shell").platform == ARM64


def test_nested_attribute_paths_are_single_components() -> None:
    assert parse_image_name("xorg.xev").packages == ("xorg.xev",)


def test_duplicates_collapse() -> None:
    assert parse_image_name("hello/hello").packages == ("hello",)
    assert parse_image_name("shell/coreutils").packages == tuple(sorted(SHELL_PACKAGES))


def test_implicit_packages_are_optional_and_not_repeated() -> None:
    assert ImageTarget(("hello",), AMD64).optional_packages == ("cacert", "iana-etc")
    assert ImageTarget(("cacert", "hello"), AMD64).optional_packages == ("iana-etc",)


def _canonical(name: str) -> str:
    return parse_image_name(name).targets([AMD64])[0].canonical


def test_canonical_form_is_equal_for_equal_images() -> None:
    assert _canonical("b/a") == _canonical("a/b") == "linux/amd64:a/b"
    assert _canonical("arm64/a") != _canonical("a")


@pytest.mark.parametrize(
    "name", ["", "Hello", "a//b", "/a", "a/", "a..b", "-a", "a b", "arm64", "x" * 256]
)
def test_invalid_names_are_name_invalid(name: str) -> None:
    with pytest.raises(NameInvalid):
        parse_image_name(name)
