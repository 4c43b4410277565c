from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from nixeryd import hookimpl
from nixeryd.config import Config, ConfigError
from nixeryd.plugins import Plugins, builtin_plugins, make_plugin_manager
from nixeryd.runtime import Provider, Runtime
from nixeryd.testing.harness import RegistryFactory


def test_builtins_are_plugins() -> None:
    plugins = Plugins(make_plugin_manager(load_entrypoints=False))
    assert plugins.storage_backend("filesystem").name == "filesystem"
    for source in ("path", "git", "channel"):
        assert plugins.package_source(source).name == source
    assert plugins.layering_strategy("popularity").name == "popularity"


def test_an_unknown_name_lists_what_is_available() -> None:
    plugins = Plugins(make_plugin_manager(load_entrypoints=False))
    with pytest.raises(ConfigError) as raised:
        plugins.storage_backend("s4")
    assert "unknown storage backend 's4'" in str(raised.value)
    assert "filesystem (" in str(raised.value)


def test_site_plugins_add_providers_and_see_events(tmp_path: Any) -> None:
    seen: list[tuple[str, str]] = []

    class SitePlugin:
        @hookimpl
        def nixeryd_package_sources(self) -> list[Provider[Any]]:
            return [Provider("site", "our packages", lambda runtime: runtime.config.plugin_options)]

        @hookimpl
        def nixeryd_image_built(self, image: str, tag: str, digest: str, seconds: float) -> None:
            seen.append((image, digest))

    plugins = Plugins(
        make_plugin_manager(plugins=[*builtin_plugins(), SitePlugin()], load_entrypoints=False)
    )
    config = Config(plugin_options={"site": {"x": 1}})
    runtime = Runtime(config, Clock(), object(), object(), lambda work: work())  # type: ignore[arg-type]
    assert plugins.package_source("site").create(runtime) == {"site": {"x": 1}}
    plugins.image_built("amd64:hello", "latest", "sha256:x", 1.0)
    assert seen == [("amd64:hello", "sha256:x")]


def test_plugins_hear_of_gc_runs_and_one_failing_does_not_stop_the_others() -> None:
    seen: list[tuple[str, int, int]] = []

    class Failing:
        @hookimpl
        def nixeryd_gc_finished(
            self, result: str, blobs_deleted: int, bytes_deleted: int, seconds: float
        ) -> None:
            raise RuntimeError("counter unavailable")

    class Counting:
        @hookimpl
        def nixeryd_gc_finished(
            self, result: str, blobs_deleted: int, bytes_deleted: int, seconds: float
        ) -> None:
            seen.append((result, blobs_deleted, bytes_deleted))

    plugins = Plugins(make_plugin_manager(plugins=[Failing(), Counting()], load_entrypoints=False))
    with capturedLogs() as events:
        plugins.gc_finished("completed", 3, 4096, 0.5)
    assert seen == [("completed", 3, 4096)]
    [error] = [event for event in events if event["log_level"] == LogLevel.error]
    assert "nixeryd_gc_finished: RuntimeError: counter unavailable" in formatEvent(error)


def test_entry_point_plugins_load() -> None:
    """The example plugin in plugins/ is installed by scripts/setup through its entry point."""
    plugins = Plugins(make_plugin_manager())
    assert plugins.layering_strategy("single-layer").name == "single-layer"


def test_two_plugins_offering_one_name_is_a_start_up_error() -> None:
    class First:
        @hookimpl
        def nixeryd_storage_backends(self) -> list[Provider[Any]]:
            return [Provider("shared", "first store", lambda runtime: None)]

    class Second:
        @hookimpl
        def nixeryd_storage_backends(self) -> list[Provider[Any]]:
            return [Provider("shared", "second store", lambda runtime: None)]

    plugins = Plugins(make_plugin_manager(plugins=[First(), Second()], load_entrypoints=False))
    with pytest.raises(ConfigError, match="two plugins offer a storage backend called 'shared'"):
        plugins.storage_backend("other")


def test_a_table_no_selected_provider_reads_is_warned_about(
    registry_with: RegistryFactory,
) -> None:
    with capturedLogs() as events:
        registry_with(plugin_options={"filesystem": {}, "s3x": {"bucket": "b"}})
    warnings = [formatEvent(event) for event in events if event["log_level"] == LogLevel.warn]
    assert warnings == ["[plugin.s3x]: no selected provider is called s3x; ignored"]


def test_an_event_plugin_that_raises_is_logged_once_and_the_others_are_told() -> None:
    seen: list[str] = []

    class Failing:
        @hookimpl
        def nixeryd_image_built(self, image: str, tag: str, digest: str, seconds: float) -> None:
            raise RuntimeError("webhook unreachable")

    class Listening:
        @hookimpl
        def nixeryd_image_built(self, image: str, tag: str, digest: str, seconds: float) -> None:
            seen.append(digest)

    plugins = Plugins(make_plugin_manager(plugins=[Failing(), Listening()], load_entrypoints=False))
    with capturedLogs() as events:
        plugins.image_built("amd64:hello", "latest", "sha256:x", 1.0)
    assert seen == ["sha256:x"]
    errors = [event for event in events if event.get("log_level") == LogLevel.error]
    assert len(errors) == 1
    message = formatEvent(errors[0])
    assert "nixeryd_image_built" in message and "webhook unreachable" in message
    assert "log_failure" not in errors[0]  # a line, not a traceback
