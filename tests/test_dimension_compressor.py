"""The hidden-state dimension compressor: metrics against NumPy, padding, the tied transpose, PCA as initialisation
and as the optimum a trained map reaches on data of known spectrum, early stopping, stage 1b from 1a, the sweep's
table, one-line errors; and on a real checkpoint, hidden states the compressor extracts on the fly at TP=2 (rank 0
then trains) equal TP=1's, are the states the output layer reads, and an interrupted store is finished by
tools/extract_hidden.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from launchers import clean_env

from megatron_ext import dimension_compressor as dc
from megatron_ext.config import ConfigError
from megatron_ext.distributed import free_port
from megatron_ext.hidden_states import HiddenStore, jsonl_sequences, split_sequences
from megatron_ext.models.dimension_compressor import (
    ReconstructionMetrics,
    SecondMoment,
    TiedLinearCompressor,
    masked_mse,
    principal_axes,
)

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda line: None}


def synthetic_store(folder: Path, d_model: int = 32, sequences: int = 96, seed: int = 0) -> tuple[Path, np.ndarray]:
    """Anisotropic tokens x = Q diag(sqrt(0.8^i)) g (known spectrum 0.8^i, eigenvectors Q), in sequences of 8..32."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 33, size=sequences).tolist()
    q, _ = np.linalg.qr(rng.standard_normal((d_model, d_model)))
    x = (rng.standard_normal((sum(lengths), d_model)) * np.sqrt(0.8 ** np.arange(d_model))) @ q.T
    store = HiddenStore.create(folder, lengths, d_model, {"key": "synthetic", "inputs": {"synthetic": seed}})
    for i in range(sequences):
        rows = x[store.offsets[i] : store.offsets[i + 1]]
        store.write(i, torch.from_numpy(rows[None].astype(np.float32)), [len(rows)])
    return folder, q


def _args(store: Path, out: Path, *extra: str) -> dc.RunConfig:
    return dc.parse_args(["--hidden-store", str(store), "--output-dir", str(out), *extra])


def numpy_metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """The issue's definitions in NumPy, of reconstructions b against tokens a (rows)."""
    err = b - a
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "mse": (err**2).mean(),
        "relative_error": (np.linalg.norm(err, axis=1) / np.linalg.norm(a, axis=1)).mean(),
        "cosine": cos.mean(),
        "variance_ratio": (b.var(axis=0) / a.var(axis=0)).mean(),
    }


# ---- the math ------------------------------------------------------------------------------------------------------


def test_metrics_equal_numpy_on_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.randn(3, 7, 16, generator=g) * 3 + 1, torch.randn(3, 7, 16, generator=g)
    m = ReconstructionMetrics(16)
    m.update(x[:2], x_hat[:2])  # streamed in two parts
    m.update(x[2:], x_hat[2:])
    got = m.result()
    expected = numpy_metrics(x.reshape(-1, 16).double().numpy(), x_hat.reshape(-1, 16).double().numpy())
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    assert float(masked_mse(x_hat, x, None)) == pytest.approx(expected["mse"], rel=1e-5)


def test_padding_is_excluded() -> None:
    g = torch.Generator().manual_seed(1)
    x, x_hat = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    padded_x, padded_h = x.clone(), x_hat.clone()
    padded_x[~mask], padded_h[~mask] = 1e6, -1e6  # garbage at the padding positions
    real_x, real_h = x[mask], x_hat[mask]
    masked, plain = ReconstructionMetrics(8), ReconstructionMetrics(8)
    masked.update(padded_x, padded_h, mask)
    plain.update(real_x, real_h)
    assert masked.result() == pytest.approx(plain.result(), rel=1e-12)
    assert float(masked_mse(padded_h, padded_x, mask)) == pytest.approx(float(masked_mse(real_h, real_x, None)))
    mom_masked, mom_plain = SecondMoment(8), SecondMoment(8)
    mom_masked.update(padded_x, mask)
    mom_plain.update(real_x)
    assert torch.allclose(mom_masked.matrix(), mom_plain.matrix(), rtol=1e-12)
    assert mom_masked.count == int(mask.sum())


def test_tied_decode_is_the_transpose() -> None:
    model = TiedLinearCompressor(12, 5, generator=torch.Generator().manual_seed(0))
    assert [n for n, _ in model.named_parameters()] == ["weight"]  # one matrix, no bias
    w = model.weight.detach().double().numpy()
    assert np.allclose(w @ w.T, np.eye(5), atol=1e-6)  # orthonormal rows at initialisation
    x = torch.randn(2, 3, 12)
    z = model.encode(x)
    assert z.shape == (2, 3, 5)
    assert np.allclose(z.detach().numpy(), x.numpy() @ w.T, atol=1e-5)
    assert np.allclose(model(x).detach().numpy(), x.numpy() @ w.T @ w, atol=1e-5)


def test_principal_axes_span_numpys_top_eigenvectors() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 10)) * np.linspace(3, 0.1, 10) + 0.5  # a mean: uncentred is not the covariance
    moment = SecondMoment(10)
    moment.update(torch.from_numpy(x).float())
    values, axes = principal_axes(moment.matrix())
    np_values, np_vectors = np.linalg.eigh(x.T @ x / len(x))
    assert np.allclose(values.numpy(), np_values[::-1], rtol=1e-5)
    top = np_vectors[:, ::-1][:, :4]
    assert np.allclose(axes[:4].double().numpy().T @ axes[:4].double().numpy(), top @ top.T, atol=1e-5)


def test_early_stopping_counts_non_improving_evaluations() -> None:
    stopper = dc.EarlyStopping(patience=2, min_delta=0.01)
    seen = [(stopper.update(loss), stopper.stop) for loss in (1.0, 0.5, 0.495, 0.4, 0.41, 0.45)]
    assert seen == [(True, False), (True, False), (False, False), (True, False), (False, False), (False, True)]
    assert stopper.best == 0.4


def test_lr_warms_up_then_decays_by_cosine() -> None:
    from megatron_ext.training.schedules import lr_at

    t = dc.parse_args(["--hidden-store", "s", "--lr", "0.01", "--min-lr", "0.001", "--warmup-ratio", "0.1"]).training
    schedule = dc.lr_schedule(t, 100)
    points = {0: 0.0, 5: 0.005, 10: 0.01, 55: 0.001 + 0.009 * 0.5, 100: 0.001}
    assert {p: lr_at(schedule, p) for p in points} == pytest.approx(points)
    assert schedule.lr_decay_style == "cosine"


# ---- training on stored hidden states ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    return synthetic_store(tmp_path_factory.mktemp("store") / "store")


def test_evaluation_and_training_steps_leave_the_padding_out(store: tuple[Path, np.ndarray]) -> None:
    """Batches of the store are padded: evaluation equals NumPy's metrics over the real rows, a training step's loss
    and gradient ignore what the padding holds, and the LR follows the warmup-cosine schedule step by step."""
    from megatron_ext.training.schedules import ParamScheduler, lr_at

    hidden = HiddenStore(store[0])
    ids = np.arange(10)
    x, mask = hidden.batch(ids[:4])
    assert not mask.all()  # sequences of different lengths
    model = TiedLinearCompressor(32, 4, generator=torch.Generator().manual_seed(0))
    got = dc.evaluate(model, dc.Data(hidden, ids, ids), 4, torch.device("cpu"))
    rows = np.asarray(hidden.hidden[: hidden.offsets[10]], dtype=np.float64)
    w = model.weight.detach().double().numpy()
    assert got == pytest.approx(numpy_metrics(rows, rows @ w.T @ w), rel=1e-6)

    x[~mask] = 1e3  # garbage where the store pads with zeros
    t = dc.parse_args(["--hidden-store", "s", "--lr", "0.01", "--min-lr", "0.001", "--warmup-ratio", "0.5"]).training
    schedule = dc.lr_schedule(t, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=0.0)
    scheduler = ParamScheduler(optimizer, schedule)
    real = x[mask].double()
    for step in range(1, 4):
        w = model.weight.detach().double().clone().requires_grad_()
        expected = (real @ w.T @ w - real).square().mean()
        expected.backward()
        loss, grad_norm = dc.train_step(model, model, optimizer, scheduler, x, mask, 0.0)
        assert loss == pytest.approx(float(expected.detach()), rel=1e-5)
        assert grad_norm == pytest.approx(float(w.grad.norm()), rel=1e-4)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(schedule, step))
    assert [lr_at(schedule, s) for s in (1, 2, 4)] == pytest.approx([0.005, 0.01, 0.001])
    _, grad_norm = dc.train_step(model, model, optimizer, scheduler, x, mask, 1e-3)  # clipped before the step
    assert grad_norm > 1e-2 and float(model.weight.grad.norm()) == pytest.approx(1e-3, rel=1e-4)


def test_pca_init_gives_pcas_loss_at_step_0(store: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    (result,) = dc.run(_args(store[0], tmp_path, "--init", "pca", "--d-compressed", "6", "--num-epochs", "1"), **QUIET)
    step0 = result.history[0]
    assert step0["step"] == 0
    for key in ("mse", "cosine", "relative_error", "variance_ratio"):
        assert step0[key] == pytest.approx(result.pca[key], rel=1e-6), key
    # Every evaluation's metrics and PCA's are in tensorboard.
    from megatron_ext.training.curves import read_scalars

    scalars = read_scalars(tmp_path / "tensorboard")
    for key in ("mse", "cosine", "relative_error", "variance_ratio"):
        steps, values = scalars[f"valid/{key}"]
        assert steps.tolist() == [h["step"] for h in result.history] and len(steps) == 2
        assert values == pytest.approx([h[key] for h in result.history], rel=1e-6), key
        assert scalars[f"pca/{key}"][1] == pytest.approx([result.pca[key]], rel=1e-6), key


def test_trained_cosine_reaches_pca_on_known_spectrum_and_sweep_table(
    store: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    """From orthogonal (random) initialisation, every D' ends within 0.01 of PCA's cosine; one table row per D'."""
    path, q = store
    cfg = _args(path, tmp_path, "--sweep", "--sweep-d-values", "4", "8", "16", "--num-epochs", "20", "--lr", "1e-2")
    results = dc.run(cfg, **QUIET)
    assert [r.d_compressed for r in results] == [4, 8, 16]
    for r in results:
        assert abs(r.best["cosine"] - r.pca["cosine"]) < 0.01, (r.d_compressed, r.best, r.pca)
        assert r.history[0]["cosine"] < r.pca["cosine"] - 0.05  # it did learn: random start is far from PCA
        w = torch.load(r.checkpoint, weights_only=True)["weight"].double().numpy()
        # The learnt projector W^T W approaches the known top-D' eigenspace Q_k Q_k^T.
        top = q[:, : r.d_compressed]
        assert np.linalg.norm(w.T @ w - top @ top.T) / np.sqrt(r.d_compressed) < 0.35
    rows = json.loads((tmp_path / "sweep_1a.json").read_text())
    assert [row["d_compressed"] for row in rows] == [4, 8, 16]
    assert rows[0]["ratio"] == 8.0 and rows[0]["parameters"] == 4 * 32
    assert rows[1]["cosine_trained"] == pytest.approx(results[1].best["cosine"])
    assert len((tmp_path / "sweep_1a.md").read_text().splitlines()) == 2 + 3
    assert (tmp_path / "sweep_1a.png").read_bytes()[:4] == b"\x89PNG"
    assert all((tmp_path / f"d{d}" / "stage1a_best.pt").is_file() for d in (4, 8, 16))


def test_early_stopping_stops_after_patience_and_keeps_the_best(store: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    # No evaluation can beat step 0 by the margin: stop after 2 more, and the kept weights are the initial ones.
    flags = ["--d-compressed", "4", "--num-epochs", "10", "--early-stopping-patience", "2", "--lr", "5e-2"]
    (result,) = dc.run(_args(store[0], tmp_path, *flags, "--early-stopping-min-delta", "1e9"), **QUIET)
    assert result.stopped_early and result.epochs == 2 and len(result.history) == 3
    initial = TiedLinearCompressor(32, 4, generator=torch.Generator().manual_seed(1234)).weight
    saved = torch.load(result.checkpoint, weights_only=True)
    assert torch.equal(saved["weight"], initial.detach()) and saved["step"] == 0
    # Without the margin the best evaluation is kept, whichever epoch it came at.
    (result,) = dc.run(_args(store[0], tmp_path / "b", *flags, "--no_early_stopping"), **QUIET)
    assert not result.stopped_early and result.epochs == 10
    best = min(result.history, key=lambda h: h["mse"])
    assert result.best["mse"] == best["mse"]
    assert torch.load(result.checkpoint, weights_only=True)["step"] == best["step"]


def test_stage_1b_starts_from_1a(store: tuple[Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (first,) = dc.run(_args(store[0], tmp_path, "--d-compressed", "6", "--num-epochs", "3"), **QUIET)
    other, _ = synthetic_store(tmp_path / "chat", sequences=40, seed=5)
    (second,) = dc.run(_args(other, tmp_path, "--stage", "1b", "--d-compressed", "6", "--num-epochs", "1"), **QUIET)
    start = torch.load(first.checkpoint, weights_only=True)["weight"]
    data = dc.Data(HiddenStore(other), *split_sequences(40, 0.05, 1234))
    evaluated = dc.evaluate(TiedLinearCompressor(32, 6, basis=start), data, 8, torch.device("cpu"))
    assert second.history[0]["mse"] == pytest.approx(evaluated["mse"], rel=1e-6)
    assert second.checkpoint.endswith("stage1b_best.pt")
    # Without 1a's checkpoint: one line.
    rc = dc.main(
        ["--hidden-store", str(other), "--output-dir", str(tmp_path / "none"), "--stage", "1b", "--d_compressed", "6"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "stage1a_best.pt: no such file" in err[0] and "run --stage 1a" in err[0]


def test_reference_spellings_and_bad_inputs(store: tuple[Path, np.ndarray], capsys: pytest.CaptureFixture) -> None:
    cfg = dc.parse_args([
        "--hidden-store", str(store[0]), "--d_compressed", "8", "--num_epochs", "2",
        "--batch_size", "4", "--learning_rate", "0.01", "--no_early_stopping", "--early_stopping_patience", "5",
        "--sweep_d_values", "4", "8", "--output_dir", "o", "--init_from", "p.pt", "--num_samples", "10",
        "--max_seq_length", "16", "--no_torch_compile", "--warmup_ratio", "0.2", "--wandb_run_name", "r",
    ])  # fmt: skip
    c, t, h = cfg.compressor, cfg.training, cfg.hidden
    assert (c.d_compressed, c.sweep_d_values, c.output_dir, c.init_from) == (8, [4, 8], "o", "p.pt")
    assert (t.num_epochs, t.micro_batch_size, t.lr, t.early_stopping, t.early_stopping_patience) == (
        2,
        4,
        0.01,
        False,
        5,
    )
    assert (t.torch_compile, t.lr_warmup_fraction, h.num_samples, h.max_seq_length) == (False, 0.2, 10, 16)
    assert t.wandb_run_name == "r"
    assert dc.parse_args(["--hidden-store", "s", "--learning-rate", "0.5", "--batch-size", "3"]).training.lr == 0.5
    damaged = store[0].parent / "damaged"
    damaged.mkdir(exist_ok=True)
    (damaged / "meta.json").write_text("{oops")
    cases = {
        "--d-compressed 32": ["--hidden-store", str(store[0]), "--d-compressed", "32"],  # D' = H
        "meta.json: damaged (Expecting property name": ["--hidden-store", str(damaged)],
        "--sweep-d-values 40": ["--hidden-store", str(store[0]), "--sweep", "--sweep-d-values", "8", "40"],
        "--load": ["--load", str(store[0].parent / "missing")],
        "--hidden-store": ["--hidden-store", str(store[0].parent / "missing")],
        "give the hidden states": ["--d-compressed", "4"],
        "--stage 1b trains on reasoning/chat text": ["--load", "ckpt", "--stage", "1b"],
        "--lr": ["--hidden-store", "s", "--lr", "-1"],
    }
    for expected, argv in cases.items():
        rc = dc.main([*argv, "--output-dir", str(store[0].parent / "bad")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (argv, err)
    assert not (store[0].parent / "bad").exists()  # nothing written


def test_jsonl_records_and_their_mistakes(tmp_path: Path) -> None:
    """Text and chat records become token sequences; a line that is not JSON, not UTF-8 or not such a record is one
    error naming its file and line."""
    good = tmp_path / "good.jsonl"
    records = [
        {"text": "ab"},
        {"messages": [{"role": "user", "content": "c"}]},
        {"conversations": [{"from": "gpt", "value": "d"}]},
    ]
    good.write_text("\n\n".join(json.dumps(r) for r in records) + "\n")
    sequences = jsonl_sequences([str(good)], lambda text: list(text.encode()), 10, 8)
    assert [bytes(s.tolist()).decode() for s in sequences] == ["ab", "user: c", "gpt: d"]
    bad = tmp_path / "bad.jsonl"
    cases = {
        b"{bad": "Expecting property name",
        b'{"text": "\xff"}': "'utf-8' codec can't decode",
        b'{"a": 1}': "expected ",
    }
    for line, message in cases.items():
        bad.write_bytes(b'{"text": "ok"}\n' + line + b"\n")
        with pytest.raises(ConfigError, match=f"^{bad}:2: {message}"):
            jsonl_sequences([str(bad)], lambda text: list(text.encode()), 10, 8)


def test_extraction_makes_its_store_before_loading_the_lm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that cannot be made fails before the (possibly long) model load; a made store is resumable."""
    from types import SimpleNamespace

    from megatron_ext import hidden_states
    from megatron_ext.training import inference

    def load_model(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the model loads")

    monkeypatch.setattr(inference, "load_model", load_model)
    lm = hidden_states.FrozenLM(tmp_path / "ckpt", SimpleNamespace(model=SimpleNamespace(hidden_size=8)), 1)
    prepared = hidden_states.Prepared(lm, None, [np.arange(3), np.arange(5)], {"text": "t"})
    source = hidden_states.HiddenSourceConfig()
    with pytest.raises(OSError):  # no folder can be made in /proc (whoever runs the test)
        hidden_states.extract(source, prepared, Path("/proc/no-such-store/store"), **QUIET)
    with pytest.raises(RuntimeError, match="the model loads"):
        hidden_states.extract(source, prepared, tmp_path / "store", **QUIET)
    store = HiddenStore(tmp_path / "store")
    assert (store.done, store.num_sequences, store.hidden_size, store.meta["key"]) == (0, 2, 8, prepared.key)


def test_saved_config_from_the_checkpoint_else_config_json(tmp_path: Path) -> None:
    """One reader of a checkpoint's run config, for inference (the frozen LM) and the converters alike."""
    from megatron_ext import convert
    from megatron_ext.training.inference import saved_config
    from megatron_ext.training.layout import CheckpointNotFound

    ckpt = tmp_path / "iter_0000002"
    config = {"model": {"hidden_size": 64}}
    got = saved_config(ckpt, {"config": config})
    assert got == config and got["model"] is not config["model"]  # a copy
    with pytest.raises(CheckpointNotFound, match="holds no config and .*config.json is missing"):
        saved_config(ckpt, {})
    with pytest.raises(convert.ConvertError, match="holds no config"):
        convert.saved_config(ckpt, {})
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert saved_config(ckpt, {}) == convert.saved_config(ckpt, {}) == config


# ---- a real checkpoint: the compressor extracting on the fly at TP=1 and TP=2, tools/extract_hidden.py resuming -----


def test_extraction_tp2_equals_tp1_and_gives_the_output_layers_input(tmp_path: Path) -> None:
    env = {**clean_env(), "PYTHONPATH": str(ROOT)}
    ckpt = tmp_path / "ckpt"
    train = subprocess.run([
        sys.executable, str(ROOT / "pretrain_gpt.py"), "--num-layers", "2", "--hidden-size", "64",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64", "--swiglu", "--normalization",
        "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear", "--micro-batch-size", "2",
        "--train-iters", "2", "--eval-iters", "0", "--save", str(ckpt), "--data-cache-path", str(tmp_path / "data"),
    ], env={**env, "MASTER_PORT": str(free_port())}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    rng = np.random.default_rng(0)
    jsonl = tmp_path / "chat.jsonl"
    with jsonl.open("w") as f:  # lengths from ~30 to over 64 tokens: padding and truncation
        for i in range(12):
            turns = [{"role": "user", "content": "x" * int(rng.integers(1, 40))},
                     {"role": "assistant", "content": f"def f({i}): return {i * i}"}]  # fmt: skip
            f.write(json.dumps({"messages": turns}) + "\n")
    common = ["--load", str(ckpt), "--input", str(jsonl), "--max-seq-length", "64", "--extract-batch-size", "5",
              "--num-samples", "12"]  # fmt: skip
    tp2 = subprocess.Popen([
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29742",
        "-m", "megatron_ext.dimension_compressor", *common, "--tensor-model-parallel-size", "2", "--d-compressed", "8",
        "--num-epochs", "1", "--valid-fraction", "0.25", "--output-dir", str(tmp_path / "tp2"),
    ], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    tp1 = subprocess.run([sys.executable, str(ROOT / "tests" / "hidden_state_scenario.py"), str(ckpt), str(jsonl),
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    out, err = tp2.communicate(timeout=300)
    assert tp1.returncode == 0, tp1.stdout[-3000:] + tp1.stderr[-3000:]
    assert tp2.returncode == 0, out[-2000:] + err[-3000:]
    assert out.count("D'=8 cosine trained") == 1  # rank 0 trains on the store both ranks extracted
    (tp2_store,) = (tmp_path / "tp2" / "hidden").iterdir()
    scenario = json.loads((tmp_path / "scenario.json").read_text())
    assert scenario["rc"] == 0
    assert "D'=4 cosine trained" in tp1.stdout and "D'=32 cosine trained" in tp1.stdout  # H/16 .. H/2 of H=64
    assert scenario["logits_max_diff"] < 1e-4  # hidden @ embedding^T is the LM's logits: the output layer's input
    one, two = HiddenStore(scenario["store"]), HiddenStore(tp2_store)
    assert one.complete and two.complete
    lengths = one.lengths()
    assert lengths.max() == 64 and lengths.min() < 64  # some sequences were padded in their batch
    assert np.array_equal(one.offsets, two.offsets)
    assert np.allclose(np.asarray(one.hidden), np.asarray(two.hidden), rtol=1e-5, atol=1e-5)
    assert len(json.loads((tmp_path / "run" / "sweep_1a.json").read_text())) == 4
    # Interrupted after 5 sequences: the same command continues there (in another layout too) and ends equal.
    rows = slice(int(two.offsets[5]), None)
    resumed = HiddenStore(tp2_store, writable=True)
    resumed.hidden[rows] = 0.0
    resumed.hidden.flush()
    (tp2_store / "progress.json").write_text(json.dumps({"done": 5}))
    tool = [sys.executable, str(ROOT / "tools" / "extract_hidden.py"), "--output", str(tp2_store), *common]
    again = subprocess.run(tool, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "continuing" in again.stderr and "after 5 of 12" in again.stderr, again.stderr
    assert np.allclose(np.asarray(one.hidden), np.asarray(HiddenStore(tp2_store).hidden), rtol=1e-5, atol=1e-5)
    other = subprocess.run([*tool, "--num-samples", "6"], env=env, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "made from other inputs" in other.stderr
