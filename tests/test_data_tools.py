"""The data-list tools: gen_file_list (token weights, per-corpus epochs), mix_datasets (renormalisation with exact
weights, labels, merged duplicates, plot), inspect_data (numbers against a hand computation, warnings), and the
shared contract for mistakes: one `error:` line, exit status 2, no traceback, no output file touched."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.data_list import DataEntry, parse_data_list, write_data_list
from megatron_ext.data.indexed import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str):
    """Import tools/<name>.py as a module so tests call main() in-process (no interpreter start per case)."""
    key = f"_tools_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before exec: dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[key]


def run_tool(capsys, name: str, *args: str) -> tuple[int, str, str]:
    code = tool(name).main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def make_dataset(prefix: Path, n_tokens: int) -> str:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(prefix, 258) as w:
        w.add_document(np.arange(n_tokens) % 258)
    return str(prefix)


@pytest.fixture
def data(tmp_path):
    """books/{a,b} 100 + 300 tokens, web/c 200, code/x/d 400 (code's grandparent layout)."""
    make_dataset(tmp_path / "data" / "books" / "a", 100)
    make_dataset(tmp_path / "data" / "books" / "b", 300)
    make_dataset(tmp_path / "data" / "web" / "c", 200)
    make_dataset(tmp_path / "data" / "code" / "x" / "d", 400)
    return tmp_path


def weights_by_prefix(path) -> dict[str, tuple[float, str]]:
    return {Path(e.prefix).name: (e.weight, e.corpus) for e in parse_data_list(path)}


# ---- gen_file_list ------------------------------------------------------------------------------------------


def test_gen_file_list_weights_are_tokens_times_corpus_epochs(data, capsys):
    out = data / "lists" / "all.txt"
    code, stdout, err = run_tool(
        capsys, "gen_file_list", "--root", data / "data", "--output", out, "--epochs", "books=2"
    )
    assert (code, err) == (0, "")
    assert weights_by_prefix(out) == {
        "a": (200.0, "books"),
        "b": (600.0, "books"),
        "c": (200.0, "web"),
        "d": (400.0, "x"),
    }
    assert [Path(e.prefix).name for e in parse_data_list(out)] == ["a", "b", "d", "c"]  # sorted paths
    assert "books" in stdout and "TOTAL" in stdout and "1,000" in stdout  # summary table: 100+300+200+400 tokens


def test_gen_file_list_epochs_apply_to_their_corpus_only(data, capsys):
    out = data / "l.txt"
    args = ["--root", data / "data", "--output", out, "--corpus-from", "grandparent", "--epochs", "data=0.5"]
    code, _, err = run_tool(capsys, "gen_file_list", *args, "--epochs", "code=3")
    assert (code, err) == (0, "")
    # books/* and web/* have grandparent 'data' (scaled 0.5); code/x/d has grandparent 'code' (scaled 3)
    assert weights_by_prefix(out) == {
        "a": (50.0, "data"),
        "b": (150.0, "data"),
        "c": (100.0, "data"),
        "d": (1200.0, "code"),
    }


def test_gen_file_list_to_stdout_and_other_corpus_rules(data, capsys):
    make_dataset(data / "data" / "web" / "algebraic-stack-train-0003_text_document", 10)
    code, stdout, err = run_tool(capsys, "gen_file_list", "--root", data / "data" / "web", "--corpus-from", "stem")
    assert code == 0 and "TOTAL" in err
    lines = [line.split() for line in stdout.splitlines() if not line.startswith("#")]
    assert [(w, Path(p).name, c) for w, p, c in lines] == [
        ("10.0", "algebraic-stack-train-0003_text_document", "algebraic-stack-train"),
        ("200.0", "c", "c"),
    ]
    code, stdout, _ = run_tool(capsys, "gen_file_list", "--root", data / "data", "--corpus-from", "none")
    assert code == 0 and {line.split()[2] for line in stdout.splitlines() if not line.startswith("#")} == {"data"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "novels=2"], "error: --epochs: no corpus named novels; corpora found: books, web, x\n"),
        (["--epochs", "books"], "error: --epochs 'books': expected CORPUS=E with E a number >= 0, e.g. books=2\n"),
        (
            ["--epochs", "books=-1"],
            "error: --epochs 'books=-1': expected CORPUS=E with E a number >= 0, e.g. books=2\n",
        ),
        (
            ["--epochs", "books=0", "web=0", "x=0"],
            "error: --epochs: every corpus has 0 epochs; expected at least one positive\n",
        ),
        (["--corpus-from", "aunt"], "error: argument --corpus-from: invalid choice: 'aunt' (choose from"),
    ],
)
def test_gen_file_list_mistakes(data, capsys, args, message):
    out = data / "l.txt"
    code, _, err = run_tool(capsys, "gen_file_list", "--root", data / "data", "--output", out, *args)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1
    assert not out.exists()


def test_gen_file_list_follows_folder_symlinks_without_looping(data, capsys):
    farm = data / "farm"
    farm.mkdir()
    (farm / "books").symlink_to(data / "data" / "books")
    (farm / "loop").symlink_to(farm)
    code, stdout, _ = run_tool(capsys, "gen_file_list", "--root", farm)
    assert code == 0
    lines = [line.split() for line in stdout.splitlines() if not line.startswith("#")]
    assert lines == [["100.0", f"{farm}/books/a", "books"], ["300.0", f"{farm}/books/b", "books"]]


def test_gen_file_list_bad_root_and_broken_pair(data, capsys):
    code, _, err = run_tool(capsys, "gen_file_list", "--root", data / "nowhere")
    assert (
        code == 2
        and err == f"error: --root {data / 'nowhere'}: not a folder; expected a folder holding .bin/.idx files\n"
    )
    (data / "data" / "web" / "c.bin").unlink()
    code, _, err = run_tool(capsys, "gen_file_list", "--root", data / "data")
    assert (
        code == 2
        and err == f"error: {data}/data/web/c.idx: {data}/data/web/c.bin not found; expected a .bin next to c.idx\n"
    )


# ---- mix_datasets -------------------------------------------------------------------------------------------


@pytest.fixture
def lists(data):
    d = data / "data"
    code = data / "code.txt"
    code.write_text(f"# code\n3 {d}/code/x/d  code\n1e-12 {d}/books/a  math\n")
    web = data / "web.txt"
    web.write_text(f"100 {d}/web/c web\n300 {d}/books/a math\n")
    return code, web


def test_mix_renormalises_each_list_and_scales_by_its_share(data, lists, capsys):
    code_list, web_list = lists
    out = data / "mix.txt"
    code, stdout, err = run_tool(capsys, "mix_datasets", "--inputs", "0.7", code_list, "0.3", web_list, "--output", out)
    assert (code, err) == (0, "") and "wrote 3 datasets from 2 lists" in stdout
    code_sum, web_sum = 3 + 1e-12, 100 + 300
    share_code, share_web = 0.7 / (0.7 + 0.3), 0.3 / (0.7 + 0.3)
    got = parse_data_list(out)
    assert [(Path(e.prefix).name, e.weight, e.corpus) for e in got] == [
        ("d", share_code * (3 / code_sum), "code"),
        ("a", share_code * (1e-12 / code_sum) + share_web * (300 / web_sum), "math"),  # merged: one line
        ("c", share_web * (100 / web_sum), "web"),
    ]
    assert abs(sum(e.weight for e in got) - 1) < 1e-15
    assert out.read_text().startswith("# mix_datasets.py --inputs 0.7 ")


def test_mix_keeps_a_tiny_weight_exactly(data, lists, capsys):
    code_list, _ = lists
    out = data / "mix.txt"
    code, _, _ = run_tool(capsys, "mix_datasets", "--inputs", "2", code_list, "--output", out, "--summary")
    assert code == 0
    tiny = 1.0 * (1e-12 / (3 + 1e-12))
    assert weights_by_prefix(out)["a"] == (tiny, "math") and tiny > 0
    assert f"{tiny!r} {data / 'data' / 'books' / 'a'} math" in out.read_text().splitlines()


def test_mix_summary_and_plot(data, lists, capsys):
    out, png = data / "mix.txt", data / "plots" / "mix.png"
    png.parent.mkdir()
    code, stdout, err = run_tool(
        capsys, "mix_datasets", "--inputs", "1", lists[0], "1", lists[1], "--output", out, "--summary", "--plot", png
    )
    assert (code, err) == (0, "")
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.split()}
    assert rows["code"][1:3] == ["1", "400"] and rows["math"][1:3] == ["1", "100"] and rows["web"][1:3] == ["1", "200"]
    assert rows["TOTAL"][1:3] == ["3", "700"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in png.parent.iterdir()) == ["mix.png"]


def test_mix_conflicting_labels_and_bad_inputs_leave_the_output_alone(data, lists, capsys):
    code_list, web_list = lists
    other = data / "other.txt"
    other.write_text(f"1 {data}/data/web/c not-web\n")
    out = data / "mix.txt"
    out.write_text("precious\n")
    cases = [
        (
            ["0.5", web_list, "0.5", other],
            f"error: {other}:1: {data}/data/web/c is labelled 'not-web' here but 'web' at {web_list}:1; "
            "expected one corpus label per prefix\n",
        ),
        (["0.5", web_list, "0.5"], "error: --inputs: 3 items; expected pairs 'WEIGHT LIST'\n"),
        (["-1", web_list], f"error: --inputs: weight '-1' for {web_list} must be a finite number >= 0\n"),
        (
            ["0", web_list, "0", code_list],
            "error: --inputs: all list weights are zero; expected at least one positive\n",
        ),
        (
            ["1", data / "missing.txt"],
            f"error: {data / 'missing.txt'}: cannot read data list: No such file or directory\n",
        ),
    ]
    for inputs, message in cases:
        code, stdout, err = run_tool(capsys, "mix_datasets", "--inputs", *inputs, "--output", out)
        assert (code, err) == (2, message)
    web_text = web_list.read_text()
    for output, plot, message in [
        (web_list, None, f"error: --output {web_list} is also an input list; expected a new file\n"),
        (out, data / "mix.txt", f"error: --plot {data / 'mix.txt'}: expected an image file name ending in .png"),
        (data / "data", None, f"error: {data / 'data'}: is a folder; expected a data list file to write\n"),
    ]:
        extra = ["--plot", plot] if plot else []
        code, stdout, err = run_tool(capsys, "mix_datasets", "--inputs", "1", web_list, "--output", output, *extra)
        assert code == 2 and err.startswith(message), err
    assert web_list.read_text() == web_text
    assert out.read_text() == "precious\n" and sorted(p.name for p in data.iterdir()) == sorted(
        ["data", "code.txt", "web.txt", "other.txt", "mix.txt"]
    )


# ---- inspect_data -------------------------------------------------------------------------------------------


def test_inspect_numbers_match_a_hand_computation(data, capsys):
    d = data / "data"
    lst = data / "l.txt"
    write_data_list(
        [
            DataEntry(1.0, f"{d}/books/a", "books", "t"),  # books: 400 tokens, weight 1+3 = 4 of 8 -> 50%
            DataEntry(3.0, f"{d}/books/b", "books", "t"),
            DataEntry(4.0, f"{d}/web/c", "web", "t"),  # web: 200 tokens, 50%
        ],
        lst,
    )
    code, stdout, err = run_tool(capsys, "inspect_data", lst, "--train-tokens", "2K", "--json")
    assert (code, err) == (0, "")
    report = json.loads(stdout)
    # 2,000 training tokens: books samples 1,000 of its 400 -> 2.5 epochs; web 1,000 of its 200 -> 5 epochs
    corpora = {c["corpus"]: c for c in report["corpora"]}
    assert corpora["books"] | {"max_file_epochs": 0} == dict(
        corpus="books", files=2, tokens=400, share=0.5, sampled_tokens=1000.0, epochs=2.5, max_file_epochs=0
    )
    assert corpora["books"]["max_file_epochs"] == pytest.approx(750 / 300)  # b: 3/8 x 2000 = 750 of 300
    assert (corpora["web"]["sampled_tokens"], corpora["web"]["epochs"]) == (1000.0, 5.0)
    assert report["total_tokens"] == 600 and report["epochs"] == 2000 / 600
    assert report["warnings"] == ["WARNING: corpus web would be repeated 5 times (> --max-epochs 4)"]

    code, stdout, _ = run_tool(capsys, "inspect_data", lst, "--train-tokens", "2000")
    lines = stdout.splitlines()
    assert lines[2].split() == ["books", "2", "400", "50.0000%", "1,000", "2.500"]
    assert lines[3].split() == ["web", "1", "200", "50.0000%", "1,000", "5.000"]
    assert lines[4].split() == ["TOTAL", "3", "600", "100.0000%", "2,000", "3.333"]
    assert lines[5:] == ["WARNING: corpus web would be repeated 5 times (> --max-epochs 4)"]
    code, stdout, _ = run_tool(capsys, "inspect_data", lst, "--train-tokens", "2000", "--max-epochs", "6")
    assert "WARNING" not in stdout
    # --split 4,1,0: training sees 80% of each file, so web's 1,000 sampled tokens are 1000 / (200 x 0.8) epochs
    code, stdout, _ = run_tool(capsys, "inspect_data", lst, "--train-tokens", "2000", "--split", "4,1,0", "--json")
    report = json.loads(stdout)
    assert report["train_fraction"] == 0.8 and report["corpora"][1]["epochs"] == 1000 / (200 * 0.8)
    assert report["warnings"] == ["WARNING: corpus web would be repeated 6.25 times (> --max-epochs 4)"]


def test_inspect_uneven_file_weights_and_data_path(data, capsys):
    d = data / "data"
    # books as a whole: 1,000 of 400 tokens = 2.5 epochs, but a (100 tokens) gets 900 of them -> 9 epochs
    args = ["--data-path", "9", f"{d}/books/a", "1", f"{d}/books/b", "10", f"{d}/web/c", "--train-tokens", "2e3"]
    code, stdout, err = run_tool(capsys, "inspect_data", *args)
    assert (code, err) == (0, "")
    assert stdout.splitlines()[-2] == (
        "WARNING: corpus books: some file would be repeated 9 times (> --max-epochs 4) although the corpus as a whole "
        "is at 2.5"
    )
    assert stdout.splitlines()[-1] == "WARNING: corpus web would be repeated 5 times (> --max-epochs 4)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train-tokens", "1T"], "error: give data lists or --data-path (one of the two)\n"),
        (
            ["L", "--train-tokens", "lots"],
            "error: --train-tokens 'lots': expected a positive count such as 2000000, 2e12, 300B or 2T\n",
        ),
        (["L", "--train-tokens", "1T", "--max-epochs", "0"], "error: --max-epochs 0.0: expected a positive number\n"),
        (["L"], "error: the following arguments are required: --train-tokens (see --help)\n"),
        (
            ["L", "--train-tokens", "1T", "--split", "0,1,1"],
            "error: --split '0,1,1': expected up to three numbers >= 0 with a positive first, e.g. 969,30,1\n",
        ),
        (
            ["--data-path", "1", "P", "2", "--train-tokens", "1T"],
            "error: --data-path: 3 items; expected pairs 'weight prefix' (or a single prefix)\n",
        ),
        (
            ["--data-path", "-1", "P", "--train-tokens", "1T"],
            "error: --data-path:1: weight -1.0 is negative; expected a number >= 0\n",
        ),
    ],
)
def test_inspect_mistakes(data, capsys, args, message):
    lst = data / "l.txt"
    lst.write_text(f"1 {data}/data/web/c\n")
    d = str(data / "data" / "web" / "c")
    args = [str(lst) if a == "L" else d if a == "P" else a for a in args]
    code, _, err = run_tool(capsys, "inspect_data", *args)
    assert (code, err) == (2, message)


def test_scripts_report_one_line_without_traceback(data):
    """As users run them: a separate interpreter, exit status 2, just the error line on stderr."""
    out = data / "out.txt"
    bad = data / "bad.txt"
    bad.write_text("1 a b c d\n")
    for script, args in [
        ("mix_datasets.py", ["--inputs", "1", str(bad), "--output", str(out)]),
        ("inspect_data.py", [str(bad), "--train-tokens", "1B"]),
        ("gen_file_list.py", ["--root", str(data / "data"), "--output", str(out), "--epochs", "x"]),
    ]:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / script), *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and proc.stdout == "", (script, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (script, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_nul_byte_in_a_list_is_one_file_line_error_in_every_reader(data, capsys):
    """A NUL byte (a damaged or binary list) ended in 'ValueError: embedded null byte' from os.path.expanduser."""
    bad = data / "nul.txt"
    bad.write_bytes(f"1 {data}/data/web/c\n1 ~\0x/y\n".encode())
    expected = f"error: {bad}:2: NUL byte in the line; expected text lines 'weight prefix [corpus]'\n"
    out, cache = data / "out.txt", data / "cache"
    for name, args in [
        ("inspect_data", [bad, "--train-tokens", "1K"]),
        ("mix_datasets", ["--inputs", "1", bad, "--output", out]),
        (
            "build_data_cache",
            ["--data-file-list", bad, "--seq-length", "16", "--train-tokens", "1K", "--data-cache-path", cache],
        ),  # fmt: skip
        ("cpt_plan", ["--d0", bad, "--stage", bad, "--buffer", bad, "--output", out, "--preset", "weak"]),
    ]:
        assert run_tool(capsys, name, *args) == (2, "", expected), name
    assert not out.exists() and not cache.exists()
    proc = subprocess.run(  # pretrain_gpt.py as users run it
        [sys.executable, str(ROOT / "pretrain_gpt.py"), "--data-file-list", str(bad), "--train-iters", "1"],
        capture_output=True, text=True, timeout=300, cwd=data,
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (2, expected)
