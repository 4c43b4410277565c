"""Registry errors: what a client is told when a request cannot be answered.

Every failure a client can cause or see is a :class:`RegistryError` carrying
one of the distribution spec's error codes, an HTTP status and a message a
person can act on. The HTTP layer renders them as
``{"errors": [{"code", "message", "detail"}]}``.
"""

from __future__ import annotations

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


class TooManyRequests(RegistryError):
    """More new images are waiting for Nix than the registry queues; answered 429
    with ``Retry-After``, which clients honour, rather than queued without bound."""

    code = "TOOMANYREQUESTS"
    status = 429

    def __init__(self, message: str, retry_after: int, detail: Any = None) -> None:
        super().__init__(message, detail)
        self.retry_after = retry_after


def first_failure(failure: Failure) -> Failure:
    """The failure of the first of several concurrent steps that failed (gatherResults
    with ``consumeErrors``), rather than its ``FirstError`` wrapper, so that a client
    gets that step's registry error."""
    wrapper = cast(FirstError, failure.value)
    return wrapper.subFailure
