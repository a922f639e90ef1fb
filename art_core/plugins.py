"""Plugin discovery: one pluggy ``PluginManager("art")`` fed by the ``art`` entry-point group, loaded lazily.

``ART_LOAD_PLUGINS=a,b`` restricts which entry points load (by entry-point or distribution name; empty loads
none). Pluggy's results are untyped, so typed code imports backend classes directly; discovery serves tooling,
config-driven code and the conformance runner.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

from art_core import hookspecs

ENTRY_POINT_GROUP = "art"
# Backends we ship as separate distributions, for an install hint when one is asked for but missing.
KNOWN_BACKENDS = {"local": "art-local", "serverless": "art-serverless", "tinker": "art-tinker"}

_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None


@dataclass(frozen=True)
class PluginEntry:
    """Something a plugin registered: a backend class or a reporter factory, and where it came from."""

    name: str
    obj: Any
    plugin: str
    distribution: str | None
    version: str | None

    @property
    def class_path(self) -> str:
        return f"{getattr(self.obj, '__module__', '?')}.{getattr(self.obj, '__qualname__', repr(self.obj))}"


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    raw = os.environ.get("ART_LOAD_PLUGINS")
    if raw is None:
        manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        return
    allow = {name.strip() for name in raw.split(",") if name.strip()}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist.name if entry_point.dist is not None else None
        if entry_point.name in allow or dist in allow:
            manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=entry_point.name)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created and loaded on first use."""
    global _manager
    with _lock:
        if _manager is None:
            manager = pluggy.PluginManager("art")
            manager.add_hookspecs(hookspecs)
            from art_core import builtin_plugin

            manager.register(builtin_plugin, name="art_core.builtin")
            _load_entry_points(manager)
            manager.check_pending()
            _manager = manager
        return _manager


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register an in-process plugin (tests, notebooks); a misspelled hook fails here, loudly."""
    manager = get_plugin_manager()
    registered = manager.register(plugin, name=name)
    if registered is None:
        raise ValueError(f"plugin {name or plugin!r} is already registered or blocked")
    try:
        manager.check_pending()
    except pluggy.PluginValidationError:
        manager.unregister(plugin)
        raise
    return registered


def unregister_plugin(plugin: object | None = None, name: str | None = None) -> None:
    """Remove a plugin registered with ``register_plugin``."""
    get_plugin_manager().unregister(plugin, name=name)


def reset_plugin_manager() -> None:
    """Forget the loaded plugins; the next use loads entry points again (for tests and ART_LOAD_PLUGINS)."""
    global _manager
    with _lock:
        _manager = None


def _collect(hook_name: str) -> list[PluginEntry]:
    manager = get_plugin_manager()
    distinfo = {id(plugin): dist for plugin, dist in manager.list_plugin_distinfo()}
    entries: list[PluginEntry] = []
    seen: dict[str, PluginEntry] = {}
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        dist = distinfo.get(id(impl.plugin))
        dist_name = dist.project_name if dist is not None else None
        version = dist.version if dist is not None else getattr(impl.plugin, "__version__", None)
        if impl.plugin_name == "art_core.builtin":
            from art_core import __version__

            dist_name, version = "art-core", __version__

        def register(name: str, obj: Any, _plugin: str = impl.plugin_name) -> None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"plugin {_plugin} registered {obj!r} under an empty or non-string name")
            entry = PluginEntry(name, obj, _plugin, dist_name, version)
            if name in seen:
                raise ValueError(
                    f"{hook_name}: {name!r} is registered twice, by {seen[name].plugin} and by {_plugin}; "
                    "uninstall one or restrict loading with ART_LOAD_PLUGINS"
                )
            seen[name] = entry
            entries.append(entry)

        impl.function(register=register)
    return sorted(entries, key=lambda entry: entry.name)


def list_backends() -> list[PluginEntry]:
    """Installed backends: name, class (``class_path``), distribution and version."""
    return _collect("art_register_backends")


def list_reporters() -> list[PluginEntry]:
    """Installed metric reporters."""
    return _collect("art_register_reporters")


def get_backend_class(name: str) -> type[Any]:
    """The backend class registered as ``name``; a known-but-missing name says which package to install."""
    backends = {entry.name: entry for entry in list_backends()}
    if name in backends:
        return backends[name].obj  # type: ignore[no-any-return]
    if name in KNOWN_BACKENDS:
        raise LookupError(f"backend {name!r} is not installed; pip install {KNOWN_BACKENDS[name]}")
    available = ", ".join(sorted(backends)) or "none"
    raise LookupError(f"unknown backend {name!r}; installed: {available}")


def load_backend(name: str, **kwargs: Any) -> Any:
    """Instantiate the backend registered as ``name`` with ``kwargs``."""
    return get_backend_class(name)(**kwargs)


def get_reporter_factory(name: str) -> Callable[[Any], Any]:
    """The factory of the reporter registered as ``name``."""
    reporters = {entry.name: entry for entry in list_reporters()}
    if name not in reporters:
        available = ", ".join(sorted(reporters)) or "none"
        raise ValueError(f"unknown reporter {name!r} in report_metrics; available: {available}")
    return reporters[name].obj  # type: ignore[no-any-return]
