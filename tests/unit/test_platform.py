import pytest

from nixeryd.platform import AMD64, ARM64, PLATFORMS, host_platform, parse_platform, parse_platforms


def test_platforms_by_name_alias_and_nix_system() -> None:
    assert parse_platform("linux/amd64") == AMD64
    assert parse_platform("linux/arm64") == parse_platform("linux/arm64/v8") == ARM64
    assert parse_platform(" aarch64-linux ") == ARM64
    assert parse_platform("LINUX/ARM/V7").system == "armv7l-linux"


def test_every_platform_round_trips_through_its_name() -> None:
    for name, platform in PLATFORMS.items():
        assert parse_platform(name) == platform
        assert platform.name == name


def test_unknown_platforms_name_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"platform 'windows/amd64'; use one of linux/amd64"):
        parse_platform("windows/amd64")


def test_lists_keep_order_and_drop_repeats() -> None:
    assert parse_platforms("linux/arm64, linux/amd64,aarch64-linux,") == (ARM64, AMD64)
    with pytest.raises(ValueError, match="at least one"):
        parse_platforms(" , ")


def test_the_host_is_a_known_platform() -> None:
    assert host_platform() in PLATFORMS.values()
