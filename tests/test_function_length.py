"""No function in megatron_ext/ is longer than 150 lines: a longer one is several steps that want names (the
train_alcf.sh resolver was one function of 412 lines). Read from the source with `ast`, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 150


def long_functions(folder: Path, limit: int) -> list[str]:
    """`file:line name (N lines)` of every function or method in `folder` longer than `limit` lines."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(folder.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_the_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "".join(f"        x{i} = {i}\n" for i in range(LIMIT))
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\nclass C:\n    def long(self):\n{body}")
    assert [line.split()[1] for line in long_functions(tmp_path, LIMIT)] == ["long"]


def test_no_function_longer_than_150_lines() -> None:
    found = long_functions(ROOT / "megatron_ext", LIMIT)
    assert not found, "split these into named steps: " + "; ".join(found)
