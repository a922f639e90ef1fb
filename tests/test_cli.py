"""The art CLI: version, backends, history (table and plot)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import art_core as art
from art_core import plugins
from art_core.cli import build_cli


@pytest.fixture(autouse=True)
def only_core_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("ART_LOAD_PLUGINS", "")
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()


def run(*args: str) -> str:
    result = CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_version_through_the_console_script() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "art"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "ART_LOAD_PLUGINS": ""},
    ).stdout
    assert out.strip() == f"art, version {art.__version__}"


def test_backends_lists_backends_and_reporters() -> None:
    out = run("backends")
    assert "reporter  wandb" in out and "art-core" in out


async def _write_history(base_path: str) -> art.Model:
    m = art.Model(name="m", project="p", base_path=base_path, report_metrics=[])
    for step in range(6):
        await m.log(metrics={"reward": step / 10, "loss/train": 1 - step / 10}, step=step)
        if step % 2 == 0:
            await m.log(metrics={"reward": step / 8}, split="val", step=step)
    return m


async def test_history_table_and_plot(base_path: str, tmp_path: Path) -> None:
    m = await _write_history(base_path)
    out = run("history", str(m.output_dir()))
    assert "6 steps (0–5)" in out
    header = out.splitlines()[1].split()
    assert header == ["step", "train/reward", "val/reward", "loss/train"]
    assert out.splitlines()[-1].split() == ["5", "0.5", "0.5"]
    png = tmp_path / "curves.png"
    run(
        "history",
        str(m.output_dir() / "history.jsonl"),
        "--plot",
        str(png),
        "--last",
        "2",
        "-m",
        "train/reward",
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_history_errors_are_clear(tmp_path: Path) -> None:
    result = CliRunner().invoke(build_cli(), ["history", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output


async def test_unknown_metric_lists_known_ones(base_path: str) -> None:
    m = await _write_history(base_path)
    result = CliRunner().invoke(build_cli(), ["history", str(m.output_dir()), "-m", "nope"])
    assert result.exit_code == 2 and "no metric nope" in result.output and "train/reward" in result.output


@pytest.mark.parametrize("args", [["--help"], ["history", "--help"]])
def test_help(args: list[str]) -> None:
    assert "Usage" in run(*args)


def test_backends_check_runs_the_quick_checks() -> None:
    out = run("backends", "--check")
    assert "strict" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("strict ")]
    assert rows and all("pass" in row for row in rows), out


def test_backends_check_fails_on_a_backend_with_kwargs() -> None:
    from art_core.testing.strict import StrictBackend

    class Sloppy(StrictBackend):
        async def train(self, model, trajectory_groups, **kwargs):  # type: ignore[no-untyped-def, override]
            raise AssertionError

    class SloppyPlugin:
        @art.hookimpl
        def art_register_backends(self, register):  # type: ignore[no-untyped-def]
            register("sloppy", Sloppy)

    plugins.register_plugin(SloppyPlugin(), name="sloppy")
    result = CliRunner().invoke(build_cli(), ["backends", "--check"])
    assert result.exit_code == 1
    assert "takes **kwargs" in result.output and "lacks the common option learning_rate" in result.output
