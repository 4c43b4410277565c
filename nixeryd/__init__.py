"""nixeryd: a container registry that builds images on demand with Nix.

Site plugins implement the hooks of :mod:`nixeryd.hookspecs`, marked with
:data:`hookimpl`, and register under the entry-point group ``nixeryd``.
"""

from nixeryd.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
