"""The one parameter count (megatron_ext/models/size.py, no torch) against the model megatron-core builds: the
count training logs, its FLOPs and train_alcf.sh's preset table (alcf_env.preset_parameters) all come from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext import alcf_env
from megatron_ext.config import parse_args
from megatron_ext.models.size import num_parameters

ROOT = Path(__file__).resolve().parents[1]

# Biases, LayerNorm, learned positions, tied output; GQA with --kv-channels, SwiGLU, untied; a train_alcf.sh preset.
CASES = [
    [],
    "--swiglu --num-query-groups 2 --kv-channels 16 --untie-embeddings-and-output-weights".split(),
    alcf_env.preset_flags(alcf_env.PRESETS["tiny"]),
]
BUILD = """
import json, sys, torch
from megatron_ext import platform
plat = platform.select("cpu"); platform.setup_device(plat, 0)
torch.distributed.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
from megatron.core import parallel_state, tensor_parallel
parallel_state.initialize_model_parallel(1, 1)
tensor_parallel.model_parallel_cuda_manual_seed(1)
from megatron_ext.config import parse_args
from megatron_ext.models.gpt import build_model, transformer_config
for flags in json.loads(sys.argv[2]):
    cfg = parse_args(flags)
    model = build_model(cfg, plat, transformer_config(cfg, plat), 384)
    print("built", sum(p.numel() for p in model.parameters()))
"""


def test_the_count_is_the_built_models(tmp_path: Path) -> None:
    args = [sys.executable, "-c", BUILD, str(tmp_path / "store"), json.dumps(CASES)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    built = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("built ")]
    assert built == [num_parameters(parse_args(flags), 384) for flags in CASES], proc.stderr[-3000:]


def test_preset_table_counts_the_model_train_alcf_sh_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name, preset in alcf_env.PRESETS.items():
        env = {"MODEL_ARCH": name, "NGPU_PER_HOST": "8", "TRAIN_ITERS": "10", "CUDA_VISIBLE_DEVICES": ""}
        plan = alcf_env.resolve({**env, "SAVE": "ckpt", "RUN_DIR": "run"}, launcher="torchrun")
        assert plan.config is not None
        assert alcf_env.preset_parameters(preset) == num_parameters(plan.config, 32000), name
