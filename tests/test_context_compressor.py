"""The context compressor (--model-variant context-compressor, megatron_ext/context_compressor.py): down-scaling
positions, window-mode and answer-only targets on hand-made samples, and (one 2-process launch of
tests/context_compressor_scenarios.py) the frozen LM, TP=2 against TP=1, exact resume, another LM refused, the
encoder with all layers at ratio 1 against the LM's own hidden states, stage ft's evaluation, the tool chain."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launchers import ROOT, clean_env, launch_scenarios, ngram_corpus

from megatron_ext.config import ConfigError, ContextCompressorOptions, parse_args
from megatron_ext.data import context_compressor as data

SCRIPT = ROOT / "tests" / "context_compressor_scenarios.py"


@pytest.mark.parametrize("n", [16, 13, 1])
@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_keep_positions_count_and_order(n: int, ratio: int) -> None:
    count = math.ceil(n / ratio)
    stride = data.keep_positions(n, ratio, "stride")
    # the last position of each group of r (a shorter last group: its last position)
    assert stride.tolist() == [min(k * ratio + ratio - 1, n - 1) for k in range(count)]
    assert data.keep_positions(n, ratio, "terminal").tolist() == list(range(n - count, n))
    for seed in range(3):
        random = data.keep_positions(n, ratio, "random", np.random.default_rng(seed))
        assert len(random) == count and len(set(random.tolist())) == count
        assert (np.diff(random) > 0).all() and random.min() >= 0 and random.max() < n


def test_window_mode_targets_and_weights() -> None:
    """A 22-token document, windows of 4 at ratio 2, encoder chunks of 8: windows 1..5 are predicted, each from
    the stride positions (2 per window) of the windows before it."""
    o = ContextCompressorOptions(comp_candidates=[2], window=4, encoder_max_length=8)
    doc = np.arange(100, 122)
    sample = data.window_sample(doc, o, np.random.default_rng(0))
    # Windows 0..4 compressed (window 5, the last, only predicted): positions 1, 3 of each, chunks of 2 windows
    assert [c.tolist() for c in sample.chunks] == [list(range(100, 108)), list(range(108, 116)), [116, 117, 118, 119]]
    assert sample.soft == [(0, 1), (0, 3), (0, 5), (0, 7), (1, 1), (1, 3), (1, 5), (1, 7), (2, 1), (2, 3)]
    assert len(sample.rows) == 5
    for i, row in enumerate(sample.rows, 1):
        window = doc[4 * i : 4 * i + 4]
        soft = row.inputs[: 2 * i]
        assert soft.tolist() == [-k - 1 for k in range(2 * i)]  # the soft tokens of windows 0..i-1, in order
        assert row.inputs[2 * i :].tolist() == window.tolist()
        scored = row.weights > 0
        assert row.labels[scored].tolist() == window.tolist()  # every token of window i, nothing else
        assert np.flatnonzero(scored).tolist() == list(range(2 * i - 1, 2 * i - 1 + len(window)))
    batch = data.collate([sample])
    assert batch["mask/lm_loss"].sum() == 4 * 4 + 2  # token-weighted: the last window has 2 tokens
    # a soft token's source is its chunk's row of the encoder output, its place the row's position
    e, s = batch["enc_tokens"].shape[1], batch["tokens"].shape[1]
    assert batch["soft_src"][:2].tolist() == [0 * e + 1, 0 * e + 3] and batch["soft_dst"][:2].tolist() == [0, 1]
    assert batch["soft_dst"][2:6].tolist() == [s + 0, s + 1, s + 2, s + 3]
    assert (batch["tokens"].flatten()[batch["soft_dst"]] == 0).all()


def test_ratios_per_window_are_drawn_per_sample_and_repeatable() -> None:
    o = ContextCompressorOptions(comp_candidates=[1, 2, 4], window=4, encoder_max_length=8)
    doc = np.arange(40)
    counts = {len(data.window_sample(doc, o, np.random.default_rng([1, 1, i])).soft) for i in range(20)}
    assert len(counts) > 1  # windows get different ratios
    a, b = (data.window_sample(doc, o, np.random.default_rng([1, 1, 7])) for _ in range(2))
    assert a.soft == b.soft


def _record(context: str) -> data.Record:
    record = {"prompt": "H{context}T?", "context": context, "answer": "ok"}
    return data.read_record(record, lambda text: [ord(c) for c in text])


def test_answer_only_loss_and_middle_truncation() -> None:
    r = _record("abcdefghijklmnop")
    assert r.head.tolist() == [ord("H")] and r.tail.tolist() == [ord("T"), ord("?")]
    assert r.answer.tolist() == [ord("o"), ord("k")]
    o = ContextCompressorOptions(comp_candidates=[4], stage="ft", encoder_max_length=8, window=8, lm_max_length=64)
    sample = data.record_sample(r, o, np.random.default_rng(0))
    (row,) = sample.rows
    soft = -(-16 // 4)
    assert row.inputs.tolist() == [ord("H"), *(-k - 1 for k in range(soft)), ord("T"), ord("?"), ord("o"), ord("k")]
    scored = np.flatnonzero(row.weights)
    assert scored.tolist() == [1 + soft + 1, 1 + soft + 2]  # from '?' and 'o'
    assert row.labels[scored].tolist() == r.answer.tolist()
    # lm_max_length 8 leaves 8 - 1 - 2 - 2 = 3 positions: 3 x 4 context tokens, first and last halves
    assert data.fit_context(r, 4, 8).tolist() == [ord(c) for c in "abcdefklmnop"]
    assert data.fit_context(r, 1, 8).tolist() == [ord(c) for c in "aop"]  # 3 tokens: 1 first, 2 last
    # without a {context} place the context comes first and the whole prompt follows
    plain = data.read_record({"prompt": "Q", "context": "xy", "answer": "a"}, lambda t: [ord(c) for c in t])
    assert plain.head.tolist() == [] and plain.tail.tolist() == [ord("Q")]


def test_evaluation_rows_score_the_same_tokens() -> None:
    o = ContextCompressorOptions(comp_candidates=[2, 4], stage="ft", encoder_max_length=8, window=8)
    sample = data.record_eval_sample(_record("abcdefgh"), o, np.random.default_rng(0))
    assert [row.loss for row in sample.rows] == ["nocontext_loss", "full_loss", "r2_loss", "r4_loss"]
    for row in sample.rows:
        assert row.labels[row.weights > 0].tolist() == [ord("o"), ord("k")]
    assert [len(row.inputs) for row in sample.rows] == [5, 13, 9, 7]


def test_options_reference_spellings_and_refusals() -> None:
    cfg = parse_args(
        "--model-variant context-compressor --compressor-lm L --comp_candidates 2 4 --window_mode --window 64 "
        "--encoder_num_hidden_layers 3 --encoder_max_length 128 --lm_max_length 256 --min_length 10 --max_length 900 "
        "--pretraining_down_scaling_method random --down_scaling_method terminal --stage ft --train_data x.jsonl "
        "--train-iters 1".split()
    )
    o = cfg.variant_options
    assert isinstance(o, ContextCompressorOptions)
    assert (o.comp_candidates, o.encoder_num_layers, o.encoder_max_length, o.lm_max_length) == ([2, 4], 3, 128, 256)
    assert (o.min_length, o.max_length, o.pretraining_down_scaling_method, o.down_scaling_method) == (
        10, 900, "random", "terminal",
    )  # fmt: skip
    base = ["--model-variant", "context-compressor", "--compressor-lm", "L", "--train-iters", "1"]
    for extra, message in (
        (["--pipeline-model-parallel-size", "2", "--num-layers", "2"], "pipeline parallelism is not built"),
        (["--comp_candidates", "3"], "--comp-candidates 3 must divide --window 1024"),
        (["--stage", "ft"], "--stage ft needs --train-data"),
        (["--no-window-mode"], "without --window-mode is not built"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_args([*base, *extra])
    with pytest.raises(ConfigError, match="needs --compressor-lm"):
        parse_args(["--model-variant", "context-compressor", "--train-iters", "1"])


def _write_data(work: Path) -> None:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta"]
    with (work / "docs.jsonl").open("w") as f:
        for _ in range(24):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=rng.integers(6, 12)))}) + "\n")
    with (work / "records.jsonl").open("w") as f:
        for _ in range(8):
            pairs = {f"k{i}": str(rng.choice(words)) for i in range(3)}
            key = str(rng.choice(list(pairs)))
            context = " ".join(f"{k}={v}" for k, v in pairs.items())
            f.write(json.dumps({"prompt": f"{{context}} {key}?", "context": context, "answer": pairs[key]}) + "\n")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("context_compressor")
    _write_data(work)
    prefix = ngram_corpus(str(work / "ngrams"))
    names = ["lm", "lm2", "dp2", "dp2_resume", "tp2", "other_lm", "r1", "ft"]
    return launch_scenarios(SCRIPT, 2, 29541, [prefix, str(work)], work / "out.json", names), work


def test_lm_is_frozen_and_bit_identical_after_training(launched: tuple[dict, Path]) -> None:
    found, _ = launched
    dp2 = found["dp2"]
    assert dp2["lm_identical"] and not dp2["lm_in_optimizer"] and not dp2["lm_requires_grad"]
    assert dp2["loss"][-1] < dp2["loss"][0]  # the encoder learns


def test_tensor_parallel_equals_one_process_layout(launched: tuple[dict, Path]) -> None:
    found, _ = launched
    assert found["tp2"]["loss"] == pytest.approx(found["dp2"]["loss"], rel=1e-5)
    assert found["tp2"]["grad_norm"] == pytest.approx(found["dp2"]["grad_norm"], rel=1e-4)


def test_resume_is_exact_and_another_lm_is_refused(launched: tuple[dict, Path]) -> None:
    found, work = launched
    assert found["dp2_resume"]["loss"] == found["dp2"]["loss"][2:]
    assert found["dp2_resume"]["grad_norm"] == found["dp2"]["grad_norm"][2:]
    assert "is not the LM this encoder was trained against" in found["other_lm"]
    assert str(work / "lm") in found["other_lm"]


def test_all_layers_at_ratio_one_reproduce_the_lm_hidden_states(launched: tuple[dict, Path]) -> None:
    r1 = launched[0]["r1"]
    assert r1["max_abs_diff"] <= 1e-6 * max(r1["scale"], 1.0)


def test_stage_ft_evaluation_reports_each_context(launched: tuple[dict, Path]) -> None:
    values = launched[0]["ft"]["eval"]
    for name in ("nocontext_loss", "full_loss", "r1_loss", "r2_loss", "r4_loss", "gap_closed_r4"):
        assert name in values and math.isfinite(values[name]), (name, values)
    gap = values["nocontext_loss"] - values["full_loss"]
    assert values["gap_closed_r2"] == pytest.approx((values["nocontext_loss"] - values["r2_loss"]) / gap)


def test_inspect_and_to_hf_read_the_encoder_checkpoint(launched: tuple[dict, Path]) -> None:
    _, work = launched
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
    hf = work / "hf"
    proc = subprocess.run([*tool, "to-hf", "--load", str(work / "dp2"), "--save", str(hf), "--no-progress"],
                          capture_output=True, text=True, env=clean_env(), cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((hf / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["tie_word_embeddings"] and config["hidden_size"] == 32
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "inspect_checkpoint.py"), str(work / "dp2"),
                           "--no-tensors"], capture_output=True, text=True, env=clean_env(), cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 layers, hidden 32" in proc.stdout and "tied embeddings" in proc.stdout  # the encoder, not the LM
