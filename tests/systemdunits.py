"""The unit files in ``systemd/``, read as key=value lines, for the tests that check them.

``systemd/nixeryd.service`` is the one list of the service's settings and its hardening
(the lines after its ``# Hardening`` comment); the NixOS module's test compares its
generated unit with :func:`hardening`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

UNITS = Path(__file__).resolve().parents[1] / "systemd"
SERVICE = UNITS / "nixeryd.service"
SOCKET = UNITS / "nixeryd.socket"


def sections(unit: Path) -> dict[str, dict[str, list[str]]]:
    """Each ``[Section]``'s keys, with every value a key is given (in order)."""
    parsed: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = parsed.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return parsed


def hardening(unit: Path = SERVICE) -> dict[str, str]:
    """The hardening options of the service: its ``[Service]`` lines after ``# Hardening``."""
    lines = unit.read_text().split("\n# Hardening\n", 1)[1].split("\n[", 1)[0].splitlines()
    return dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition("=") for line in lines)
        if key.strip() and not key.startswith("#")
    )


def exec_start(unit: Path = SERVICE) -> list[str]:
    """The service's ExecStart command line, split as systemd splits it."""
    return shlex.split(sections(unit)["Service"]["ExecStart"][0])


def listen_endpoint(unit: Path = SERVICE) -> str:
    """The ``--listen`` endpoint the service's ExecStart gives."""
    argv = exec_start(unit)
    return argv[argv.index("--listen") + 1]
