"""Plugins and the example reach art_core only through its documented surface.

That surface is ``art_core`` itself (``import art_core as art``), ``art_core.plugin_api`` (what a backend builds
on) and the documented subpackages below. A name a plugin takes from anywhere else is an internal that may move:
export it from ``art_core.plugin_api`` and import it from there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import art_core
import art_core.plugin_api

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCES = [
    ROOT / "plugins" / name / name for name in ("art_local", "art_serverless", "art_tinker")
] + [ROOT / "examples" / "third_party_backend" / "art_bigram"]
# Each has its own documented entry: the conformance kit, the judge, the helpers, the reporter and plugin hooks.
DOCUMENTED_PACKAGES = ("art_core.testing", "art_core.rewards", "art_core.utils", "art_core.reporters")
# hookspecs: the plugin hooks; sft: the train_sft() contract, with its own options value and helpers.
DOCUMENTED_MODULES = ("art_core.hookspecs", "art_core.sft")
# history_by_step and plot_rewards are the `art history` command's own pieces, shared with the demo's report.
KNOWN_EXCEPTIONS = {("plugins/art_local/art_local/demo/report.py", "art_core.cli")}


def internal_imports(path: Path) -> list[str]:
    """``module.name`` of each name ``path`` imports from art_core outside the documented surface."""
    found = []
    relative = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("art_core."):
            continue
        module = node.module or ""
        if (
            module == "art_core.plugin_api"
            or module.startswith(tuple(f"{p}." for p in DOCUMENTED_PACKAGES))
            or module in DOCUMENTED_PACKAGES + DOCUMENTED_MODULES
            or (relative, module) in KNOWN_EXCEPTIONS
        ):
            continue
        found += [f"{module}.{a.name}" for a in node.names if a.name not in art_core.__all__]
    return found


def test_plugins_import_art_core_internals_only_through_plugin_api() -> None:
    problems = {
        str(path.relative_to(ROOT)): names
        for source in PLUGIN_SOURCES
        for path in sorted(source.rglob("*.py"))
        if (names := internal_imports(path))
    }
    assert not problems, f"import these from art_core.plugin_api (export them there if missing): {problems}"


def test_plugin_api_exports_resolve_and_are_documented() -> None:
    doc = art_core.plugin_api.__doc__ or ""
    missing = [name for name in art_core.plugin_api.__all__ if not hasattr(art_core.plugin_api, name)]
    undocumented = [
        name for name in art_core.plugin_api.__all__ if f"``{name}``" not in doc and name.isidentifier()
    ]
    assert not missing and not undocumented, (missing, undocumented)


def test_the_checker_flags_an_internal_import(tmp_path: Path) -> None:
    package = tmp_path / "plugin"
    package.mkdir()
    source = package / "module.py"
    source.write_text(
        "from art_core.trajectories import check_groups, TrajectoryGroup\n"
        "from art_core.plugin_api import is_choice\n"
        "from art_core.testing.kit import Kit\n"
    )
    assert internal_imports(source) == ["art_core.trajectories.check_groups"]
