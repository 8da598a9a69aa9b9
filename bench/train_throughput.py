"""Training throughput of our step (megatron-core GPTModel + DDP + optimizer) against a plain-PyTorch GPT.

All run in this process on the same data, alternating repeats (ours, plain, plain+fused, ours, ...), fp32 with
the same number of torch threads. The plain GPT has the identical shape and starts from a copy of our initial
weights (checked: same per-token loss), uses scaled_dot_product_attention(is_causal=True), torch AdamW with our
optimizer's hyper-parameters and weight-decay groups (none on biases and norms), at each step the learning rate
our schedule gave our step of the same index, the same gradient clipping and the same micro batch / gradient
accumulation with a per-token mean loss over the step. Same data, same weights and same schedule: the losses of
the loss columns agree, which shows they compute the same training step.
All read their micro-batches from the same megatron-core GPTDataset through the same `MicroBatches` reader, so
data loading is included for each (its cost alone is printed too).
Our trainer steps with torch's fused AdamW on CPU (see `megatron_ext.training.optim.use_fused_adam_on_cpu`). Two
plain models run beside it: one with AdamW as plain PyTorch constructs it (`torch.optim.AdamW(...)`: the for-loop
implementation on CPU) and one with `fused=True`, the same kernel as ours, so the table separates what the
optimizer kernel gives from what the rest of the step costs.

The default shape is a small LLM's (8 layers, hidden 512, 8 heads of dimension 64, seq 256, micro batch 8,
vocabulary 258 padded to 384: 25.5M parameters). What megatron-core's layout adds to the plain model (activations
copied between its sequence-first layout and the attention kernel's, linear in the hidden size; passes over every
gradient for the contiguous gradient buffer: zeroing it and scaling it by 1/tokens, and adding into it for the
parameters outside the layers' linears, whose matmuls sum into it themselves; a fixed Python cost per step) shrinks
against the matrix work, quadratic in the hidden size, as the model grows. A transformer layer alone (forward +
backward) runs at parity with the plain block. The ratios measured so far, and why single steps swing on a shared
machine: bench/results/train_throughput.md.
Both run with fixed glibc malloc thresholds (see `tune_malloc`; `--no-malloc-tune` keeps glibc's defaults), and
page faults per step are printed. The three models share one heap, which keeps growing for a few steps (ours took
fresh memory from the kernel, ~100k page faults, until its 4th step): the warmup goes on until a step of ours
takes (almost) none.
On a shared 2-core machine other processes dominate the spread: the table also gives CPU-time ratios, and the
fastest single step of each (the least disturbed) is compared too.

    python bench/train_throughput.py                # GPT-2 style (LayerNorm, GELU, learned positions, tied)
    python bench/train_throughput.py --llama        # RMSNorm, SwiGLU, RoPE, GQA, untied, no bias
    python bench/train_throughput.py --profile 2    # then profile 2 steps of each and print the top operators

Last, the cost of the per-phase timers (--timing-log-level): our step alone, alternating megatron-core given no
timers object, timers at level 0 (Megatron-LM's default: nothing timed inside a step) and at level 2 (every
phase and micro-batch timed, synchronising the device around each).

This is a benchmark, not a test: it prints what it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ext.platform import quiet_optional_dependency_warnings  # noqa: E402

quiet_optional_dependency_warnings()

from megatron_ext import distributed  # noqa: E402
from megatron_ext.config import Config, ModelConfig, parse_args  # noqa: E402
from megatron_ext.data.gpt_data import MicroBatches  # noqa: E402
from megatron_ext.models.gpt import num_parameters  # noqa: E402
from megatron_ext.training.loop import Trainer, setup, train_step  # noqa: E402
from megatron_ext.training.telemetry import Telemetry  # noqa: E402

Batch = dict[str, torch.Tensor]


# ---- the plain-PyTorch GPT ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Everything the plain model needs to be built like ours."""

    layers: int
    hidden: int
    heads: int
    groups: int  # key/value heads (== heads without GQA)
    head_dim: int
    ffn: int
    vocab: int
    seq: int
    rms_norm: bool
    eps: float
    swiglu: bool
    rope: bool
    rope_base: float
    learned_positions: bool
    max_positions: int
    tied: bool
    bias: bool

    @classmethod
    def from_config(cls, m: ModelConfig, vocab: int) -> Shape:
        groups = m.num_query_groups if m.group_query_attention and m.num_query_groups else m.num_attention_heads
        if m.position_embedding_type == "rope":
            assert m.rotary_percent == 1.0, "the plain model rotates whole heads only"
        return cls(
            layers=m.num_layers,
            hidden=m.hidden_size,
            heads=m.num_attention_heads,
            groups=groups,
            head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
            ffn=m.ffn_hidden_size,
            vocab=vocab,
            seq=m.seq_length,
            rms_norm=m.normalization == "RMSNorm",
            eps=m.norm_epsilon,
            swiglu=m.swiglu,
            rope=m.position_embedding_type == "rope",
            rope_base=float(m.rotary_base),
            learned_positions=m.position_embedding_type == "learned_absolute",
            max_positions=m.max_position_embeddings,
            tied=not m.untie_embeddings_and_output_weights,
            bias=not m.disable_bias_linear,
        )


def _norm(s: Shape) -> nn.Module:
    return nn.RMSNorm(s.hidden, eps=s.eps) if s.rms_norm else nn.LayerNorm(s.hidden, eps=s.eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PlainBlock(nn.Module):
    """Pre-norm transformer layer. The fused QKV projection keeps megatron-core's row layout (per key/value
    group: its query heads, then its key, then its value) so our weights load unchanged."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        self.ln1 = _norm(s)
        self.qkv = nn.Linear(s.hidden, (s.heads + 2 * s.groups) * s.head_dim, bias=s.bias)
        self.proj = nn.Linear(s.heads * s.head_dim, s.hidden, bias=s.bias)
        self.ln2 = _norm(s)
        self.fc1 = nn.Linear(s.hidden, s.ffn * (2 if s.swiglu else 1), bias=s.bias)
        self.fc2 = nn.Linear(s.ffn, s.hidden, bias=s.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        s = self.s
        b, n, _ = x.shape
        per_group = s.heads // s.groups
        qkv = self.qkv(self.ln1(x)).view(b, n, s.groups, per_group + 2, s.head_dim)
        q, k, v = qkv.split([per_group, 1, 1], dim=3)
        q = q.reshape(b, n, s.heads, s.head_dim).transpose(1, 2)  # [b, heads, n, d]
        k = k.reshape(b, n, s.groups, s.head_dim).transpose(1, 2)
        v = v.reshape(b, n, s.groups, s.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=per_group > 1)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, s.heads * s.head_dim))
        h = self.fc1(self.ln2(x))
        if s.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return x + self.fc2(h)


class PlainGPT(nn.Module):
    """Decoder-only GPT in plain PyTorch; returns per-token cross-entropy [b, s] like megatron-core's GPTModel."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        self.wte = nn.Embedding(s.vocab, s.hidden)
        self.wpe = nn.Embedding(s.max_positions, s.hidden) if s.learned_positions else None
        self.blocks = nn.ModuleList(PlainBlock(s) for _ in range(s.layers))
        self.ln_f = _norm(s)
        self.lm_head = None if s.tied else nn.Linear(s.hidden, s.vocab, bias=False)
        if s.rope:
            inv_freq = 1.0 / (s.rope_base ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim))
            angles = torch.outer(torch.arange(s.seq, dtype=torch.float32), inv_freq)
            angles = torch.cat((angles, angles), dim=-1)  # [seq, d], non-interleaved as megatron-core
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        n = tokens.size(1)
        rope = (self.rope_cos[:n], self.rope_sin[:n]) if self.s.rope else None
        for block in self.blocks:
            x = block(x, rope)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight) if self.lm_head is None else self.lm_head(x)
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), reduction="none")
        return ce.view_as(labels)


_LAYER_NAMES = {
    "input_layernorm": "ln1",
    "self_attention.linear_qkv": "qkv",
    "self_attention.linear_proj": "proj",
    "pre_mlp_layernorm": "ln2",
    "mlp.linear_fc1": "fc1",
    "mlp.linear_fc2": "fc2",
}


def _plain_name(megatron_name: str) -> str:
    top = {
        "embedding.word_embeddings.weight": "wte.weight",
        "embedding.position_embeddings.weight": "wpe.weight",
        "output_layer.weight": "lm_head.weight",
    }
    if megatron_name in top:
        return top[megatron_name]
    if megatron_name.startswith("decoder.final_layernorm."):
        return "ln_f." + megatron_name.rsplit(".", 1)[1]
    prefix, rest = megatron_name.split(".layers.", 1)
    assert prefix == "decoder", megatron_name
    index, rest = rest.split(".", 1)
    module, leaf = rest.rsplit(".", 1)
    return f"blocks.{index}.{_LAYER_NAMES[module]}.{leaf}"


def copy_weights(ours: nn.Module, plain: PlainGPT) -> None:
    """Loads our (unwrapped) GPTModel's parameters into the plain model; every parameter must be matched."""
    target = dict(plain.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            dest = target[_plain_name(name)]
            assert dest.shape == p.shape, (name, dest.shape, p.shape)
            dest.copy_(p)
            seen.add(_plain_name(name))
    missing = set(target) - seen
    assert not missing, f"plain parameters without a megatron counterpart: {sorted(missing)}"


@dataclass
class PlainTrainer:
    model: PlainGPT
    optimizer: torch.optim.Optimizer
    data: Iterator[Batch]
    accumulation: int
    clip: float
    # (lr, weight decay) our optimizer used at each step, appended by `follow_schedule` before our step: the plain
    # step k uses entry k, so both follow one schedule however it is configured.
    schedule: list[tuple[float, float]] = field(default_factory=list)
    steps: int = 0


def _decay_group_values(tr: Trainer) -> tuple[float, float]:
    """(lr, weight decay) of our optimizer's decayed parameter group now."""
    groups = tr.optimizer.param_groups
    decayed = max(groups, key=lambda g: g["weight_decay"])
    return decayed["lr"], decayed["weight_decay"]


def build_plain(cfg: Config, tr: Trainer, fused_adam: bool = False) -> PlainTrainer:
    """The plain model, optimizer and data, configured as our run is (hyper-parameters read from our optimizer);
    `fused_adam`: torch's fused AdamW instead of its default."""
    model = PlainGPT(Shape.from_config(cfg.model, tr.recipe.vocab_size))
    copy_weights(tr.model[0].module, model)  # type: ignore[arg-type]
    group = tr.optimizer.param_groups[0]
    lr, weight_decay = _decay_group_values(tr)
    assert {g["weight_decay"] for g in tr.optimizer.param_groups} <= {0.0, weight_decay}
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=group["betas"],
        eps=group["eps"],
        fused=fused_adam or None,
    )
    t = cfg.training
    data = MicroBatches(tr.train_data[0].dataset, t.micro_batch_size, 0, 1)
    return PlainTrainer(model, optimizer, data, t.global_batch_size // t.micro_batch_size, cfg.optimizer.clip_grad)


def plain_step(pt: PlainTrainer) -> dict[str, float]:
    """One optimizer step: per-token mean loss over the accumulated micro-batches, clip, AdamW (if finite)."""
    if pt.steps < len(pt.schedule):
        lr, weight_decay = pt.schedule[pt.steps]
        for g in pt.optimizer.param_groups:
            g["lr"] = lr
            g["weight_decay"] = weight_decay if g["weight_decay"] else 0.0
    batches = [next(pt.data) for _ in range(pt.accumulation)]
    tokens = sum(b["loss_mask"].sum() for b in batches).clamp(min=1)  # type: ignore[union-attr]
    pt.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros(())
    for b in batches:
        per_token = pt.model(b["tokens"], b["position_ids"], b["labels"])
        loss = (per_token.float() * b["loss_mask"]).sum() / tokens
        loss.backward()
        loss_sum += loss.detach()
    params = [p for p in pt.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, pt.clip).item() if pt.clip > 0 else math.nan
    loss_value = loss_sum.item()
    if math.isfinite(loss_value) and (pt.clip == 0 or math.isfinite(norm)):
        pt.optimizer.step()
    pt.steps += 1
    return {"lm_loss": loss_value, "grad_norm": norm}


# ---- measuring ------------------------------------------------------------------------------------------------


def _adam_kind(groups: list[dict]) -> str:
    return "fused" if all(g.get("fused") for g in groups) else "for-loop"


def megatron_flags(a: argparse.Namespace, cache: str) -> list[str]:
    flags = [
        "--num-layers", str(a.num_layers),
        "--hidden-size", str(a.hidden_size),
        "--num-attention-heads", str(a.heads),
        "--seq-length", str(a.seq_length),
        "--micro-batch-size", str(a.micro_batch_size),
        "--global-batch-size", str(a.micro_batch_size * a.grad_accum),
        "--hidden-dropout", "0",
        "--attention-dropout", "0",
        "--device", "cpu",
        "--train-iters", "1000",
        "--eval-iters", "0",
        "--data-cache-path", cache,
        "--seed", str(a.seed),
    ]  # fmt: skip
    if a.llama:
        flags += [
            "--normalization", "RMSNorm",
            "--swiglu",
            "--position-embedding-type", "rope",
            "--num-query-groups", str(a.query_groups),
            "--untie-embeddings-and-output-weights",
            "--disable-bias-linear",
        ]  # fmt: skip
    return flags + a.extra


def check_same_function(tr: Trainer, pt: PlainTrainer) -> float:
    """Largest difference of the per-token losses of both models on one batch (same weights, no grad)."""
    batch = next(MicroBatches(tr.train_data[0].dataset, tr.cfg.training.micro_batch_size, 0, 1))
    with torch.no_grad():
        ours = tr.model[0](batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        plain = pt.model(batch["tokens"], batch["position_ids"], batch["labels"])
    return (ours - plain).abs().max().item()


@dataclass
class Timed:
    wall_s: float  # time.perf_counter
    cpu_s: float  # time.process_time: CPU seconds of this process (all threads), less sensitive to other load
    faults: int  # minor page faults (fresh memory from the kernel)
    fastest_s: float  # the fastest single step (wall): the least disturbed by other processes
    loss: float  # of the last step


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(step: Callable[[], dict[str, float]], steps: int) -> Timed:
    """Times `steps` consecutive steps."""
    gc.collect()
    values: dict[str, float] = {}
    fastest = math.inf
    faults, cpu, start = _minor_faults(), time.process_time(), time.perf_counter()
    for _ in range(steps):
        begin = time.perf_counter()
        values = step()
        fastest = min(fastest, time.perf_counter() - begin)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Timed(wall, cpu, _minor_faults() - faults, fastest, values["lm_loss"])


def median_interval(values: list[float], level: float = 0.9, resamples: int = 2000) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median: how far the printed median could move on a rerun, which
    single repeats (swinging +-10% on a shared machine) do not show."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * resamples)], medians[int((1 - tail) * resamples) - 1]


def tune_malloc() -> str:
    """Keeps glibc from handing freed heap memory back to the kernel after every step.

    With glibc's default (dynamic) thresholds, the top of the heap is trimmed once a step's activations are freed,
    and the next forward pass takes the same memory again through tens of thousands of page faults per step. Which
    of two models in one process is hit depends on the order of their allocations (here it is ours; each alone
    is hit too), so by default both run with fixed thresholds: allocations up to 32 MiB come from the heap, and
    the heap is trimmed only above 1 GiB of free memory at its top.
    """
    if not sys.platform.startswith("linux"):
        return "malloc: left as is (not Linux)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "malloc: left as is (glibc mallopt unavailable)"
    return "malloc: glibc mmap threshold 32 MiB, trim threshold 1 GiB for both (--no-malloc-tune: defaults)"


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" (1/5/15 min; {os.cpu_count()} CPUs)"


def data_seconds_per_microbatch(tr: Trainer, n: int = 32) -> float:
    reader = MicroBatches(tr.train_data[0].dataset, tr.cfg.training.micro_batch_size, 0, 1, consumed_samples=10**6)
    start = time.perf_counter()
    for _ in range(n):
        next(reader)
    return (time.perf_counter() - start) / n


def layer_times(tr: Trainer, pt: PlainTrainer, pairs: int = 20) -> tuple[float, float, float]:
    """(ours ms, plain ms, median ratio ours/plain in tokens/s) of the first transformer layer's forward + backward
    on one micro-batch of random activations, alternating: the layers without embedding, loss, optimizer and the
    gradient buffer's zeroing and scaling (ours adds each gradient into the buffer, as plain accumulates `.grad`)."""
    gpt, s = tr.model[0].module, pt.model.s  # type: ignore[union-attr]
    layer, block = gpt.decoder.layers[0], pt.model.blocks[0]  # type: ignore[union-attr]
    x = torch.randn(s.seq, tr.cfg.training.micro_batch_size, s.hidden)
    rope_ours = gpt.rotary_pos_emb(s.seq) if s.rope else None  # type: ignore[union-attr]
    rope_plain = (pt.model.rope_cos, pt.model.rope_sin) if s.rope else None

    def ours() -> None:
        layer(x.clone().requires_grad_(), attention_mask=None, rotary_pos_emb=rope_ours)[0].sum().backward()

    def plain() -> None:
        block(x.transpose(0, 1).contiguous().requires_grad_(), rope_plain).sum().backward()

    times: dict[Callable[[], None], list[float]] = {ours: [], plain: []}
    for i in range(pairs + 2):  # the first two pairs warm up
        for fn, values in times.items():
            start = time.perf_counter()
            fn()
            if i >= 2:
                values.append(time.perf_counter() - start)
    for module in (layer, block):
        module.zero_grad(set_to_none=True)
    ratios = [p / o for o, p in zip(times[ours], times[plain], strict=True)]
    return 1000 * statistics.median(times[ours]), 1000 * statistics.median(times[plain]), statistics.median(ratios)


def profile(name: str, step: Callable[[], dict[str, float]], steps: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"\n== profile: {name}, {steps} steps, top {rows} operators by self CPU time ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def parse_bench_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--llama", action="store_true", help="RMSNorm, SwiGLU, RoPE, GQA, untied embeddings, no bias")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each (alternating)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each before the first repeat (at least)")
    p.add_argument(
        "--max-warmup",
        type=int,
        default=10,
        help="more untimed steps of each, up to this many, while a step of ours still takes fresh memory from the "
        "kernel (over 1000 page faults): the heap the three models share is still growing",
    )
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--query-groups", type=int, default=2, help="key/value heads with --llama")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--malloc-tune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fixed glibc malloc thresholds for both, so neither re-faults its activation memory every step",
    )
    p.add_argument("--data-cache-path", default=None, help="reuse a cache folder (default: a temporary one)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS", help="afterwards profile STEPS of each")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more Megatron flags for both")
    a = p.parse_args(argv)
    if a.extra and a.extra[0] == "--":
        a.extra = a.extra[1:]
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_bench_args(argv)
    a.malloc = tune_malloc() if a.malloc_tune else "malloc: glibc defaults (dynamic thresholds)"
    torch.set_num_threads(a.threads)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(distributed.free_port()))

    with contextlib.ExitStack() as stack:
        cache = a.data_cache_path or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_tp_"))
        cfg = parse_args(megatron_flags(a, cache))
        tr = setup(cfg)
        stack.callback(distributed.destroy)
        run(a, cfg, tr, build_plain(cfg, tr), build_plain(cfg, tr, fused_adam=True))


def run(a: argparse.Namespace, cfg: Config, tr: Trainer, pt: PlainTrainer, fused: PlainTrainer) -> None:
    """Times ours, plain (torch's default AdamW) and plain with fused AdamW, alternating."""
    m, t = cfg.model, cfg.training
    ours_params = sum(p.numel() for p in tr.model[0].module.parameters())  # type: ignore[union-attr]
    plain_params = sum(p.numel() for p in pt.model.parameters())
    formula = num_parameters(cfg, tr.recipe.vocab_size)
    group = tr.optimizer.param_groups[0]
    lr, wd = _decay_group_values(tr)
    flavour = "llama (RMSNorm, SwiGLU, RoPE, GQA, untied, no bias)"
    if not a.llama:
        flavour = "gpt (LayerNorm, GELU, learned positions, tied embeddings)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU, {sys.platform}; {a.malloc}")
    print(f"model: {flavour}")
    print(
        f"  layers {m.num_layers}, hidden {m.hidden_size}, heads {m.num_attention_heads}"
        f"{f', kv groups {m.num_query_groups}' if m.group_query_attention else ''}, head dim "
        f"{m.kv_channels or m.hidden_size // m.num_attention_heads}, ffn {m.ffn_hidden_size}, vocab "
        f"{tr.recipe.vocab_size}, seq {m.seq_length}, dropout {m.hidden_dropout}/{m.attention_dropout}"
    )
    print(
        f"  micro batch {t.micro_batch_size} x {t.global_batch_size // t.micro_batch_size} accumulation = global "
        f"{t.global_batch_size} ({t.global_batch_size * m.seq_length} tokens/step); AdamW (ours "
        f"{_adam_kind(tr.optimizer.param_groups)}, plain {_adam_kind(pt.optimizer.param_groups)}, plain+fused "
        f"{_adam_kind(fused.optimizer.param_groups)}) lr {lr:g} "
        f"betas {group['betas']} eps {group['eps']:g} wd {wd:g} clip {cfg.optimizer.clip_grad:g}"
    )
    print(f"parameters: ours {ours_params:,}  plain {plain_params:,}  (num_parameters formula {formula:,})")
    assert ours_params == plain_params, "the plain model must have our parameter count"
    diff = check_same_function(tr, pt)
    print(f"same weights, same batch: max |per-token loss ours - plain| = {diff:.2e}")
    data_ms = 1000 * data_seconds_per_microbatch(tr)
    print(f"data: both read the built-in corpus through MicroBatches ({data_ms:.2f} ms per micro-batch, included)")

    def ours() -> dict[str, float]:
        values = _decay_group_values(tr)  # what this step uses; the plain steps of the same index too
        pt.schedule.append(values)
        fused.schedule.append(values)
        return train_step(tr)

    runs: dict[str, Callable[[], dict[str, float]]] = {
        "ours": ours,
        "plain": partial(plain_step, pt),
        "plain+fused": partial(plain_step, fused),
    }
    tokens_per_step = t.global_batch_size * m.seq_length
    warm_start, warmup, faults = time.perf_counter(), 0, [math.inf, math.inf]
    # Past --warmup, more steps while ours still faults and faults less than the step before (a shape whose
    # activations are mmap'ed faults every step: no point waiting for that to settle).
    while warmup < a.warmup or (warmup < a.max_warmup and 1000 < faults[-1] < faults[-2]):
        for name, step in runs.items():
            before = _minor_faults()
            step()
            if name == "ours":
                faults.append(_minor_faults() - before)
        warmup += 1
    last = f" (the last step of ours: {faults[-1]} page faults)" if warmup else ""
    print(f"warmup: {warmup} steps of each in {time.perf_counter() - warm_start:.1f}s{last}")
    print(f"load average before the timed repeats: {_load()}")
    print(
        "\ntokens/s: tokens / wall seconds (perf_counter); ours/x: tokens/s ratio; cpu: the same ratio in CPU seconds "
        "(process_time, less sensitive to other processes); faults: minor page faults per step of ours"
    )
    print(
        f"{'repeat':>6} | {'ours tok/s':>10} | {'plain':>6} | {'+fused':>6} | {'ours/plain':>10} | {'cpu':>5} | "
        f"{'ours/+fused':>11} | {'cpu':>5} | {'faults':>6} | {'loss ours':>9} | {'plain':>7} | {'+fused':>7}"
    )
    tps: dict[str, list[float]] = {name: [] for name in runs}
    ratios: dict[str, list[float]] = {"plain": [], "plain+fused": []}
    cpu_ratios: dict[str, list[float]] = {"plain": [], "plain+fused": []}
    fastest = dict.fromkeys(runs, math.inf)
    for r in range(a.repeats):
        timed = {name: time_steps(step, a.steps) for name, step in runs.items()}
        for name, tm in timed.items():
            fastest[name] = min(fastest[name], tm.fastest_s)
            tps[name].append(a.steps * tokens_per_step / tm.wall_s)
        for name in ratios:
            ratios[name].append(tps["ours"][-1] / tps[name][-1])
            cpu_ratios[name].append(timed[name].cpu_s / timed["ours"].cpu_s)
        o, p, f = timed["ours"], timed["plain"], timed["plain+fused"]
        print(
            f"{r:>6} | {tps['ours'][-1]:>10.0f} | {tps['plain'][-1]:>6.0f} | {tps['plain+fused'][-1]:>6.0f} | "
            f"{ratios['plain'][-1]:>10.3f} | {cpu_ratios['plain'][-1]:>5.3f} | {ratios['plain+fused'][-1]:>11.3f} | "
            f"{cpu_ratios['plain+fused'][-1]:>5.3f} | {o.faults // a.steps:>6} | {o.loss:>9.4f} | {p.loss:>7.4f} | "
            f"{f.loss:>7.4f}"
        )
    print(f"load average after: {_load()}")
    print(
        "\nmedian tokens/s: "
        + ", ".join(f"{name} {statistics.median(values):.0f}" for name, values in tps.items())
        + f" ({a.repeats} repeats x {a.steps} steps)"
    )
    for name, adam in (("plain", "torch's default AdamW"), ("plain+fused", "fused AdamW, as ours")):
        low, high = median_interval(ratios[name])
        print(
            f"median ratio ours/{name} ({adam}): {statistics.median(ratios[name]):.3f} (90% bootstrap interval "
            f"{low:.3f}-{high:.3f}; min {min(ratios[name]):.3f}, max {max(ratios[name]):.3f}; cpu-time "
            f"{statistics.median(cpu_ratios[name]):.3f}; fastest single steps {fastest[name] / fastest['ours']:.3f})"
        )
    print(
        "fastest single step (the least disturbed by other processes): "
        + ", ".join(f"{name} {1000 * value:.0f} ms" for name, value in fastest.items())
    )
    if cfg.precision.params_dtype == "float32":
        ours_ms, plain_ms, ratio = layer_times(tr, pt)
        print(
            f"one transformer layer alone, forward + backward of a micro-batch (20 alternating pairs): ours "
            f"{ours_ms:.0f} ms, plain {plain_ms:.0f} ms, median ratio ours/plain {ratio:.3f}"
        )
    else:
        print("one transformer layer alone: skipped (the plain model is fp32)")
    timer_overhead(tr, a.steps, a.repeats)
    if a.profile:
        for name, step in runs.items():
            profile(name, step, a.profile, a.profile_rows)


def use_timers(tr: Trainer, level: int | None) -> None:
    """Our step with its timers at `level` (as --timing-log-level); None: megatron-core's configs get no timers
    object at all (as before the timers existed)."""
    cfg = copy.copy(tr.cfg)
    cfg.logging = replace(cfg.logging, timing_log_level=level or 0)
    tr.telemetry = Telemetry(cfg, tr.device, tr.config, tr.model, tr.optimizer, tr.metrics, rank=0)
    if level is None:
        for config in [tr.config, *(o.config for o in getattr(tr.optimizer, "chained_optimizers", [tr.optimizer]))]:
            config.timers = None


def timer_overhead(tr: Trainer, steps: int, repeats: int) -> None:
    """Step time of ours without timers, at timing level 0 and at level 2, alternating in this run: wall and CPU
    seconds (the CPU time is less sensitive to other processes on a shared machine)."""
    levels: dict[str, int | None] = {"no timers": None, "level 0": 0, "level 2": 2}
    timed: dict[str, list[Timed]] = {name: [] for name in levels}
    for _ in range(repeats):
        for name, level in levels.items():
            use_timers(tr, level)
            timed[name].append(time_steps(partial(train_step, tr), steps))
    use_timers(tr, tr.cfg.logging.timing_log_level)

    def ratio(a: str, b: str, cpu: bool) -> float:
        return statistics.median(
            (x.cpu_s / y.cpu_s) if cpu else (x.wall_s / y.wall_s) for x, y in zip(timed[a], timed[b])
        )

    ms = {name: 1000 * statistics.median(t.wall_s for t in values) / steps for name, values in timed.items()}
    print(
        f"\ntimers (our step alone, {repeats} alternating repeats x {steps} steps): median step "
        + ", ".join(f"{name} {value:.1f} ms" for name, value in ms.items())
        + f"; median ratio level 0 / no timers {ratio('level 0', 'no timers', False):.3f} (cpu-time "
        f"{ratio('level 0', 'no timers', True):.3f}), level 2 / level 0 {ratio('level 2', 'level 0', False):.3f} "
        f"(cpu-time {ratio('level 2', 'level 0', True):.3f})"
    )


if __name__ == "__main__":
    main()
