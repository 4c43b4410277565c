"""The registry HTTP API (the pull side of the OCI distribution spec), served with klein.

Routes map to the builder and storage; every failure is a registry error
rendered as ``{"errors": [...]}`` JSON with the spec's code, never a
traceback. The README's "Remote clients" and "Errors" sections say what clients get.

The web pages (``/``, ``/images/...``, ``/builds/...``; :mod:`nixeryd.web`
renders them) are routed here too, behind the same authentication; their
errors are the same registry errors, as an HTML page for a browser.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from typing import Any, cast
from urllib.parse import urlencode

from klein import Klein
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from nixeryd import web
from nixeryd.answers import SERVER, Answers, render
from nixeryd.auth import Gate, Identity, gated
from nixeryd.blobserving import blob_headers
from nixeryd.builder import ImageBuilder
from nixeryd.builds import LogLine
from nixeryd.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    RegistryError,
    TagInvalid,
    Unsupported,
)
from nixeryd.fanout import PlatformFanOut
from nixeryd.imagename import ImageName, is_valid_tag, parse_image_name
from nixeryd.images import StoredManifest, TaggedImage
from nixeryd.manifest import MANIFEST_MEDIA_TYPES, OCI_INDEX, choose
from nixeryd.manifeststore import blobs_named
from nixeryd.metrics import Metrics
from nixeryd.nixbuild import PackagesNotFound
from nixeryd.ratelimit import ClientBuckets
from nixeryd.search import PackageSearch
from nixeryd.singleflight import SingleFlight
from nixeryd.sources import PackageSource
from nixeryd.storage import SMALL_BLOB_SIZE, BlobInfo, Redirect, Storage

API_VERSION = b"registry/2.0"

#: Seconds between comment lines on a build's event stream while the build runs. Nix can
#: print nothing for minutes (a long compile, a link step) and a proxy in front cuts a
#: response silent for a minute (nginx's proxy_read_timeout); EventSource ignores comments.
EVENT_STREAM_HEARTBEAT = 15.0

# The spec's digest grammar; only sha256 is stored, other algorithms are simply unknown.
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_SHA256 = re.compile(r"^sha256:[a-f0-9]{64}$")


class PaginationInvalid(RegistryError):
    code = "PAGINATION_NUMBER_INVALID"
    status = 400


def check_digest(digest: str) -> bool:
    """True for a sha256 digest we can look up, False for another well-formed algorithm;
    :class:`DigestInvalid` for anything else."""
    if _SHA256.match(digest):
        return True
    if _DIGEST.match(digest) and not digest.startswith("sha256:"):
        return False
    raise DigestInvalid(f"{digest!r} is not a valid digest (expected sha256:<64 hex digits>)")


class RegistryApp:
    """The registry's routes, bound to the images on the configured platforms, the builder
    (for its recent errors), storage and the package source."""

    app = Klein()
    # A repository name never has an empty component: "/v2//etc/passwd/..." is a bad name
    # (NAME_INVALID), not a redirect to "/v2/etc/passwd/...".
    app.url_map.merge_slashes = False
    log = Logger()

    def __init__(
        self,
        images: PlatformFanOut,
        builder: ImageBuilder,
        storage: Storage,
        source: PackageSource,
        metrics: Metrics,
        gate: Gate | None = None,
        *,
        metrics_page: IResource | None = None,
        build_limit: ClientBuckets | None = None,
        source_description: str = "",
        search: PackageSearch | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        """``gate`` is the site's authentication policy; None: no authentication.
        ``metrics_page`` is served at ``/metrics``; None: not here (another listener
        serves it, or nothing does). ``build_limit`` rations each client's requests
        for tags not yet served (see :mod:`nixeryd.ratelimit`); None: no limit.
        ``source_description`` names the package set on the index page; ``search``
        answers the package search page (None: no search). ``clock`` times the event
        streams' heartbeats (the global reactor when not given)."""
        if clock is None:
            from twisted.internet import reactor as global_reactor

            clock = cast(IReactorTime, global_reactor)
        self._clock = clock
        self._source_description = source_description
        self._search = search
        self._images = images
        self.metrics = metrics
        self._metrics_page = metrics_page
        self._gate = gate
        self._build_limit = build_limit
        #: Names (and tags) known to be built: served since start, or (under the ``builds``
        #: policy, see _may_build) recorded in storage.
        self._built_names: OrderedDict[str, None] = OrderedDict()
        self._builder = builder
        self._storage = storage
        self._source = source
        self._answers = Answers([(b"Docker-Distribution-API-Version", API_VERSION)], metrics)
        self._blob_infos: OrderedDict[str, BlobInfo] = OrderedDict()
        #: Blob digest -> the name and tag of the image it was last served for, oldest
        #: first; the image's docker manifest digest marks it noted.
        self._blob_images: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._rebuilds: SingleFlight[BlobInfo | None] = SingleFlight()

    @property
    def storage(self) -> Storage:
        """The storage backend, for the service tree to start and stop."""
        return self._storage

    @property
    def images(self) -> PlatformFanOut:
        """The images on the configured platforms, for ``nixeryd build`` to build without a
        request (:mod:`nixeryd.export`)."""
        return self._images

    @property
    def answers(self) -> Answers:
        """The remembered responses, for the HTTP channel to serve before parsing a request."""
        return self._answers

    def resource(self) -> IResource:
        """The root resource: the routes, with the API version header on every response,
        and remembered answers served before routing."""
        return cast(IResource, _WithApiVersion(self.app.resource(), self._answers, self._gate))

    @property
    def gate(self) -> Gate | None:
        """The authentication policy, for the HTTP channel to apply to remembered answers."""
        return self._gate

    @app.route("/", methods=["GET", "HEAD"])
    def index(self, request: Request) -> bytes:
        document = web.index_document(
            self._builder.builds,
            _host(request),
            request.isSecure(),
            self._source_description,
            self._images.platforms,
            self._builder.recent_errors,
        )
        if _wants_json(request):
            return _json(request, document)
        return _html(request, web.render_index(document))

    @app.route("/search", methods=["GET", "HEAD"])
    @inlineCallbacks
    def search_page(self, request: Request) -> Any:
        """Packages whose attribute names contain ``?q=``, in ``?tag=``'s package set."""
        if self._search is None:
            return _not_an_endpoint(request)
        query = (_arg(request, b"q") or "").strip().lower()
        tag = _arg(request, b"tag") or "latest"
        if not is_valid_tag(tag):
            raise TagInvalid(f"{tag!r} is not a valid tag")
        results = (yield self._search.search(query, tag)) if query else []
        document = web.search_document(query, tag, results, _host(request), request.isSecure())
        if _wants_json(request):
            return _json(request, document)
        return _html(request, web.render_search(document))

    @app.route("/images", methods=["GET", "HEAD"])
    def open_image(self, request: Request) -> bytes:
        """The index page's form: to the image page of the name typed."""
        name = (_arg(request, b"name") or "").strip().strip("/")
        repository, colon, tag = name.partition(":")
        parse_image_name(repository)
        if colon and not is_valid_tag(tag):
            raise TagInvalid(f"{tag!r} is not a valid tag")
        request.redirect(f"/images/{name}".encode())
        return b""

    @app.route("/images/<path:reference>", methods=["GET", "HEAD"])
    def image_page(self, request: Request, reference: str) -> bytes:
        """An image name (and tag, ``latest`` if none) on every platform it stands for."""
        name, colon, tag = reference.partition(":")
        tag = tag if colon else "latest"
        if not is_valid_tag(tag):
            raise TagInvalid(f"{tag!r} is not a valid tag")
        canonicals = [
            target.canonical for target in parse_image_name(name).targets(self._images.platforms)
        ]
        hub = self._builder.builds
        document = web.image_document(
            hub, name, tag, canonicals, _host(request), request.isSecure()
        )
        if _wants_json(request):
            return _json(request, document)
        builds = {}
        for entry in document["platforms"]:
            if entry["build"] is not None:
                build = hub.build(entry["build"]["id"])
                assert build is not None
                builds[build.id] = web.build_document(build)
        return _html(request, web.render_image(document, builds))

    @app.route("/builds/<int:number>", methods=["GET", "HEAD"])
    def build_page(self, request: Request, number: int) -> bytes:
        """One build, its whole log kept, live while it runs."""
        build = self._builder.builds.build(number)
        if build is None:
            raise BuildUnknown(f"build #{number} is not kept; the index page lists those that are")
        document = web.build_document(build)
        if _wants_json(request):
            return _json(request, document)
        return _html(request, web.render_build(document))

    @app.route("/builds/<int:number>/events", methods=["GET"])
    def build_events(self, request: Request, number: int) -> Any:
        """A build's log as Server-Sent Events, each line with its number as its id, from
        after ``Last-Event-ID`` (or ``?after=``), then a ``result`` event."""
        build = self._builder.builds.build(number)
        if build is None:
            raise BuildUnknown(f"build #{number} is not kept; the index page lists those that are")
        after = _last_event_id(request)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-store")
        # Proxies (nginx) would otherwise hold the stream back.
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.write(b"retry: 2000\n\n")
        for line in build.since(after):
            request.write(web.event_stream_entry("line", line.as_json(), line.number))

        def result() -> None:
            if not request.finished and not request._disconnected:
                request.write(web.event_stream_entry("result", web.build_summary(build)))
                request.finish()

        if build.finished:
            result()
            return NOT_DONE_YET

        def sent(line: LogLine | None) -> None:
            if line is None:
                result()
            elif not request._disconnected:
                request.write(web.event_stream_entry("line", line.as_json(), line.number))

        def heartbeat() -> None:
            if not request._disconnected:
                request.write(b": still building\n\n")

        beating = LoopingCall(heartbeat)
        beating.clock = self._clock
        beating.start(EVENT_STREAM_HEARTBEAT, now=False)
        stop = build.listen(sent)

        def ended(_: object) -> None:
            stop()
            beating.stop()

        request.notifyFinish().addBoth(ended)
        return NOT_DONE_YET

    @app.route("/errors/<int:number>/log", methods=["GET", "HEAD"])
    def error_log(self, request: Request, number: int) -> bytes:
        """Everything Nix printed for a recent failed build the index page lists."""
        error = self._builder.recent_error(number)
        if error is None or error.log is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"no such recent build error; the index page lists the ones kept\n"
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return f"{error.image}:{error.tag}\n\n{error.log}".encode()

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics_page(self, request: Request) -> Any:
        """Prometheus metrics (:mod:`nixeryd.metrics`), behind the site's authentication."""
        if self._metrics_page is None:
            return _not_an_endpoint(request)
        return self._metrics_page

    @app.route("/v2/", methods=["GET", "HEAD"])
    @app.route("/v2", methods=["GET", "HEAD"])
    def base(self, request: Request) -> bytes:
        return _json(request, {})

    @app.route("/v2/<path:name>/manifests/<reference>", methods=["GET", "HEAD"])
    @inlineCallbacks
    def manifest(self, request: Request, name: str, reference: str) -> Any:
        image = parse_image_name(name)
        by_digest = ":" in reference
        if by_digest:
            manifest = yield self._manifest_by_digest(reference)
            immutable = True
        else:
            manifest, immutable = yield self._manifest_by_tag(request, name, image, reference)
        headers = [
            (b"Content-Type", manifest.media_type.encode()),
            (b"Content-Length", str(len(manifest.data)).encode()),
            (b"Docker-Content-Digest", manifest.digest.encode()),
            (b"ETag", f'"{manifest.digest}"'.encode()),
        ]
        if not by_digest:
            headers.append((b"Vary", b"Accept"))
        if immutable:
            self._answers.remember(request, headers, manifest.data, by_accept=not by_digest)
        return render(request, headers, manifest.data)

    @inlineCallbacks
    def _manifest_by_tag(self, request: Request, name: str, image: ImageName, tag: str) -> Any:
        if not is_valid_tag(tag):
            raise TagInvalid(
                f"{tag!r} is not a valid tag (letters, digits, '_', '.', '-'; at most 128)"
            )
        identity: Identity | None = getattr(request, "identity", None)
        if identity is not None and self._gate is not None and self._gate.policy == "builds":
            yield self._may_build(request, name, tag, identity)
        named = f"{name}:{tag}"
        if self._build_limit is not None and named not in self._built_names:
            self._build_limit.take(_client(request, identity), named)
        tagged = yield self._images.tagged(image, tag)
        self._note_blobs(name, tag, tagged)
        if identity is not None and not identity.anonymous:
            yield self._note_built(named)
        else:
            self._remember_built(named)
        accept = request.requestHeaders.getRawHeaders(b"accept", [])
        # Caches between client and registry must key a tag's answer by Accept.
        request.setHeader(b"Vary", b"Accept")
        return tagged.answer(choose(accept, multi_platform=bool(tagged.indexes))), tagged.pinned

    @inlineCallbacks
    def _may_build(self, request: Request, name: str, tag: str, identity: Identity) -> Any:
        """Under the ``builds`` policy, an anonymous client gets a tag's manifest only if an
        authenticated pull of the same name and tag succeeded before (a record in storage,
        so it holds across restarts and instances); otherwise 401: it may be a new build.
        Decided here, before the fan-out is asked, so that no Nix runs for it."""
        named = f"{name}:{tag}"
        if not identity.anonymous or named in self._built_names:
            return
        built = yield self._storage.get_record(_built_record(named))
        if built is None:
            assert self._gate is not None
            raise self._gate.unauthorized(
                request,
                f"repository:{name}:pull",
                None,
                f"{named} has not been built yet, and only authenticated users may build "
                "new images; log in to the registry",
            )
        self._remember_built(named)

    @inlineCallbacks
    def _note_built(self, name: str) -> Any:
        if name in self._built_names:
            return
        yield self._storage.put_record(_built_record(name), b"built")
        self._remember_built(name)

    def _remember_built(self, name: str) -> None:
        self._built_names[name] = None
        while len(self._built_names) > BLOB_INFOS_KEPT:
            self._built_names.popitem(last=False)

    @inlineCallbacks
    def _manifest_by_digest(self, digest: str) -> Any:
        unknown = ManifestUnknown(f"manifest {digest} is not known to this registry")
        if not check_digest(digest):
            raise unknown
        blob = yield self._storage.read_blob(digest)
        if blob is None or blob.info.media_type not in MANIFEST_MEDIA_TYPES:
            raise unknown
        return StoredManifest(blob.info.media_type, digest, blob.data)

    @app.route("/v2/<path:name>/blobs/<digest>", methods=["GET", "HEAD"])
    @inlineCallbacks
    def blob(self, request: Request, name: str, digest: str) -> Any:
        parse_image_name(name)
        unknown = BlobUnknown(f"blob {digest} is not known to this registry")
        if not check_digest(digest):
            raise unknown
        info = yield self._blob_info(digest)
        if info is None:
            info = yield self._rebuilt(digest)
            if info is None:
                raise unknown
        if request.method == b"HEAD":
            return render(request, blob_headers(info), b"")
        if info.size <= SMALL_BLOB_SIZE and not request.requestHeaders.hasHeader(b"range"):
            blob = yield self._storage.read_blob(digest)
            if blob is None:
                yield self._rebuilt(digest)
                blob = yield self._storage.read_blob(digest)
            if blob is None:
                raise unknown
            headers = blob_headers(blob.info)
            self._answers.remember(request, headers, blob.data, by_accept=False)
            return render(request, headers, blob.data)
        answer = self._storage.serve_blob(info)
        if isinstance(answer, Redirect):
            redirect = [
                (b"Location", answer.url.encode()),
                (b"Docker-Content-Digest", digest.encode()),
                (b"Content-Length", b"0"),
            ]
            if answer.until is not None:
                self._answers.remember(
                    request, redirect, b"", by_accept=False, code=answer.status, until=answer.until
                )
            request.setResponseCode(answer.status)
            return render(request, redirect, b"")
        # The resource reads the file itself, and the info may be from memory: a file
        # found missing (or of the wrong size) now is written again within this request,
        # where the resource could only answer 404. One stat, small beside a large blob.
        if (yield self._storage.stat_blob(digest)) is None:
            info = yield self._rebuilt(digest)
            if info is None:
                raise unknown
            answer = self._storage.serve_blob(info)

        def answered(_: object) -> None:
            if request.code == BlobUnknown.status:
                # Found missing or damaged while being served, too late for this answer:
                # written again now, for the client's retry (which waits for it).
                self._rebuilt(digest)

        request.notifyFinish().addBoth(answered)
        return answer

    def _rebuilt(self, digest: str) -> Deferred[BlobInfo | None]:
        """A lost blob written again, by building again the image last served that names
        it; its info, or None (no image served since start names it, the build failed,
        or it gave other bytes). Concurrent requests for the blob wait for one build."""
        self._blob_lost(digest)
        return self._rebuilds.run(digest, lambda: self._rebuild(digest))

    @inlineCallbacks
    def _rebuild(self, digest: str) -> Any:
        named = self._blob_images.get(digest)
        if named is None:
            return None
        name, tag = named
        self.log.warn(
            "blob {digest} is lost: building {name}:{tag}, which names it, again",
            digest=digest,
            name=name,
            tag=tag,
        )
        try:
            yield self._images.tagged(parse_image_name(name), tag)
        except RegistryError as error:
            self.log.error(
                "blob {digest} not rebuilt: {name}:{tag} failed: {message}",
                digest=digest,
                name=name,
                tag=tag,
                message=error.message,
            )
            return None
        info = yield self._blob_info(digest)
        if info is None:
            # Layers are deterministic, so this is a changed package set: the image's new
            # manifest names other blobs, and its next pull gets them.
            self.log.warn(
                "blob {digest}: {name}:{tag} was built again without it", digest=digest,
                name=name, tag=tag,
            )  # fmt: skip
        return info

    def _note_blobs(self, name: str, tag: str, tagged: TaggedImage) -> None:
        """Remember which image and tag each blob of ``tagged`` was served for, so that a
        blob found lost can be written again (see :meth:`_rebuilt`)."""
        for image in tagged.images:
            digest = image.manifests["docker"].digest
            if self._blob_images.get(digest) == (name, tag):
                continue
            for blob in [digest, *blobs_named(image.manifests.values())]:
                self._blob_images[blob] = (name, tag)
                self._blob_images.move_to_end(blob)
        while len(self._blob_images) > BLOB_INFOS_KEPT:
            self._blob_images.popitem(last=False)

    def _blob_lost(self, digest: str) -> None:
        """A blob is not in storage, or was found damaged (and taken away) while serving
        it: forget what leads clients to it, so that the next pull of an image naming
        it builds the image again, which writes the blob again.

        A client's unknown digest changes nothing (no image in memory names it, and
        finding that out is a dictionary lookup). Losing a blob is rare, so every
        remembered answer goes, not just those naming it (an index names it only
        through its manifests).
        """
        known = self._blob_infos.pop(digest, None) is not None
        if self._images.forget_blob(digest) or known:
            self._answers.clear()

    @inlineCallbacks
    def _blob_info(self, digest: str) -> Any:
        """A blob's info, from memory once seen: blobs are immutable, so it stays true
        for as long as the blob is stored, and a redirect then needs no round trip."""
        info = self._blob_infos.get(digest)
        if info is not None:
            self._blob_infos.move_to_end(digest)
            return info
        info = yield self._storage.stat_blob(digest)
        if info is not None:
            self._blob_infos[digest] = info
            while len(self._blob_infos) > BLOB_INFOS_KEPT:
                self._blob_infos.popitem(last=False)
        return info

    @app.route("/v2/<path:name>/referrers/<digest>", methods=["GET", "HEAD"])
    def referrers(self, request: Request, name: str, digest: str) -> bytes:
        """The OCI 1.1 referrers API: nixeryd's images have no signatures or attachments.

        Answering with an empty index, rather than 404, spares clients that look
        for signatures (cosign, oras, notation) their fallback to tag-schema
        lookups (``sha256-<hex>`` tags), which would each look like an image build.
        """
        parse_image_name(name)
        check_digest(digest)
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
        request.setHeader(b"Content-Type", OCI_INDEX.encode())
        request.setHeader(b"Content-Length", str(len(body)).encode())
        return body

    @app.route("/v2/<path:name>/tags/list", methods=["GET", "HEAD"])
    @inlineCallbacks
    def tags(self, request: Request, name: str) -> Any:
        parse_image_name(name)
        tags = sorted(set((yield self._source.tags())))
        last = _arg(request, b"last")
        if last is not None:
            tags = [tag for tag in tags if tag > last]
        count = _arg(request, b"n")
        if count is not None:
            if not (count.isascii() and count.isdigit()):
                raise PaginationInvalid(f"n={count!r} must be a non-negative integer")
            # More than 18 digits is more tags than any source has (and Python refuses
            # to parse over 4,300 digits).
            limit = int(count) if len(count.lstrip("0")) <= 18 else len(tags)
            if limit < len(tags):
                tags = tags[:limit]
                if tags:
                    query = urlencode({"n": limit, "last": tags[-1]})
                    request.setHeader(
                        b"Link", f'</v2/{name}/tags/list?{query}>; rel="next"'.encode()
                    )
        return _json(request, {"name": name, "tags": tags})

    @app.handle_errors(RegistryError)
    def registry_error(self, request: Request, failure: Failure) -> bytes:
        error = cast(RegistryError, failure.value)
        if error.status >= 500:
            # The registry's own trouble (storage failing): the operator's to fix, so
            # logged, once per request and without a traceback (the message names it).
            self.log.error("{path}: {message}", path=request.path, message=error.message)
        request.setResponseCode(error.status)
        for header, value in getattr(error, "headers", ()):
            request.setHeader(header, value)
        document = error.as_json()
        if not request.path.startswith(b"/v2/"):
            if _wants_json(request):
                return _json(request, document)
            return _html(request, web.render_error(error.status, document["errors"][0]))
        self._name_build_page(request, error, document["errors"][0])
        return _json(request, document)

    def _name_build_page(
        self, request: Request, raised: RegistryError, error: dict[str, Any]
    ) -> None:
        """A failed pull of a tag that was built here names the page with its log: in
        the detail for scripts, at the end of the message for people (clients show it),
        unless it failed for missing packages, which the message names alone."""
        name, found, tag = request.path.decode("utf-8")[4:].rpartition("/manifests/")
        if not found or ":" in tag:
            return
        try:
            targets = parse_image_name(name).targets(self._images.platforms)
        except RegistryError:
            return
        hub = self._builder.builds
        if not any(hub.latest(target.canonical, tag) for target in targets):
            return
        scheme = "https" if request.isSecure() else "http"
        page = f"{scheme}://{_host(request)}{web.image_path(name, tag)}"
        if not isinstance(raised, PackagesNotFound):
            error["message"] += f"\n(build log: {page})"
        detail = error.get("detail")
        if detail is None or isinstance(detail, dict):
            # A copy: the error's own detail is answered again (a remembered failure).
            error["detail"] = {**(detail or {}), "buildPage": page}

    @app.handle_errors(NotFound)
    def not_found(self, request: Request, failure: Failure) -> bytes:
        return _not_an_endpoint(request)

    @app.handle_errors(RequestRedirect)
    def redirect(self, request: Request, failure: Failure) -> bytes:
        """werkzeug's canonical-URL redirects (a missing trailing slash): a registry client
        asks for the paths the spec names, so anything else is not an endpoint."""
        return _not_an_endpoint(request)

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: Request, failure: Failure) -> bytes:
        return _pull_only(request)

    @app.handle_errors(Exception)
    def internal_error(self, request: Request, failure: Failure) -> bytes:
        self.log.failure("internal error serving {path}", failure, path=request.path)
        request.setResponseCode(500)
        return _json(
            request,
            RegistryError("internal error; the registry's log has the details").as_json(),
        )


def _json(request: Request, document: Any) -> bytes:
    body = json.dumps(document).encode()
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    return body


def _html(request: Request, page: bytes) -> bytes:
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Content-Length", str(len(page)).encode())
    return page


def _wants_json(request: Request) -> bool:
    return web.wants_json(request.args, request.getHeader(b"accept"))


def _host(request: Request) -> str:
    """The host the request came in on, for the pull commands a page shows (escaped
    there, like all request text)."""
    return (request.getHeader(b"host") or b"localhost").decode("latin-1")


def _last_event_id(request: Request) -> int:
    """Where an event stream resumes: after the line numbered by ``Last-Event-ID``
    (EventSource's reconnection) or ``?after=`` (a page holding lines up to it)."""
    given = request.getHeader(b"last-event-id") or (_arg(request, b"after") or "").encode()
    text = given.decode("latin-1").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else 0


class BuildUnknown(RegistryError):
    code = "NAME_UNKNOWN"
    status = 404


def _not_an_endpoint(request: Request) -> bytes:
    if request.method not in (b"GET", b"HEAD"):
        # A push (POST .../blobs/uploads/, PATCH, PUT ...) or a delete.
        return _pull_only(request)
    error = Unsupported(
        f"{request.path.decode('latin-1')!r} is not a registry endpoint nixeryd serves"
    )
    request.setResponseCode(404)
    return _json(request, error.as_json())


def _pull_only(request: Request) -> bytes:
    error = Unsupported(
        "nixeryd builds images on demand from Nix packages: it serves pulls only "
        f"({request.method.decode('latin-1')} is not supported)"
    )
    request.setResponseCode(405)
    return _json(request, error.as_json())


def _client(request: Request, identity: Identity | None) -> str:
    """Whose rate a request counts against: an authenticated user's, else its address's
    (the peer's: a proxy in front makes all its clients one)."""
    if identity is not None and not identity.anonymous:
        return f"user {identity.subject}"
    address = request.getClientAddress()
    return f"address {getattr(address, 'host', address)}"


def _arg(request: Request, name: bytes) -> str | None:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


def _built_record(named: str) -> str:
    """The record that says an authenticated pull of ``name:tag`` succeeded."""
    return "auth/built/" + hashlib.sha256(named.encode()).hexdigest()


#: How many blobs' infos are kept in memory (a few MB).
BLOB_INFOS_KEPT = 50_000


class _WithApiVersion(Resource):
    """Adds ``Docker-Distribution-API-Version`` and nixeryd's ``Server`` banner to every
    response, errors included, and serves remembered answers without routing."""

    isLeaf = True

    def __init__(self, wrapped: Any, answers: Answers, gate: Gate | None) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._answers = answers
        self._gate = gate

    def render(self, request: Request) -> Any:
        request.setHeader(b"Docker-Distribution-API-Version", API_VERSION)
        request.setHeader(b"Server", SERVER)
        try:
            # What klein decodes to route by (and the policy reads names from); klein
            # answers a path that is not UTF-8 with an HTML page and logs a traceback.
            b"/".join(request.postpath or []).decode("utf-8")
        except UnicodeDecodeError:
            request.setResponseCode(400)
            error = NameInvalid("the request path, once percent-decoded, is not UTF-8")
            return _json(request, error.as_json())
        if self._gate is not None:
            # Before memory: no remembered answer bypasses the policy.
            return gated(self._gate, request, self._answer)
        return self._answer(request)

    def _answer(self, request: Request) -> Any:
        answer = self._answers.answer(request)
        if answer is not None:
            return answer
        return self._wrapped.render(request)
