"""What Megatron-DeepSpeed users bring, and what it means here: blendcorpus' mix_datasets.py command line, a
DeepSpeed JSON config mapped onto the schema, the DeepSpeed flags, the helpers.sh variables, the compatibility
table. Fast: one interpreter start (the guide's mixing command as a shell runs it), the rest in-process."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.data_list import parse_data_list
from megatron_ext.data.indexed import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    """tools/<name>.py as a module, to call main() in-process."""
    key = f"_tools_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "tools" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _dataset(prefix: Path, n_tokens: int) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(prefix, 258) as w:
        w.add_document(np.arange(n_tokens) % 258)


# ---- tools/mix_datasets.py: blendcorpus' interface ----------------------------------------------------------


@pytest.fixture
def guide_lists(tmp_path: Path) -> Path:
    """papers.txt (two datasets, weights on a token scale, one of them tiny) and dolma.txt (three), as in the
    continual pre-training guide, in the working folder."""
    for name, n in [("papers/p0", 300), ("papers/p1", 100), ("dolma/d0", 200), ("dolma/d1", 50), ("dolma/d2", 9)]:
        _dataset(tmp_path / name, n)
    (tmp_path / "papers.txt").write_text("3e9 papers/p0 papers\n1e-3 papers/p1 papers\n")
    (tmp_path / "dolma.txt").write_text("0.5 dolma/d0 dolma\n0.25 dolma/d1 dolma\n0.25 dolma/d2 dolma\n")
    return tmp_path


def test_the_guides_mixing_command_verbatim_writes_the_exact_mix(guide_lists: Path) -> None:
    command = "python3 tools/mix_datasets.py --input 0.9 papers.txt 0.1 dolma.txt > mix.txt"
    shell = command.replace("python3 tools/", f"{sys.executable} {ROOT}/tools/")
    done = subprocess.run(shell, shell=True, cwd=guide_lists, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "wrote 5 datasets from 2 lists to standard output\n"
    got = [
        (Path(e.prefix).relative_to(guide_lists).as_posix(), e.weight, e.corpus)
        for e in parse_data_list(guide_lists / "mix.txt")
    ]
    papers, dolma = 3e9 + 1e-3, 1.0
    assert got == [
        ("papers/p0", 0.9 / 1.0 * (3e9 / papers), "papers"),
        ("papers/p1", 0.9 / 1.0 * (1e-3 / papers), "papers"),  # 3e-13: blendcorpus' %.6f wrote 0.000000
        ("dolma/d0", 0.1 / 1.0 * (0.5 / dolma), "dolma"),
        ("dolma/d1", 0.1 / 1.0 * (0.25 / dolma), "dolma"),
        ("dolma/d2", 0.1 / 1.0 * (0.25 / dolma), "dolma"),
    ]
    assert got[1][1] > 0 and math.isclose(math.fsum(w for _, w, _ in got), 1.0, rel_tol=1e-15)


def test_lists_of_files_not_staged_here_are_mixed_with_a_warning(
    guide_lists: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(guide_lists)
    lus = "/lus/flare/projects/none/dolma"  # a login node's list, before the data is staged
    (guide_lists / "remote.txt").write_text(f"2 {lus}/a dolma\n1 {lus}/b dolma\n1 papers/p0 papers\n")
    mix = _tool("mix_datasets").main
    assert mix(["--inputs", "1", "remote.txt", "3", "dolma.txt"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"warning: remote.txt: 2 of 3 datasets are not on this machine (first: remote.txt:1: {lus}/a.idx not "
        "found); mixed as listed (--no-check skips this check)",
        "wrote 6 datasets from 2 lists to standard output",
    ]
    lines = [line.split() for line in out.splitlines() if not line.startswith("#")]
    assert [(float(w), p) for w, p, _ in lines[:3]] == [(0.25 * 2 / 4, f"{lus}/a"), (0.25 / 4, f"{lus}/b"),
                                                        (0.25 / 4, str(guide_lists / "papers/p0"))]  # fmt: skip
    assert mix(["--inputs", "1", "remote.txt", "--no-check", "--output", "m.txt", "--summary"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("wrote 3 datasets from 1 lists to m.txt\n")
    assert [line.split()[:3] for line in out.splitlines()[3:5]] == [["dolma", "2", "0"], ["papers", "1", "300"]]
    # present files must still be whole, and a missing list is still an error
    (guide_lists / "papers" / "p0.bin").write_bytes(b"\0" * 7)
    assert mix(["--inputs", "1", "remote.txt"]) == 2
    assert "has 7 bytes but the .idx implies 600" in capsys.readouterr().err
    assert mix(["--input", "1", "absent.txt"]) == 2
    assert capsys.readouterr().err == "error: absent.txt: cannot read data list: No such file or directory\n"
