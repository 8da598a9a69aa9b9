"""cpt_plan: stage mixes against a hand computation (mix_lists underneath), presets, the empty-buffer
redistribution, the replay buffer over three stages, the summary's numbers, and mistakes (one `error:` line,
exit status 2, nothing written)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.data_list import DataEntry, DataListError, mix_lists, parse_data_list
from megatron_ext.data.indexed import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]
A0, AD, AB = 0.05, 0.48, 0.47  # the strong-low-d0 preset


def cpt_plan():
    """tools/cpt_plan.py as a module, so tests call main() in-process."""
    if "_tools_cpt_plan" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_tools_cpt_plan", ROOT / "tools" / "cpt_plan.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["_tools_cpt_plan"] = module  # before exec: dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["_tools_cpt_plan"]


def plan(capsys, *args) -> tuple[int, str, str]:
    code = cpt_plan().main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def stage_args(data: Path, stage: int, output: str) -> list:
    """The list arguments of a stage: D0, D<stage>, the buffer B.txt and the output, all under ``data``."""
    d0, di, buf, out = data / "D0.txt", data / f"D{stage}.txt", data / "B.txt", data / output
    return ["--d0", d0, "--stage", di, "--buffer", buf, "--output", out]


def weights(path: Path) -> dict[str, float]:
    return {Path(e.prefix).name: e.weight for e in parse_data_list(path)}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """D0 = web/a (1,000 tokens, weight 1) + books/b (3,000, weight 3); stages D1 code/c 500, D2 math/m 200,
    D3 law/l 100, each listed with an arbitrary weight (7) that the buffer must replace by token counts."""
    for name, n in [("web/a", 1000), ("books/b", 3000), ("code/c", 500), ("math/m", 200), ("law/l", 100)]:
        prefix = tmp_path / "data" / name
        prefix.parent.mkdir(parents=True, exist_ok=True)
        with IndexedDatasetWriter(prefix, 258) as w:
            w.add_document(np.arange(n) % 258)
    (tmp_path / "D0.txt").write_text("1 data/web/a\n3 data/books/b\n")
    for i, name in enumerate(["code/c", "math/m", "law/l"], start=1):
        (tmp_path / f"D{i}.txt").write_text(f"7 data/{name}\n")
    return tmp_path


def test_mix_lists_against_a_hand_computation() -> None:
    x = [DataEntry(3.0, "/d/x", "code", "x.txt:1"), DataEntry(1e-12, "/d/a", "math", "x.txt:2")]
    y = [DataEntry(100.0, "/d/c", "web", "y.txt:1"), DataEntry(300.0, "/d/../d/a", "math", "y.txt:2")]
    z = [DataEntry(5.0, "/d/z", "z", "z.txt:1")]
    got = mix_lists([(0.7, x), (0.3, y), (0.0, z)])  # z: zero share, left out
    assert [(e.prefix, e.weight, e.corpus) for e in got] == [
        ("/d/x", 0.7 * (3 / (3 + 1e-12)), "code"),
        ("/d/a", 0.7 * (1e-12 / (3 + 1e-12)) + 0.3 * (300 / 400), "math"),  # the same dataset: one entry
        ("/d/c", 0.3 * (100 / 400), "web"),
    ]
    tiny = mix_lists([(2.0, x)])[1].weight
    assert tiny == 1e-12 / (3 + 1e-12) and tiny > 0
    with pytest.raises(DataListError, match=r"^y.txt:2: /d/a is labelled 'books' here but 'math' at x.txt:2;"):
        mix_lists([(1.0, x), (1.0, [DataEntry(1.0, "/d/a", "books", "y.txt:2")])])
    with pytest.raises(DataListError, match=r"^z.txt: all 1 weights are zero"):
        mix_lists([(1.0, x), (0.0, [DataEntry(0.0, "/d/z", "z", "z.txt:1")])])


def test_a_tiny_weight_survives_the_stage_mix(data: Path, capsys) -> None:
    (data / "D0.txt").write_text("3 data/web/a\n1e-12 data/books/b\n")
    code, _, err = plan(capsys, *stage_args(data, 1, "s1.txt"), "--preset", "weak")
    assert (code, err) == (0, "")
    got = weights(data / "s1.txt")
    assert got["b"] == pytest.approx(0.05 * 1e-12 / (3 + 1e-12), rel=1e-12, abs=0) and got["b"] > 0
    assert got == pytest.approx({"a": 0.05 * 3 / (3 + 1e-12), "b": got["b"], "c": 0.95}, rel=1e-12, abs=0)


@pytest.mark.parametrize(
    ("preset", "alphas"),
    [("weak", (0.05, 0.95, 0.0)), ("strong-equal", (0.33, 0.33, 0.34)), ("strong-low-d0", (0.05, 0.48, 0.47))],
)
def test_presets(data: Path, capsys, preset: str, alphas: tuple) -> None:
    (data / "B.txt").write_text(f"500 {data}/data/code/c code\n")
    out = data / "s2.txt"
    code, stdout, err = plan(capsys, *stage_args(data, 2, "s2.txt"), "--preset", preset)
    assert (code, err) == (0, "")
    a0, ad, ab = alphas
    expected = {"a": a0 / 4, "b": a0 * 3 / 4, "m": ad} | ({"c": ab} if ab else {})  # weak: no replay of B
    assert weights(out) == pytest.approx(expected, rel=1e-12, abs=0)
    assert out.read_text().splitlines()[0].endswith(f"--buffer {data / 'B.txt'} --preset {preset}")
    assert cpt_plan().PRESETS[preset] == alphas and "note:" not in stdout


def test_an_empty_buffer_gives_its_share_to_d0_and_di(data: Path, capsys) -> None:
    out = data / "s1.txt"
    code, stdout, err = plan(capsys, *stage_args(data, 1, "s1.txt"), "--alphas", "0.2", "0.3", "0.5")
    assert (code, err) == (0, "")
    a0, ad = 0.2 / 0.5, 0.3 / 0.5  # alpha_B = 0.5 split 2:3
    assert weights(out) == pytest.approx({"a": a0 / 4, "b": a0 * 3 / 4, "c": ad}, rel=1e-12, abs=0)
    assert stdout.splitlines()[0] == (
        "note: the buffer is empty; its share 0.5 goes to D0 and Di in proportion to their alphas: "
        "alpha_0 0.4, alpha_D 0.6"
    )
    assert out.read_text().splitlines()[1].startswith("# stage mix: alpha_0=0.4 alpha_D=0.6 alpha_B=0.0 (")
    assert not (data / "B.txt").exists()  # planned without --update-buffer: the buffer is not created


def test_buffer_bookkeeping_over_three_stages(data: Path, capsys) -> None:
    buf = data / "B.txt"

    def stage(i: int, *extra: str) -> Path:
        out = data / f"stage{i}.txt"
        code, _, err = plan(capsys, *stage_args(data, i, out.name), "--preset", "strong-low-d0", *extra)
        assert (code, err) == (0, "")
        return out

    s1 = stage(1, "--update-buffer")  # no buffer yet: alpha_B goes to D0 and D1 in proportion 5:48
    a0, ad = A0 / (A0 + AD), AD / (A0 + AD)
    assert weights(s1) == pytest.approx({"a": a0 / 4, "b": a0 * 3 / 4, "c": ad}, rel=1e-12, abs=0)
    assert [(Path(e.prefix).name, e.weight, e.corpus) for e in parse_data_list(buf)] == [("c", 500.0, "code")]
    s2 = stage(2, "--update-buffer")
    assert weights(s2) == pytest.approx({"a": A0 / 4, "b": A0 * 3 / 4, "m": AD, "c": AB}, rel=1e-12, abs=0)
    assert [(Path(e.prefix).name, e.weight) for e in parse_data_list(buf)] == [("c", 500.0), ("m", 200.0)]
    assert weights(stage(2)) == weights(s2)  # planning stage 2 again: its own datasets in B count in Di only
    s3 = stage(3, "--update-buffer")
    by_size = {"c": AB * 500 / 700, "m": AB * 200 / 700}  # earlier stages replayed in proportion to their tokens
    assert weights(s3) == pytest.approx({"a": A0 / 4, "b": A0 * 3 / 4, "l": AD, **by_size}, rel=1e-12, abs=0)
    assert [Path(e.prefix).name for e in parse_data_list(s3)] == ["a", "b", "l", "c", "m"]  # D0, D3, then B
    assert weights(buf) == {"c": 500.0, "m": 200.0, "l": 100.0}


def test_summary_numbers_and_plot(data: Path, capsys) -> None:
    (data / "B.txt").write_text(f"500 {data}/data/code/c code\n")
    png = data / "s2.png"
    code, stdout, err = plan(
        capsys, *stage_args(data, 2, "s2.txt"), "--preset", "strong-low-d0", "--train-tokens", "10K", "--plot", png
    )
    assert (code, err) == (0, "")
    lines = stdout.splitlines()
    assert lines[0] == "stage mix: alpha_0=0.05 alpha_D=0.48 alpha_B=0.47 (datasets: D0 2, Di 1, B 1)"
    # 10,000 tokens: D0 gets 5% = 500 of its 4,000 (books 3/4 of that), D2 48% = 4,800 of 200, B 47% = 4,700 of 500
    assert [line.split() for line in lines[3:11]] == [
        ["D0", "2", "4,000", "5.0000%", "500", "0.125"],
        ["books", "1", "3,000", "3.7500%", "375", "0.125"],
        ["web", "1", "1,000", "1.2500%", "125", "0.125"],
        ["Di", "1", "200", "48.0000%", "4,800", "24.000"],
        ["math", "1", "200", "48.0000%", "4,800", "24.000"],
        ["B", "1", "500", "47.0000%", "4,700", "9.400"],
        ["code", "1", "500", "47.0000%", "4,700", "9.400"],
        ["TOTAL", "4", "4,700", "100.0000%", "10,000", "2.128"],
    ]
    assert lines[11:13] == [
        "WARNING: corpus code would be repeated 9.4 times (> --max-epochs 4)",
        "WARNING: corpus math would be repeated 24 times (> --max-epochs 4)",
    ]
    assert lines[13:] == [f"wrote 4 datasets to {data / 's2.txt'}", f"wrote {png}"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--alphas", "0.5", "0.5", "0.1"],
            "error: --alphas 0.5 0.5 0.1 sum to 1.1; expected alpha_0 + alpha_D + alpha_B = 1\n",
        ),
        (["--alphas", "-0.5", "1", "0.5"], "error: --alphas -0.5 1 0.5: expected three finite numbers >= 0\n"),
        (
            ["--preset", "weak", "--alphas", "1", "0", "0"],
            "error: argument --alphas: not allowed with argument --preset (see --help)\n",
        ),
        (["--preset", "mild"], "error: argument --preset: invalid choice: 'mild' (choose from "),
        (["--preset", "weak", "--train-tokens", "lots"], "error: --train-tokens 'lots': expected a positive count "),
        (
            ["--preset", "weak", "--stage", "MISSING"],
            "error: MISSING: cannot read data list: No such file or directory\n",
        ),
        (["--preset", "weak", "--output", "BUF"], "error: --output BUF is also an input list or the buffer; "),
        (["--alphas", "0", "0", "1"], "error: the buffer is empty and alpha_0 = alpha_D = 0: the stage would have no "),
    ],
)
def test_mistakes_write_nothing(data: Path, capsys, args: list, message: str) -> None:
    subs = {"MISSING": str(data / "missing.txt"), "BUF": str(data / "B.txt")}
    args = [subs.get(a, a) for a in args]
    message = message.replace("MISSING", subs["MISSING"]).replace("BUF", subs["BUF"])
    code, stdout, err = plan(capsys, *stage_args(data, 1, "s1.txt"), "--update-buffer", *args)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1 and stdout == ""
    assert not (data / "s1.txt").exists() and not (data / "B.txt").exists()


def test_script_runs_from_any_folder(data: Path) -> None:
    """As users run it: a separate interpreter in another folder finds its sibling tools; an error is one line."""
    base = [sys.executable, str(ROOT / "tools" / "cpt_plan.py"), "--d0", "D0.txt", "--stage", "D1.txt"]
    ok = subprocess.run([*base, "--buffer", "B.txt", "--output", "s1.txt", "--preset", "weak", "--update-buffer"],
                        cwd=data, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0 and ok.stderr == "" and weights(data / "B.txt") == {"c": 500.0}
    bad = subprocess.run([*base, "--buffer", "B.txt", "--output", "s2.txt", "--alphas", "1", "1", "1"],
                         cwd=data, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and not (data / "s2.txt").exists()
    assert bad.stderr == "error: --alphas 1 1 1 sum to 3; expected alpha_0 + alpha_D + alpha_B = 1\n"
