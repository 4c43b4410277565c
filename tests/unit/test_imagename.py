import pytest

from nixeryd.errors import NameInvalid
from nixeryd.imagename import SHELL_PACKAGES, parse_image_name


def test_packages_are_sorted_so_order_does_not_matter() -> None:
    assert parse_image_name("htop/git") == parse_image_name("git/htop")
    assert parse_image_name("htop/git").packages == ("git", "htop")


def test_shell_meta_package_expands_at_the_front() -> None:
    image = parse_image_name("shell/git")
    assert set(image.packages) == {"git", *SHELL_PACKAGES}
    assert image.architecture == "amd64"
    assert image.system == "x86_64-linux"


def test_meta_packages_only_count_at_the_front() -> None:
    image = parse_image_name("git/shell")
    assert image.packages == ("git", "shell")


def test_arm64_selects_the_aarch64_system() -> None:
    image = parse_image_name("arm64/shell/hello")
    assert image.architecture == "arm64"
    assert image.system == "aarch64-linux"
    assert "hello" in image.packages
    assert parse_image_name("shell/arm64/hello").architecture == "arm64"


def test_shell_alone_is_an_image() -> None:
    assert parse_image_name("shell").packages == tuple(sorted(SHELL_PACKAGES))
    assert parse_image_name("arm64/shell").architecture == "arm64"


def test_nested_attribute_paths_are_single_components() -> None:
    assert parse_image_name("xorg.xev").packages == ("xorg.xev",)


def test_duplicates_collapse() -> None:
    assert parse_image_name("hello/hello").packages == ("hello",)
    assert parse_image_name("shell/coreutils").packages == tuple(sorted(SHELL_PACKAGES))


def test_implicit_packages_are_optional_and_not_repeated() -> None:
    assert parse_image_name("hello").optional_packages == ("cacert", "iana-etc")
    assert parse_image_name("cacert/hello").optional_packages == ("iana-etc",)


def test_canonical_form_is_equal_for_equal_images() -> None:
    assert parse_image_name("b/a").canonical == parse_image_name("a/b").canonical
    assert parse_image_name("arm64/a").canonical != parse_image_name("a").canonical


@pytest.mark.parametrize(
    "name", ["", "Hello", "a//b", "/a", "a/", "a..b", "-a", "a b", "arm64", "x" * 256]
)
def test_invalid_names_are_name_invalid(name: str) -> None:
    with pytest.raises(NameInvalid):
        parse_image_name(name)
