"""Every documented snippet runs: the ```python blocks of README.md and docs/**/*.md (each file's blocks
in order, in one namespace, as a reader pastes them) and the ``qready ...`` lines of their ```bash
blocks (through the CLI, in order, on the installed demo recipe).

A block opts out only with ``<!-- not-run: reason -->`` on the line before its opening fence.
"""

from __future__ import annotations

import re
import shlex
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the not-run reason


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` with their language and not-run marker."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.search(before)
        out.append(Block(path, text[: m.start()].count("\n") + 1, m.group(1), m.group(2),
                         marker.group(1) if marker else None))
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_not_run_markers_give_a_reason_and_are_few() -> None:
    every = [b for p in DOCS for b in blocks(p) if b.lang == "python"]
    skipped = [b for b in every if b.skip]
    assert all(len(b.skip) > 10 for b in skipped), [(b.path.name, b.line) for b in skipped]
    assert len(skipped) <= max(2, len(every) // 5), "not-run is for snippets needing a large asset"


@pytest.mark.parametrize("path", [p for p in DOCS if any(b.lang == "python" for b in blocks(p))], ids=_rel)
def test_python_snippets_run(path: Path, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # snippets write files (model.qready, m.onnx) in the working directory
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for block in blocks(path):
        if block.lang != "python":
            continue
        if block.skip:
            print(f"{_rel(path)}:{block.line}: not run ({block.skip})")
            continue
        start = time.perf_counter()
        try:
            exec(compile(block.code, f"{_rel(path)}:{block.line}", "exec"), namespace)
        except Exception:
            pytest.fail(f"the snippet at {_rel(path)} line {block.line} fails:\n{traceback.format_exc(limit=-3)}")
        ran += 1
        print(f"{_rel(path)}:{block.line}: {time.perf_counter() - start:.1f} s")
    assert ran > 0


def documented_commands() -> list[tuple[str, int, str]]:
    """``(file, line, command)`` for every ``qready ...`` line of a bash block."""
    out = []
    for path in DOCS:
        for block in blocks(path):
            if block.lang not in ("bash", "sh", "console") or block.skip:
                continue
            for i, line in enumerate(block.code.splitlines(), start=1):
                command = line.split(" #", 1)[0].strip()
                if command.startswith("qready "):
                    out.append((_rel(path), block.line + i, command))
    return out


def test_documented_commands_run(tmp_path, monkeypatch, capsys) -> None:
    from qready.app.cli import main

    commands = documented_commands()
    assert len(commands) >= 6, commands
    monkeypatch.chdir(tmp_path)
    for where, line, command in commands:
        argv = shlex.split(command)[1:]
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 0, f"{where}:{line}: `{command}` exited {code}: {err}"
