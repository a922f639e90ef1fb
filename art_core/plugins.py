"""Plugin discovery: one pluggy ``PluginManager("art")`` fed by the ``art`` entry-point group, loaded lazily.

``ART_LOAD_PLUGINS=a,b`` restricts which entry points load (by entry-point or distribution name; empty loads
none). Pluggy's results are untyped, so typed code imports backend classes directly; discovery serves tooling,
config-driven code and the conformance runner.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
import warnings
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


@dataclass(frozen=True)
class PluginFailure:
    """An entry point that could not be imported (the rest of the plugins still load)."""

    name: str
    distribution: str | None
    error: str


_failures: list[PluginFailure] = []


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    raw = os.environ.get("ART_LOAD_PLUGINS")
    allow = None if raw is None else {name.strip() for name in raw.split(",") if name.strip()}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist.name if entry_point.dist is not None else None
        if allow is not None and entry_point.name not in allow and dist not in allow:
            continue
        try:
            manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=entry_point.name)
        except Exception as error:  # one broken plugin must not take the others down; it is reported instead
            failure = PluginFailure(entry_point.name, dist, f"{type(error).__name__}: {error}")
            _failures.append(failure)
            warnings.warn(
                f"art plugin {entry_point.name!r} ({dist}) failed to load: {failure.error}",
                RuntimeWarning,
                stacklevel=2,
            )


def plugin_failures() -> list[PluginFailure]:
    """Entry points that failed to import during loading."""
    get_plugin_manager()
    return list(_failures)


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
        _failures.clear()


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

        def register(
            name: str,
            obj: Any,
            _plugin: str = impl.plugin_name,
            _dist: str | None = dist_name,
            _version: str | None = version,
        ) -> None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"plugin {_plugin} registered {obj!r} under an empty or non-string name")
            entry = PluginEntry(name, obj, _plugin, _dist, _version)
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
