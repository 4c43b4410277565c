"""The systemd units: verified by systemd itself, and consistent with each other."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nixeryd.config import load_config
from tests.systemdunits import SERVICE, SOCKET, exec_start, hardening, listen_endpoint, sections


def test_systemd_analyze_verify_is_clean() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: run scripts/setup (Debian's systemd package)")
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(SOCKET), str(SERVICE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr == "" and verified.stdout == ""


def test_the_service_adopts_the_socket_by_name_and_in_its_address_family() -> None:
    socket_unit = sections(SOCKET)["Socket"]
    name = socket_unit["FileDescriptorName"][0]
    assert listen_endpoint() == f"systemd:domain=INET6:name={name}"
    # A bare port is every address, IPv6 and IPv4: an AF_INET6 socket.
    assert socket_unit["ListenStream"] == ["8080"]
    assert sections(SERVICE)["Unit"]["Requires"] == ["nixeryd.socket"]


def test_the_service_notifies_runs_as_its_own_user_and_keeps_state_in_its_directory() -> None:
    service = {key: values[-1] for key, values in sections(SERVICE)["Service"].items()}
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["WatchdogSec"]
    assert service["User"] == service["Group"] == "nixeryd"
    assert service["StateDirectory"] == "nixeryd" and service["StateDirectoryMode"] == "0750"
    environment = dict(value.split("=", 1) for value in sections(SERVICE)["Service"]["Environment"])
    assert environment["NIX_REMOTE"] == "daemon"
    assert environment["HOME"] == "/var/lib/nixeryd"
    assert environment["STORAGE_PATH"] == "/var/lib/nixeryd/storage"
    assert environment["NIXERYD_GC_ROOTS"] == "/var/lib/nixeryd/gcroots"
    assert exec_start()[exec_start().index("--config") + 1] == "/etc/nixeryd/nixeryd.toml"
    assert service["LimitNOFILE"] == "65536"


def test_the_hardening_list() -> None:
    options = hardening()
    assert options["ProtectSystem"] == "strict"
    assert options["CapabilityBoundingSet"] == "" and options["AmbientCapabilities"] == ""
    assert options["SystemCallFilter"] == "@system-service"
    assert options["SystemCallErrorNumber"] == "EPERM"
    assert options["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert options["MemoryDenyWriteExecute"] == "no"  # see the unit's comment
    for flag in (
        "NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
        "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "ProtectControlGroups", "ProtectClock", "ProtectHostname", "RestrictNamespaces",
        "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
    ):  # fmt: skip
        assert options[flag] == "yes", flag


#: What MemoryDenyWriteExecute=yes does to the process (Linux >= 6.3 has it as a prctl),
#: then the TLS client Twisted builds for an HTTPS object store or popularity URL.
_TLS_CLIENT_WITHOUT_WRITE_EXECUTE = """
import ctypes, sys
if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(3)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
tls = TLSMemoryBIOFactory(optionsForClientTLS("s3.example"), True, Factory.forProtocol(Protocol))
tls.buildProtocol(None).makeConnection(StringTransport())
"""


def test_memory_deny_write_execute_would_break_https_clients() -> None:
    """Why the unit leaves MemoryDenyWriteExecute off."""
    run = subprocess.run(
        [sys.executable, "-c", _TLS_CLIENT_WITHOUT_WRITE_EXECUTE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if run.returncode == 3:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert run.returncode == 1
    assert "Cannot allocate write+execute memory" in run.stderr


def test_the_example_settings_load_as_the_unit_runs_them() -> None:
    """What the installation copies to /etc/nixeryd, with the unit's flags and variables."""
    argv = exec_start()
    environment = dict(value.split("=", 1) for value in sections(SERVICE)["Service"]["Environment"])
    example = Path(__file__).resolve().parents[2] / "etc"
    env_file = dict(
        line.split("=", 1)
        for line in (example / "nixeryd.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    config = load_config(
        {"listen": [argv[argv.index("--listen") + 1]]},
        {**environment, **env_file},  # the environment file overrides Environment=
        example / "nixeryd.toml",
    )
    assert config.listen == ("systemd:domain=INET6:name=nixeryd",)
    assert config.storage_path == "/var/lib/nixeryd/storage"
