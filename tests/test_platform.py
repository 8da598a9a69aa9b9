"""The CPU substitutes: each CUDA assumption they replace still exists in megatron-core, and they work.

If megatron-core fixes or moves one of these spots, the first tests fail and say which substitute to revisit.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_ext import distributed, platform

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


# Spots replaced for speed on CPU only (module, attribute path, text that shows what is replaced). If one changes,
# revisit the substitute named in the comment.
SPEED_SPOTS = [
    # models.gpt.NativeColumnLinear / NativeRowLinear: megatron-core adds the bias after the matmul, in a Python
    # autograd function, and the row-parallel layer adds it after its (one-rank) reduction.
    ("megatron.core.tensor_parallel.layers", "LinearWithGradAccumulationAndAsyncCommunication.forward",
     "output = output + bias"),
    ("megatron.core.tensor_parallel.layers", "ColumnParallelLinear.forward",
     "output_bias = self.bias if self.skip_bias_add"),
    ("megatron.core.tensor_parallel.layers", "RowParallelLinear.forward", "output = (output_ + self.bias)"),
    ("megatron.core.tensor_parallel.layers", "ColumnParallelLinear._forward_impl",
     "linear_with_grad_accumulation_and_async_allreduce"),
    ("megatron.core.transformer.mlp", "MLP.forward", "intermediate_parallel = intermediate_parallel + bias_parallel"),
    # models.gpt.SwiGLU, the MLP's activation module on CPU: megatron-core's unfused GLU adds the (zero) offset.
    ("megatron.core.transformer.mlp", "MLP.__init__",
     "if self.config.use_te_activation_func and not (submodules.activation_func is None)"),
    ("megatron.core.transformer.mlp", "MLP.forward", "x_linear + self.config.glu_linear_offset"),
    ("megatron.core.fusions.fused_bias_dropout", "_bias_dropout_add_func", "if bias is not None:"),
    # platform._use_foreach_clipping: the local fallbacks for Apex's multi-tensor kernels used in clipping.
    ("megatron.core.utils", "local_multi_tensor_l2_norm", "torch.tensor(l2)"),
    ("megatron.core.utils", "local_multi_tensor_scale", "dst.copy_(src * scale)"),
    ("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32", "l2_norm_impl,"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
     "multi_tensor_scale_impl, dummy_overflow_buf, [grads, grads], clip_coeff"),
    # platform._use_rope_without_copy: the unfused rotary embedding copies its result into a cat with the
    # (empty) pass-through part; apply_rotary_pos_emb looks it up in its module at each call.
    ("megatron.core.models.common.embeddings.rope_utils", "_apply_rotary_pos_emb_bshd",
     "return torch.cat((t, t_pass), dim=-1)"),
    ("megatron.core.models.common.embeddings.rope_utils", "apply_rotary_pos_emb", "return _apply_rotary_pos_emb_bshd("),
    # training.optim.use_fused_adam_on_cpu: without Apex/TE megatron-core builds torch's Adam/AdamW unfused.
    ("megatron.core.optimizer", "_get_megatron_optimizer_based_on_param_groups",
     "adam_cls = torch.optim.AdamW if config.decoupled_weight_decay else torch.optim.Adam"),
]  # fmt: skip


def _source(module: str, path: str) -> str:
    """The source of `path` as megatron-core's file has it: read from the file, not from the live attribute, which
    platform.setup replaces with our substitute once any test has set up a run in this process."""
    file = inspect.getsourcefile(importlib.import_module(module))
    assert file is not None, module
    text = Path(file).read_text()
    body: list[ast.stmt] = ast.parse(text).body
    for part in path.split("."):
        node = next(n for n in body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == part)
        body = node.body
    segment = ast.get_source_segment(text, node)
    assert segment is not None, path
    return segment


@pytest.mark.parametrize("module,path,text", CUDA_SPOTS)
def test_substituted_cuda_spot_still_exists(module: str, path: str, text: str) -> None:
    source = _source(module, path)
    assert text in source, f"{module}.{path} no longer contains {text!r}: revisit megatron_ext/platform.py"


@pytest.mark.parametrize("module,path,text", SPEED_SPOTS)
def test_replaced_speed_spot_still_exists(module: str, path: str, text: str) -> None:
    source = _source(module, path)
    assert text in source, f"{module}.{path} no longer contains {text!r}: revisit its substitute (see SPEED_SPOTS)"


def test_native_linears_keep_megatron_signatures() -> None:
    """NativeColumnLinear/NativeRowLinear override forward and read these attributes of megatron-core's layers."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    column = inspect.signature(ColumnParallelLinear.forward).parameters
    assert list(column) == ["self", "input_", "weight", "runtime_gather_output"]
    assert list(inspect.signature(RowParallelLinear.forward).parameters) == ["self", "input_"]
    for cls in (ColumnParallelLinear, RowParallelLinear):
        init = inspect.getsource(cls.__init__)
        for attribute in ("self.tp_group", "self.sequence_parallel", "self.explicit_expert_comm",
                          "self.gradient_accumulation_fusion", "self.skip_bias_add"):  # fmt: skip
            assert attribute in init, f"{cls.__name__} no longer sets {attribute}: revisit models/gpt.py"


def test_foreach_clipping_equals_megatron_fallbacks() -> None:
    """Same norm and same clipped gradients, bit for bit, as megatron-core's local implementations."""
    from megatron.core import utils

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        grads = [torch.randn(shape, generator=gen).to(dtype) for shape in [(64, 32), (32,), (7,), (3, 5, 2)]]
        ours, _ = platform._foreach_l2_norm(2048, torch.zeros(1), [grads], False)
        expected = torch.norm(torch.tensor([[float(torch.norm(g)) for g in grads]], dtype=dtype)).float()
        assert ours.shape == (1,) and ours.dtype == torch.float32 and torch.equal(ours[0], expected), (ours, expected)
        scaled, reference = [g.clone() for g in grads], [g.clone() for g in grads]
        platform._foreach_scale(2048, torch.zeros(1), [scaled, scaled], 0.37)
        utils.local_multi_tensor_scale(2048, torch.zeros(1), [reference, reference], 0.37)
        assert all(torch.equal(a, b) for a, b in zip(scaled, reference, strict=True))
        copies = [torch.empty_like(g) for g in grads]
        platform._foreach_scale(2048, torch.zeros(1), [grads, copies], 0.5)
        assert all(torch.equal(c, g * 0.5) for c, g in zip(copies, grads, strict=True))


def test_rope_without_copy_equals_megatron_rope() -> None:
    from megatron.core.models.common.embeddings import rope_utils

    original = inspect.unwrap(rope_utils._apply_rotary_pos_emb_bshd)
    params = list(inspect.signature(original).parameters)
    assert params == ["t", "freqs", "rotary_interleaved", "multi_latent_attention", "mscale"], params
    ours = platform._rope_without_copy(original)
    gen = torch.Generator().manual_seed(0)
    mixed = torch.randn(16, 2, 2, 96, generator=gen, requires_grad=True)  # [s, b, groups, (4 + 2) heads * 16]
    query = mixed[..., :64].reshape(16, 2, 8, 16)  # a strided view, as megatron-core's query
    for rotary_interleaved in (False, True):
        for freqs in (torch.randn(16, 1, 1, 16, generator=gen), torch.randn(16, 1, 1, 8, generator=gen)):
            expected, got = original(query, freqs, rotary_interleaved), ours(query, freqs, rotary_interleaved)
            assert torch.equal(got, expected)
            grad = torch.randn(expected.shape, generator=gen)
            (want,) = torch.autograd.grad(expected, mixed, grad)
            (have,) = torch.autograd.grad(got, mixed, grad)
            assert torch.equal(have, want)


def test_fused_adam_on_cpu_follows_unfused_adam() -> None:
    """The same update up to fp32 rounding; saved groups as megatron-core built them."""
    import types

    from megatron_ext.training.optim import use_fused_adam_on_cpu

    def build() -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(32, 16), (16,), (5, 3)]]
        groups = [{"params": params[::2], "weight_decay": 0.1}, {"params": params[1:2], "weight_decay": 0.0}]
        return params, torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)

    (plain_params, plain), (fused_params, fused) = build(), build()
    use_fused_adam_on_cpu(types.SimpleNamespace(chained_optimizers=[types.SimpleNamespace(optimizer=fused)]))  # type: ignore[arg-type]
    assert all(g["fused"] for g in fused.param_groups) and not any(g["fused"] for g in plain.param_groups)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(plain_params, fused_params, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        plain.step()
        fused.step()
    for a, b in zip(plain_params, fused_params, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (a - b).abs().max()
        assert torch.equal(plain.state[a]["step"], fused.state[b]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(plain.state[a][key], fused.state[b][key], rtol=1e-6, atol=0), key
    saved = fused.state_dict()
    assert [g["fused"] for g in saved["param_groups"]] == [g["fused"] for g in plain.state_dict()["param_groups"]]
    fused.load_state_dict(saved)
    assert all(g["fused"] for g in fused.param_groups), "loading a state dict switches the groups back"


def test_every_patched_module_still_assumes_cuda() -> None:
    stale = []
    for name in platform.CPU_PATCHED_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        if "torch.cuda" not in source and "cuda" not in source:
            stale.append(name)
    assert not stale, f"these modules no longer mention CUDA; drop them from CPU_PATCHED_MODULES: {stale}"


def _run(code: str) -> subprocess.CompletedProcess:
    port = distributed.free_port()  # a fixed port collides with any other run on the machine
    env_code = (
        f"import os; os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='{port}', RANK='0', WORLD_SIZE='1')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", env_code + textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_native_linears_match_megatron_linears() -> None:
    proc = _run(
        """
        import torch
        from megatron_ext import platform
        plat = platform.select("cpu"); platform.setup_device(plat, 0)
        torch.distributed.init_process_group("gloo")
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.distributed import DistributedDataParallel as DDP, DistributedDataParallelConfig
        from megatron.core.optimizer import clip_grads
        assert clip_grads.l2_norm_impl is platform._foreach_l2_norm
        assert clip_grads.multi_tensor_scale_impl is platform._foreach_scale
        parallel_state.initialize_model_parallel(1, 1)
        from megatron_ext.config import parse_args
        from megatron_ext.models import gpt
        build_spec = gpt.layer_spec
        for flags, exact in (("", False), ("--swiglu --disable-bias-linear --num-query-groups 2", True)):
            results = []
            for native in (True, False):
                cfg = parse_args(f"--train-iters 1 --hidden-dropout 0 --attention-dropout 0 {flags}".split())
                torch.manual_seed(0); tensor_parallel.model_parallel_cuda_manual_seed(1)
                gpt.layer_spec = lambda *args, native=native: build_spec(*args[:4], native)
                config = gpt.transformer_config(cfg, plat)
                config.use_te_activation_func &= native  # False: megatron-core's own GLU
                model = gpt.build_model(cfg, plat, config, 384)
                gpt.layer_spec = build_spec
                names = {type(m).__name__ for m in model.modules()}
                assert ("NativeColumnLinear" in names and "NativeRowLinear" in names) == native, names
                assert ("SwiGLU" in names) == (native and "--swiglu" in flags), names
                gen = torch.Generator().manual_seed(3)
                with torch.no_grad():  # non-zero biases, so that their placement matters
                    for name, p in model.named_parameters():
                        if name.endswith(".bias"):
                            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                ddp = DDP(config, DistributedDataParallelConfig(), model)
                losses, grads = [], []
                for _ in range(2):  # two micro-batches: the second accumulates into the gradient buffer
                    x = torch.randint(0, 256, (2, 64), generator=gen); pos = torch.arange(64).expand(2, -1)
                    loss = ddp(x, pos, None, labels=x)
                    loss.sum().backward()
                    losses.append(loss.detach())
                    grads.append([p.main_grad.clone() for p in model.parameters()])
                # Native: each linear's weight gradient was summed into the buffer by its matmul, not DDP's hook.
                fused = {n: p.grad_added_to_main_grad for n, p in model.named_parameters() if "linear" in n}
                assert all(v == (n.endswith("weight") and native) for n, v in fused.items()), fused
                results.append((losses, grads))
            (losses_a, grads_a), (losses_b, grads_b) = results
            for step, (loss_a, loss_b, step_a, step_b) in enumerate(zip(losses_a, losses_b, grads_a, grads_b)):
                if exact and step == 0:  # no bias, nothing accumulated yet: the same matmuls
                    assert torch.equal(loss_a, loss_b) and all(map(torch.equal, step_a, step_b))
                    continue
                # a bias inside the matmul or a sum inside it: fp32 rounding only
                assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=1e-5), (loss_a - loss_b).abs().max()
                for a, b in zip(step_a, step_b, strict=True):
                    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * b.abs().max()), (a - b).abs().max()
        print("ok")
        """
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


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
