"""Plugin discovery: one pluggy ``PluginManager("art")`` fed by the ``art`` entry-point group, loaded lazily.

``ART_LOAD_PLUGINS=a,b`` restricts which entry points load (by entry-point or distribution name; empty loads
none). A broken plugin (an import error, a misspelled hook, a hook that raises) is skipped with a warning that
names it, its distribution and the fix; the others and every ``art`` command keep working, and
``plugin_failures()`` (``art backends``) lists it. Pluggy's results are untyped, so typed code imports backend classes directly; discovery serves tooling,
config-driven code and the conformance runner.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

from art_core import hookspecs
from art_core.version import __version__

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
    """A plugin that could not be used, or a problem in one: the rest of the plugins still load.

    ``broken`` plugins were skipped entirely (an import error, an unknown hook, a hook that raised); the others
    loaded with a warning (a function that looks like a hook but lacks ``@hookimpl``).
    """

    name: str
    distribution: str | None
    error: str
    fix: str
    broken: bool = True

    def message(self) -> str:
        state = "is broken and was skipped" if self.broken else "loaded with a problem"
        return f"art plugin {self.name!r} (distribution {self.distribution or 'unknown'}) {state}: {self.error}. Fix: {self.fix}"


_failures: list[PluginFailure] = []
# plugin name -> (distribution, version) of the entry points loaded
_distributions: dict[str, tuple[str | None, str | None]] = {}
HOOK_NAMES = sorted(name for name in vars(hookspecs) if name.startswith("art_"))


def _report(failure: PluginFailure) -> None:
    _failures.append(failure)
    warnings.warn(failure.message(), RuntimeWarning, stacklevel=3)


def _hook_fix(name: str, module: str) -> str:
    close = difflib.get_close_matches(name, HOOK_NAMES, n=1)
    if close:
        return f"rename {name} to {close[0]} in {module}"
    return f"remove {name} from {module}, or implement one of the hooks {', '.join(HOOK_NAMES)}"


def hook_problems(
    manager: pluggy.PluginManager, plugin: object, name: str, dist: str | None
) -> list[PluginFailure]:
    """Unknown hook names (broken) and ``art_*`` functions without ``@hookimpl`` (a warning) of one plugin."""
    module = getattr(plugin, "__name__", type(plugin).__name__)
    problems = []
    for caller in manager.get_hookcallers(plugin) or []:
        if caller.spec is None:
            problems.append(
                PluginFailure(
                    name, dist, f"{caller.name} is not a hook art knows", _hook_fix(caller.name, module)
                )
            )
    for attribute in dir(plugin):
        if not attribute.startswith("art_") or not callable(getattr(plugin, attribute, None)):
            continue
        if manager.parse_hookimpl_opts(plugin, attribute) is None:
            fix = f"decorate {module}.{attribute} with @art_core.hookimpl"
            if attribute not in HOOK_NAMES:
                fix += f" and {_hook_fix(attribute, module)}"
            problems.append(
                PluginFailure(
                    name, dist, f"{attribute} looks like a hook but lacks @hookimpl", fix, broken=False
                )
            )
    return problems


def _load_entry_point(manager: pluggy.PluginManager, entry_point: importlib.metadata.EntryPoint) -> None:
    dist = entry_point.dist.name if entry_point.dist is not None else None
    version = entry_point.dist.version if entry_point.dist is not None else None
    if manager.get_plugin(entry_point.name) is not None or manager.is_blocked(entry_point.name):
        return
    try:
        plugin = entry_point.load()
    except Exception as error:  # one broken plugin must not take the others down; it is reported instead
        fix = f"reinstall or upgrade {dist or entry_point.value}, or uninstall it; ART_LOAD_PLUGINS=<other names> skips it"
        _report(
            PluginFailure(
                entry_point.name,
                dist,
                f"importing {entry_point.value} failed: {type(error).__name__}: {error}",
                fix,
            )
        )
        return
    try:
        manager.register(plugin, name=entry_point.name)
    except pluggy.PluginValidationError as error:
        _report(
            PluginFailure(
                entry_point.name, dist, str(error), f"fix the hook's arguments in {entry_point.value}"
            )
        )
        return
    problems = hook_problems(manager, plugin, entry_point.name, dist)
    for problem in problems:
        _report(problem)
    if any(problem.broken for problem in problems):
        manager.unregister(plugin)
        return
    _distributions[entry_point.name] = (dist, version)


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    raw = os.environ.get("ART_LOAD_PLUGINS")
    allow = None if raw is None else {name.strip() for name in raw.split(",") if name.strip()}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist.name if entry_point.dist is not None else None
        if allow is not None and entry_point.name not in allow and dist not in allow:
            continue
        _load_entry_point(manager, entry_point)


def plugin_failures() -> list[PluginFailure]:
    """Plugins that were skipped as broken, and problems in the ones that loaded."""
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
        _distributions.clear()


def _collect(hook_name: str) -> list[PluginEntry]:
    manager = get_plugin_manager()
    entries: list[PluginEntry] = []
    seen: dict[str, PluginEntry] = {}
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        dist_name, version = _distributions.get(
            impl.plugin_name, (None, getattr(impl.plugin, "__version__", None))
        )
        if impl.plugin_name == "art_core.builtin":
            dist_name, version = "art-core", __version__
        found: list[PluginEntry] = []

        def register(
            name: str,
            obj: Any,
            _plugin: str = impl.plugin_name,
            _dist: str | None = dist_name,
            _version: str | None = version,
            _found: list[PluginEntry] = found,
        ) -> None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"plugin {_plugin} registered {obj!r} under an empty or non-string name")
            _found.append(PluginEntry(name, obj, _plugin, _dist, _version))

        try:
            impl.function(register=register)
        except Exception as error:  # a hook that raises breaks its own plugin only
            with _lock:
                if not any(f.name == impl.plugin_name and f.broken for f in _failures):
                    _report(
                        PluginFailure(
                            impl.plugin_name,
                            dist_name,
                            f"{hook_name} raised {type(error).__name__}: {error}",
                            f"fix {hook_name} in {getattr(impl.plugin, '__name__', impl.plugin_name)}",
                        )
                    )
            continue
        for entry in found:
            if entry.name in seen:
                raise ValueError(
                    f"{hook_name}: {entry.name!r} is registered twice, by {seen[entry.name].plugin} and by "
                    f"{entry.plugin}; uninstall one or restrict loading with ART_LOAD_PLUGINS"
                )
            seen[entry.name] = entry
            entries.append(entry)
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
