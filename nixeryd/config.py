"""Configuration: one declared schema, layered command line > environment > file.

Every option is declared once in :data:`OPTIONS` with its command-line flag,
the environment variables that set it (Nixery's names first, so nixeryd is a
drop-in replacement) and its TOML key. :func:`load_config` layers the sources
and names the key and the source in every error.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from nixeryd.compression import COMPRESSORS, Compression, default_compressor
from nixeryd.gcroots import default_gc_roots
from nixeryd.layering import DEFAULT_LAYER_BUDGET
from nixeryd.platform import Platform, host_platform, parse_platforms
from nixeryd.ratelimit import Rate, parse_rate

log = Logger()


class ConfigError(Exception):
    """A configuration value is missing, malformed or contradicts another."""


@dataclass(frozen=True)
class Config:
    """The daemon's configuration, validated."""

    listen: tuple[str, ...] = ("tcp:8080",)
    pkgs_path: str | None = None
    pkgs_repo: str | None = None
    channel: str | None = None
    channel_url: str | None = None
    #: Answer any tag of a path or channel source with its one image, as Nixery did.
    accept_any_tag: bool = False
    package_source: str = "path"
    storage_backend: str = "filesystem"
    storage_path: str = "nixeryd-storage"
    #: Seconds a Nix builder may run, and may be silent (Nix's --timeout, --max-silent-time).
    nix_timeout: float = 60.0
    #: Seconds a whole image may take: evaluation, builds, closure query and layers.
    build_timeout: float = 3600.0
    failure_ttl: float = 60.0
    #: Nix commands (evaluations, realisations, closure queries) run at once; 0: one per core.
    nix_jobs: int = 0
    #: Nix commands that may wait for one of those; past it a new image is answered 429.
    nix_queue: int = 64
    #: Requests each client may make for image names not yet served (see
    #: :mod:`nixeryd.ratelimit`); None: no limit.
    build_rate: Rate | None = None
    #: MiB of store paths (NAR bytes) one image's closure may have; 0: no limit.
    max_closure_size: int = 0
    #: MiB of store paths (NAR bytes) one layer may hold; 0: no limit.
    max_layer_size: int = 0
    #: Long-running evaluators (one per package set and system); 0: a nix-instantiate per image.
    evaluators: int = 4
    #: Resident MiB past which an evaluator is restarted after its answer.
    evaluator_memory: int = 2048
    #: Seconds an evaluator waits for a request before it stops.
    evaluator_idle: float = 600.0
    #: Seconds an evaluator of an unpinned source (a local path) is reused; 0: never.
    evaluator_unpinned_ttl: float = 60.0
    #: Seconds a git source's ``git ls-remote`` listing is reused (0: never).
    git_refs_ttl: float = 30.0
    popularity_url: str | None = None
    layering_strategy: str = "prefix"
    layer_budget: int = DEFAULT_LAYER_BUDGET
    #: Platforms every image is built for (an index lists them); the first is the default.
    platforms: tuple[Platform, ...] = field(default_factory=lambda: (host_platform(),))
    nix_bin_dir: str | None = None
    #: Where each daemon keeps its builds' Nix GC roots; None: :meth:`gc_roots_dir`'s default.
    gc_roots: str | None = None
    #: Seconds between the daemon's garbage collection runs (:mod:`nixeryd.gc`); 0: none.
    gc_interval: float = 0.0
    #: Seconds after which an image record not used goes, unless kept; None: never by age.
    gc_max_age: float | None = None
    #: Seconds within which nothing goes, and for which a blob must be unreferenced to go.
    gc_grace: float = 3600.0
    #: A file of images kept whatever their age (``nixeryd gc --keep``), read at each run.
    gc_keep: str | None = None
    log_format: str = "text"
    log_level: str = "info"
    #: Log a line per request (:mod:`nixeryd.accesslog`), in ``log_format``.
    access_log: bool = True
    #: Serve Prometheus metrics at /metrics (:mod:`nixeryd.metrics`).
    metrics: bool = True
    #: Endpoints serving /metrics alone, without authentication; empty: /metrics is on
    #: the registry's own listeners, behind its authentication policy.
    metrics_listen: tuple[str, ...] = ()
    layer_compressor: str = field(default_factory=default_compressor)
    #: None: the compressor's default level.
    layer_compression_level: int | None = None
    #: Layers written at once; 0: one per core.
    layer_workers: int = 0
    #: nixpkgs configuration, passed to the package set only when set (see
    #: :meth:`nixpkgs_config`); unset, nixpkgs reads its own as Nixery lets it.
    nixpkgs_config_file: str | None = None
    allow_unfree: bool | None = None
    allow_broken: bool | None = None
    allow_insecure: bool | None = None
    permitted_insecure_packages: tuple[str, ...] = ()
    #: Nix files of overlays applied to the package set, absolute paths.
    nixpkgs_overlays: tuple[str, ...] = ()
    #: The authentication provider (:mod:`nixeryd.auth`); None: no authentication.
    auth: str | None = None
    #: What needs credentials when ``auth`` is set: ``everything``, or ``builds``.
    auth_policy: str = "everything"
    #: ``[plugin.<name>]`` tables of the config file: providers' own settings
    #: (:mod:`nixeryd.settings`).
    plugin_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: The environment the configuration was read from, where providers' settings are read.
    environment: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: Where each option set was set (``--flag``, ``$VARIABLE``, ``file: key``); an option
    #: left at its default is absent. ``nixeryd build`` uses storage only if it is configured.
    origins: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def compression(self) -> Compression:
        """The layer compressor at the configured level (checked by :func:`load_config`)."""
        default = COMPRESSORS[self.layer_compressor].default
        level = default if self.layer_compression_level is None else self.layer_compression_level
        return Compression(self.layer_compressor, level)

    @property
    def gc_roots_dir(self) -> Path:
        """The directory of Nix GC roots (:mod:`nixeryd.gcroots`): ``gc_roots``, else
        ``$STATE_DIRECTORY/gcroots`` under systemd, else ``<tmp>/nixeryd-gcroots``."""
        if self.gc_roots:
            return Path(self.gc_roots)
        return default_gc_roots(self.environment)

    @property
    def nixpkgs_config(self) -> dict[str, Any] | None:
        """The nixpkgs ``config`` nixeryd's options set, in the form ``nix/nixeryd.nix``
        reads; None when no option is set, so that nixpkgs' own configuration applies."""
        configured: dict[str, Any] = {}
        if self.nixpkgs_config_file:
            configured["configFile"] = self.nixpkgs_config_file
        for key, value in (
            ("allowUnfree", self.allow_unfree),
            ("allowBroken", self.allow_broken),
            ("allowInsecure", self.allow_insecure),
        ):
            if value is not None:
                configured[key] = value
        if self.permitted_insecure_packages:
            configured["permittedInsecurePackages"] = list(self.permitted_insecure_packages)
        return configured or None


@dataclass(frozen=True)
class Option:
    """One declared configuration option."""

    name: str
    help: str
    env: tuple[str, ...] = ()
    parse: Callable[[str], Any] = str


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


#: Go's units and ``d`` for days, for ages (garbage collection's) that run to weeks.
_AGE_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_AGE_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")


def parse_age(text: str) -> float:
    """Seconds of an age such as ``0``, ``90s``, ``36h``, ``7d`` or ``1h30m`` (Go's units,
    and ``d`` for days); ValueError saying what is expected otherwise."""
    seconds = seconds_in(text, _AGE_PART, _AGE_UNITS)
    if seconds is None:
        raise ValueError(f"{text.strip()!r} is not a duration such as 0, 90s, 36h or 7d")
    if seconds < 0:
        raise ValueError(f"{text.strip()!r}: a duration cannot be negative")
    return seconds


def seconds_in(text: str, part: re.Pattern[str], units: Mapping[str, float]) -> float | None:
    """Seconds of a bare number or of a sequence of ``<number><unit>`` (``1h30m``), by
    ``units``; None if ``text`` is neither. Durations and ages alike are written so."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        parts = part.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            return None
        return sum(float(number) * units[unit] for number, unit in parts)


def _budget(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 125:
        raise ValueError("must be between 1 and 125 (Docker's layer limit)")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def parse_boolean(text: str) -> bool:
    """``true``/``false`` and their usual spellings (1/0, yes/no, on/off)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _nix_file(text: str) -> str:
    path = Path(text).expanduser().resolve()
    if not path.is_file():
        raise ValueError("no such Nix file")
    return str(path)


def _nix_files(text: str) -> tuple[str, ...]:
    return tuple(_nix_file(part) for part in _names(text))


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse


OPTIONS: tuple[Option, ...] = (
    Option("pkgs_path", "package set: a local directory or .nix file", ("NIXERY_PKGS_PATH",)),
    Option("pkgs_repo", "package set: a git repository URL", ("NIXERY_PKGS_REPO",)),
    Option("channel", "package set: a nixpkgs channel name or commit", ("NIXERY_CHANNEL",)),
    Option(
        "channel_url",
        "URL template for channel tarballs, with {channel} (a local mirror for air-gapped sites)",
        ("NIXERYD_CHANNEL_URL",),
    ),
    Option(
        "accept_any_tag",
        "answer any tag of a path or channel source with its one image, as Nixery did",
        ("NIXERYD_ACCEPT_ANY_TAG",),
        parse_boolean,
    ),
    Option(
        "package_source",
        "name of the package source plugin (default: from which package set option is set)",
        ("NIXERYD_PACKAGE_SOURCE",),
    ),
    Option("storage_backend", "name of the storage plugin", ("NIXERY_STORAGE_BACKEND",)),
    Option("storage_path", "directory of the filesystem storage", ("STORAGE_PATH",)),
    Option(
        "nix_timeout",
        "seconds each Nix builder may run, and may print nothing, before Nix stops it "
        "(nix-store --timeout and --max-silent-time)",
        ("NIX_TIMEOUT",),
        _positive_float,
    ),
    Option(
        "build_timeout",
        "seconds one image may take in all (evaluation, builds, closure query, layers) "
        "before nixeryd stops its Nix and answers an error",
        ("NIXERYD_BUILD_TIMEOUT",),
        _positive_float,
    ),
    Option(
        "failure_ttl",
        "seconds a failed image of a moving source (a path, a branch) is answered again "
        "without running Nix; a pinned source's failure is kept for good (0: never)",
        ("NIXERYD_FAILURE_TTL",),
        _non_negative_float,
    ),
    Option(
        "nix_jobs",
        "Nix commands (evaluations, realisations, closure queries) run at once; the others "
        "wait in a queue (0: one per core this process may use)",
        ("NIXERYD_NIX_JOBS",),
        _non_negative_int,
    ),
    Option(
        "nix_queue",
        "Nix commands that may wait for a free one; past that, a new image is answered "
        "429 TOOMANYREQUESTS with Retry-After (0: refuse whenever all run)",
        ("NIXERYD_NIX_QUEUE",),
        _non_negative_int,
    ),
    Option(
        "build_rate",
        "requests each client (an authenticated user, else its address) may make for image "
        "names the registry has not served, as N/second, N/minute or N/hour with an "
        "optional ', burst B'; past it 429 TOOMANYREQUESTS with Retry-After (0: no limit)",
        ("NIXERYD_BUILD_RATE",),
        parse_rate,
    ),
    Option(
        "max_closure_size",
        "MiB of store paths (NAR bytes) an image's closure may have; a larger image is "
        "refused with an error naming the limit, before any layer is written (0: no limit)",
        ("NIXERYD_MAX_CLOSURE_SIZE",),
        _non_negative_int,
    ),
    Option(
        "max_layer_size",
        "MiB of store paths (NAR bytes) one layer may hold; an image needing a larger "
        "layer is refused with an error naming the limit (0: no limit)",
        ("NIXERYD_MAX_LAYER_SIZE",),
        _non_negative_int,
    ),
    Option(
        "evaluators",
        "long-running Nix evaluators kept, one per package set pin and system, so that an "
        "image does not import the package set again (0: a nix-instantiate per image)",
        ("NIXERYD_EVALUATORS",),
        _non_negative_int,
    ),
    Option(
        "evaluator_memory",
        "resident MiB past which an evaluator is restarted once it has answered",
        ("NIXERYD_EVALUATOR_MEMORY",),
        _positive_int,
    ),
    Option(
        "evaluator_idle",
        "seconds an evaluator waits for another image before it stops",
        ("NIXERYD_EVALUATOR_IDLE",),
        _positive_float,
    ),
    Option(
        "evaluator_unpinned_ttl",
        "seconds an evaluator of a source without a pin (a local path, whose files may "
        "change) is reused before a new one reads the files again (0: never reused)",
        ("NIXERYD_EVALUATOR_UNPINNED_TTL",),
        _non_negative_float,
    ),
    Option(
        "git_refs_ttl",
        "seconds a git source's ref listing (git ls-remote) is reused for tags/list and "
        "pulls by branch or tag; a push shows after at most this long (0: list every time)",
        ("NIXERYD_GIT_REFS_TTL",),
        _non_negative_float,
    ),
    Option(
        "popularity_url",
        "popularity data: http(s)://, file:// or a path",
        ("NIX_POPULARITY_URL",),
    ),
    Option("layering_strategy", "name of the layering plugin", ("NIXERYD_LAYERING_STRATEGY",)),
    Option("layer_budget", "most layers per image", ("NIXERYD_LAYER_BUDGET",), _budget),
    Option(
        "platforms",
        "comma-separated platforms to build each image for, such as linux/amd64,linux/arm64; "
        "the first is served to clients that take no index (default: this machine's)",
        ("NIXERYD_PLATFORMS",),
        parse_platforms,
    ),
    Option(
        "nix_bin_dir",
        "directory holding nix-instantiate, nix-store and nix (default: from PATH)",
        ("NIXERYD_NIX_BIN_DIR",),
    ),
    Option(
        "gc_roots",
        "directory where each daemon keeps the Nix GC roots of its builds in progress; a "
        "stopped daemon's are removed at start and by nixeryd gc (default: "
        "$STATE_DIRECTORY/gcroots under systemd, else <tmp>/nixeryd-gcroots)",
        ("NIXERYD_GC_ROOTS",),
    ),
    Option(
        "gc_interval",
        "run garbage collection of storage in the daemon this often (0, 6h, 1d; see "
        "docs/gc.md), with the gc_* options below; run it in one daemon per storage "
        "(default: 0, never: run nixeryd gc from a timer instead)",
        ("NIXERYD_GC_INTERVAL",),
        parse_age,
    ),
    Option(
        "gc_max_age",
        "garbage collection (nixeryd gc --max-age and gc_interval): image records not "
        "written or used for this long go, unless kept (default: never by age)",
        ("NIXERYD_GC_MAX_AGE",),
        parse_age,
    ),
    Option(
        "gc_grace",
        "garbage collection (nixeryd gc --grace and gc_interval): nothing younger than this "
        "goes, and a blob goes only once unreferenced this long; longer than a build may "
        "take (default: 1h)",
        ("NIXERYD_GC_GRACE",),
        parse_age,
    ),
    Option(
        "gc_keep",
        "garbage collection (nixeryd gc --keep and gc_interval): a file of images kept "
        "whatever their age, one NAME[:TAG] a line, as pulled",
        ("NIXERYD_GC_KEEP",),
    ),
    Option(
        "nixpkgs_config_file",
        "a Nix file of nixpkgs configuration (config.nix), passed to the package set; the "
        "allow_* options below are laid over it (default: nixpkgs reads its own)",
        ("NIXERYD_NIXPKGS_CONFIG",),
        _nix_file,
    ),
    Option(
        "allow_unfree",
        "nixpkgs config allowUnfree: build packages with unfree licences",
        ("NIXERYD_ALLOW_UNFREE",),
        parse_boolean,
    ),
    Option(
        "allow_broken",
        "nixpkgs config allowBroken: build packages marked broken",
        ("NIXERYD_ALLOW_BROKEN",),
        parse_boolean,
    ),
    Option(
        "allow_insecure",
        "allow every package nixpkgs marks insecure (as NIXPKGS_ALLOW_INSECURE=1)",
        ("NIXERYD_ALLOW_INSECURE",),
        parse_boolean,
    ),
    Option(
        "permitted_insecure_packages",
        "comma-separated name-version of insecure packages to allow, such as openssl-1.1.1w "
        "(nixpkgs config permittedInsecurePackages)",
        ("NIXERYD_PERMITTED_INSECURE_PACKAGES",),
        _names,
    ),
    Option(
        "nixpkgs_overlays",
        "comma-separated Nix files of overlays (each an overlay or a list of them) applied to "
        "the package set (default: nixpkgs reads its own)",
        ("NIXERYD_NIXPKGS_OVERLAYS",),
        _nix_files,
    ),
    Option(
        "auth",
        "authentication provider: htpasswd, token (Docker's token flow) or jwks (an "
        "external issuer's tokens); its settings are in [plugin.<name>] (default: none)",
        ("NIXERYD_AUTH",),
    ),
    Option(
        "auth_policy",
        "with auth: everything (every request needs credentials) or builds (anyone may pull "
        "images already built; building a new name needs credentials)",
        ("NIXERYD_AUTH_POLICY",),
        _one_of("everything", "builds"),
    ),
    Option("log_format", "text or json", ("NIXERYD_LOG_FORMAT",), _one_of("text", "json")),
    Option(
        "log_level",
        "least level logged: debug (adds every line Nix prints), info, warn or error",
        ("NIXERYD_LOG_LEVEL",),
        _one_of("debug", "info", "warn", "error"),
    ),
    Option(
        "access_log",
        "log a line per request, in log_format: true or false (false raises the rate of "
        "cached answers by about a tenth)",
        ("NIXERYD_ACCESS_LOG",),
        parse_boolean,
    ),
    Option(
        "metrics",
        "serve Prometheus metrics at /metrics: true or false",
        ("NIXERYD_METRICS",),
        parse_boolean,
    ),
    Option(
        "metrics_listen",
        "comma-separated Twisted endpoints serving /metrics alone, without authentication, "
        "such as tcp:9090:interface=127.0.0.1 (default: /metrics on the registry's listeners, "
        "behind its authentication)",
        ("NIXERYD_METRICS_LISTEN",),
        _names,
    ),
    Option(
        "layer_compressor",
        "layer compressor: isal (gzip, fast; the default where installed), zlib (gzip)"
        " or zstd (OCI tar+zstd layers, served in OCI manifests only)",
        ("NIXERYD_LAYER_COMPRESSOR",),
        _one_of(*COMPRESSORS),
    ),
    Option(
        "layer_compression_level",
        "compression level: isal 0-3 (default 2), zlib 0-9 (6), zstd 1-19 (3)",
        ("NIXERYD_LAYER_COMPRESSION_LEVEL",),
        int,
    ),
    Option(
        "layer_workers",
        "layers compressed at once, each on its own thread; 0 (the default): one per core",
        ("NIXERYD_LAYER_WORKERS",),
        _non_negative_int,
    ),
)

_PACKAGE_SET_KEYS = {"pkgs_path": "path", "pkgs_repo": "git", "channel": "channel"}


def default_package_set() -> str:
    """The example package set shipped in ``nix/example``, served when none is configured."""
    from importlib.resources import files

    return str(files("nixeryd") / "nixexprs" / "example")


def load_config(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: Path | None = None,
) -> Config:
    """Layer the sources (command line > environment > file) into a validated Config.

    ``cli`` maps option names to values already given on the command line
    (absent or None when not given); ``listen`` is a sequence of endpoints.
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}

    if config_file is not None:
        _read_file(config_file, values, origins)

    for option in OPTIONS:
        for variable in option.env:
            if environ.get(variable):
                values[option.name] = _parse(option, environ[variable], f"${variable}")
                origins[option.name] = f"${variable}"
                break
    if environ.get("PORT"):
        values["listen"] = (f"tcp:{_parse_port(environ['PORT'])}",)
        origins["listen"] = "$PORT"

    for option in OPTIONS:
        if cli.get(option.name) is not None:
            values[option.name] = _parse(option, str(cli[option.name]), f"--{_flag(option.name)}")
            origins[option.name] = f"--{_flag(option.name)}"
    if cli.get("listen"):
        values["listen"] = tuple(cli["listen"])
        origins["listen"] = "--listen"

    _choose_package_source(values, origins)
    config = Config(**values, environment=dict(environ), origins=dict(origins))
    _check_compression(config, origins)
    if config.metrics_listen and not config.metrics:
        raise ConfigError(
            f"metrics_listen (from {origins['metrics_listen']}) is set but metrics "
            f"(from {origins['metrics']}) is false: set one or the other"
        )
    return config


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _parse(option: Option, text: str, origin: str) -> Any:
    try:
        return option.parse(text)
    except ValueError as error:
        raise ConfigError(f"{origin} ({option.name}) = {text!r}: {error}") from error


def _parse_port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"$PORT = {text!r}: must be a TCP port number")
    return int(text)


def _read_file(path: Path, values: dict[str, Any], origins: dict[str, str]) -> None:
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"config file {path}: {error}") from error
    known = {option.name: option for option in OPTIONS}
    for key, value in document.items():
        origin = f"{path}: {key}"
        if key == "listen":
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise ConfigError(f"{origin}: must be a list of endpoint strings")
            values["listen"] = tuple(value)
        elif key == "plugin":
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: must be a table of [plugin.<name>] tables")
            for name, table in value.items():
                if not isinstance(table, dict):
                    raise ConfigError(f"{origin}.{name}: must be a table, [plugin.{name}]")
            values["plugin_options"] = value
        elif key in known:
            # Lists (platforms = ["linux/amd64", "linux/arm64"]) read like their flag's commas.
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            values[key] = _parse(known[key], text, origin)
        else:
            log.warn("{origin}: unknown configuration key, ignored", origin=origin)
            continue
        origins[key] = origin


def _check_compression(config: Config, origins: Mapping[str, str]) -> None:
    """The level must suit the compressor, and the compressor must be installed."""
    try:
        config.compression  # noqa: B018 - validates
    except ValueError as error:
        named = [
            f"{key} (from {origins[key]})"
            for key in ("layer_compressor", "layer_compression_level")
            if key in origins
        ]
        raise ConfigError(f"{', '.join(named) or 'layer compression'}: {error}") from error


def _choose_package_source(values: dict[str, Any], origins: dict[str, str]) -> None:
    given = [key for key in _PACKAGE_SET_KEYS if values.get(key)]
    if len(given) > 1:
        named = ", ".join(f"{key} (from {origins[key]})" for key in given)
        raise ConfigError(f"configure exactly one package set; got {named}")
    if "package_source" not in values:
        values["package_source"] = _PACKAGE_SET_KEYS[given[0]] if given else "path"
    if not given and values["package_source"] == "path":
        values["pkgs_path"] = default_package_set()
