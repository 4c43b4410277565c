"""The NixOS module, ``nix/module.nix``.

The package cannot be built offline (``test_package.py``), so NixOS systems with
``services.nixeryd`` are evaluated (``nixos.nix``, one ``nix-instantiate`` for all of
them): they have the unit, socket, user, firewall and Nix daemon settings the module
promises, a configuration file nixeryd's own loader reads back, and the hardening of
``systemd/nixeryd.service``. Then this host's systemd
verifies the units, and runs what they describe: the socket unit's ListenStream under
``systemd-socket-activate``, the unit's command with the module's file (this checkout's
nixeryd in place of the package), through a pull with a real Nix and a real client.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from nixeryd.config import OPTIONS, load_config
from tests.e2e.conftest import TEST_PACKAGES, free_port, require
from tests.nixinstalls import NixInstallation, installations
from tests.nixpkgs.test_package import ROOT, instantiate

REPO_UNIT = ROOT / "systemd" / "nixeryd.service"

#: The [Service] settings the module's unit must have, with their values: the
#: sandbox (as systemd/nixeryd.service has it), the readiness protocol and the state.
SERVICE: dict[str, str] = {
    "NoNewPrivileges": "true",
    "ProtectSystem": "strict",
    "ProtectHome": "true",
    "PrivateTmp": "true",
    "PrivateDevices": "true",
    "ProtectKernelTunables": "true",
    "ProtectKernelModules": "true",
    "ProtectKernelLogs": "true",
    "ProtectControlGroups": "true",
    "ProtectClock": "true",
    "ProtectHostname": "true",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "true",
    "RestrictRealtime": "true",
    "RestrictSUIDSGID": "true",
    "LockPersonality": "true",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "SystemCallErrorNumber": "EPERM",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "UMask": "0027",
    "LimitNOFILE": "65536",
    "StateDirectory": "nixeryd",
    "User": "nixeryd",
    "Group": "nixeryd",
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "30s",
    "KillMode": "mixed",
}
#: The daemon's lifecycle: compared with the repository's unit only once that unit
#: speaks the notify protocol (it names NotifyAccess or WatchdogSec), as before it is
#: Type=simple, and stops the Nix commands by their control group, on purpose.
LIFECYCLE = ("Type", "NotifyAccess", "WatchdogSec", "KillMode")
ENVIRONMENT: dict[str, str] = {
    "NIX_REMOTE": "daemon",
    "HOME": "/var/lib/nixeryd",
    "NIXERYD_GC_ROOTS": "/var/lib/nixeryd/gcroots",
}

#: The Nix type each of config.py's parsers is declared with (a part of its description).
NIX_TYPES: dict[str, str] = {
    "str": "string",
    "parse_boolean": "boolean",
    "int": "signed integer",
    "_non_negative_int": "unsigned integer",
    "_positive_int": "positive integer",
    "_budget": "integer between 1 and 125",
    "_positive_float": "positive integer or floating point number",
    "_non_negative_float": "nonnegative integer or floating point number",
    "_names": "list of string",
    "parse_platforms": "list of string",
    "_nix_file": "absolute path",
    "_nix_files": "list of absolute path",
    "parse": "one of",  # _one_of(...)
    "parse_age": "nonnegative integer or floating point number, meaning >=0, or string",
}


@pytest.fixture(scope="module")
def systems(
    modern_nix: NixInstallation, nixpkgs: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """``nixos.nix``'s report of its systems (10 to 20 s of evaluation)."""
    workdir = tmp_path_factory.mktemp("nixos")
    nixpkgs_config = workdir / "config.nix"
    nixpkgs_config.write_text("{ allowUnfree = true; }\n")
    output = instantiate(
        modern_nix, "--eval", "--strict", "--json", "--read-write-mode",
        str(Path(__file__).with_name("nixos.nix")),
        "--arg", "nixpkgs", str(nixpkgs),
        "--arg", "module", str(ROOT / "nix" / "module.nix"),
        "--arg", "nixpkgsConfig", str(nixpkgs_config),
        "--argstr", "port", str(free_port()),
        "--argstr", "storageDir", str(workdir / "storage"),
        "--argstr", "pkgsPath", str(TEST_PACKAGES),
    )  # fmt: skip
    report: dict[str, Any] = json.loads(output)
    return report


def unit_settings(text: str, section: str = "Service") -> dict[str, list[str]]:
    """Each setting of a unit file's section, as systemd reads it: the words of every
    assignment in order, an empty assignment resetting the list."""
    settings: dict[str, list[str]] = {}
    current = None
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            words = shlex.split(value) if key == "Environment" else value.split()
            settings[key.strip()] = settings.get(key.strip(), []) + words if words else []
    return settings


def normal(key: str, words: list[str]) -> list[str]:
    """One spelling of a setting: booleans as true/false, octal modes and time spans as
    numbers, so that ``ProtectHome=yes`` equals the module's ``ProtectHome=true``."""
    if len(words) != 1:
        return words
    word = words[0].lower()
    if word in ("yes", "true", "on", "1") and key != "LimitNOFILE":
        return ["true"]
    if word in ("no", "false", "off", "0"):
        return ["false"]
    if key == "UMask":
        return [str(int(word, 8))]
    span = re.fullmatch(r"(\d+)\s*(s|sec|min|m)?", word)
    if key.endswith("Sec") and span:
        return [str(int(span[1]) * (60 if span[2] in ("min", "m") else 1))]
    return words


def environment(settings: dict[str, list[str]]) -> dict[str, str]:
    return dict(word.partition("=")[::2] for word in settings.get("Environment", []))


# -- the module -----------------------------------------------------------------------


def test_every_configuration_option_is_a_typed_setting(systems: dict[str, Any]) -> None:
    declared = systems["settingsOptions"]
    assert sorted(set(declared) - {"plugin"}) == sorted(option.name for option in OPTIONS)
    for option in OPTIONS:
        parser = option.parse.__name__
        assert parser in NIX_TYPES, f"{option.name}: map its parser {parser} to a Nix type"
        assert NIX_TYPES[parser] in declared[option.name], (option.name, declared[option.name])
        if parser == "parse":
            with pytest.raises(ValueError, match="must be one of") as refused:
                option.parse("\0")
            choices = str(refused.value).removeprefix("must be one of ").split(", ")
            assert declared[option.name] == "null or one of " + ", ".join(f'"{c}"' for c in choices)


def test_the_unit_runs_the_package_with_the_file(systems: dict[str, Any]) -> None:
    sample = systems["sample"]
    service = unit_settings(sample["unit"])
    assert service["ExecStart"] == [
        f"{sample['package']}/bin/nixeryd", "serve", "--config", "/etc/nixeryd/nixeryd.toml",
    ]  # fmt: skip
    assert service["User"] == service["Group"] == ["nixeryd"]
    assert service["EnvironmentFile"] == ["/run/secrets/nixeryd.env"]
    # A filesystem storage outside the state directory is writable in ProtectSystem=strict.
    assert service["ReadWritePaths"] == ["/srv/registry"]
    assert unit_settings(sample["unit"], "Install")["WantedBy"] == ["multi-user.target"]
    unit = unit_settings(sample["unit"], "Unit")
    assert "nix-daemon.socket" in unit["After"] and "nix-daemon.socket" in unit["Wants"]
    # The daemon's own Nix comes first on PATH.
    assert sample["environment"]["PATH"].startswith(f"{sample['nix']}/bin:")
    assert sample["user"] == {
        "isSystemUser": True, "group": "nixeryd", "home": "/var/lib/nixeryd", "groupExists": True,
    }  # fmt: skip


@pytest.mark.parametrize("key", SERVICE)
def test_the_unit_is_hardened_as_the_repository_unit(systems: dict[str, Any], key: str) -> None:
    module = unit_settings(systems["sample"]["unit"])
    assert normal(key, module.get(key, ["(unset)"])) == normal(key, SERVICE[key].split())
    repository = unit_settings(REPO_UNIT.read_text())
    if key in LIFECYCLE and not {"NotifyAccess", "WatchdogSec"} & set(repository):
        pytest.skip(f"{REPO_UNIT.name} does not speak the notify protocol yet")
    if key not in repository:
        pytest.skip(f"{REPO_UNIT.name} has no {key}= yet")
    assert normal(key, module[key]) == normal(key, repository[key])


@pytest.mark.parametrize("variable", ENVIRONMENT)
def test_its_environment_is_the_repository_units(systems: dict[str, Any], variable: str) -> None:
    assert environment(unit_settings(systems["sample"]["unit"]))[variable] == ENVIRONMENT[variable]
    repository = environment(unit_settings(REPO_UNIT.read_text()))
    if variable not in repository:
        pytest.skip(f"{REPO_UNIT.name} does not set {variable} yet")
    assert repository[variable] == ENVIRONMENT[variable]


def test_the_file_is_the_settings_and_nixeryd_reads_it(
    systems: dict[str, Any], tmp_path: Path
) -> None:
    text = systems["sample"]["toml"]
    document = tomllib.loads(text)
    config_file = document.pop("nixpkgs_config_file")
    assert re.fullmatch(r"/nix/store/[a-z0-9]{32}-config\.nix", config_file), config_file
    assert document == {
        "listen": [
            "tcp:8080:interface=127.0.0.1",
            "ssl:port=8443:privateKey=/var/lib/nixeryd/key.pem:certKey=/var/lib/nixeryd/cert.pem",
        ],
        "pkgs_repo": "https://example.org/pkgs.git",
        "nix_timeout": 300,
        "failure_ttl": 1.5,
        "access_log": False,
        "evaluators": 0,
        "log_format": "json",
        "platforms": ["linux/amd64", "linux/arm64"],
        "permitted_insecure_packages": ["openssl-1.1.1w"],
        "storage_path": "/srv/registry",
        "storage_backend": "filesystem",
        "auth": "htpasswd",
        "plugin": {
            "htpasswd": {"file": "/run/secrets/htpasswd"},
            "s3": {
                "bucket": "images",
                "secret_key": {"env": "S3_SECRET"},
                "odd key": 'quote " backslash \\ newline \n end',
            },
            "other": {
                "mixed": [1, 2.5, 1e20, True, "x", {"inline": 1}, []],
                "text": "ünïcødé 名前, tab\t, control \x01 \x7f",
                "ключ": "unicode key",
                "nested": {"deeper": {"value": 1}},
                "empty": {},
            },
        },
    }
    # Sections only for the top two levels, as the configuration reference writes them.
    assert "[plugin.s3]" in text and 'secret_key = { env = "S3_SECRET" }' in text

    path = tmp_path / "nixeryd.toml"
    path.write_text(text)
    config = load_config({}, {}, path)
    assert config.listen == tuple(document["listen"])
    assert (config.package_source, config.pkgs_repo) == ("git", "https://example.org/pkgs.git")
    assert (config.nix_timeout, config.failure_ttl, config.evaluators) == (300.0, 1.5, 0)
    assert (config.access_log, config.log_format, config.auth) == (False, "json", "htpasswd")
    assert [platform.system for platform in config.platforms] == ["x86_64-linux", "aarch64-linux"]
    assert config.nixpkgs_config == {
        "configFile": config_file,
        "permittedInsecurePackages": ["openssl-1.1.1w"],
    }
    assert config.plugin_options == document["plugin"]


def test_unset_settings_leave_nixeryds_defaults(systems: dict[str, Any]) -> None:
    assert tomllib.loads(systems["socket"]["toml"]) == {
        "listen": ["systemd:domain=INET:name=nixeryd"],
        "storage_path": "/var/lib/nixeryd/storage",
    }


def test_the_daemon_allows_nixeryd_without_trusting_it(systems: dict[str, Any]) -> None:
    settings = systems["sample"]["nixSettings"]
    assert settings["extra-allowed-users"] == ["nixeryd"]
    # allowed-users keeps its default: every other user still reaches the daemon.
    assert settings["allowed-users"] == ["*"]
    assert "nixeryd" not in settings["trusted-users"]


def test_the_firewall_opens_the_listeners_ports(systems: dict[str, Any]) -> None:
    assert sorted(systems["sample"]["firewall"]) == [8080, 8443]
    assert systems["socket"]["firewall"] == [8080]
    assert systems["socket6"]["firewall"] == []


def test_socket_activation(systems: dict[str, Any]) -> None:
    """systemd listens; nixeryd adopts the socket and is started by it, not at boot."""
    socket = systems["socket"]
    assert socket["sockets"] == {
        "nixeryd": {"listenStreams": ["0.0.0.0:8080"], "wantedBy": ["sockets.target"]}
    }
    assert (socket["wantedBy"], socket["requires"]) == ([], ["nixeryd.socket"])
    assert "nixeryd.socket" in unit_settings(socket["unit"], "Unit")["After"]
    socket6 = systems["socket6"]
    assert socket6["sockets"]["nixeryd"]["listenStreams"] == ["[::1]:9000"]
    assert tomllib.loads(socket6["toml"])["listen"] == ["systemd:domain=INET6:name=nixeryd"]
    assert systems["sample"]["sockets"] == {}


def test_mistakes_are_refused_or_warned_about(systems: dict[str, Any]) -> None:
    assert systems["sample"]["failedAssertions"] == []
    assert systems["sample"]["warnings"] == systems["served"]["warnings"] == []
    # The example package set's busybox is not on NixOS: a system without a package set.
    (warning,) = systems["socket"]["warnings"]
    assert "no package set" in warning
    mistakes = systems["mistakes"]
    assert [message.split(": ")[1] for message in mistakes["noListener"]] == ["no listener"]
    assert "services.nixeryd.listen, not settings.listen" in mistakes["settingsListen"][0]


# -- on this host's systemd -----------------------------------------------------------


def here(unit: str, package: str) -> str:
    """A unit with this checkout's nixeryd in place of the package, which is not built."""
    return unit.replace(f"{package}/bin/nixeryd", str(Path(sys.executable).with_name("nixeryd")))


def test_systemd_verifies_the_units(systems: dict[str, Any], tmp_path: Path) -> None:
    require("systemd-analyze")
    for name in ("sample", "served"):
        system = systems[name]
        directory = tmp_path / name
        directory.mkdir()
        units = [directory / "nixeryd.service"]
        units[0].write_text(here(system["unit"], system["package"]))
        if system["socketUnit"] is not None:
            units.append(directory / "nixeryd.socket")
            units[1].write_text(system["socketUnit"])
        verified = subprocess.run(
            ["systemd-analyze", "verify", *map(str, units)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert (verified.returncode, verified.stderr) == (0, ""), name


@pytest.mark.e2e
@pytest.mark.parametrize("nix", installations(), ids=lambda nix: nix.label)
def test_the_socket_starts_nixeryd_which_serves_a_pull(
    systems: dict[str, Any], nix: NixInstallation, tmp_path: Path
) -> None:
    """As systemd would run it: the socket listens, the first connection starts the unit's
    command with the module's file, and nixeryd adopts the socket (``systemd:`` endpoint)
    and builds the image with Nix (each installation, as the end-to-end tests run).
    The unit's environment names a NixOS host's paths and its Nix daemon; here nixeryd
    uses the test's Nix store directly."""
    require("systemd-socket-activate", "skopeo")
    served = systems["served"]
    storage = Path(tomllib.loads(served["toml"])["storage_path"])
    shutil.rmtree(storage, ignore_errors=True)  # built by this Nix, not the one before
    (listen_stream,) = served["sockets"]["nixeryd"]["listenStreams"]
    config = tmp_path / "nixeryd.toml"
    config.write_text(served["toml"])
    command = unit_settings(here(served["unit"], served["package"]))["ExecStart"]
    assert command[-2:] == ["--config", "/etc/nixeryd/nixeryd.toml"]
    log_path = tmp_path / "nixeryd.log"
    env = nix.env() | {"NIXERYD_GC_ROOTS": str(tmp_path / "gcroots")}
    # The socket unit's FileDescriptorName=, which systemd passes in LISTEN_FDNAMES.
    (name,) = unit_settings(served["socketUnit"], "Socket")["FileDescriptorName"]
    activate = ["systemd-socket-activate", "--listen", listen_stream, f"--fdname={name}"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*activate, *command[:-1], str(config)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        inspected = subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", f"docker://{listen_stream}/shell/hello"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert inspected.returncode == 0, inspected.stderr + log_path.read_text()
        assert json.loads(inspected.stdout)["Layers"]
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    # What it built went to the module's storage_path.
    assert any(storage.rglob("*"))
