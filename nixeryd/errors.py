"""Registry errors: what a client is told when a request cannot be answered.

Every failure a client can cause or see is a :class:`RegistryError` carrying
one of the distribution spec's error codes, an HTTP status and a message a
person can act on. The HTTP layer renders them as
``{"errors": [{"code", "message", "detail"}]}``.
"""

from __future__ import annotations

import errno
from typing import Any, cast

from twisted.internet.defer import FirstError
from twisted.python.failure import Failure


class RegistryError(Exception):
    """An error with a distribution-spec code, answered as JSON."""

    code = "UNKNOWN"
    status = 500

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def as_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return {"errors": [error]}


class ManifestUnknown(RegistryError):
    code = "MANIFEST_UNKNOWN"
    status = 404


class BlobUnknown(RegistryError):
    code = "BLOB_UNKNOWN"
    status = 404


class NameUnknown(RegistryError):
    code = "NAME_UNKNOWN"
    status = 404


class NameInvalid(RegistryError):
    code = "NAME_INVALID"
    status = 400


class TagInvalid(RegistryError):
    code = "TAG_INVALID"
    status = 404


class DigestInvalid(RegistryError):
    code = "DIGEST_INVALID"
    status = 400


class Unsupported(RegistryError):
    code = "UNSUPPORTED"
    status = 405


class RangeNotSatisfiable(RegistryError):
    code = "RANGE_INVALID"
    status = 416


class BuildFailed(RegistryError):
    """Nix could not evaluate or build the image; the message carries Nix's own words.

    Answered as 404 ``MANIFEST_UNKNOWN``: docker, podman and containerd show the
    message of a 4xx error to their user but print only the status of a 5xx,
    and a message is the point of this error (Nixery #94, #171).
    """

    code = "MANIFEST_UNKNOWN"
    status = 404


class BuildTimedOut(BuildFailed):
    """Nix ran longer than ``NIX_TIMEOUT`` and was killed."""


class ImageTooLarge(BuildFailed):
    """The image's closure or one of its layers is larger than the site allows
    (``NIXERYD_MAX_CLOSURE_SIZE``, ``NIXERYD_MAX_LAYER_SIZE``); the message names the
    limit, so that a user can ask for fewer packages or the operator raise it."""


class TooManyRequests(RegistryError):
    """More new images are waiting for Nix than the registry queues; answered 429
    with ``Retry-After``, which clients honour, rather than queued without bound."""

    code = "TOOMANYREQUESTS"
    status = 429

    def __init__(self, message: str, retry_after: int, detail: Any = None) -> None:
        super().__init__(message, detail)
        self.retry_after = retry_after
        #: Set on the answer, as the HTTP layer does for every error carrying headers.
        self.headers = [(b"Retry-After", str(retry_after).encode())]


class ShuttingDown(RegistryError):
    """The daemon is stopping: a request it had not answered yet is told so, and may be
    retried (against another instance, or this one once it is back)."""

    code = "UNAVAILABLE"
    status = 503


def first_failure(failure: Failure) -> Failure:
    """The failure of the first of several concurrent steps that failed (gatherResults
    with ``consumeErrors``), rather than its ``FirstError`` wrapper, so that a client
    gets that step's registry error."""
    wrapper = cast(FirstError, failure.value)
    return wrapper.subFailure


class StorageFailed(RegistryError):
    """Storage refused a read or write: the registry's trouble, for its operator to fix.

    ``UNAVAILABLE`` (the code the distribution registry uses for a server that
    cannot serve now) with 507 Insufficient Storage for a full disk or quota,
    503 for the rest (read-only, permission denied, I/O errors): a client may
    retry later, and the message tells the operator what to fix.
    """

    code = "UNAVAILABLE"
    status = 503


class StorageFull(StorageFailed):
    status = 507


# errno -> what an operator reads: the state of the storage, and what to do about it.
_FAULTS = {
    errno.ENOSPC: "storage is full",
    errno.EDQUOT: "the storage quota is exhausted",
    errno.EROFS: "storage is read-only",
    errno.EACCES: "nixeryd has no permission on its storage",
    errno.EPERM: "nixeryd has no permission on its storage",
    errno.EIO: "storage reported an I/O error",
}


def storage_failure(error: OSError, doing: str) -> StorageFailed:
    """The registry error for an OSError raised while ``doing`` (``"writing a blob"``)."""
    cause = _FAULTS.get(error.errno or 0, "storage failed")
    message = f"{cause} ({error.strerror or error}) while {doing}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"{message}: free space in the storage directory, or enlarge it")
    return StorageFailed(f"{message}: check the storage directory's mount and permissions")
