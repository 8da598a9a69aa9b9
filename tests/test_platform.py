"""The CPU substitutes: each CUDA assumption they replace still exists in megatron-core, and they work.

If megatron-core fixes or moves one of these spots, the first tests fail and say which substitute to revisit.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_ext import platform

ROOT = Path(__file__).resolve().parents[1]

# (module, attribute path, text that shows the CUDA assumption)
CUDA_SPOTS = [
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", "torch.cuda"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", "_lazy_call"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add", "torch.cuda.get_rng_state"),
    ("megatron.core.transformer.utils", "get_default_causal_mask", 'device="cuda"'),
    ("megatron.core.tensor_parallel.layers", "VocabParallelEmbedding.__init__", "torch.cuda.current_device"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining", 'device="cuda"'),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__", "torch.cuda.FloatTensor"),
    ("megatron.core.optimizer.distrib_optimizer",
     "DistributedOptimizer._build_model_and_main_param_groups", "torch.cuda."),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", "'torch.cuda.FloatTensor'"),
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer", ".cuda()"),
    ("megatron.core.pipeline_parallel.p2p_communication", "P2PCommunicator._communicate", "torch.cuda.current_device"),
]  # fmt: skip


def _resolve(module: str, path: str) -> object:
    obj: object = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return inspect.unwrap(obj)  # type: ignore[arg-type]


@pytest.mark.parametrize("module,path,text", CUDA_SPOTS)
def test_substituted_cuda_spot_still_exists(module: str, path: str, text: str) -> None:
    source = inspect.getsource(_resolve(module, path))  # type: ignore[arg-type]
    assert text in source, f"{module}.{path} no longer contains {text!r}: revisit megatron_ext/platform.py"


def test_every_patched_module_still_assumes_cuda() -> None:
    stale = []
    for name in platform.CPU_PATCHED_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        if "torch.cuda" not in source and "cuda" not in source:
            stale.append(name)
    assert not stale, f"these modules no longer mention CUDA; drop them from CPU_PATCHED_MODULES: {stale}"


def _run(code: str) -> subprocess.CompletedProcess:
    env_code = "import os; os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29561', RANK='0', WORLD_SIZE='1')\n"
    return subprocess.run(
        [sys.executable, "-c", env_code + textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only failure mode")
def test_megatron_core_needs_the_substitutes_on_cpu() -> None:
    proc = _run(
        """
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        import torch; torch.distributed.init_process_group("gloo")
        from megatron.core import parallel_state; parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(1)
        """
    )
    assert proc.returncode != 0, "megatron-core now seeds on CPU by itself: the RNG substitutes may be unnecessary"
    assert "CUDA" in proc.stderr


def test_substitutes_make_seeding_dropout_and_attention_work() -> None:
    proc = _run(
        """
        import torch
        from megatron_ext import platform
        plat = platform.select("cpu"); platform.setup_device(plat, 0)
        torch.distributed.init_process_group("gloo")
        from megatron.core import parallel_state, tensor_parallel
        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        outside = torch.get_rng_state()
        with tracker.fork():
            a = torch.nn.functional.dropout(torch.ones(1000), 0.5)
        assert torch.equal(outside, torch.get_rng_state()), "fork must restore the default generator"
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        with tracker.fork():
            b = torch.nn.functional.dropout(torch.ones(1000), 0.5)
        assert torch.equal(a, b), "same seed, same dropout mask"
        from megatron.core.transformer.utils import get_default_causal_mask
        assert get_default_causal_mask(4).device.type == "cpu"
        # Golden: our SDPA core attention equals megatron-core's own unfused attention on the same weights.
        from megatron_ext.config import parse_args
        from megatron_ext.models.gpt import build_model, transformer_config
        losses = []
        for backend in ("sdpa", "unfused"):
            cfg = parse_args(f"--train-iters 1 --attention-backend {backend} --num-query-groups 2 --swiglu "
                             "--position-embedding-type rope --hidden-dropout 0 --attention-dropout 0".split())
            torch.manual_seed(0); tensor_parallel.model_parallel_cuda_manual_seed(1)
            model = build_model(cfg, plat, transformer_config(cfg, plat), 384)
            x = torch.randint(0, 256, (2, 64)); pos = torch.arange(64).expand(2, -1)
            losses.append(model(x, pos, None, labels=x))
        assert torch.allclose(losses[0], losses[1], atol=1e-5), (losses[0] - losses[1]).abs().max()
        print("ok")
        """
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_select() -> None:
    assert platform.select("cpu") == platform.Platform("cpu", "gloo")
    if not torch.cuda.is_available():
        assert platform.select("auto").device_type == "cpu"
        with pytest.raises(platform.PlatformError, match="--device cuda"):
            platform.select("cuda")
    with pytest.raises(platform.PlatformError, match="does not run on CPU"):
        platform.select("cpu", "nccl")
    if not platform._xpu_available():
        with pytest.raises(platform.PlatformError, match="XPU"):
            platform.select("xpu")
