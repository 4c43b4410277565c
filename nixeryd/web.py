"""The web pages: what the registry's routes (:mod:`nixeryd.registry`) show people.

Every page is a document (a dict) first, built from the build hub
(:mod:`nixeryd.builds`) and what the request says; the same document is
served as JSON to scripts (``?format=json``, or ``Accept: application/json``
without ``text/html``) and rendered here as HTML for browsers. The HTML is
server-rendered and complete without JavaScript; a few lines of inline
script stream a running build's log (Server-Sent Events, resumed from the
last line the page holds) and start a build from the image page. Nothing is
loaded from elsewhere (air-gapped sites): no CDN, no web fonts.

Every text that comes from a request or from Nix (the Host header, image
names, log lines) goes through :func:`html.escape` here, and no such text
reaches the inline script: it reads what it needs from ``data-`` attributes.
``docs/web.md`` describes the pages.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from nixeryd.builder import BuildError
from nixeryd.builds import Build, BuildHub
from nixeryd.config import Config
from nixeryd.imagename import SHELL_PACKAGES
from nixeryd.platform import Platform

#: The docker manifest media types a page's "Build" button asks for (any will do).
_PULL_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json,"
    "application/vnd.oci.image.index.v1+json,"
    "application/vnd.docker.distribution.manifest.list.v2+json"
)


def describe_source(config: Config) -> str:
    """The configured package set, as the index page names it (a git URL's
    credentials left out)."""
    where = config.pkgs_path or config.pkgs_repo or config.channel or ""
    parts = urlsplit(where)
    if parts.password is not None or parts.username is not None:
        where = urlunsplit(parts._replace(netloc=parts.hostname or ""))
    return f"{config.package_source}: {where}" if where else config.package_source


def wants_json(args: Mapping[bytes, Sequence[bytes]], accept: bytes | None) -> bool:
    """Whether a page request asks for the page's JSON document."""
    if args.get(b"format", [b""])[0] == b"json":
        return True
    types = (accept or b"").lower()
    return b"application/json" in types and b"text/html" not in types


def image_name_of(canonical: str) -> str:
    """A name to pull a canonical image by (``linux/arm64:bashInteractive/...`` ->
    ``arm64/shell/...``): the shell's packages become ``shell``, attribute names are
    lower-cased (the package set resolves them), arm64 gets its prefix."""
    platform, _, joined = canonical.partition(":")
    packages = joined.split("/")
    prefix = []
    if platform == "linux/arm64":
        prefix.append("arm64")
    if set(SHELL_PACKAGES) <= set(packages):
        prefix.append("shell")
        packages = [package for package in packages if package not in SHELL_PACKAGES]
    return "/".join([*prefix, *(package.lower() for package in packages)])


def pull_commands(host: str, reference: str, secure: bool) -> dict[str, str]:
    """How each client pulls ``reference`` from ``host``."""
    image = f"{host}/{reference}"
    insecure = not secure
    return {
        "docker": f"docker pull {image}",
        "podman": f"podman pull{' --tls-verify=false' if insecure else ''} {image}",
        "skopeo": (
            f"skopeo copy{' --src-tls-verify=false' if insecure else ''} "
            f"docker://{image} oci:image:latest"
        ),
        "ctr": f"ctr images pull{' --plain-http' if insecure else ''} {image}",
    }


def build_summary(build: Build) -> dict[str, Any]:
    """A build as lists show it, with the page it is on."""
    document = build.as_json()
    del document["layers"]
    name = image_name_of(build.image)
    document["name"] = name
    document["page"] = image_path(name, build.tag)
    document["buildPage"] = f"/builds/{build.id}"
    return document


def image_path(name: str, tag: str) -> str:
    return f"/images/{quote(name)}:{quote(tag)}"


def index_document(
    hub: BuildHub,
    host: str,
    secure: bool,
    source: str,
    platforms: Sequence[Platform],
    errors: Iterable[BuildError],
) -> dict[str, Any]:
    return {
        "about": "nixeryd builds container images on demand from Nix packages: the image "
        "name is the list of packages it holds",
        "host": host,
        "pull": pull_commands(host, "shell/hello", secure),
        "source": source,
        "platforms": [platform.name for platform in platforms],
        "builds": [build_summary(build) for build in hub.recent()],
        "errors": [
            {
                "number": error.number,
                "when": error.when,
                "image": error.image,
                "tag": error.tag,
                "message": error.message,
                "log": f"/errors/{error.number}/log" if error.log is not None else None,
            }
            for error in reversed(list(errors))
        ],
    }


def image_document(
    hub: BuildHub,
    name: str,
    tag: str,
    canonicals: Sequence[str],
    host: str,
    secure: bool,
) -> dict[str, Any]:
    """An image name and tag on each of its platforms: the latest build of each, with
    its layers and the other images that share them, and every build kept."""
    platforms = []
    for canonical in canonicals:
        latest = hub.latest(canonical, tag)
        entry: dict[str, Any] = {
            "image": canonical,
            "platform": canonical.partition(":")[0],
            "build": None,
        }
        if latest is not None:
            entry["build"] = build_summary(latest)
            entry["manifest"] = latest.manifest
            entry["layers"] = [
                {
                    "digest": layer.digest,
                    "size": layer.size,
                    "paths": layer.paths,
                    "sharedWith": [
                        {"name": image_name_of(other), "tag": other_tag}
                        for other, other_tag in hub.sharing(layer.digest, canonicals)
                    ],
                }
                for layer in latest.layers
            ]
        platforms.append(entry)
    return {
        "name": name,
        "tag": tag,
        "pull": pull_commands(host, f"{name}:{tag}", secure),
        "platforms": platforms,
        "history": [build_summary(build) for build in hub.of(canonicals, tag)],
    }


def build_document(build: Build) -> dict[str, Any]:
    document = build.as_json(log=True)
    document["name"] = image_name_of(build.image)
    document["page"] = image_path(document["name"], build.tag)
    return document


def search_document(
    query: str, tag: str, results: Sequence[Mapping[str, Any]], host: str, secure: bool
) -> dict[str, Any]:
    return {
        "query": query,
        "tag": tag,
        "results": [
            {
                **result,
                "page": None if result["image"] is None else image_path(result["image"], tag),
                "pull": None
                if result["image"] is None
                else pull_commands(host, f"{result['image']}:{tag}", secure)["docker"],
            }
            for result in results
        ],
    }


def event_stream_entry(event: str, data: Any, number: int | None = None) -> bytes:
    """One Server-Sent Event: ``data`` as one line of JSON (so no line breaks to split)."""
    head = f"id: {number}\n" if number is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n".encode()


# HTML rendering.

_e = html.escape


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    if size < 1024:
        return f"{size} B"
    scaled = size / 1024
    for unit in ("KiB", "MiB"):
        if scaled < 1024:
            return f"{scaled:.1f} {unit}"
        scaled /= 1024
    return f"{scaled:.1f} GiB"


def _seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def _when(started: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))


def _page(title: str, body: str, *, script: str = "") -> bytes:
    return _LAYOUT.format(title=_e(title), body=body, script=script).encode()


def _pull_list(commands: Mapping[str, str]) -> str:
    return (
        "<dl class=pull>"
        + "".join(
            f"<dt>{_e(client)}</dt><dd><code>{_e(command)}</code></dd>"
            for client, command in commands.items()
        )
        + "</dl>"
    )


def _builds_table(builds: Iterable[Mapping[str, Any]], caption: str) -> str:
    rows = "".join(
        f'<tr><td><a href="{_e(b["page"])}">{_e(b["name"])}:{_e(b["tag"])}</a></td>'
        f"<td>{_e(b['platform'])}</td>"
        f'<td><span class="status {_e(b["status"])}">{_e(b["status"])}</span></td>'
        f"<td>{_e(_seconds(b['seconds']))}</td><td>{_e(_size(b['size']))}</td>"
        f'<td><a href="{_e(b["buildPage"])}">#{b["id"]}</a> {_e(_when(b["started"]))}</td></tr>'
        for b in builds
    )
    if not rows:
        return f"<p>{_e(caption)}: none since the daemon started.</p>"
    return (
        f'<div class=scroll tabindex=0 role=region aria-label="{_e(caption)}">'
        f"<table><caption>{_e(caption)}</caption><thead><tr>"
        "<th scope=col>Image</th><th scope=col>Platform</th><th scope=col>Status</th>"
        "<th scope=col>Duration</th><th scope=col>Size</th><th scope=col>Build</th>"
        f"</tr></thead><tbody>{rows}</tbody></table></div>"
    )


def render_index(document: Mapping[str, Any]) -> bytes:
    platforms = ", ".join(_e(platform) for platform in document["platforms"])
    body = f"""<h1>nixeryd</h1>
<p>A container registry that builds images on demand with Nix. The image name is the list
of packages it holds: <code>shell/hello</code> is <code>hello</code> with an interactive
shell and core utilities.</p>
<section aria-labelledby=pull><h2 id=pull>Pull an image</h2>
{_pull_list(document["pull"])}
<p><code>shell</code> at the front adds an interactive shell and core utilities;
<code>arm64</code> at the front builds for linux/arm64 alone. Nested package attributes are
written with dots (<code>tools.greeter</code>).</p></section>
<section aria-labelledby=find><h2 id=find>Search packages</h2>
{_search_form("")}</section>
<section aria-labelledby=open><h2 id=open>Open an image</h2>
<form action=/images method=get class=open><label for=name>Image name</label>
<input id=name name=name required placeholder="shell/hello" autocapitalize=none
 spellcheck=false><button type=submit>Open</button></form></section>
<section aria-labelledby=config><h2 id=config>This registry</h2>
<dl><dt>Package source</dt><dd><code>{_e(document["source"])}</code></dd>
<dt>Platforms</dt><dd>{platforms}</dd></dl></section>
<section aria-labelledby=recent><h2 id=recent>Recent builds</h2>
{_builds_table(document["builds"], "Recent builds")}</section>
<section aria-labelledby=errors><h2 id=errors>Recent build errors</h2>
<ul>{_errors_list(document["errors"])}</ul></section>"""
    return _page("nixeryd", body)


def _errors_list(errors: Iterable[Mapping[str, Any]]) -> str:
    return (
        "".join(
            f"<li><code>{_e(error['image'])}:{_e(error['tag'])}</code> {_e(_when(error['when']))}"
            + (f' (<a href="{_e(error["log"])}">full log</a>)' if error["log"] else "")
            + f"<pre>{_e(error['message'])}</pre></li>"
            for error in errors
        )
        or "<li>none</li>"
    )


def _log_section(build: Mapping[str, Any]) -> str:
    """A build's cause (when it failed) first, then its log, live while it runs."""
    cause = ""
    if build["error"] is not None:
        cause = (
            f"<div class=cause role=alert><h3>Why it failed</h3>"
            f"<p><code>{_e(build['error']['code'])}</code></p>"
            f"<pre>{_e(build['error']['message'])}</pre></div>"
        )
    lines = "".join(
        f'<li value="{line["n"]}" data-n="{line["n"]}"><span class=step>{_e(line["step"])}</span> '
        f"{_e(line['text'])}</li>"
        for line in build["log"]
    )
    dropped = (
        f"<p>{build['linesDropped']} earlier lines were not kept.</p>"
        if build["linesDropped"]
        else ""
    )
    live = ' data-live="1"' if build["status"] == "building" else ""
    return (
        f'<section class=build aria-labelledby="build-{build["id"]}">'
        f'<h2 id="build-{build["id"]}">Build #{build["id"]}: {_e(build["platform"])} '
        f'<span class="status {_e(build["status"])}" data-status>{_e(build["status"])}</span></h2>'
        f"<p>Started {_e(_when(build['started']))}; "
        f"{_e(_seconds(build['seconds']))}; {build['lines']} log lines.</p>{cause}{dropped}"
        f'<h3 id="log-{build["id"]}">Log</h3><ol class=log data-build="{build["id"]}"{live} '
        f'aria-live=polite tabindex=0 aria-labelledby="log-{build["id"]}">'
        f"{lines}</ol></section>"
    )


def render_image(document: Mapping[str, Any], builds: Mapping[int, Mapping[str, Any]]) -> bytes:
    """The image page; ``builds`` are the full documents (with logs) of each platform's
    latest build."""
    name, tag = document["name"], document["tag"]
    sections = []
    for entry in document["platforms"]:
        build = entry["build"]
        if build is None:
            sections.append(
                f'<section aria-label="{_e(entry["platform"])}"><h2>{_e(entry["platform"])}'
                "</h2><p>Not built since the daemon started.</p></section>"
            )
            continue
        layers = "".join(
            f"<tr><td><code>{_e(layer['digest'][:19])}…</code></td>"
            f"<td>{_e(_size(layer['size']))}</td><td>"
            + (
                "<br>".join(f"<code>{_e(path)}</code>" for path in layer["paths"])
                if layer["paths"]
                else ("symlink forest" if layer["paths"] is not None else "not known")
            )
            + "</td><td>"
            + (
                ", ".join(
                    f'<a href="{_e(image_path(other["name"], other["tag"]))}">'
                    f"{_e(other['name'])}:{_e(other['tag'])}</a>"
                    for other in layer["sharedWith"]
                )
                or "-"
            )
            + "</td></tr>"
            for layer in entry["layers"]
        )
        table = (
            "<div class=scroll tabindex=0 role=region aria-label=Layers>"
            "<table><caption>Layers</caption><thead><tr>"
            "<th scope=col>Digest</th><th scope=col>Size</th><th scope=col>Store paths</th>"
            f"<th scope=col>Shared with</th></tr></thead><tbody>{layers}</tbody></table></div>"
            if layers
            else ""
        )
        manifest = (
            f"<p>Manifest <code>{_e(entry['manifest'])}</code>, {_e(_size(build['size']))}</p>"
            if entry["manifest"]
            else ""
        )
        sections.append(
            f'<section aria-label="{_e(entry["platform"])}"><h2>{_e(entry["platform"])}</h2>'
            f"{manifest}{table}</section>{_log_section(builds[build['id']])}"
        )
    build_button = (
        f'<p><button type=button id=start data-pull="/v2/{_e(name)}/manifests/{_e(tag)}" '
        f'data-accept="{_PULL_ACCEPT}">Build {_e(name)}:{_e(tag)} now</button> '
        "<span id=started role=status></span></p>"
    )
    body = (
        f"<h1>{_e(name)}:{_e(tag)}</h1><section aria-labelledby=pull><h2 id=pull>Pull it</h2>"
        f"{_pull_list(document['pull'])}{build_button}</section>{''.join(sections)}"
        f"<section aria-labelledby=history><h2 id=history>Build history</h2>"
        f"{_builds_table(document['history'], 'Builds of this image')}</section>"
    )
    return _page(f"{name}:{tag} · nixeryd", body, script=_SCRIPT)


def render_build(document: Mapping[str, Any]) -> bytes:
    body = (
        f'<h1>Build #{document["id"]} of <a href="{_e(document["page"])}">'
        f"{_e(document['name'])}:{_e(document['tag'])}</a></h1>{_log_section(document)}"
    )
    return _page(f"build #{document['id']} · nixeryd", body, script=_SCRIPT)


def _search_form(query: str) -> str:
    return (
        "<form action=/search method=get class=open role=search><label for=q>Package</label>"
        f'<input id=q name=q required value="{_e(query)}" placeholder=hello autocapitalize=none '
        "spellcheck=false><button type=submit>Search</button></form>"
    )


def render_search(document: Mapping[str, Any]) -> bytes:
    query = document["query"]
    rows = "".join(
        "<tr><td>"
        + (
            f'<a href="{_e(result["page"])}">{_e(result["attrPath"])}</a>'
            if result["page"]
            else f"{_e(result['attrPath'])} (a set of packages: pull one inside it, "
            f"such as <code>{_e(result['attrPath'].lower())}.name</code>)"
        )
        + f"</td><td>{_e(result['description'] or '')}</td>"
        + f"<td>{'<code>' + _e(result['pull']) + '</code>' if result['pull'] else ''}</td></tr>"
        for result in document["results"]
    )
    if rows:
        found = (
            f'<div class=scroll tabindex=0 role=region aria-label="Packages found">'
            f"<table><caption>Packages whose names contain {_e(query)}</caption><thead><tr>"
            "<th scope=col>Attribute</th><th scope=col>Description</th>"
            f"<th scope=col>Pull</th></tr></thead><tbody>{rows}</tbody></table></div>"
        )
    elif query:
        found = f"<p>No package name contains <code>{_e(query)}</code>.</p>"
    else:
        found = ""
    body = (
        f"<h1>Search packages</h1>{_search_form(query)}"
        "<p>Top-level attribute names of the package set; at most 50 are shown.</p>"
        f"{found}"
    )
    return _page(f"{query or 'search'} · nixeryd", body)


def render_error(status: int, error: Mapping[str, Any]) -> bytes:
    body = (
        f"<h1>{status}: {_e(error['code'])}</h1><div class=cause role=alert>"
        f'<pre>{_e(error["message"])}</pre></div><p><a href="/">The index page</a></p>'
    )
    return _page(f"{status} · nixeryd", body)


_LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
:root{{--fg:#1a1a1a;--bg:#fff;--muted:#4a4a4a;--code:#f2f2f2;--link:#0645ad;--bad:#a40000;
--good:#1b5e20;--run:#6b4e00}}
@media (prefers-color-scheme:dark){{:root{{--fg:#eee;--bg:#121212;--muted:#c8c8c8;
--code:#262626;--link:#9ecbff;--bad:#ff9a9a;--good:#9be59f;--run:#ffd866}}}}
*{{box-sizing:border-box}}
body{{font-family:system-ui,sans-serif;color:var(--fg);background:var(--bg);margin:0;
line-height:1.5}}
header,main,footer{{max-width:60rem;margin:0 auto;padding:0 1rem}}
header{{border-bottom:1px solid var(--muted)}}header a{{font-weight:bold}}
a{{color:var(--link)}}code,pre{{background:var(--code);font-size:.9em;
overflow-wrap:anywhere}}pre{{padding:.5em;white-space:pre-wrap}}
dl.pull dt{{font-weight:bold}}dl.pull dd{{margin:0 0 .5em 0}}
.scroll{{overflow-x:auto}}table{{border-collapse:collapse;width:100%}}
caption{{text-align:left;font-weight:bold}}
th,td{{text-align:left;padding:.25em .5em;border-bottom:1px solid var(--muted);
vertical-align:top}}
.status{{font-weight:bold}}.failed{{color:var(--bad)}}.built,.cached{{color:var(--good)}}
.building{{color:var(--run)}}
.cause{{border-left:.3em solid var(--bad);padding-left:.75em}}
ol.log{{font-family:ui-monospace,monospace;font-size:.85em;background:var(--code);
padding:.5em .5em .5em 4em;overflow-wrap:anywhere;max-height:70vh;overflow-y:auto}}
.step{{color:var(--muted)}}ol.log li.new{{border-left:.2em solid var(--run);
padding-left:.3em}}
form.open{{display:flex;flex-wrap:wrap;gap:.5em;align-items:center}}
input,button{{font:inherit;padding:.3em .6em}}
</style></head><body>
<header><nav aria-label="site"><p><a href="/">nixeryd</a></p></nav></header>
<main>{body}</main>
<footer><p>Every page is also JSON: add <code>?format=json</code>.</p></footer>
{script}</body></html>
"""

# Streams each live log: the page holds lines up to its last, the stream sends the rest
# (each with its number as the event id, so EventSource's own reconnection resumes too),
# then a result, on which the page is loaded again to show the finished build. Lines that
# arrive while the page is open are marked as new.
_SCRIPT = """<script>
for (const log of document.querySelectorAll("ol.log[data-live]")) {
  const items = log.querySelectorAll("li");
  const last = items.length ? items[items.length - 1].dataset.n : "0";
  const events = new EventSource(`/builds/${log.dataset.build}/events?after=${last}`);
  events.addEventListener("line", (event) => {
    const line = JSON.parse(event.data);
    const shown = log.lastElementChild;
    if (shown && Number(shown.dataset.n) >= line.n) return;
    const item = document.createElement("li");
    item.value = line.n; item.dataset.n = line.n; item.className = "new";
    const step = document.createElement("span");
    step.className = "step"; step.textContent = line.step;
    item.append(step, " " + line.text);
    log.append(item);
    log.scrollTop = log.scrollHeight;
  });
  events.addEventListener("result", () => { events.close(); location.reload(); });
}
const start = document.getElementById("start");
if (start) start.addEventListener("click", () => {
  document.getElementById("started").textContent = "Building…";
  fetch(start.dataset.pull, {headers: {Accept: start.dataset.accept}})
    .finally(() => location.reload());
  const poll = setInterval(async () => {
    const answer = await fetch(location.pathname + "?format=json");
    const page = await answer.json();
    if (page.platforms.some((p) => p.build && p.build.status === "building")) {
      clearInterval(poll); location.reload();
    }
  }, 500);
});
</script>"""
