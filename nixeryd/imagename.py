"""Image names: the package list a registry repository name stands for.

``shell/git/htop`` is an image of the packages ``git`` and ``htop`` plus the
``shell`` meta-package. The rules are Nixery's:

* the packages are sorted, so ``git/htop`` and ``htop/git`` are one image;
* meta-packages are recognised only at the front of the name: ``shell`` adds
  an interactive shell and basic tools, ``arm64`` selects the ``linux/arm64``
  platform; without it the image is built for every configured platform;
* ``cacert`` and ``iana-etc`` are added when the package set has them (the
  Nix side drops them silently when it does not).

Lower-cased and digit-leading names are resolved against the package set's
attribute names by the Nix expression, which alone knows them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from nixeryd.errors import NameInvalid
from nixeryd.platform import ARM64, Platform

SHELL_PACKAGES = ("bashInteractive", "coreutils", "moreutils", "nano")
IMPLICIT_PACKAGES = ("cacert", "iana-etc")

# The distribution spec's tag grammar.
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")

# The distribution spec's repository name grammar, per path component.
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class ImageName:
    """A parsed image name: what to build, and for which platform if the name says."""

    #: The packages the client asked for (attribute paths), sorted, meta-packages expanded.
    packages: tuple[str, ...]
    #: The platform the name's ``arm64`` prefix chose; None leaves it to the configuration.
    platform: Platform | None = None

    def targets(self, configured: Sequence[Platform]) -> list[ImageTarget]:
        """The images this name stands for: one per configured platform, unless it chose one."""
        platforms = [self.platform] if self.platform is not None else configured
        return [ImageTarget(self.packages, platform) for platform in platforms]


@dataclass(frozen=True)
class ImageTarget:
    """One image to build: the packages of an image name, for one platform."""

    packages: tuple[str, ...]
    platform: Platform

    @property
    def system(self) -> str:
        """The Nix system string the packages are evaluated for."""
        return self.platform.system

    @property
    def optional_packages(self) -> tuple[str, ...]:
        """Packages added when the package set has them and not already requested."""
        return tuple(name for name in IMPLICIT_PACKAGES if name not in self.packages)

    @property
    def canonical(self) -> str:
        """A stable text form: equal for every spelling of the same image."""
        return f"{self.platform.name}:{'/'.join(self.packages)}"


def is_valid_tag(tag: str) -> bool:
    """Whether ``tag`` is a tag by the distribution spec's grammar: what a client can pull."""
    return _TAG.match(tag) is not None


def parse_image_name(name: str) -> ImageName:
    """Parse a repository name such as ``shell/git/htop``.

    Raises :class:`NameInvalid` for names the distribution spec does not allow
    or that select no package.
    """
    if not name or len(name) > _MAX_NAME_LENGTH:
        raise NameInvalid(f"repository name must be 1 to {_MAX_NAME_LENGTH} characters")
    components = name.split("/")
    for component in components:
        if not _COMPONENT.match(component):
            raise NameInvalid(
                f"invalid repository name component {component!r}: use lower-case package "
                "names separated by '/', such as shell/git/htop"
            )

    platform = None
    packages: set[str] = set()
    rest = list(components)
    while rest and rest[0] in ("shell", "arm64"):
        meta = rest.pop(0)
        if meta == "shell":
            packages.update(SHELL_PACKAGES)
        else:
            platform = ARM64
    packages.update(rest)
    if not packages:
        raise NameInvalid(f"{name!r} names no package: add one, such as {name}/hello")
    return ImageName(packages=tuple(sorted(packages)), platform=platform)
