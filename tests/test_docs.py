"""docs/writing-a-backend.md cannot drift: its code blocks are excerpts of the example plugin or run as written.

Each ```python / ```toml block is preceded by ``<!-- file: PATH -->`` (the block, split at lines that are just
``# ...``, appears in that file in order) or ``<!-- run -->`` (it runs in a fresh interpreter). The kit's
standard tests and capability flags are all documented, and relative links resolve.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

from art_core.testing import BackendConformance
from art_core.testing.conformance import standard_tests

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "writing-a-backend.md"
CHECKED_LANGUAGES = {"python", "toml"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml", ""}


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    marker: str  # the HTML comment on the line before the fence, or ""
    code: str


def blocks(text: str) -> list[Block]:
    """Every fenced block of ``text`` with its language and the marker comment above it."""
    lines = text.splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[index])
        if not opening:
            index += 1
            continue
        end = lines.index("```", index + 1)
        above = next((line for line in reversed(lines[:index]) if line.strip()), "")
        marker = above.strip() if above.strip().startswith("<!--") else ""
        found.append(Block(index + 1, opening[1], marker, "\n".join(lines[index + 1 : end]) + "\n"))
        index = end + 1
    return found


def excerpt_problem(block: Block) -> str | None:
    """Why ``block`` is not an in-order excerpt of the file its marker names (None when it is)."""
    match = re.fullmatch(r"<!-- file: (\S+) -->", block.marker)
    assert match, block.marker
    path = ROOT / match[1]
    if not path.is_file():
        return f"line {block.line}: {match[1]} does not exist"
    source = path.read_text()
    chunks = re.split(r"(?m)^[ \t]*# \.\.\.[ \t]*\n", block.code)
    position = 0
    for chunk in chunks:
        found = source.find(chunk, position)
        if found < 0:
            return f"line {block.line}: this part is not in {match[1]} (in order):\n{chunk}"
        position = found + len(chunk)
    return None


DOC_BLOCKS = blocks(DOC.read_text())
RUN_BLOCKS = [block for block in DOC_BLOCKS if block.marker == "<!-- run -->"]


def test_every_code_block_is_an_excerpt_or_runs() -> None:
    unmarked = [
        block.line
        for block in DOC_BLOCKS
        if block.language in CHECKED_LANGUAGES
        and not (block.marker == "<!-- run -->" or block.marker.startswith("<!-- file: "))
    ]
    assert not unmarked, f"blocks at lines {unmarked} need <!-- file: PATH --> or <!-- run -->"
    assert all(block.language == "python" for block in RUN_BLOCKS)
    assert len([b for b in DOC_BLOCKS if b.marker.startswith("<!-- file: ")]) >= 8 and len(RUN_BLOCKS) >= 2


def test_excerpts_match_the_example_plugin() -> None:
    problems = [
        problem
        for block in DOC_BLOCKS
        if block.marker.startswith("<!-- file: ")
        for problem in [excerpt_problem(block)]
        if problem is not None
    ]
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[f"line{block.line}" for block in RUN_BLOCKS])
def test_runnable_blocks_run(block: Block, tmp_path: Path) -> None:
    pytest.importorskip("art_bigram", reason="pip install -e examples/third_party_backend")
    process = subprocess.run(
        [sys.executable, "-c", block.code], cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert process.returncode == 0, f"block at line {block.line} failed:\n{process.stderr[-3000:]}"


def test_every_standard_check_and_capability_flag_is_documented() -> None:
    text = DOC.read_text()
    tests = standard_tests()
    flags = [name for name in dir(BackendConformance) if name.startswith("supports_")]
    missing = [name for name in [*tests, *flags] if f"`{name}`" not in text]
    assert not missing, f"docs/writing-a-backend.md does not mention {missing}"


def test_relative_links_resolve() -> None:
    targets = re.findall(r"\]\((?!https?://)([^)#]+)\)", DOC.read_text())
    broken = [target for target in targets if not (DOC.parent / target).exists()]
    assert targets and not broken, broken


def test_the_package_tree_lists_the_example_files() -> None:
    (tree,) = [block for block in DOC_BLOCKS if block.language == "text"]
    example = ROOT / "examples" / "third_party_backend"
    listed = set(re.findall(r"[\w.]+\.(?:py|toml)\b", tree.code))
    present = {path.name for path in example.rglob("*") if path.suffix in {".py", ".toml"}}
    assert listed == present - {"__init__.py"}, (listed, present)


def imported_names(source: str) -> dict[str, str]:
    """Name -> the import line that binds it, for every top-level import of a module's source."""
    names: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            line = ast.unparse(node)
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = line
    return names


def used_names(code: str) -> set[str]:
    """The names a (possibly partial) excerpt reads: its name tokens, less attributes, strings and comments."""
    names: set[str] = set()
    previous = ""
    for token in tokenize.generate_tokens(io.StringIO(textwrap.dedent(code)).readline):
        if token.type == tokenize.NAME and previous != ".":
            names.add(token.string)
        previous = token.string
    return names


def _squash(code: str) -> str:
    """``code`` without whitespace, parentheses and trailing commas: a wrapped import reads as ast.unparse's."""
    return re.sub(r"[\s()]", "", re.sub(r",\s*\)", ")", code))


def test_python_excerpts_import_the_names_they_use() -> None:
    """A reader can follow every excerpt: each name it takes from its file's imports is imported in it, or in
    an earlier excerpt of the same file."""
    problems = []
    seen: dict[str, str] = {}  # file -> the code of its excerpts so far
    for block in DOC_BLOCKS:
        if block.language != "python" or not block.marker.startswith("<!-- file: "):
            continue
        file = block.marker.removeprefix("<!-- file: ").removesuffix(" -->")
        imports = imported_names((ROOT / file).read_text())
        shown = seen.get(file, "") + block.code
        seen[file] = shown
        missing = sorted(
            name
            for name in used_names(block.code) & set(imports)
            if _squash(imports[name]) not in _squash(shown)
        )
        if missing:
            problems.append(f"line {block.line}: uses {missing} without {[imports[n] for n in missing]}")
    assert not problems, "\n".join(problems)


def test_no_file_refers_to_a_document_that_is_not_in_the_repository() -> None:
    """Every ``*.md`` a tracked file names is in the repository, and nothing points outside it.

    A path (``docs/rl-math.md``, ``../README.md``) must resolve from the file's folder, one above it or the
    root; a bare name (``DEMO.md``) must be the name of a tracked file.
    """
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    basenames = {Path(name).name for name in tracked}
    outside = "../" + "shared"  # spelled in two parts so that this file does not match itself
    broken = []
    for name in tracked:
        path = ROOT / name
        if not path.is_file() or path.suffix not in TEXT_SUFFIXES:
            continue
        text = path.read_text()
        if outside in text:
            broken.append(f"{name} refers to {outside}, outside the repository")
        for target in set(re.findall(r"(?<![\w/.-])((?:\.\./|[\w-]+/)*[\w-]+\.md)\b", text)):
            if "/" not in target:
                found = target in basenames
            else:
                folders = [f for f in [path.parent, *path.parent.parents] if f == ROOT or ROOT in f.parents]
                found = any((folder / target).exists() for folder in folders)
            if not found:
                broken.append(f"{name} refers to {target}")
    assert not broken, "\n".join(sorted(broken))
