"""scripts/demo.sh at a reduced size (tokenizer trained, PNG written, sample and next commands printed, the
printed resume and train_alcf.sh commands work), and the pieces it reports with: loss curves against tokens,
bits per byte (against an independent count of the validation text), the valid-Python-lines measure."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.indexed import IndexedDatasetWriter
from megatron_ext.data.tokenizers import ByteTokenizer, build_tokenizer
from megatron_ext.training import curves

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo_quality", ROOT / "bench" / "demo_quality.py")
assert _spec is not None and _spec.loader is not None
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)

SMALL = [
    "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
    "--seq-length", "64", "--micro-batch-size", "2", "--train-iters", "4", "--lr-warmup-iters", "1",
    "--log-interval", "2", "--eval-interval", "2", "--eval-iters", "1",
]  # fmt: skip


# ---- the measure of Python-likeness --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "completion", "ended", "valid", "counted"),
    [
        ("def f(", "a, b):\n    return a + b\n", True, 2, 2),
        ("def f(", "a, b):\n    return a $ b\n    x = 'abc\n    y = 1\n", True, 2, 4),  # error token, open quote
        ("", "x = (1]\nfoo)\n  bar\n", True, 1, 3),  # wrong closing bracket, one closing nothing; fresh start
        ("", '"""Doc it\'s\nmore\n"""\nx = 1\n', True, 4, 4),  # a docstring's lines read in context
        ("", "if x:\n        a\n    b\nc\n", True, 3, 4),  # dedent to no outer level
        ("import os\n", "\n\nx = foo(1,\n  2", False, 1, 1),  # blank lines and the unfinished last line not counted
        ("x = 1\n", "", True, 0, 0),  # the prompt's lines never count
    ],
)
def test_valid_line_counts(prompt: str, completion: str, ended: bool, valid: int, counted: int) -> None:
    got_valid, got_counted, _ = quality.line_counts(prompt, completion, ended)
    assert (got_valid, got_counted) == (valid, counted)


# ---- loss curves and bits per byte ---------------------------------------------------------------------------


def test_tokens_follow_the_logged_batch_sizes() -> None:
    """A ramp-up: windows of 10 iterations at batch 2, then 4, then 8 (logged at each window's end)."""
    steps = np.array([10, 20, 30])
    scalars = {
        curves.TRAIN_LOSS: (steps, np.array([5.0, 4.0, 3.0])),
        curves.TRAIN_BATCH: (steps, np.array([2.0, 4.0, 8.0])),
        "valid/code/lm_loss": (np.array([20, 25]), np.array([4.5, 4.2])),
    }
    got = curves.loss_curves(scalars, seq_length=16)
    assert got["train"].tokens.tolist() == [10 * 2 * 16, 10 * 2 * 16 + 10 * 4 * 16, (20 + 40 + 80) * 16]
    assert got["valid/code"].tokens.tolist() == [60 * 16, (60 + 5 * 8) * 16]  # halfway into the batch-8 window
    with pytest.raises(ValueError, match="not a training run"):
        curves.loss_curves({"valid/code/lm_loss": scalars["valid/code/lm_loss"]}, 16)


def test_read_scalars_keeps_a_resumed_runs_values(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for values in ({10: 5.0, 20: 4.0}, {20: 3.5, 30: 3.0}):  # the second run resumed from iteration 10
        writer = SummaryWriter(str(tmp_path))
        for step, value in values.items():
            writer.add_scalar("train/lm_loss", value, step)
        writer.close()
    steps, values = curves.read_scalars(tmp_path)["train/lm_loss"]
    assert steps.tolist() == [10, 20, 30] and values.tolist() == [5.0, 3.5, 3.0]


def test_bytes_per_token_counts_the_validation_documents(tmp_path: Path) -> None:
    """Byte tokens: every byte is a token, plus the eod after each document (which the loss also predicts)."""
    tok = ByteTokenizer()
    docs = ["def a():\n    pass\n", "x = 'é'\n", "import os\n" * 3, "y = 2\n"]
    prefix = str(tmp_path / "d")
    with IndexedDatasetWriter(prefix, tok.vocab_size) as writer:
        for text in docs:
            writer.add_document([*tok.tokenize(text), tok.eod])
    # split 2,1,1 of 4 documents: the validation part is document 2 alone
    text_bytes = len(docs[2].encode())
    assert curves.bytes_per_token([prefix], "2,1,1", 1, tok) == text_bytes / (text_bytes + 1)
    both = sum(len(d.encode()) for d in docs[:2])
    assert curves.bytes_per_token([prefix], "1,1,0", 0, tok) == both / (both + 2)
    assert curves.bits_per_byte(math.log(2) * 3, 1.5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no validation text"):
        curves.bytes_per_token([prefix], "1,0,0", 1, tok)


# ---- the demo itself, reduced --------------------------------------------------------------------------------


def _command(out: str, marker: str) -> list[str]:
    """The printed command line containing `marker` (with its backslash-continued lines), as argv."""
    lines = out.splitlines()
    i = next(k for k, line in enumerate(lines) if marker in line)
    while i > 0 and lines[i - 1].endswith("\\"):
        i -= 1
    text = lines[i]
    while text.endswith("\\"):
        i += 1
        text = text[:-1] + lines[i]
    return shlex.split(text, comments=True)


def test_demo_reduced(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    env = {**os.environ, "SKIP_SETUP": "1", "RUN_DIR": str(run), "VOCAB_SIZE": "400", "DOCUMENTS": "60",
           "QUALITY_PROMPTS": "2", "SAMPLE_TOKENS": "12", "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(
        ["bash", "scripts/demo.sh", *SMALL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout

    tok = build_tokenizer("SentencePieceTokenizer", run / "tokenizer" / "stdlib_sp400.model")
    assert tok.vocab_size == 400
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "tensorboard").is_dir()
    assert f"--- greedy sample, prompt {quality.PROMPTS[0]!r} " in out
    assert re.search(r"model: +valid Python lines (\d\.\d{3} \(\d+/\d+ lines\)|n/a)", out)

    # Bits per byte as printed = loss x tokens / bytes of the validation documents / ln 2, counted here from the
    # jsonl the demo wrote and the tokenizer (split 969,30,1 of 60 documents: documents 58 and 59).
    texts = [json.loads(line)["text"] for line in (run / "stdlib" / "stdlib.jsonl").read_text().splitlines()]
    valid = texts[round(0.969 * len(texts)) : round(0.999 * len(texts))]
    ratio = sum(len(t.encode()) for t in valid) / sum(len(tok.tokenize(t)) + 1 for t in valid)
    m = re.search(r"validation loss (\d+\.\d+) nats/token = (\d+\.\d+) bits/byte", out)
    assert m, out
    assert float(m.group(2)) == pytest.approx(float(m.group(1)) / ratio / math.log(2), abs=2e-3)

    block = out[out.index("== next commands") :]
    for what in ("tools/generate.py", "tools/inspect_checkpoint.py", "convert_checkpoint.py to-hf", "train_alcf.sh"):
        assert what in block, what
    resume = _command(block, "pretrain.sh --load")
    resume[resume.index("--train-iters") + 1] = "6"
    proc = subprocess.run(resume, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iter 6/6" in proc.stdout and (run / "checkpoints" / "iter_0000006").is_dir()

    alcf = _command(block, "train_alcf.sh")
    assignments = dict(a.split("=", 1) for a in alcf[: alcf.index("bash")])
    proc = subprocess.run(
        alcf[alcf.index("bash") :], cwd=ROOT, env={**os.environ, **assignments, "DRY_RUN": "1"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    launched = shlex.split(proc.stdout[proc.stdout.index("pretrain_gpt.py") :].split("\n", 1)[0])
    demo = shlex.split((run / "pretrain.sh").read_text().splitlines()[-1])
    for flag in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--seq-length", "--lr", "--min-lr",
                 "--tokenizer-model", "--data-path", "--swiglu", "--untie-embeddings-and-output-weights"):  # fmt: skip
        assert _last(launched, flag) == _last(demo, flag), flag
    assert "--nproc-per-node 2" in proc.stdout or "-np 2" in proc.stdout or "--ntasks 2" in proc.stdout


def _last(argv: list[str], flag: str) -> str | float | None:
    """The value the last `flag` in argv gives (the one argparse keeps); True for a switch, None if absent."""
    if flag not in argv:
        return None
    i = len(argv) - 1 - argv[::-1].index(flag)
    value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
    try:
        return float(value)  # 3e-3 and 0.003 alike
    except (TypeError, ValueError):
        return value
