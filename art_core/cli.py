"""The ``art`` command line: ``art --version``, ``art backends``, ``art history``, plus plugins' commands."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from art_core.version import __version__

DEFAULT_HISTORY_COLUMNS = ("train/reward", "val/reward", "loss/train", "train/exception_rate")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="art")
def cli() -> None:
    """Train LLM agents with reinforcement learning."""


@cli.command()
@click.option(
    "--check", is_flag=True, help="Run the conformance kit's quick (no-training) checks on each backend."
)
def backends(check: bool) -> None:
    """List installed backends and metric reporters, with their distributions and versions, and broken plugins."""
    from art_core.plugins import list_backends, list_reporters, plugin_failures

    rows = [
        ("backend", e.name, e.distribution or "-", e.version or "-", e.class_path) for e in list_backends()
    ]
    rows += [
        ("reporter", e.name, e.distribution or "-", e.version or "-", e.class_path) for e in list_reporters()
    ]
    failures = plugin_failures()
    rows += [
        ("broken" if f.broken else "warning", f.name, f.distribution or "-", "-", f"{f.error}. Fix: {f.fix}")
        for f in failures
    ]
    click.echo(format_table(("kind", "name", "distribution", "version", "class"), rows))
    if check:
        from art_core.testing.quick import run_quick_checks

        results = run_quick_checks()
        results += [(f.name, "plugin loads", "fail", f.error) for f in failures if f.broken]
        click.echo()
        click.echo(format_table(("backend", "check", "result", "detail"), results))
        if any(row[2] != "pass" for row in results):
            sys.exit(1)


def resolve_history_path(path: Path) -> Path:
    """Accept a ``history.jsonl`` file or a model directory that contains one."""
    if path.is_dir():
        path = path / "history.jsonl"
    if not path.exists():
        raise click.BadParameter(
            f"{path} does not exist; pass a history.jsonl or a model directory", param_hint="PATH"
        )
    return path


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def history_by_step(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Merge records per step (several ``log`` calls share a step); numeric values only, later lines win."""
    merged: dict[int, dict[str, float]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int):
            continue
        row = merged.setdefault(step, {})
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                row[key] = float(value)
    return dict(sorted(merged.items()))


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--metrics", "-m", default=None, help="Comma-separated metric keys to show (default: rewards and loss)."
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write reward curves to this PNG.",
)
@click.option("--last", type=int, default=None, help="Only show the last N steps.")
def history(path: Path, metrics: str | None, plot_path: Path | None, last: int | None) -> None:
    """Summarise a model's history.jsonl (a file or the model directory) and optionally plot reward curves."""
    from art_core.history import read_history

    history_path = resolve_history_path(path)
    by_step = history_by_step(read_history(history_path))
    if not by_step:
        click.echo(f"{history_path}: no records")
        return
    keys = sorted({key for row in by_step.values() for key in row})
    wanted = (
        [m.strip() for m in metrics.split(",")]
        if metrics
        else [k for k in DEFAULT_HISTORY_COLUMNS if k in keys]
    )
    unknown = [m for m in wanted if m not in keys]
    if unknown:
        raise click.BadParameter(
            f"no metric {', '.join(unknown)} in {history_path}; known: {', '.join(keys)}"
        )
    steps = list(by_step)[-last:] if last else list(by_step)
    click.echo(f"{history_path}: {len(by_step)} steps ({min(by_step)}–{max(by_step)}), {len(keys)} metrics")
    click.echo(format_table(("step", *wanted), [(s, *(by_step[s].get(k) for k in wanted)) for s in steps]))
    if plot_path is not None:
        plot_rewards(by_step, plot_path, title=str(history_path.parent.name))
        click.echo(f"wrote {plot_path}")


def plot_rewards(by_step: dict[int, dict[str, float]], out: Path, *, title: str = "") -> None:
    """Draw every ``*/reward`` series against the step into a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise click.ClickException("plotting needs matplotlib: pip install 'art-core[plot]'") from error
    series = sorted({key for row in by_step.values() for key in row if key.endswith("reward")})
    if not series:
        raise click.ClickException("no reward metric to plot (keys ending in 'reward')")
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    for key in series:
        points = [(step, row[key]) for step, row in by_step.items() if key in row]
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=key)
    axes.set_xlabel("step")
    axes.set_ylabel("reward")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)


def build_cli() -> click.Group:
    """The ``art`` group with every plugin's commands added."""
    import warnings

    from art_core.plugins import get_plugin_manager

    for impl in get_plugin_manager().hook.art_register_commands.get_hookimpls():
        try:
            impl.function(cli=cli)
        except Exception as error:  # a broken plugin must not take the whole CLI down
            warnings.warn(
                f"art plugin {impl.plugin_name!r} failed to add its commands: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
    return cli


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    build_cli().main(args=list(argv) if argv is not None else None, prog_name="art")
