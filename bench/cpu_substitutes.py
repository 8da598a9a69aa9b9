"""Each CPU speed substitute against the megatron-core code it replaces, forward + backward, in one process.

- linear: `NativeColumnLinear` (one `F.linear`, bias inside the matmul) against megatron-core's
  ColumnParallelLinear (matmul in its own autograd function, then the bias) on one rank.
- rope: `platform._rope_without_copy` against megatron-core's unfused rotary embedding (which copies every query
  into a concatenation with the empty pass-through part).
- swiglu: `models.gpt.SwiGLU` against megatron-core's unfused GLU (which adds the zero `glu_linear_offset` and
  whose gradient halves autograd concatenates).
- wgrad: a linear's weight gradient summed into megatron-core DDP's gradient buffer inside the matmul
  (`models.gpt._LinearIntoMainGrad`) against autograd's fresh gradient that DDP's hook then adds into the buffer
  (megatron-core without its CUDA-only gradient-accumulation fusion); the MLP's first linear's shape.

The shapes are `bench/train_throughput.py`'s default model (tokens 256 x 8, hidden 512, 8 heads of 64, SwiGLU ffn
1408). Pairs alternate (megatron-core, ours); the median time of each and the median of the per-pair ratios
megatron-core / ours are printed (> 1: ours is faster). Both give the same input gradient (checked before timing;
tests/test_platform.py compares outputs and every gradient).

    python bench/cpu_substitutes.py
    python bench/cpu_substitutes.py --pairs 100 --threads 2

This is a benchmark, not a test: it prints what it measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ext.platform import quiet_optional_dependency_warnings  # noqa: E402

quiet_optional_dependency_warnings()

from megatron_ext import platform  # noqa: E402

Step = Callable[[], torch.Tensor]


def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor) -> Step:
    """A step: `fn` on a fresh leaf copy of `x`, backward with `grad`; returns the input gradient."""

    def step() -> torch.Tensor:
        leaf = x.detach().requires_grad_()
        fn(leaf).backward(grad)
        assert leaf.grad is not None
        return leaf.grad

    return step


def linear_pair(tokens: tuple[int, int], hidden: int, out: int) -> tuple[Step, Step]:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megatron_ext.models.gpt import NativeColumnLinear

    if not torch.distributed.is_initialized():  # one rank, rendezvous through a file: no port to collide on
        store = torch.distributed.FileStore(tempfile.mktemp(prefix="cpu_substitutes_"), 1)
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1)
    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=8, use_cpu_initialization=True, add_bias_linear=True
    )
    kwargs = dict(config=config, init_method=torch.nn.init.normal_, bias=True, gather_output=False)
    megatron, ours = ColumnParallelLinear(hidden, out, **kwargs), NativeColumnLinear(hidden, out, **kwargs)
    ours.load_state_dict(megatron.state_dict())
    x, grad = torch.randn(*tokens, hidden), torch.randn(*tokens, out)
    return fwd_bwd(lambda t: megatron(t)[0], x, grad), fwd_bwd(lambda t: ours(t)[0], x, grad)


def rope_pair(tokens: tuple[int, int], heads: int, groups: int, dim: int) -> tuple[Step, Step]:
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils._apply_rotary_pos_emb_bshd
    original = getattr(original, "__wrapped__", original)
    ours = platform._rope_without_copy(original)
    per_group = heads // groups
    mixed = torch.randn(*tokens, groups, (per_group + 2) * dim)  # megatron-core's fused QKV output
    freqs = torch.randn(tokens[0], 1, 1, dim)

    def query(t: torch.Tensor) -> torch.Tensor:  # the query as megatron-core splits it off the QKV output
        return t[..., : per_group * dim].reshape(*tokens, heads, dim)

    grad = torch.randn(*tokens, heads, dim)
    return (
        fwd_bwd(lambda t: original(query(t), freqs), mixed, grad),
        fwd_bwd(lambda t: ours(query(t), freqs), mixed, grad),
    )


def swiglu_pair(tokens: tuple[int, int], ffn: int) -> tuple[Step, Step]:
    from megatron_ext.models.gpt import _SwiGLUFunction

    def megatron_glu(y: torch.Tensor) -> torch.Tensor:  # megatron-core's MLP.forward without the fusion
        x_glu, x_linear = torch.chunk(y, 2, dim=-1)
        return F.silu(x_glu) * (x_linear + 0.0)

    y, grad = torch.randn(*tokens, 2 * ffn), torch.randn(*tokens, ffn)
    return fwd_bwd(megatron_glu, y, grad), fwd_bwd(_SwiGLUFunction.apply, y, grad)


def wgrad_pair(tokens: tuple[int, int], hidden: int, out: int) -> tuple[Step, Step]:
    from megatron_ext.models.gpt import _LinearIntoMainGrad

    def ddp_weight() -> torch.nn.Parameter:
        """A weight with a gradient-buffer slice and megatron-core DDP's backward hook."""
        weight = torch.nn.Parameter(0.02 * torch.randn(out, hidden, generator=torch.Generator().manual_seed(0)))
        weight.main_grad = torch.zeros_like(weight)  # type: ignore[attr-defined]
        weight.grad_added_to_main_grad = False  # type: ignore[attr-defined]

        def hook(p: torch.Tensor) -> None:  # DistributedDataParallel._make_backward_post_hook, one rank
            if not p.grad_added_to_main_grad:  # type: ignore[attr-defined]
                p.main_grad.add_(p.grad)  # type: ignore[attr-defined]
            p.grad = None

        weight.register_post_accumulate_grad_hook(hook)
        return weight

    plain, fused = ddp_weight(), ddp_weight()
    x, grad = torch.randn(*tokens, hidden), torch.randn(*tokens, out)
    return (
        fwd_bwd(lambda t: F.linear(t, plain), x, grad),
        fwd_bwd(lambda t: _LinearIntoMainGrad.apply(t, fused, None), x, grad),
    )


def measure(name: str, megatron: Step, ours: Step, pairs: int) -> None:
    assert torch.allclose(megatron(), ours(), rtol=1e-5, atol=1e-6), f"{name}: the gradients differ"
    for _ in range(3):
        megatron(), ours()
    times: dict[str, list[float]] = {"megatron": [], "ours": []}
    for _ in range(pairs):
        for key, step in (("megatron", megatron), ("ours", ours)):
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    ratios = [m / o for m, o in zip(times["megatron"], times["ours"], strict=True)]
    m, o = (1000 * statistics.median(times[k]) for k in ("megatron", "ours"))
    print(
        f"{name:<7} megatron-core {m:7.2f} ms  ours {o:7.2f} ms  median ratio megatron-core/ours "
        f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=40, help="alternating (megatron-core, ours) timings of each")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    platform.setup_device(platform.select("cpu"), 0)
    tokens = (256, 8)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; forward + backward, {a.pairs} pairs")
    measure("linear", *linear_pair(tokens, 512, 1536), a.pairs)
    measure("rope", *rope_pair(tokens, heads=8, groups=2, dim=64), a.pairs)
    measure("swiglu", *swiglu_pair(tokens, ffn=1408), a.pairs)
    measure("wgrad", *wgrad_pair(tokens, 512, 2 * 1408), a.pairs)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
