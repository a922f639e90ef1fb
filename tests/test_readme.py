"""The README stays true: it opens with the test command CI runs, its quickstart is the example file verbatim,
its other Python blocks run, and the commands it shows exist."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
BASH = [code for lang, code in BLOCKS if lang == "bash"]


def test_readme_opens_with_the_command_ci_runs() -> None:
    first_block = BLOCKS[0][1]
    assert "make test" in first_block and "make demo" in first_block
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_quickstart_block_is_the_example_file() -> None:
    quickstart = [code for code in PYTHON if code.startswith('"""Quickstart')]
    assert quickstart == [(ROOT / "examples" / "quickstart.py").read_text()]


def test_other_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may create .art directories
    namespace: dict[str, object] = {"__name__": "readme"}
    for code in PYTHON:
        if code.startswith('"""Quickstart'):
            continue
        compiled = compile(code, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(compiled, namespace)
        if asyncio.iscoroutine(result):
            asyncio.run(result)


def _commands() -> list[list[str]]:
    commands = []
    for block in BASH:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(shlex.split(line))
    return commands


def test_make_targets_and_art_commands_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    art = Path(sys.executable).parent / "art"
    for argv in _commands():
        if argv[0] == "make":
            assert re.search(rf"^{argv[1]}:", makefile, flags=re.M), argv
        elif argv[0] == "art":
            words = [w for w in argv[1:] if not w.startswith("-")][:2]
            for depth in (2, 1):  # 'art tinker serve' or 'art history PATH'
                probe = subprocess.run(
                    [str(art), *words[:depth], "--help"], capture_output=True, text=True, env=dict(os.environ)
                )
                if probe.returncode == 0:
                    break
            assert probe.returncode == 0, (argv, probe.stderr)
        elif argv[0].endswith("python") or argv[0].startswith(".venv"):
            script = next(a for a in argv[1:] if a.endswith(".py"))
            assert (ROOT / script).is_file(), argv
