"""Provider settings: the [plugin.<name>] table, environment variables, secret indirection."""

from __future__ import annotations

from pathlib import Path

import pytest

from nixeryd.config import ConfigError
from nixeryd.settings import Setting, parse_boolean, parse_duration, resolve

BUCKET = Setting("bucket", "the bucket", ("S3_BUCKET",), required=True)
SECRET = Setting("secret_key", "the secret key", ("S3_SECRET_KEY",), secret=True)
EXPIRY = Setting("link_expiration", "link lifetime", ("S3_LINK_EXPIRATION",), parse_duration, 300.0)
SETTINGS = (BUCKET, SECRET, EXPIRY)


def test_the_table_wins_over_the_environment_and_defaults_fill_the_rest() -> None:
    settings = resolve("s3", SETTINGS, {"bucket": "from-file"}, {"S3_BUCKET": "from-env"})
    assert settings == {"bucket": "from-file", "secret_key": None, "link_expiration": 300.0}


def test_nixery_variables_set_what_the_table_does_not() -> None:
    environ = {"S3_BUCKET": "images", "S3_LINK_EXPIRATION": "1h30m"}
    settings = resolve("s3", SETTINGS, {}, environ)
    assert settings["bucket"] == "images"
    assert settings["link_expiration"] == 5400.0


def test_secrets_come_from_a_file_or_another_variable(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("s3cr3t\n")
    from_file = resolve("s3", SETTINGS, {"bucket": "b", "secret_key": {"file": str(secret)}}, {})
    assert from_file["secret_key"] == "s3cr3t"
    from_env = resolve("s3", SETTINGS, {"bucket": "b", "secret_key": {"env": "K"}}, {"K": "k2"})
    assert from_env["secret_key"] == "k2"
    via_file_variable = resolve(
        "s3", SETTINGS, {"bucket": "b"}, {"S3_SECRET_KEY_FILE": str(secret)}
    )
    assert via_file_variable["secret_key"] == "s3cr3t"


def test_unknown_keys_and_missing_required_settings_name_what_to_fix() -> None:
    with pytest.raises(ConfigError, match=r"\[plugin.s3\]: unknown key bukket; s3 reads: bucket"):
        resolve("s3", SETTINGS, {"bukket": "x"}, {})
    with pytest.raises(
        ConfigError, match=r"s3 needs the bucket: set bucket in \[plugin.s3\] or \$S3_BUCKET"
    ):
        resolve("s3", SETTINGS, {}, {})


def test_a_bad_secret_is_reported_without_its_value() -> None:
    picky = Setting("token", "a token", ("TOKEN",), parse_duration, secret=True)
    with pytest.raises(ConfigError) as caught:
        resolve("x", (picky,), {}, {"TOKEN": "hunter2"})
    assert "hunter2" not in str(caught.value)
    assert "(secret)" in str(caught.value)


def test_missing_secret_files_and_variables_are_start_up_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        resolve("s3", SETTINGS, {"bucket": "b", "secret_key": {"file": str(tmp_path / "no")}}, {})
    with pytest.raises(ConfigError, match="environment variable NOPE is not set"):
        resolve("s3", SETTINGS, {"bucket": "b", "secret_key": {"env": "NOPE"}}, {})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300.0), ("90s", 90.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("20", 20.0)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "-5m", "0s", "m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_booleans_from_toml_arrive_as_text() -> None:
    flag = Setting("path_style", "path-style URLs", ("S3_USE_PATH_STYLE",), parse_boolean, False)
    assert resolve("s3", (flag,), {"path_style": True}, {}) == {"path_style": True}
    assert resolve("s3", (flag,), {}, {"S3_USE_PATH_STYLE": "true"}) == {"path_style": True}
