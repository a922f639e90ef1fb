"""Per-backend train() signatures are enforced by the type checkers: mypy (and pyright when installed).

``tests/typing/positive.py`` must check clean; in ``tests/typing/negative.py`` the line after each
``# expect-error: <mypy code>/<pyright rule> "<text>"`` comment must give exactly that error and no other line
any. mypy shares the repo's ``.mypy_cache`` with ``make typecheck`` (same config), so a warm run takes seconds.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TYPING = ROOT / "tests" / "typing"
POSITIVE, NEGATIVE = TYPING / "positive.py", TYPING / "negative.py"
MARKER = re.compile(r'^\s*# expect-error: (?P<mypy>[\w-]+)/(?P<pyright>\w+) "(?P<text>[^"]+)"\s*$')
MYPY_LINE = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+): error: (?P<message>.*?)  \[(?P<code>[\w-]+)\]$")


@dataclass(frozen=True)
class Diagnostic:
    file: str
    line: int
    code: str
    message: str


@dataclass(frozen=True)
class Expected:
    line: int
    codes: dict[str, str]  # checker → code
    text: str


def expected_errors() -> list[Expected]:
    """The marked lines of negative.py: each marker applies to the next line."""
    lines = NEGATIVE.read_text().splitlines()
    found = []
    for index, line in enumerate(lines):
        match = MARKER.match(line)
        if match:
            found.append(
                Expected(index + 2, {"mypy": match["mypy"], "pyright": match["pyright"]}, match["text"])
            )
    return found


def run_mypy() -> list[Diagnostic]:
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    process = subprocess.run(
        [*command, "--no-error-summary", "--no-pretty", str(POSITIVE), str(NEGATIVE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert process.returncode in (0, 1), f"mypy crashed:\n{process.stdout}\n{process.stderr}"
    found = []
    for line in process.stdout.splitlines():
        match = MYPY_LINE.match(line)
        if match:
            path = str((ROOT / match["file"]).resolve())
            found.append(Diagnostic(path, int(match["line"]), match["code"], match["message"]))
        elif ": error:" in line:
            pytest.fail(f"unparsed mypy error: {line}")
    return found


def run_pyright() -> list[Diagnostic]:
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyright",
            "--outputjson",
            "--pythonpath",
            sys.executable,
            str(POSITIVE),
            str(NEGATIVE),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    try:
        report = json.loads(process.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright did not run:\n{process.stdout}\n{process.stderr}")
    return [
        Diagnostic(
            str(Path(item["file"]).resolve()),
            item["range"]["start"]["line"] + 1,
            item.get("rule", ""),
            item["message"],
        )
        for item in report["generalDiagnostics"]
        if item["severity"] == "error"
    ]


def check(checker: str, diagnostics: list[Diagnostic]) -> None:
    """Exactly the expected errors on the marked lines of negative.py, nothing anywhere else."""
    expected = {item.line: item for item in expected_errors()}
    problems = []
    negative_file = str(NEGATIVE.resolve())
    for item in diagnostics:
        mark = expected.get(item.line) if item.file == negative_file else None
        if mark is None:
            problems.append(f"unexpected: {item.file}:{item.line}: {item.message} [{item.code}]")
        elif item.code != mark.codes[checker] or mark.text not in item.message:
            problems.append(
                f"line {item.line}: got [{item.code}] {item.message!r}; "
                f"expected [{mark.codes[checker]}] with {mark.text!r}"
            )
    negative_lines = [item.line for item in diagnostics if item.file == negative_file]
    for line in expected:
        if negative_lines.count(line) != 1:
            problems.append(f"line {line}: expected exactly one error, got {negative_lines.count(line)}")
    assert not problems, f"{checker}:\n" + "\n".join(problems)


def test_the_negative_file_covers_the_promised_errors() -> None:
    marks = [(item.codes["mypy"], item.text) for item in expected_errors()]
    for option in ("plot_tensors", "logprob_calculation_chunk_size", "deploy_checkpoint"):
        assert ("call-arg", option) in marks
    assert marks.count(("call-arg", "plot_tensors")) == 2  # on ServerlessBackend and through the Protocol
    assert "await backend.train(model, groups, plot_tensors=True)" in NEGATIVE.read_text()


def test_mypy_accepts_the_positive_file_and_reports_exactly_the_marked_errors() -> None:
    check("mypy", run_mypy())


@pytest.mark.skipif(importlib.util.find_spec("pyright") is None, reason="pyright is not installed")
def test_pyright_accepts_the_positive_file_and_reports_exactly_the_marked_errors() -> None:
    check("pyright", run_pyright())
