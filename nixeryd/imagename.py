"""Image names: the package list a registry repository name stands for.

``shell/git/htop`` is an image of the packages ``git`` and ``htop`` plus the
``shell`` meta-package. The rules are Nixery's (see NIXERY.md):

* the packages are sorted, so ``git/htop`` and ``htop/git`` are one image;
* meta-packages are recognised only at the front of the name: ``shell`` adds
  an interactive shell and basic tools, ``arm64`` selects ``aarch64-linux``;
* ``cacert`` and ``iana-etc`` are added when the package set has them (the
  Nix side drops them silently when it does not).

Lower-cased and digit-leading names are resolved against the package set's
attribute names by the Nix expression, which alone knows them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nixeryd.errors import NameInvalid

SHELL_PACKAGES = ("bashInteractive", "coreutils", "moreutils", "nano")
IMPLICIT_PACKAGES = ("cacert", "iana-etc")

#: Nix system and OCI architecture of each target the image name can select.
PLATFORMS = {"amd64": "x86_64-linux", "arm64": "aarch64-linux"}

# The distribution spec's repository name grammar, per path component.
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class ImageName:
    """A parsed image name: what to build, for which platform."""

    #: The packages the client asked for (attribute paths), sorted, meta-packages expanded.
    packages: tuple[str, ...]
    #: OCI architecture (``amd64`` or ``arm64``).
    architecture: str

    @property
    def system(self) -> str:
        """The Nix system string the packages are evaluated for."""
        return PLATFORMS[self.architecture]

    @property
    def optional_packages(self) -> tuple[str, ...]:
        """Packages added when the package set has them and not already requested."""
        return tuple(name for name in IMPLICIT_PACKAGES if name not in self.packages)

    @property
    def canonical(self) -> str:
        """A stable text form: equal for every spelling of the same image."""
        return f"{self.architecture}:{'/'.join(self.packages)}"


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

    architecture = "amd64"
    packages: set[str] = set()
    rest = list(components)
    while rest and rest[0] in ("shell", "arm64"):
        meta = rest.pop(0)
        if meta == "shell":
            packages.update(SHELL_PACKAGES)
        else:
            architecture = "arm64"
    packages.update(rest)
    if not packages:
        raise NameInvalid(f"{name!r} names no package: add one, such as {name}/hello")
    return ImageName(packages=tuple(sorted(packages)), architecture=architecture)
