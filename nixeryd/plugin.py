"""Everything a plugin is written with, in one module: the public plugin API.

A plugin imports from here (and its tests from :mod:`nixeryd.testing`) and
from nowhere else in nixeryd, so that nixeryd's internal modules can move
without breaking site plugins. ``plugins/README.md`` walks through writing
one; this is the brief version.

Hooks. A plugin is a module (or object) with functions marked
``@hookimpl``, registered through the entry-point group ``nixeryd``. Each
provider hook returns a list of :class:`Provider`; nixeryd calls them once
at start-up, and creates only the providers the configuration names:

``nixeryd_storage_backends() -> list[Provider[Storage]]``
    selected by ``storage_backend`` (``NIXERY_STORAGE_BACKEND``); the
    contract is :class:`Storage` (``start``/``stop``, staged and small blobs,
    ``serve_blob`` answering a :class:`Redirect` or a resource, records);
``nixeryd_package_sources() -> list[Provider[PackageSource]]``
    selected by ``package_source``; turns an image tag into a :class:`SourceRef`;
``nixeryd_layering_strategies() -> list[Provider[LayeringStrategy]]``
    selected by ``layering_strategy``; groups a :class:`ClosureGraph` into
    :class:`Layer` values;
``nixeryd_authenticators() -> list[Provider[Authenticator]]``
    selected by ``auth`` (``NIXERYD_AUTH``); an :class:`Authenticator`
    turns an ``Authorization`` header into an :class:`Identity` (or None),
    words the ``WWW-Authenticate`` challenge, and may serve endpoints of its
    own (the token endpoint); ``docs/auth.md`` describes the policies;
``nixeryd_image_built(image, tag, digest, seconds) -> None``
    an event, for metrics or audit logs: return quickly and never raise.

Creating. ``Provider(name, summary, create, settings=(Setting(...), ...))``:
``create(runtime)`` is called once with a :class:`Runtime` whose
``settings`` maps each declared :class:`Setting`'s name to its value,
resolved from the ``[plugin.<name>]`` table of the config file (a value may
be ``{ env = "VAR" }`` or ``{ file = "/path" }``), then the setting's
environment variables (``<VAR>_FILE`` for a secret), then its default. An
unknown key in the selected provider's table, a missing required setting or
a value ``parse`` refuses (raise ValueError) stops start-up with a
:class:`ConfigError` naming it; ``create`` raises ConfigError for anything
else a site must fix. Use the runtime's services, not global ones, so tests
can fake them: ``runtime.reactor``, ``runtime.http`` (treq's interface),
``runtime.processes`` (a :class:`ProcessRunner`), ``runtime.run_in_thread``.

Threads. Every method nixeryd calls on a provider's object runs on the
reactor thread and must not block it: return a Deferred, and send blocking
work (file I/O, hashing, a blocking client library) through
``runtime.run_in_thread(work)``, a :class:`ThreadRunner` whose Deferred
fires back on the reactor thread. ``work`` runs in a worker thread: it must
not touch the reactor or state the reactor thread changes. Two exceptions:
:class:`StagedBlob`'s ``file`` is written from a worker thread, and a
:class:`LayeringStrategy` is pure and synchronous (the builder moves large
closures off the reactor itself).

Errors. Anything a client caused is a :class:`RegistryError` subclass
(:class:`DigestInvalid` for a malformed digest, :class:`BlobUnknown` for a
blob that is gone, :class:`ManifestUnknown` for a tag a source does not
know, :class:`BuildFailed` with the cause in words a user can act on), which
the registry answers as the distribution spec's JSON error; any other
exception is a server error, logged.
"""

from __future__ import annotations

from nixeryd.auth import Authenticator, Identity, Unauthorized, basic_credentials
from nixeryd.blobserving import (
    FileBlobResource,
    blob_headers,
    error_body,
    refused_method,
    requested_range,
)
from nixeryd.blobserving import Request as BlobRequest
from nixeryd.closure import ClosureGraph
from nixeryd.config import Config, ConfigError
from nixeryd.errors import (
    BlobUnknown,
    BuildFailed,
    BuildTimedOut,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RangeNotSatisfiable,
    RegistryError,
    TagInvalid,
    Unsupported,
)
from nixeryd.hookspecs import hookimpl
from nixeryd.layering import Layer, LayeringStrategy
from nixeryd.popularity import Popularity
from nixeryd.process import InteractiveProcess, ProcessResult, ProcessRunner, ProcessTimedOut
from nixeryd.runtime import Provider, Runtime, ThreadRunner
from nixeryd.settings import Setting, parse_boolean, parse_duration
from nixeryd.sources import PackageSource, SourceRef
from nixeryd.storage import (
    SMALL_BLOB_SIZE,
    Blob,
    BlobAnswer,
    BlobInfo,
    RecordInfo,
    Redirect,
    StagedBlob,
    Storage,
    digest_hex,
    record_parts,
)

__all__ = [
    "SMALL_BLOB_SIZE",
    "Authenticator",
    "Blob",
    "BlobAnswer",
    "BlobInfo",
    "BlobRequest",
    "BlobUnknown",
    "BuildFailed",
    "BuildTimedOut",
    "ClosureGraph",
    "Config",
    "ConfigError",
    "DigestInvalid",
    "FileBlobResource",
    "Identity",
    "InteractiveProcess",
    "Layer",
    "LayeringStrategy",
    "ManifestUnknown",
    "NameInvalid",
    "NameUnknown",
    "PackageSource",
    "Popularity",
    "ProcessResult",
    "ProcessRunner",
    "ProcessTimedOut",
    "Provider",
    "RangeNotSatisfiable",
    "RecordInfo",
    "Redirect",
    "RegistryError",
    "Runtime",
    "Setting",
    "SourceRef",
    "StagedBlob",
    "Storage",
    "TagInvalid",
    "ThreadRunner",
    "Unauthorized",
    "Unsupported",
    "basic_credentials",
    "blob_headers",
    "digest_hex",
    "error_body",
    "hookimpl",
    "parse_boolean",
    "parse_duration",
    "record_parts",
    "refused_method",
    "requested_range",
]
