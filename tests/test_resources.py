"""DRY_RUN's resource estimate (megatron_ext/resources.py) against a hand computation, and as train_alcf.sh
prints it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from megatron_ext import resources
from megatron_ext.config import ConfigError, parse_args

ROOT = Path(__file__).resolve().parents[1]
# 4 layers of hidden 64, 4 heads in 2 query groups (head 16: q 64, kv 32), SwiGLU fc1 2 x 128, untied, no biases,
# RMSNorm, RoPE; bf16 at TP 2 x PP 2 with the distributed optimizer over DP 2; micro-batch 2 x 32 tokens.
FLAGS = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --ffn-hidden-size 128 --swiglu "
    "--normalization RMSNorm --position-embedding-type rope --untie-embeddings-and-output-weights "
    "--disable-bias-linear --seq-length 32 --micro-batch-size 2 --global-batch-size 16 --bf16 --hidden-dropout 0 "
    "--attention-dropout 0 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
    "--use-distributed-optimizer --train-iters 10"
).split()
ROWS = 256  # padded vocabulary


def test_memory_per_rank_matches_a_hand_computation() -> None:
    cfg = parse_args(FLAGS)
    cfg.resolve_batch(8)  # DP 2
    layer = 64 * (64 + 2 * 32) + 64 * 64 + (64 * 128 * 2 + 128 * 64) + 2 * 64  # QKV, proj, fc1, fc2, 2 norms
    assert layer == 36992
    last_stage = 2 * layer + 64 + ROWS * 64  # 2 layers, final norm, output layer (> the first stage's embedding)
    params = last_stage // 2  # TP 2
    est = resources.estimate(cfg, ROWS, data_parallel=2, train_tokens=1000)
    assert est.parameters == params == 45216
    assert (est.weights, est.gradients, est.optimizer) == (2 * params, 4 * params, 12 * params / 2)
    # Per token of one layer: Q, K, V (64 + 2 x 32), attention out (64), fc1 (2 x 128), SwiGLU out (128) in bf16,
    # split over TP 2; two norm inputs, QKV input and fc1 input (4 x 64) replicated; no dropout masks.
    per_layer = 2 * 32 * (2 * (128 + 64 + 256 + 128) / 2 + 2 * (4 * 64 + 64 + 64))
    first = 2 * per_layer * 2  # 2 layers x min(PP 2, 4 micro-batches) in flight
    last = 2 * per_layer + 2 * 32 * ROWS / 2 * (2 + 4)  # one in flight, plus bf16 logits and their fp32 copy
    assert est.activations == max(first, last) == first
    params_total = 4 * layer + ROWS * 64 + 64 + ROWS * 64
    per_token = 3 * (2 * (params_total - ROWS * 64) + 2 * (2 * 4 * 32 * 64))  # Megatron-LM's count
    assert est.flops == per_token * 1000


def test_recomputation_keeps_only_layer_inputs_and_one_layer() -> None:
    cfg = parse_args([*FLAGS, "--recompute-activations", "--pipeline-model-parallel-size", "1"])
    cfg.resolve_batch(4)
    per_layer = resources.layer_activation_bytes(cfg)
    expected = 4 * 2 * (2 * 32 * 64) + per_layer + 2 * 32 * ROWS / 2 * 6  # inputs of 4 layers, one layer, logits
    assert resources.activation_bytes(cfg, ROWS, 4) == expected


def test_the_report_warns_when_it_does_not_fit_and_times_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_args(FLAGS)
    cfg.resolve_batch(8)
    monkeypatch.setattr(resources, "device_name", lambda env: ("NVIDIA H100 80GB HBM3", "nvidia-smi"))
    est = resources.estimate(cfg, ROWS, 2, 10**12)
    lines = resources.report(cfg, ROWS, 2, 8, 10**12, {})
    assert lines[-2] == f"  total {est.total / 1e9:.2f} GB of 80 GB (NVIDIA H100 80GB HBM3, from nvidia-smi)"
    seconds = est.flops / (8 * 989e12)
    assert lines[-1] == (
        f"  {est.flops:.3g} FLOPs on 8 devices of 989 TFLOP/s: {seconds / 60:.1f} min at peak, "
        f"{seconds / 0.4 / 60:.1f} min at 40% MFU"
    )
    small = resources.report(cfg, ROWS, 2, 8, 10**12, {"DEVICE_MEMORY_GB": "0.0005"})
    assert small[-3].startswith("  total 0.00 GB of 0.0005 GB (DEVICE_MEMORY_GB)")
    assert small[-2].startswith(f"warning: {est.total / 1e9:.2f} GB per rank does not fit in 0.0005 GB")
    with pytest.raises(ConfigError, match="DEVICE_MEMORY_GB='lots' is not a number of GB > 0"):
        resources.report(cfg, ROWS, 2, 8, 10**12, {"DEVICE_MEMORY_GB": "lots"})
    assert resources.device_spec("NVIDIA GH200 480GB") == resources.DEVICES["GH200"]  # not H200's
    assert resources.device_spec("NVIDIA A100-SXM4-40GB") == resources.Device(40, 312.0)


def test_dry_run_of_7b_on_a_24_gb_device_warns(tmp_path: Path) -> None:
    """The issue's case: `MODEL_ARCH=7B TRAIN_TOKENS=2T` on a laptop passed with no word."""
    env = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "MODEL_ARCH": "7B", "TRAIN_TOKENS": "2T", "DEVICE_MEMORY_GB": "24",
           "PYTHON": str(ROOT / ".venv" / "bin" / "python"), "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "train_alcf.sh")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("resources per rank"))
    assert lines[start + 2].endswith("of 24 GB (DEVICE_MEMORY_GB)")
    assert lines[start + 3].startswith("warning: ") and "does not fit in 24 GB" in lines[start + 3]
    assert lines[-1] == "DRY_RUN=1: nothing launched"
