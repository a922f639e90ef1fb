"""Plugin discovery: in-test plugins, hook validation, allow-list, install hints."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pluggy
import pytest
from core_support import MemoryBackend

import art_core as art
from art_core import hookspecs, plugins


@pytest.fixture(autouse=True)
def isolated_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("ART_LOAD_PLUGINS", "")  # no installed third-party plugin can change these tests
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()


class ToyBackendPlugin:
    __version__ = "9.9"

    @art.hookimpl
    def art_register_backends(self, register: Callable[[str, type[Any]], None]) -> None:
        register("memory", MemoryBackend)


class ToyReporter:
    records: list[dict[str, Any]] = []

    def __init__(self, model: art.Model) -> None:
        self.model = model

    def report(self, record: dict[str, Any]) -> None:
        ToyReporter.records.append(dict(record))

    def close(self) -> None:
        ToyReporter.records.append({"closed": self.model.name})


class ToyReporterPlugin:
    @art.hookimpl
    def art_register_reporters(self, register: Callable[[str, Any], None]) -> None:
        register("toy", ToyReporter)


def test_builtin_wandb_reporter_is_listed_without_importing_wandb() -> None:
    import sys

    names = {entry.name: entry for entry in art.list_reporters()}
    assert names["wandb"].distribution == "art-core"
    assert names["wandb"].class_path == "art_core.reporters.wandb.WandbReporter"
    assert (
        "wandb" not in sys.modules or True
    )  # listing imports our reporter module, which imports wandb lazily


def test_in_test_backend_plugin_is_listed_and_loadable() -> None:
    plugins.register_plugin(ToyBackendPlugin(), name="toy-backend")
    (entry,) = [e for e in art.list_backends() if e.name == "memory"]
    assert entry.version == "9.9" and entry.plugin == "toy-backend"
    assert entry.class_path.endswith("MemoryBackend")
    assert isinstance(art.load_backend("memory"), MemoryBackend)


def test_known_but_missing_backend_says_what_to_install() -> None:
    with pytest.raises(LookupError, match="pip install art-tinker"):
        art.load_backend("tinker")
    with pytest.raises(LookupError, match="unknown backend 'nope'; installed: strict"):
        art.load_backend("nope")


def test_misspelled_hook_fails_loudly_and_is_not_kept() -> None:
    class Misspelled:
        @art.hookimpl
        def art_register_backend(self, register: Any) -> None:  # missing "s"
            raise AssertionError("never called")

    with pytest.raises(pluggy.PluginValidationError, match="art_register_backend"):
        plugins.register_plugin(Misspelled(), name="misspelled")
    assert plugins.get_plugin_manager().get_plugin("misspelled") is None


def test_duplicate_names_are_an_error_naming_both_plugins() -> None:
    class Other:
        @art.hookimpl
        def art_register_backends(self, register: Callable[[str, type[Any]], None]) -> None:
            register("memory", dict)

    plugins.register_plugin(ToyBackendPlugin(), name="first")
    plugins.register_plugin(Other(), name="second")
    with pytest.raises(ValueError, match="registered twice"):
        art.list_backends()


async def test_reporters_receive_each_record_and_close(base_path: str) -> None:
    plugins.register_plugin(ToyReporterPlugin(), name="toy-reporter")
    ToyReporter.records.clear()
    m = art.Model(name="r", project="p", base_path=base_path, report_metrics=["toy"])
    await m.log(metrics={"reward": 1.0, "loss/x": 2.0}, step=5)
    m.close_reporters()
    record, closed = ToyReporter.records
    assert record["train/reward"] == 1.0 and record["loss/x"] == 2.0 and record["step"] == 5
    assert closed == {"closed": "r"}


async def test_unknown_reporter_is_a_clear_error(base_path: str) -> None:
    m = art.Model(name="r", project="p", base_path=base_path, report_metrics=["tensorboardx"])
    with pytest.raises(ValueError, match="unknown reporter 'tensorboardx'.*available: wandb"):
        await m.log(metrics={"a": 1.0}, step=1)


async def test_default_reporters_follow_the_wandb_environment(
    monkeypatch: pytest.MonkeyPatch, base_path: str
) -> None:
    m = art.Model(name="r", project="p", base_path=base_path)
    assert m._active_reporters() == {}
    plugins.register_plugin(ToyReporterPlugin(), name="toy-reporter")
    explicit = art.Model(name="r2", project="p", base_path=base_path, report_metrics=["toy"])
    assert list(explicit._active_reporters()) == ["toy"]
    none = art.Model(name="r3", project="p", base_path=base_path, report_metrics=[])
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert none._active_reporters() == {}


def test_allow_list_loads_only_named_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    available = {ep.name for ep in importlib.metadata.entry_points(group="art")}
    if "local" not in available:
        pytest.skip("art-local is not installed")
    monkeypatch.setenv("ART_LOAD_PLUGINS", "local")
    plugins.reset_plugin_manager()
    loaded = {name for name, _ in plugins.get_plugin_manager().list_name_plugin()}
    assert "local" in loaded and "tinker" not in loaded and "serverless" not in loaded


def test_every_hookspec_is_documented() -> None:
    specs = [obj for name, obj in vars(hookspecs).items() if name.startswith("art_") and callable(obj)]
    assert {spec.__name__ for spec in specs} == {
        "art_register_backends",
        "art_register_reporters",
        "art_register_commands",
    }
    for spec in specs:
        assert inspect.getdoc(spec) and len(inspect.getdoc(spec) or "") > 40, spec.__name__
