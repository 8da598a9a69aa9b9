"""Data position across checkpoints: exact continuation (also at another data-parallel size), re-weighting that
never repeats a sample of any corpus, and one validation loss per corpus."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launchers import clean_env

from megatron_ext.config import parse_args
from megatron_ext.data.data_list import parse_data_lists
from megatron_ext.data.gpt_data import build_train_data
from megatron_ext.data.indexed import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32


@pytest.fixture(scope="module")
def lists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two corpora (code-like and prose-like byte streams), a 80/20 and a 20/80 list, and a validation list."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for corpus, alphabet in (("code", (40, 125)), ("prose", (97, 122))):
        (root / corpus).mkdir()
        for part in range(2):
            with IndexedDatasetWriter(root / corpus / f"part{part}", vocab_size=258) as w:
                for _ in range(60):
                    w.add_document(np.append(rng.integers(*alphabet, size=rng.integers(20, 120)), 256))
        with IndexedDatasetWriter(root / corpus / "valid", vocab_size=258) as w:
            for _ in range(20):
                w.add_document(np.append(rng.integers(*alphabet, size=100), 256))
    out = {}
    for name, (wc, wp) in {"a": (0.8, 0.2), "b": (0.2, 0.8)}.items():
        out[name] = root / f"mix_{name}.txt"
        out[name].write_text(
            "# weight prefix corpus\n"
            + "".join(f"{w / 2} {c}/part{i} {c}\n" for c, w in (("code", wc), ("prose", wp)) for i in range(2))
        )
    out["valid"] = root / "valid.txt"
    out["valid"].write_text("1 code/valid code\n1 prose/valid prose\n")
    return out


def _cfg(data_list: Path, cache: Path) -> object:
    cfg = parse_args(
        f"--data-file-list {data_list} --data-cache-path {cache} --seq-length {SEQ} --train-iters 50 "
        "--global-batch-size 4 --micro-batch-size 4".split()
    )
    cfg.resolve_batch(1)
    return cfg


def test_reweighting_continues_each_corpus_without_repeats(lists: dict[str, Path], tmp_path: Path) -> None:
    run = 400
    cfg_a, cfg_b = _cfg(lists["a"], tmp_path), _cfg(lists["b"], tmp_path)
    first = build_train_data(cfg_a, parse_data_lists([lists["a"]]), run, 0, None, eod=256)
    seen = [first.blend.sample_of(i) for i in range(160)]
    saved = first.state_dict(160)
    second = build_train_data(cfg_b, parse_data_lists([lists["b"]]), run, 160, saved, eod=256)
    assert "differs from the checkpoint's" in second.note and second.position(160) == 0
    after = [second.blend.sample_of(i) for i in range(200)]
    assert not set(seen) & set(after), "a sample was drawn again after re-weighting"
    for corpus, count in saved["consumed_per_corpus"].items():
        numbers = sorted(n for c, n in after if c == corpus)
        assert numbers[0] == count, f"{corpus} did not continue where it stopped"
    share = sum(c == "prose" for c, _ in after) / len(after)
    assert abs(share - 0.8) < 0.02 and abs(sum(c == "prose" for c, _ in seen) / len(seen) - 0.2) < 0.02


def test_same_mixture_resumes_at_the_same_position(lists: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(lists["a"], tmp_path)
    first = build_train_data(cfg, parse_data_lists([lists["a"]]), 400, 0, None, eod=256)
    again = build_train_data(cfg, parse_data_lists([lists["a"]]), 400, 96, first.state_dict(96), eod=256)
    assert again.note == "" and again.position(96) == 96
    assert np.array_equal(again.blend.sample_tokens(96), first.blend.sample_tokens(96))


def _run(args: list[str], tmp: Path, nproc: int = 1) -> str:
    env = {**clean_env(), "PYTHONPATH": str(ROOT)}
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc-per-node={nproc}"]  # fmt: skip
    tiny = (
        f"--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length {SEQ} --micro-batch-size 2 "
        "--global-batch-size 4 --lr 1e-3 --log-interval 1 --eval-interval 3 --eval-iters 1 "
        "--hidden-dropout 0 --attention-dropout 0 --train-iters 6"
    ).split()
    argv = [*launch, str(ROOT / "pretrain_gpt.py"), *tiny, "--data-cache-path", str(tmp / "cache"), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _losses(log: str) -> dict[int, float]:
    return {int(i): float(x) for i, x in re.findall(r"^iter (\d+)/\d+ \| loss ([0-9.]+)", log, re.M)}


def test_resume_at_another_data_parallel_size_and_reweighting(lists: dict[str, Path], tmp_path: Path) -> None:
    data = ["--data-file-list", str(lists["a"]), "--valid-data-file-list", str(lists["valid"])]
    whole = _run(data, tmp_path)
    ckpt = tmp_path / "ckpt"
    _run([*data, "--save", str(ckpt), "--exit-interval", "3"], tmp_path, nproc=2)  # DP=2
    resumed = _run([*data, "--load", str(ckpt)], tmp_path)  # DP=1
    w, r = _losses(whole), _losses(resumed)
    assert sorted(r) == [4, 5, 6]
    for i in r:
        assert r[i] == pytest.approx(w[i], rel=1e-5), (i, r[i], w[i])
    for corpus in ("code", "prose"):
        assert re.search(rf"^validation at iter 6 \| {corpus} \| loss [0-9.]+", resumed, re.M)
    reweighted = _run(["--data-file-list", str(lists["b"]), "--load", str(ckpt)], tmp_path)
    assert "each corpus continues after the samples it already gave" in reweighted


def test_build_data_cache_ahead_of_time(lists: dict[str, Path], tmp_path: Path) -> None:
    tool = [sys.executable, str(ROOT / "tools" / "build_data_cache.py")]
    args = ["--data-file-list", str(lists["a"]), "--seq-length", str(SEQ), "--train-samples", "200",
            "--data-cache-path", str(tmp_path)]  # fmt: skip
    first = subprocess.run([*tool, *args], capture_output=True, text=True, timeout=120)
    second = subprocess.run([*tool, *args], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "built in" in first.stdout, first.stderr
    assert second.returncode == 0 and "already present" in second.stdout, second.stderr
    bad = tmp_path / "bad.txt"
    bad.write_text("0.5 missing/prefix web\n")
    proc = subprocess.run([*tool, *args[:1], str(bad), *args[2:]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {bad}:1:") and proc.stderr.count("\n") == 1
    proc = subprocess.run([*tool, *args, "--start-offsets", '{"nocorpus": 5}'], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --start-offsets: unknown corpus nocorpus")
    below_a_file = [*args[:-1], str(bad / "cache")]
    proc = subprocess.run([*tool, *below_a_file], capture_output=True, text=True, timeout=120)
    expected = f"error: --data-cache-path {bad / 'cache'}: {bad} is a file; expected a folder there\n"
    assert proc.returncode == 2 and proc.stderr == expected, proc.stderr
