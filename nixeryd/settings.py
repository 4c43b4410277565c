"""A provider's own settings, declared by its plugin: from ``[plugin.<name>]`` or the environment.

A storage backend, package source or layering strategy declares what it
reads as :class:`Setting` values on its :class:`~nixeryd.runtime.Provider`.
When the configuration selects the provider, :func:`resolve` builds its
settings, highest first, from:

1. the ``[plugin.<provider name>]`` table of the config file, where a value
   may be a literal or an indirection: ``{ env = "VAR" }`` (read that
   environment variable) or ``{ file = "/run/secrets/key" }`` (read the
   file, trailing newline removed: systemd credentials, Kubernetes secrets);
2. the setting's environment variables (Nixery's names first, so that
   Nixery's deployments keep working), then, for a secret, ``<VAR>_FILE``
   naming a file that holds it;
3. the setting's default.

Unknown keys in the table and missing required settings are start-up
errors that name the key and where it came from. A secret's value is never
part of an error message or a log line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nixeryd.config import ConfigError, parse_boolean, seconds_in

__all__ = ["Setting", "parse_boolean", "parse_duration", "resolve"]

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


@dataclass(frozen=True)
class Setting:
    """One setting a provider reads.

    ``name`` is the key in the ``[plugin.<provider>]`` table and in the
    resolved mapping; ``env`` the variables that set it; ``parse`` turns text
    into the value (TOML values other than strings are passed to it as text,
    ``true`` as ``"true"``).
    """

    name: str
    help: str
    env: tuple[str, ...] = ()
    parse: Callable[[str], Any] = str
    default: Any = None
    required: bool = False
    #: May come from a file, and is never shown.
    secret: bool = False


def parse_duration(text: str) -> float:
    """Seconds of a Go duration (``5m``, ``1h30m``, ``90s``, ``1.5h``), as Nixery's
    variables such as ``S3_LINK_EXPIRATION`` are written; a bare number is seconds."""
    seconds = seconds_in(text, _DURATION_PART, _DURATION_UNITS)
    if seconds is None:
        raise ValueError("must be a duration such as 90s, 5m or 1h30m")
    if seconds <= 0:
        raise ValueError("must be longer than 0")
    return seconds


def resolve(
    provider: str,
    settings: Sequence[Setting],
    table: Mapping[str, Any],
    environ: Mapping[str, str],
) -> dict[str, Any]:
    """The settings of ``provider`` by name; ConfigError for anything a site must fix."""
    known = {setting.name: setting for setting in settings}
    unknown = sorted(set(table) - set(known))
    if unknown:
        choices = ", ".join(sorted(known)) or "none"
        raise ConfigError(
            f"[plugin.{provider}]: unknown key {', '.join(unknown)}; {provider} reads: {choices}"
        )
    resolved: dict[str, Any] = {}
    for setting in settings:
        found = _lookup(provider, setting, table, environ)
        if found is None:
            if setting.required:
                raise ConfigError(f"{provider} needs {_sources(provider, setting)}")
            resolved[setting.name] = setting.default
            continue
        text, origin = found
        try:
            resolved[setting.name] = setting.parse(text)
        except ValueError as error:
            shown = "(secret)" if setting.secret else repr(text)
            raise ConfigError(f"{origin} ({setting.name}) = {shown}: {error}") from error
    return resolved


def _lookup(
    provider: str, setting: Setting, table: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[str, str] | None:
    """The setting's text and where it came from, or None where nothing sets it."""
    if setting.name in table:
        origin = f"[plugin.{provider}] {setting.name}"
        return _indirect(table[setting.name], origin, environ), origin
    for variable in setting.env:
        if environ.get(variable):
            return environ[variable], f"${variable}"
    if setting.secret:
        for variable in setting.env:
            path = environ.get(f"{variable}_FILE")
            if path:
                return _read_secret(path, f"${variable}_FILE"), f"${variable}_FILE"
    return None


def _indirect(value: Any, origin: str, environ: Mapping[str, str]) -> str:
    if isinstance(value, dict):
        if set(value) == {"env"} and isinstance(value["env"], str):
            if not environ.get(value["env"]):
                raise ConfigError(f"{origin}: environment variable {value['env']} is not set")
            return environ[value["env"]]
        if set(value) == {"file"} and isinstance(value["file"], str):
            return _read_secret(value["file"], origin)
        raise ConfigError(f'{origin}: a table must be {{ env = "VAR" }} or {{ file = "/path" }}')
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ConfigError(f"{origin}: must be a string, number, boolean, or an env/file table")


def _read_secret(path: str, origin: str) -> str:
    try:
        return Path(path).read_text().rstrip("\n")
    except OSError as error:
        raise ConfigError(f"{origin}: cannot read {path}: {error.strerror}") from error


def _sources(provider: str, setting: Setting) -> str:
    """Where a missing required setting could come from, for the error message."""
    places = [f"{setting.name} in [plugin.{provider}]"]
    places += [f"${variable}" for variable in setting.env]
    if setting.secret:
        places += [f"${variable}_FILE" for variable in setting.env]
    return f"{setting.help}: set " + " or ".join(places)
