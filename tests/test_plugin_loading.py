"""Loading entry points survives a broken plugin: real distributions on sys.path, real pluggy, the real CLI.

Each test installs small distributions (a ``*.dist-info`` with an ``entry_points.txt`` and a module) into a
temporary directory on ``sys.path``, which is all ``importlib.metadata`` needs to find them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import art_core as art
from art_core import plugins

GOOD = """
from art_core import hookimpl


@hookimpl
def art_register_backends(register):
    from art_core.testing import StrictBackend

    register("good-strict", StrictBackend)
"""
PLUGINS = {
    "good": ("art-good", GOOD),
    "broken": ("art-broken", "import not_a_module_anyone_has\n"),
    "typo": ("art-typo", GOOD.replace("def art_register_backends(", "def art_register_backend(")),
    "undecorated": ("art-undecorated", GOOD.replace("@hookimpl\n", "")),
    "raising": (
        "art-raising",
        GOOD.replace("    from art_core", '    raise RuntimeError("no licence")\n    from art_core'),
    ),
}


def install(directory: Path, name: str, distribution: str, source: str) -> None:
    module = f"artplug_{name}"
    (directory / f"{module}.py").write_text(textwrap.dedent(source))
    info = directory / f"{distribution.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[art]\n{name} = {module}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name, (distribution, source) in PLUGINS.items():
        install(tmp_path, name, distribution, source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ART_LOAD_PLUGINS", ",".join(PLUGINS))
    plugins.reset_plugin_manager()
    yield tmp_path
    plugins.reset_plugin_manager()
    for name in PLUGINS:
        sys.modules.pop(f"artplug_{name}", None)


def failures_by_name() -> dict[str, plugins.PluginFailure]:
    return {failure.name: failure for failure in plugins.plugin_failures()}


def test_the_good_plugin_loads_beside_broken_ones(site: Path) -> None:
    with pytest.warns(RuntimeWarning) as caught:
        backends = {entry.name: entry for entry in art.list_backends()}
    assert backends["good-strict"].distribution == "art-good" and backends["good-strict"].version == "1.0"
    assert isinstance(art.load_backend("good-strict"), art.TrainableBackend)
    messages = "\n".join(str(w.message) for w in caught)
    for name in ("broken", "typo", "undecorated", "raising"):
        assert f"art plugin {name!r} (distribution art-{name})" in messages


def test_an_import_error_names_the_plugin_its_distribution_and_the_fix(site: Path) -> None:
    with pytest.warns(RuntimeWarning):
        failure = failures_by_name()["broken"]
    assert failure.broken and failure.distribution == "art-broken"
    assert "ModuleNotFoundError" in failure.error and "not_a_module_anyone_has" in failure.error
    assert "reinstall or upgrade art-broken, or uninstall it" in failure.fix


def test_a_misspelled_hook_skips_its_plugin_and_says_the_right_name(site: Path) -> None:
    with pytest.warns(RuntimeWarning):
        failure = failures_by_name()["typo"]
    assert failure.broken and "art_register_backend is not a hook art knows" in failure.error
    assert failure.fix == "rename art_register_backend to art_register_backends in artplug_typo"
    assert plugins.get_plugin_manager().get_plugin("typo") is None


def test_a_hook_without_hookimpl_is_reported_not_silently_absent(site: Path) -> None:
    with pytest.warns(RuntimeWarning) as caught:
        failure = failures_by_name()["undecorated"]
    assert any("looks like a hook but lacks @hookimpl" in str(w.message) for w in caught)
    assert not failure.broken
    assert failure.fix == "decorate artplug_undecorated.art_register_backends with @art_core.hookimpl"


def test_a_hook_that_raises_breaks_only_its_plugin(site: Path) -> None:
    with pytest.warns(RuntimeWarning):
        names = [entry.name for entry in art.list_backends()]
        failure = failures_by_name()["raising"]
    assert names.count("good-strict") == 1  # the raising plugin registers the same name; it is skipped
    assert failure.broken and "art_register_backends raised RuntimeError: no licence" in failure.error


def run_art(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site), "ART_LOAD_PLUGINS": ",".join(PLUGINS)}
    art_script = Path(sys.executable).parent / "art"
    return subprocess.run([str(art_script), *args], capture_output=True, text=True, env=env, timeout=120)


def test_every_art_command_still_works_and_backends_lists_the_broken(site: Path) -> None:
    helped = run_art(site, "--help")
    assert helped.returncode == 0 and "backends" in helped.stdout, helped.stderr
    assert "art plugin 'typo' (distribution art-typo) is broken and was skipped" in helped.stderr
    listed = run_art(site, "backends")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[1]: line for line in listed.stdout.splitlines()[2:] if line.strip()}
    assert rows["good-strict"].startswith("backend")
    assert rows["broken"].startswith("broken") and "art-broken" in rows["broken"]
    assert "Fix: rename art_register_backend to art_register_backends" in rows["typo"]
    assert rows["undecorated"].startswith("warning")
    checked = run_art(site, "backends", "--check")
    assert checked.returncode == 1 and "plugin loads" in checked.stdout
