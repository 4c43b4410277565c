"""The image's root symlink layer: the requested packages joined into one tree.

Nixery makes the packages usable at ``/bin/hello`` and the like with nixpkgs'
``symlinkJoin`` (``lndir -silent`` over each package, in order) and copies the
result into a layer. :func:`symlink_forest` computes the same tree directly
from the store, as :class:`~nixeryd.tarball.TreeEntry` values for
:func:`~nixeryd.tarball.write_tree_layer`, so no Nix build is needed for it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from twisted.logger import Logger

from nixeryd.tarball import TreeEntry, member_order

_log = Logger()

_DIR_MODE = 0o755
_SYMLINK_MODE = 0o777

#: What Nixery adds to every image: a world-writable /tmp and the /usr/bin/env
#: that shebang lines expect (dangling in images without coreutils).
_EXTRAS = (
    TreeEntry("tmp", "dir", 0o1777),
    TreeEntry("usr", "dir", _DIR_MODE),
    TreeEntry("usr/bin", "dir", _DIR_MODE),
    TreeEntry("usr/bin/env", "symlink", _SYMLINK_MODE, target="/bin/env"),
)


def symlink_forest(package_paths: Sequence[str]) -> list[TreeEntry]:
    """The entries of the root symlink layer for the packages at ``package_paths``, sorted.

    Every directory of every package becomes a real directory (mode 0755);
    every file and every symlink becomes a symlink to its absolute store path.
    Symlinks are linked, not followed, even when they point at a directory,
    so only real directories are merged. On a conflict the earlier package
    wins, whatever the kinds: a later package's file where an earlier one has
    a directory is dropped, and so is a later package's whole directory where
    an earlier one has a file or symlink.

    The extras (``tmp`` with mode 1777, ``usr/bin/env`` -> ``/bin/env``) are
    placed before the first package, so they are always there as such; a
    package's own ``tmp`` directory is merged into the extra one.

    A package whose store path is not a directory (a single file, or a
    symlink, which is not followed) has nothing to join and contributes
    nothing; that is logged, because ``lndir`` would have failed on it. A
    missing path raises :class:`FileNotFoundError` naming it.
    """
    forest = {entry.name: entry for entry in _EXTRAS}
    for package in package_paths:
        try:
            mode = os.lstat(package).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "package path does not exist", package) from None
        if not stat.S_ISDIR(mode):
            _log.info(
                "{package} is not a directory; it adds nothing to the forest", package=package
            )
            continue
        _join(os.path.normpath(package), forest)
    return sorted(forest.values(), key=lambda entry: member_order(entry.name))


def _join(package: str, forest: dict[str, TreeEntry]) -> None:
    """Add ``package``'s tree to ``forest`` where nothing is there yet."""
    pending = [""]
    while pending:
        directory = pending.pop()
        with os.scandir(os.path.join(package, directory)) as scan:
            children = list(scan)
        for child in children:
            name = f"{directory}/{child.name}" if directory else child.name
            present = forest.get(name)
            if child.is_dir(follow_symlinks=False):
                if present is None:
                    present = forest[name] = TreeEntry(name, "dir", _DIR_MODE)
                if present.kind == "dir":
                    pending.append(name)
            elif present is None:
                forest[name] = TreeEntry(name, "symlink", _SYMLINK_MODE, target=child.path)
