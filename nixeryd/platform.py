"""Target platforms: the OCI platform a client asks for and the Nix system that builds it.

A multi-arch image is an image index (OCI) or manifest list (Docker) with one
manifest per platform; clients pick theirs by the ``platform`` object of each
entry (``docker pull --platform linux/arm64``, ``podman pull --arch arm64``,
``skopeo --override-arch arm64``). Each entry is built by evaluating the
package set with that platform's Nix ``system``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Platform:
    """An OCI platform (``os``/``architecture``/``variant``) and its Nix system."""

    os: str
    architecture: str
    variant: str | None
    system: str

    @property
    def name(self) -> str:
        """The ``os/architecture[/variant]`` form clients and configuration use."""
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)

    def as_json(self) -> dict[str, Any]:
        """The fields of an image config and of an index entry's ``platform`` object."""
        fields: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            fields["variant"] = self.variant
        return fields


#: The platforms Nix can build Linux images for. Variants follow the OCI image
#: spec's conventions (arm64 is ``v8``; 32-bit arm needs one to be chosen at all).
PLATFORMS: dict[str, Platform] = {
    platform.name: platform
    for platform in (
        Platform("linux", "amd64", None, "x86_64-linux"),
        Platform("linux", "arm64", "v8", "aarch64-linux"),
        Platform("linux", "386", None, "i686-linux"),
        Platform("linux", "arm", "v7", "armv7l-linux"),
        Platform("linux", "arm", "v6", "armv6l-linux"),
        Platform("linux", "ppc64le", None, "powerpc64le-linux"),
        Platform("linux", "s390x", None, "s390x-linux"),
        Platform("linux", "riscv64", None, "riscv64-linux"),
    )
}

AMD64 = PLATFORMS["linux/amd64"]
ARM64 = PLATFORMS["linux/arm64/v8"]

#: Names that mean a listed platform: without the default variant, or by Nix system.
_ALIASES = {
    "linux/arm64": ARM64,
    **{platform.system: platform for platform in PLATFORMS.values()},
}

#: ``uname -m`` of the hosts nixeryd runs on, for the default platform.
_MACHINES = {
    "x86_64": AMD64,
    "aarch64": ARM64,
    "arm64": ARM64,
    "i686": PLATFORMS["linux/386"],
    "armv7l": PLATFORMS["linux/arm/v7"],
    "armv6l": PLATFORMS["linux/arm/v6"],
    "ppc64le": PLATFORMS["linux/ppc64le"],
    "s390x": PLATFORMS["linux/s390x"],
    "riscv64": PLATFORMS["linux/riscv64"],
}


def parse_platform(text: str) -> Platform:
    """A platform from ``linux/arm64``, ``linux/arm/v7`` or a Nix system (``aarch64-linux``)."""
    name = text.strip().lower()
    platform = PLATFORMS.get(name) or _ALIASES.get(name)
    if platform is None:
        known = ", ".join(PLATFORMS)
        raise ValueError(f"unknown platform {text!r}; use one of {known}")
    return platform


def parse_platforms(text: str) -> tuple[Platform, ...]:
    """A comma-separated list of platforms, the first being the default, without repeats."""
    platforms: list[Platform] = []
    for item in text.split(","):
        if not item.strip():
            continue
        platform = parse_platform(item)
        if platform not in platforms:
            platforms.append(platform)
    if not platforms:
        raise ValueError("name at least one platform, such as linux/amd64")
    return tuple(platforms)


def host_platform() -> Platform:
    """The platform of this machine: what Nix builds natively, so the default target."""
    return _MACHINES.get(os.uname().machine, AMD64)
