from pathlib import Path

import pytest

from nixeryd.compression import Compression
from nixeryd.config import ConfigError, default_package_set, load_config
from nixeryd.platform import AMD64, ARM64, host_platform


def test_nixery_variables_work_unchanged() -> None:
    config = load_config(
        {},
        {
            "PORT": "9000",
            "NIXERY_PKGS_REPO": "git@example.com:pkgs.git",
            "NIXERY_STORAGE_BACKEND": "filesystem",
            "STORAGE_PATH": "/srv/store",
            "NIX_TIMEOUT": "120",
            "NIX_POPULARITY_URL": "file:///srv/popularity.json",
        },
    )
    assert config.listen == ("tcp:9000",)
    assert config.package_source == "git"
    assert config.pkgs_repo == "git@example.com:pkgs.git"
    assert config.storage_path == "/srv/store"
    assert config.nix_timeout == 120.0
    assert config.popularity_url == "file:///srv/popularity.json"


def test_the_default_is_the_example_package_set() -> None:
    config = load_config({}, {})
    assert config.package_source == "path"
    assert config.pkgs_path == default_package_set()
    assert (Path(default_package_set()) / "default.nix").is_file()
    assert config.listen == ("tcp:8080",)


def test_command_line_beats_environment_beats_file(tmp_path: Path) -> None:
    file = tmp_path / "nixeryd.toml"
    file.write_text('nix_timeout = 10\nlayer_budget = 50\nlisten = ["tcp:1"]\n')
    config = load_config({"nix_timeout": "30"}, {"NIX_TIMEOUT": "20", "PORT": "2"}, file)
    assert config.nix_timeout == 30.0
    assert config.layer_budget == 50
    assert config.listen == ("tcp:2",)
    config = load_config({"listen": ["tcp:3", "unix:/run/n.sock"]}, {"PORT": "2"}, file)
    assert config.listen == ("tcp:3", "unix:/run/n.sock")


def test_build_limits_and_log_level() -> None:
    config = load_config({}, {})
    assert (config.nix_timeout, config.build_timeout, config.log_level) == (60.0, 3600.0, "info")
    config = load_config({}, {"NIXERYD_BUILD_TIMEOUT": "900", "NIXERYD_LOG_LEVEL": "debug"})
    assert (config.build_timeout, config.log_level) == (900.0, "debug")
    with pytest.raises(ConfigError, match=r"NIXERYD_BUILD_TIMEOUT"):
        load_config({}, {"NIXERYD_BUILD_TIMEOUT": "0"})
    with pytest.raises(ConfigError, match=r"NIXERYD_LOG_LEVEL.*one of debug, info, warn, error"):
        load_config({}, {"NIXERYD_LOG_LEVEL": "verbose"})


def test_evaluator_bounds() -> None:
    config = load_config({}, {})
    assert (config.evaluators, config.evaluator_memory) == (4, 2048)
    assert (config.evaluator_idle, config.evaluator_unpinned_ttl) == (600.0, 60.0)
    config = load_config(
        {"evaluator_idle": "30"},
        {
            "NIXERYD_EVALUATORS": "0",
            "NIXERYD_EVALUATOR_MEMORY": "512",
            "NIXERYD_EVALUATOR_UNPINNED_TTL": "0",
        },
    )
    assert (config.evaluators, config.evaluator_memory) == (0, 512)
    assert (config.evaluator_idle, config.evaluator_unpinned_ttl) == (30.0, 0.0)
    with pytest.raises(ConfigError, match=r"NIXERYD_EVALUATOR_MEMORY.*greater than 0"):
        load_config({}, {"NIXERYD_EVALUATOR_MEMORY": "0"})
    with pytest.raises(ConfigError, match=r"NIXERYD_EVALUATORS.*0 or more"):
        load_config({}, {"NIXERYD_EVALUATORS": "-1"})


def test_errors_name_the_key_and_its_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$NIX_TIMEOUT \(nix_timeout\) = 'soon'"):
        load_config({}, {"NIX_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="--layer-budget"):
        load_config({"layer_budget": "500"}, {})
    with pytest.raises(ConfigError, match=r"\$PORT"):
        load_config({}, {"PORT": "http"})
    file = tmp_path / "bad.toml"
    file.write_text("log_format = 'xml'\n")
    with pytest.raises(ConfigError, match=f"{file}: log_format"):
        load_config({}, {}, file)


def test_only_one_package_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one package set"):
        load_config({"channel": "nixos-unstable"}, {"NIXERY_PKGS_PATH": str(tmp_path)})


def test_plugin_tables_reach_plugins(tmp_path: Path) -> None:
    file = tmp_path / "nixeryd.toml"
    file.write_text('unknown_key = 1\n[plugin.mysite]\nbucket = "images"\n')
    config = load_config({}, {}, file)
    assert config.plugin_options == {"mysite": {"bucket": "images"}}


@pytest.mark.parametrize("document", ['plugin = "s3"\n', 'plugin.s3 = "bucket"\n'])
def test_plugin_settings_must_be_tables(tmp_path: Path, document: str) -> None:
    file = tmp_path / "nixeryd.toml"
    file.write_text(document)
    with pytest.raises(ConfigError, match="must be a table"):
        load_config({}, {}, file)


def test_platforms_from_each_source(tmp_path: Path) -> None:
    assert load_config({}, {}).platforms == (host_platform(),)
    file = tmp_path / "nixeryd.toml"
    file.write_text('platforms = ["linux/arm64", "linux/amd64"]\n')
    assert load_config({}, {}, file).platforms == (ARM64, AMD64)
    config = load_config({}, {"NIXERYD_PLATFORMS": "linux/amd64,linux/arm64"}, file)
    assert config.platforms == (AMD64, ARM64)
    with pytest.raises(ConfigError, match=r"--platforms \(platforms\) = 'linux/sparc'"):
        load_config({"platforms": "linux/sparc"}, {})


def test_layer_compression_defaults_to_isal_at_its_default_level() -> None:
    config = load_config({}, {})
    assert (config.layer_compressor, config.compression) == ("isal", Compression("isal", 2))
    assert config.layer_workers == 0


def test_layer_compression_options_from_every_source(tmp_path: Path) -> None:
    file = tmp_path / "nixeryd.toml"
    file.write_text('layer_compressor = "zstd"\nlayer_compression_level = 9\nlayer_workers = 3\n')
    config = load_config({}, {}, file)
    assert (config.compression, config.layer_workers) == (Compression("zstd", 9), 3)
    config = load_config(
        {"layer_compression_level": "1"},
        {"NIXERYD_LAYER_COMPRESSOR": "zlib", "NIXERYD_LAYER_WORKERS": "1"},
    )
    assert (config.compression, config.layer_workers) == (Compression("zlib", 1), 1)


@pytest.mark.parametrize(
    ("cli", "environ", "message"),
    [
        ({"layer_compressor": "lz4"}, {}, r"--layer-compressor \(layer_compressor\).*one of isal"),
        (
            {"layer_compression_level": "9"},
            {},
            r"layer_compression_level \(from --layer-compression-level\): isal .* 0 to 3",
        ),
        (
            {},
            {"NIXERYD_LAYER_COMPRESSOR": "zstd", "NIXERYD_LAYER_COMPRESSION_LEVEL": "0"},
            r"layer_compressor \(from \$NIXERYD_LAYER_COMPRESSOR\), .*: zstd .* 1 to 19",
        ),
        ({"layer_workers": "-1"}, {}, r"layer_workers.*0 or more"),
        ({"layer_compression_level": "fast"}, {}, r"layer_compression_level.*'fast'"),
    ],
)
def test_layer_compression_options_are_checked(
    cli: dict[str, str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(cli, environ)


def test_access_log_is_a_boolean() -> None:
    assert load_config({}, {}).access_log is True
    assert load_config({}, {"NIXERYD_ACCESS_LOG": "off"}).access_log is False
    assert load_config({"access_log": "Yes"}, {"NIXERYD_ACCESS_LOG": "0"}).access_log is True
    with pytest.raises(ConfigError, match="must be true or false"):
        load_config({}, {"NIXERYD_ACCESS_LOG": "sometimes"})


def test_nixpkgs_configuration_is_left_to_nixpkgs_unless_set() -> None:
    assert load_config({}, {}).nixpkgs_config is None
    assert load_config({}, {}).nixpkgs_overlays == ()


def test_nixpkgs_configuration_from_each_source(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.nix"
    overlay.write_text("final: prev: { }\n")
    site_config = tmp_path / "config.nix"
    site_config.write_text("{ }\n")
    file = tmp_path / "nixeryd.toml"
    file.write_text(
        "allow_broken = true\n"
        'permitted_insecure_packages = ["openssl-1.1.1w", "olm-3.2.16"]\n'
        f'nixpkgs_overlays = ["{overlay}"]\n'
    )
    config = load_config(
        {"allow_insecure": "false"},
        {"NIXERYD_ALLOW_UNFREE": "1", "NIXERYD_NIXPKGS_CONFIG": str(site_config)},
        file,
    )
    assert config.nixpkgs_config == {
        "configFile": str(site_config),
        "allowUnfree": True,
        "allowBroken": True,
        "allowInsecure": False,
        "permittedInsecurePackages": ["openssl-1.1.1w", "olm-3.2.16"],
    }
    assert config.nixpkgs_overlays == (str(overlay),)


def test_a_missing_overlay_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"NIXERYD_NIXPKGS_OVERLAYS.*no such Nix file"):
        load_config({}, {"NIXERYD_NIXPKGS_OVERLAYS": f"{tmp_path}/absent.nix"})


def test_git_refs_ttl_defaults_to_30_seconds_and_may_be_0(tmp_path: Path) -> None:
    assert load_config({}, {}).git_refs_ttl == 30.0
    assert load_config({}, {"NIXERYD_GIT_REFS_TTL": "0"}).git_refs_ttl == 0.0
    file = tmp_path / "nixeryd.toml"
    file.write_text("git_refs_ttl = 5\n")
    assert load_config({"git_refs_ttl": "7"}, {}, file).git_refs_ttl == 7.0
    assert load_config({}, {}, file).git_refs_ttl == 5.0
    with pytest.raises(ConfigError, match=r"NIXERYD_GIT_REFS_TTL"):
        load_config({}, {"NIXERYD_GIT_REFS_TTL": "-1"})
