"""One typed schema for every option.

Each component has a dataclass; each field carries its help text, its Megatron-LM flag (derived from the field
name unless given) and any Megatron-DeepSpeed aliases. The same schema renders the command line (`--help`),
validates (`__post_init__` raises `ConfigError` naming the flag and the fix) and is saved as JSON with every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from megatron_ext.cli import OneLineParser, UserError
from megatron_ext.compat import (
    ATTENTION_BACKENDS,
    LEGACY_SPELLINGS,
    NO_EFFECT,
    NOT_BUILT,
    VALUE_ALIASES,
    Accepted,
    refused_feature,
)
from megatron_ext.lr_schedule import (
    LR_DECAY_STYLES,
    LR_LENGTHS,
    STYLE_ALIASES,
    WD_INCR_STYLES,
    WSD_DECAY_STYLES,
    ScheduleConfig,
    ScheduleError,
    canonical_style,
    resolve_lengths,
)


class ConfigError(UserError, ValueError):
    """A user mistake in the configuration; the message is one line naming the option and the fix."""


def opt(
    default: Any,
    help: str,  # noqa: A002 - mirrors argparse
    *,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    choices: Sequence[Any] | None = None,
    nargs: str | int | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field: default plus the metadata the command line and docs are rendered from."""
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": choices, "nargs": nargs}
    meta["metavar"] = metavar
    if isinstance(default, list | dict):
        return field(default_factory=functools.partial(type(default), default), metadata=meta)
    return field(default=default, metadata=meta)


def derived(help: str, **kwargs: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A config field that follows from others unless given. Its annotation is the resolved type, the one every
    reader sees once the section is built (or, for what needs the world size, after `Config.resolve_batch`); its
    default, None, stands for "not given" on the command line and in config.json, and the section's
    `__post_init__` (or `resolve_batch`) replaces it. Only parse-time code asks whether one was given (`is None`)."""
    return opt(None, help, **kwargs)


def parse_count(text: str) -> int:
    """2000, 5e9, 300B, 2T, 1_000 -> a whole count (K/M/B/T are powers of 1000): the type of every length flag
    (`--train-iters`, `--lr-warmup-tokens`, ...), so token budgets can be written as people say them. Exact
    (a Fraction, not a float or a Decimal, whose 28-digit context rounds 1.00...01e3 to a whole number) at any
    number of digits; an exponent with a suffix (1e3K) is refused as a likely typo. A minus sign is kept, for the
    range checks to name the flag."""
    m = re.fullmatch(r"(-?[0-9][0-9_]*(?:\.[0-9]*)?)(?:[eE]([+-]?[0-9]{1,3}))?\s*([kKmMbBgGtT]?)", text.strip())
    if m is not None and not (m.group(2) and m.group(3)):
        try:  # ValueError: more digits than int() reads (sys.get_int_max_str_digits), far past MAX_COUNT anyway
            mantissa = Fraction(m.group(1).replace("_", ""))
        except ValueError:
            mantissa = Fraction(MAX_COUNT + 1)
        value = mantissa * Fraction(10) ** int(m.group(2) or 0) * _COUNT_SUFFIXES[m.group(3).lower()]
        if value.denominator == 1 and abs(value) <= MAX_COUNT:
            return int(value)
    raise argparse.ArgumentTypeError(f"{text!r}: expected a whole count such as 2000, 5e9, 300B or 2T")


MAX_COUNT = 10**18  # far beyond any run: 1e400 is a typo, not a length
_COUNT_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def is_length(f: dataclasses.Field) -> bool:
    """A length of the run or of the schedule (`train_iters`, `lr_warmup_tokens`, ...): a flag that takes counts."""
    return f.name.startswith(("train_", "lr_")) and f.name.endswith(("_iters", "_samples", "_tokens"))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def file_in_the_way(path: str | Path) -> Path | None:
    """`path` itself or its nearest existing parent, when that is a file: no folder can be made at `path`."""
    existing = next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def folder_problem(folder: str | Path) -> str | None:
    """Why no folder can be made at `folder` (a typo like `--save log.txt`, or `log.txt/ckpt`), or None."""
    blocker = file_in_the_way(folder)
    if blocker is None:
        return None
    return (
        "is a file; expected a folder" if blocker == Path(folder) else f"{blocker} is a file; expected a folder there"
    )


def write_problem(folder: str | Path) -> str | None:
    """Why nothing can be written at `folder` (or the parent it would be made in), or None: a read-only file
    system or a missing permission is found at start-up, not as an OSError traceback at the first save."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    cause = "read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "permission denied"
    return f"cannot write there{'' if existing == path else f' ({existing})'}: {cause}"


def iterations_for_tokens(tokens: int, seq_length: int, global_batch_size: int) -> int:
    """A run length in tokens as whole iterations, rounded up (train_alcf.sh's TRAIN_TOKENS, plot_lr's
    --train-tokens)."""
    return -(-tokens // (seq_length * global_batch_size))


def _check_positive(section: object, *names: str) -> None:
    """Each named field of `section`, where set (not None), is > 0."""
    for name in names:
        value = getattr(section, name)
        _check(value is None or value > 0, f"--{name.replace('_', '-')} must be positive, not {value}")


@dataclass
class ModelConfig:
    """Shape and flavour of the GPT (Llama-style options included)."""

    num_layers: int = opt(4, "Number of transformer layers.")
    hidden_size: int = opt(128, "Transformer hidden size.")
    num_attention_heads: int = opt(4, "Number of attention heads.")
    group_query_attention: bool = opt(False, "Use grouped-query attention (GQA) with --num-query-groups.")
    num_query_groups: int | None = opt(
        None, "Number of key/value head groups for GQA.", aliases=["--num-key-value-heads"]
    )
    ffn_hidden_size: int = derived(
        "MLP hidden size; default 4 x hidden (with --swiglu: Megatron-LM's 8/3 x hidden rounded up to 64)."
    )
    kv_channels: int | None = opt(None, "Per-head dimension; default hidden_size / num_attention_heads.")
    seq_length: int = opt(256, "Sequence length of a training sample.")
    max_position_embeddings: int = derived("Largest position for learned absolute embeddings; default --seq-length.")
    swiglu: bool = opt(False, "SwiGLU MLP (gated SiLU) as in Llama.")
    normalization: str = opt("LayerNorm", "Normalisation layer: LayerNorm or RMSNorm (any case).")
    norm_epsilon: float = opt(1e-5, "Epsilon of the normalisation layers.", aliases=["--layernorm-epsilon"])
    position_embedding_type: str = opt(
        "learned_absolute", "Position embedding.", choices=["learned_absolute", "rope", "none"]
    )
    rotary_base: int = opt(10000, "RoPE base (theta).", aliases=["--rope-theta"])
    rotary_percent: float = opt(1.0, "Fraction of each head's dimensions that RoPE rotates.")
    untie_embeddings_and_output_weights: bool = opt(False, "Separate output layer instead of the embedding.")
    disable_bias_linear: bool = opt(False, "No bias in linear layers (Llama).", aliases=["--no-bias"])
    hidden_dropout: float = opt(0.1, "Dropout after attention and MLP.")
    attention_dropout: float = opt(0.1, "Dropout of attention probabilities.")
    init_method_std: float = opt(0.02, "Standard deviation of the weight initialisation.")
    use_cpu_initialization: bool = opt(
        True,
        "Layout-free initial weights: every full tensor drawn on the CPU from (--seed, its checkpoint key) and this "
        "rank's slice cut out, so any TP/PP/DP/virtual-pipeline layout starts from the same model "
        "(megatron_ext/models/init.py); --no-use-cpu-initialization keeps megatron-core's per-rank draw.",
    )
    make_vocab_size_divisible_by: int = opt(128, "Pad the vocabulary to a multiple of this x TP size.")
    attention_backend: str = opt(
        "auto",
        "Core attention: sdpa (torch scaled_dot_product_attention: flash kernels on GPU without flash-attn), "
        "unfused (megatron-core's local DotProductAttention), te (Transformer Engine), auto (te when "
        "installed on GPU, else sdpa). With --reset-attention-mask sdpa runs causal SDPA per document; "
        "sdpa-dense (one SDPA call with a dense document mask) and unfused take an O(s^2) mask: references.",
        choices=["auto", "sdpa", "sdpa-dense", "unfused", "te", *ATTENTION_BACKENDS],
    )
    apply_layernorm_1p: bool = opt(
        False, "LayerNorm with zero-centred gamma: weight initialised to 0 and applied as (1 + weight)."
    )
    squared_relu: bool = opt(False, "MLP activation relu(x)^2 instead of GeLU.")
    no_position_embedding: bool = opt(
        False,
        "No learned absolute position embedding (Megatron-LM's deprecated spelling): --position-embedding-type "
        "learned_absolute becomes none; rope stays rope.",
    )
    rotary_interleaved: bool = opt(False, "RoPE rotates interleaved pairs (x0,x1),(x2,x3)... instead of halves.")
    word_embedding_init_std: float | None = opt(
        None, "Standard deviation of the word embedding's initialisation (default --init-method-std)."
    )

    def __post_init__(self) -> None:
        self.attention_backend = ATTENTION_BACKENDS.get(self.attention_backend, self.attention_backend)
        if self.no_position_embedding and self.position_embedding_type == "learned_absolute":
            self.position_embedding_type = "none"
        _check(not (self.swiglu and self.squared_relu), "give --swiglu or --squared-relu, not both")
        _check(
            not self.apply_layernorm_1p or self.normalization.lower() == "layernorm",
            "--apply-layernorm-1p is for --normalization LayerNorm",
        )
        norm = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}.get(self.normalization.lower())
        if norm is None:
            raise ConfigError(f"--normalization {self.normalization!r} must be LayerNorm or RMSNorm")
        self.normalization = norm
        _check_positive(self, "num_layers", "hidden_size", "num_attention_heads", "seq_length")
        _check(
            self.hidden_size % self.num_attention_heads == 0 or self.kv_channels is not None,
            f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
            f"{self.num_attention_heads}: change one, or set --kv-channels",
        )
        if self.num_query_groups is not None and not self.group_query_attention:
            self.group_query_attention = True
        if self.group_query_attention:
            if self.num_query_groups is None:
                raise ConfigError("--group-query-attention needs --num-query-groups N")
            _check(
                self.num_attention_heads % self.num_query_groups == 0,
                f"--num-attention-heads {self.num_attention_heads} is not divisible by --num-query-groups "
                f"{self.num_query_groups}",
            )
        if self.ffn_hidden_size is None:
            if self.swiglu:  # keep the parameter count of a 4h MLP, as Megatron-LM does
                self.ffn_hidden_size = ((int(8 * self.hidden_size / 3) + 63) // 64) * 64
            else:
                self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        _check(
            self.position_embedding_type != "learned_absolute" or self.max_position_embeddings >= self.seq_length,
            f"--max-position-embeddings {self.max_position_embeddings} is below --seq-length {self.seq_length}",
        )
        _check(0 <= self.hidden_dropout < 1 and 0 <= self.attention_dropout < 1, "dropouts must be in [0, 1)")
        _check(self.make_vocab_size_divisible_by > 0, "--make-vocab-size-divisible-by must be positive")
        _check_positive(self, "ffn_hidden_size", "kv_channels", "norm_epsilon", "init_method_std", "rotary_base")
        _check_positive(self, "word_embedding_init_std")
        _check(0 < self.rotary_percent <= 1, f"--rotary-percent {self.rotary_percent} must be in (0, 1]")


@dataclass
class ParallelConfig:
    """How the model and the batch are split over ranks; data parallel is what remains of the world."""

    tensor_model_parallel_size: int = opt(1, "Tensor-parallel size.")
    pipeline_model_parallel_size: int = opt(1, "Pipeline-parallel size.")
    num_layers_per_virtual_pipeline_stage: int | None = opt(
        None, "Layers per virtual pipeline stage (interleaved 1F1B schedule)."
    )
    sequence_parallel: bool = opt(False, "Sequence parallelism within the tensor-parallel group.")
    use_distributed_optimizer: bool = opt(False, "Shard optimizer state over data-parallel ranks (ZeRO-1).")
    overlap_grad_reduce: bool = opt(False, "Overlap the data-parallel gradient reduction with backward.")
    distributed_backend: str = opt(
        "auto",
        "Process-group backend: auto picks nccl on CUDA, xccl/ccl on XPU, gloo on CPU.",
        choices=["auto", "nccl", "gloo", "ccl", "xccl"],
    )
    distributed_timeout_minutes: int = opt(10, "Timeout of collective operations.")
    device: str = opt(
        "auto", "Where to train: auto picks cuda, then xpu, then cpu.", choices=["auto", "cuda", "xpu", "cpu"]
    )
    context_parallel_size: int = opt(1, "Context-parallel size (parsed; > 1 is not built here: the run stops).")
    decoder_first_pipeline_num_layers: int | None = opt(
        None, "Uneven pipeline: layers of the first stage (the rest spread evenly over the other stages)."
    )
    decoder_last_pipeline_num_layers: int | None = opt(
        None, "Uneven pipeline: layers of the last stage (the rest spread evenly over the other stages)."
    )
    grad_reduce_in_bf16: bool = opt(
        False, "Reduce gradients over data-parallel ranks in bf16 (with --bf16) instead of fp32."
    )

    def __post_init__(self) -> None:
        _check(self.tensor_model_parallel_size >= 1, "--tensor-model-parallel-size must be >= 1")
        _check(self.pipeline_model_parallel_size >= 1, "--pipeline-model-parallel-size must be >= 1")
        _check_positive(self, "distributed_timeout_minutes", "context_parallel_size")
        for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
            _check(
                getattr(self, name) is None or self.pipeline_model_parallel_size > 1,
                f"--{name.replace('_', '-')} needs --pipeline-model-parallel-size > 1",
            )


@dataclass
class TrainingConfig:
    """Batch sizes, length of the run and what to do when things go wrong."""

    micro_batch_size: int = opt(4, "Samples per micro-batch on one data-parallel rank.")
    global_batch_size: int = derived(
        "Samples per optimizer step over all ranks; default micro batch x data-parallel size."
    )
    eval_global_batch_size: int = derived(
        "Samples of one validation batch over all ranks (--eval-iters of them per evaluation); default "
        "--global-batch-size."
    )
    step_batch_size_schedule: str | None = opt(
        None,
        "Global batch size in steps of consumed tokens: 'TOKENS:BATCH ...' from 0, e.g. '0:384 200B:768 400B:1152' "
        "(counts such as 200B); --global-batch-size defaults to the last batch size.",
        metavar="SCHEDULE",
    )
    rampup_batch_size: list[int] | None = opt(
        None,
        "Batch-size ramp-up: START INCREMENT RAMPUP_SAMPLES, growing the global batch from START by INCREMENT "
        "over RAMPUP_SAMPLES samples.",
        nargs=3,
        metavar="N",
    )
    train_iters: int | None = opt(None, "Optimizer steps to train for.")
    train_samples: int | None = opt(None, "Samples to train for (instead of --train-iters).")
    exit_interval: int | None = opt(
        None, "Save (when --save is set) and exit once the iteration is a multiple of this."
    )
    exit_signal_handler: bool = opt(False, "On SIGTERM/SIGUSR1 save a checkpoint at the step boundary and exit.")
    exit_duration_in_mins: float | None = opt(
        None, "Save (when --save is set) and exit once the job has run this long (set it below the walltime)."
    )
    recompute_activations: bool = opt(False, "Recompute every layer's activations in backward (saves memory).")
    cross_entropy_chunk: int | None = opt(
        None,
        "Compute the output layer and cross-entropy N tokens at a time, recomputing each chunk's logits in "
        "backward: peak memory of N x vocabulary logits instead of all of a long sequence's; same loss.",
        metavar="N",
    )
    check_for_nan_in_loss_and_grad: bool = opt(
        True,
        "Detect NaN/inf in the loss and the gradient norm and never apply such a step (see --nan-policy); "
        "--no-check-for-nan-in-loss-and-grad applies it as it is.",
    )
    nan_policy: str = opt(
        "skip",
        "On a NaN/inf step: skip it (up to --max-skipped-steps in a row) or stop.",
        choices=["skip", "stop"],
    )
    max_skipped_steps: int = opt(10, "Stop after this many consecutive skipped (NaN/inf) steps.")
    seed: int = opt(1234, "Random seed (weights, dropout, data order).")
    recompute_granularity: str | None = opt(
        None,
        "Activation recompute: full (whole layers, --recompute-method/--recompute-num-layers) or selective (the "
        "core attention only). --recompute-activations is full, uniform, 1 layer.",
        choices=["full", "selective"],
    )
    recompute_method: str | None = opt(
        None, "With full recompute: uniform (every chunk of N layers) or block (the first N layers of a stage).",
        choices=["uniform", "block"],
    )  # fmt: skip
    recompute_num_layers: int | None = opt(None, "With full recompute: N of --recompute-method (default 1).")
    deterministic_mode: bool = opt(
        False, "Deterministic algorithms only (torch.use_deterministic_algorithms): bitwise-repeatable runs."
    )

    def __post_init__(self) -> None:
        _check(self.micro_batch_size > 0, "--micro-batch-size must be positive")
        _check(self.train_iters is None or self.train_iters > 0, "--train-iters must be positive")
        _check_positive(self, "global_batch_size", "train_samples", "exit_interval", "exit_duration_in_mins")
        _check_positive(self, "eval_global_batch_size")
        _check_positive(self, "cross_entropy_chunk", "recompute_num_layers")
        _check(self.seed >= 0, f"--seed {self.seed} must be >= 0")
        if self.recompute_activations and self.recompute_granularity is None:
            self.recompute_granularity = "full"
        _check(
            self.recompute_granularity == "full" or (self.recompute_method, self.recompute_num_layers) == (None, None),
            "--recompute-method and --recompute-num-layers need --recompute-granularity full",
        )
        if self.recompute_granularity == "full":
            self.recompute_method = self.recompute_method or "uniform"
            self.recompute_num_layers = self.recompute_num_layers or 1
        _check(
            self.train_iters is None or self.train_samples is None,
            "give --train-iters or --train-samples, not both",
        )
        if self.rampup_batch_size is not None:
            _check(
                self.train_samples is not None,
                "--rampup-batch-size needs --train-samples (the run length in samples, as in Megatron-LM)",
            )
        if self.step_batch_size_schedule is not None:
            steps = self.batch_size_steps()
            _check(
                self.train_samples is not None and self.rampup_batch_size is None,
                "--step-batch-size-schedule needs --train-samples (the run length in samples) and no "
                "--rampup-batch-size",
            )
            last = steps[-1][1]
            _check(
                self.global_batch_size in (None, last),
                f"--global-batch-size {self.global_batch_size} differs from the last batch size {last} of "
                "--step-batch-size-schedule: give one of them",
            )
            self.global_batch_size = last

    def batch_size_steps(self) -> list[tuple[int, int]]:
        """--step-batch-size-schedule as (from consumed tokens, global batch size) pairs, checked."""
        flag = f"--step-batch-size-schedule {self.step_batch_size_schedule!r}"
        try:
            steps = [
                (parse_count(tokens), int(batch))
                for tokens, batch in (s.split(":") for s in (self.step_batch_size_schedule or "").strip("'\" ").split())
            ]
        except (ValueError, argparse.ArgumentTypeError):
            raise ConfigError(f"{flag}: expected TOKENS:BATCH pairs such as '0:384 200B:768'") from None
        _check(bool(steps) and steps[0][0] == 0, f"{flag}: the first step must start at 0 tokens")
        _check(all(a[0] < b[0] for a, b in zip(steps, steps[1:])), f"{flag}: token counts must increase")
        _check(all(batch > 0 for _, batch in steps), f"{flag}: batch sizes must be positive")
        return steps


@dataclass
class OptimizerConfig:
    """AdamW (or SGD), gradient clipping, weight decay and the learning-rate schedule."""

    optimizer: str = opt("adam", "Optimizer (adam and adamw are both AdamW).", choices=["adam", "adamw", "sgd"])
    lr: float = opt(3e-4, "Peak learning rate.")
    min_lr: float = opt(0.0, "Learning rate at the end of decay or cooldown (0 allowed for every style).")
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = opt(0.9, "Adam beta1.")
    adam_beta2: float = opt(0.999, "Adam beta2.")
    adam_eps: float = opt(1e-8, "Adam epsilon.")
    sgd_momentum: float = opt(0.9, "SGD momentum.")
    clip_grad: float = opt(1.0, "Clip the global gradient norm to this (0 disables).")
    decoupled_lr: float | None = opt(
        None, "Peak LR of the embedding and output layer (their own parameter group; default --lr)."
    )
    decoupled_min_lr: float | None = opt(None, "Minimum LR of the --decoupled-lr group (default --min-lr).")

    def __post_init__(self) -> None:
        _check(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, not {self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"--{name.replace('_', '-')} {value} must be in [0, 1)")
        _check_positive(self, "adam_eps")
        _check(self.weight_decay >= 0, f"--weight-decay must be >= 0, not {self.weight_decay}")
        _check(0 <= self.min_lr <= self.lr, f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        _check(self.clip_grad >= 0, "--clip-grad must be >= 0")
        if self.optimizer == "adamw":  # ALCF's spelling; megatron-core's adam is AdamW
            self.optimizer = "adam"
        _check_positive(self, "decoupled_lr")
        _check(
            self.decoupled_min_lr is None
            or (self.decoupled_lr is not None and 0 <= self.decoupled_min_lr <= self.decoupled_lr),
            "--decoupled-min-lr needs --decoupled-lr, and must be in [0, --decoupled-lr]",
        )


@dataclass
class LRScheduleConfig:
    """The learning-rate and weight-decay schedule. Every length can be given in iterations, samples or tokens
    (tokens survive batch-size and sequence-length changes); a checkpoint stores the whole schedule. Resolved and
    checked when the command line is parsed (`schedule_config`; the vocabulary: megatron_ext/lr_schedule.py)."""

    lr_decay_style: str = opt(
        "cosine",
        "constant, linear, cosine, inverse-square-root, WSD (warmup-stable-decay; ALCF's constant-plus-cooldown "
        "is the same), infinite-cosine or infinite-inv-sqrt (decay to --constant-lr, hold, then cooldown). Other "
        f"spellings accepted: {', '.join(STYLE_ALIASES)}.",
    )
    lr_warmup_init: float = opt(0.0, "Learning rate at the start of warmup.")
    lr_warmup_iters: int | None = opt(None, "Linear warmup length in iterations.")
    lr_warmup_samples: int | None = opt(None, "Linear warmup length in samples.")
    lr_warmup_tokens: int | None = opt(None, "Linear warmup length in tokens.")
    lr_warmup_fraction: float | None = opt(None, "Warmup as a fraction of the decay length.")
    lr_decay_iters: int | None = opt(None, "Where the LR reaches --min-lr (from 0, warmup included); default: run end.")
    lr_decay_samples: int | None = opt(None, "--lr-decay-iters in samples.")
    lr_decay_tokens: int | None = opt(None, "--lr-decay-iters in tokens.")
    lr_wsd_decay_style: str = opt(
        "exponential",
        "Shape of WSD's final decay and of the infinite schedules' cooldown.",
        choices=WSD_DECAY_STYLES,
    )
    lr_wsd_decay_iters: int | None = opt(None, "WSD: length of the final decay, ending at the decay end.")
    lr_wsd_decay_samples: int | None = opt(None, "--lr-wsd-decay-iters in samples.")
    lr_wsd_decay_tokens: int | None = opt(None, "--lr-wsd-decay-iters in tokens.")
    constant_lr: float | None = opt(None, "Infinite schedules: the LR held between the decay and the cooldown.")
    lr_infinite_decay_iters: int | None = opt(None, "Infinite schedules: decay length from the peak to --constant-lr.")
    lr_infinite_decay_samples: int | None = opt(None, "--lr-infinite-decay-iters in samples.")
    lr_infinite_decay_tokens: int | None = opt(None, "--lr-infinite-decay-iters in tokens.")
    lr_cooldown_iters: int | None = opt(None, "Infinite schedules: cooldown to --min-lr, ending at the decay end.")
    lr_cooldown_samples: int | None = opt(None, "--lr-cooldown-iters in samples.")
    lr_cooldown_tokens: int | None = opt(None, "--lr-cooldown-iters in tokens.")
    lr_timescale: float = opt(10.0, "infinite-inv-sqrt: steepness of the decay to --constant-lr.")
    start_weight_decay: float | None = opt(None, "Weight decay at the start (default --weight-decay).")
    end_weight_decay: float | None = opt(None, "Weight decay at the end (default --weight-decay).")
    weight_decay_incr_style: str = opt("constant", "How weight decay moves from start to end.", choices=WD_INCR_STYLES)
    override_opt_param_scheduler: bool = opt(
        False,
        "On resume, follow this command line's schedule instead of the checkpoint's (LR and min LR in the optimizer "
        "too). Without it, a schedule that differs from the checkpoint's is an error.",
        flag="--override-opt_param-scheduler",
    )
    use_checkpoint_opt_param_scheduler: bool = opt(
        False,
        "On resume, keep the checkpoint's schedule even where the command line differs.",
        flag="--use-checkpoint-opt_param-scheduler",
    )
    restart_lr_schedule: bool = opt(
        False,
        "Start the schedule from position 0 at the loaded checkpoint (implies --override-opt_param-scheduler): "
        "a rewarm for a new continual-pre-training stage, or a cooldown run from a constant-LR checkpoint.",
    )

    def __post_init__(self) -> None:
        style = canonical_style(self.lr_decay_style)
        _check(
            style in LR_DECAY_STYLES,
            f"--lr-decay-style {self.lr_decay_style!r} must be one of {', '.join(LR_DECAY_STYLES)} (or an alias: "
            f"{', '.join(STYLE_ALIASES)})",
        )
        self.lr_decay_style = style
        for length in LR_LENGTHS:
            given = [u for u in ("iters", "samples", "tokens") if getattr(self, f"{length}_{u}") is not None]
            flags = " / ".join(f"--{length.replace('_', '-')}-{u}" for u in given)
            _check(len(given) <= 1, f"give one of {flags}")
            for unit in given:
                value = getattr(self, f"{length}_{unit}")
                _check(value >= 0, f"--{length.replace('_', '-')}-{unit} {value} must be >= 0")
        _check(
            self.lr_warmup_fraction is None
            or (self.lr_warmup_iters, self.lr_warmup_samples, self.lr_warmup_tokens) == (None, None, None),
            "give --lr-warmup-fraction or a warmup length, not both",
        )
        _check(
            self.lr_warmup_fraction is None or 0 <= self.lr_warmup_fraction < 1,
            "--lr-warmup-fraction must be in [0, 1)",
        )
        _check(
            not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
            "give --override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler, not both",
        )
        if self.restart_lr_schedule:
            self.override_opt_param_scheduler = True

    def length(self, name: str) -> tuple[float, str] | None:
        """A length as (value, unit) from whichever of its -iters/-samples/-tokens flags was given."""
        for unit in ("iters", "samples", "tokens"):
            value = getattr(self, f"{name}_{unit}")
            if value is not None:
                return value, unit
        return None


# The precisions a run trains in: flag name -> dtype name (torch's attribute, Hugging Face's torch_dtype). The one
# vocabulary of dtypes: megatron_ext/platform.py maps the names to torch dtypes, train_alcf.sh's DTYPE takes both.
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class PrecisionConfig:
    """Mixed precision; the optimizer keeps fp32 master weights for bf16/fp16."""

    bf16: bool = opt(False, "Train in bfloat16.")
    fp16: bool = opt(False, "Train in float16 with dynamic loss scaling.")
    loss_scale: float | None = opt(None, "Static loss scale for fp16 (default: dynamic).")
    initial_loss_scale: float = opt(2.0**16, "Initial dynamic loss scale.")
    min_loss_scale: float = opt(1.0, "Minimum dynamic loss scale.")
    loss_scale_window: int = opt(1000, "Steps without overflow before the dynamic loss scale grows.")
    hysteresis: int = opt(2, "Overflows tolerated before the dynamic loss scale shrinks.")
    fp8_format: str | None = opt(
        None,
        "FP8 training with Transformer Engine on a GPU that has it: e4m3 or hybrid (e4m3 forward, e5m2 backward). "
        "Elsewhere the run stops at start-up.",
        choices=["e4m3", "hybrid"],
    )
    fp8_amax_history_len: int = opt(1, "FP8: length of the amax history window.")
    fp8_amax_compute_algo: str = opt("most_recent", "FP8: scaling from the history.", choices=["most_recent", "max"])
    fp8_param_gather: bool = opt(False, "FP8: keep the parameters in FP8 for the all-gather (needs --fp8-format).")

    def __post_init__(self) -> None:
        _check(not (self.bf16 and self.fp16), "give --bf16 or --fp16, not both")

    @property
    def params_dtype(self) -> str:
        return PRECISIONS["bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"]


# --tokenizer-type values -> the DataConfig fields each needs (megatron_ext/data/tokenizers.py builds them).
TOKENIZER_TYPES: dict[str, tuple[str, ...]] = {
    "ByteTokenizer": (),
    "SentencePieceTokenizer": ("tokenizer_model",),
    "GPTSentencePieceTokenizer": ("tokenizer_model",),
    "Llama2Tokenizer": ("tokenizer_model",),
    "HuggingFaceTokenizer": ("tokenizer_model",),
    "HFTokenizer": ("tokenizer_model",),
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),
    "NullTokenizer": ("vocab_size",),
    "TikTokenizer": ("tokenizer_model",),
}


@dataclass
class DataConfig:
    """Where samples come from. Without --data-path the built-in corpus (the standard library) is used."""

    data_path: list[str] | None = opt(
        None, "Megatron's blend: PREFIX or W1 PREFIX1 W2 PREFIX2 ... of .bin/.idx datasets.", nargs="+"
    )
    data_file_list: list[str] | None = opt(
        None,
        "Data list file(s) as on ALCF systems: lines `weight prefix [corpus]` (corpus defaults to the prefix's "
        "folder); files are grouped by corpus and corpora blended by weight.",
        nargs="+",
    )
    valid_data_file_list: list[str] | None = opt(
        None,
        "Validation data list(s): every corpus in them gets its own validation loss in the logs and tensorboard "
        "(watch an earlier corpus while training on a new one). Default: the validation split of the training data.",
        nargs="+",
    )
    split: str = opt("969,30,1", "Train,valid,test split of each dataset, as weights.")
    data_cache_path: str = opt("data_cache", "Folder for index caches and the built-in corpus.")
    tokenizer_type: str = opt(
        "ByteTokenizer",
        "Tokenizer: the files each needs are in TOKENIZER_TYPES (HFTokenizer is HuggingFaceTokenizer, "
        "Llama2Tokenizer and GPTSentencePieceTokenizer are SentencePieceTokenizer; NullTokenizer reads text of ids).",
        choices=list(TOKENIZER_TYPES),
    )
    tokenizer_model: str | None = opt(None, "SentencePiece .model, or a Hugging Face tokenizer.json / folder.")
    vocab_file: str | None = opt(None, "GPT2BPETokenizer: the GPT-2 vocab.json (read when the run starts).")
    merge_file: str | None = opt(None, "GPT2BPETokenizer: the GPT-2 merges.txt (read when the run starts).")
    vocab_size: int | None = opt(None, "NullTokenizer: ids below this are tokens, this one is end-of-document.")
    tiktoken_pattern: str | None = opt(
        None, "TikTokenizer's split pattern (parsed; TikTokenizer is not built here).", choices=["v1", "v2"]
    )
    mock_data: bool = opt(
        False,
        "Train on synthetic data (random token ids in documents of random length, made under --data-cache-path "
        "for the tokenizer's vocabulary): no data files needed.",
    )
    num_workers: int = opt(0, "Data-loader worker processes.")
    reset_attention_mask: bool = opt(
        False,
        "Document masking: samples are still cut from the concatenated documents, but attention never crosses a "
        "document boundary of the .idx (per-document attention through megatron-core's packed 'thd' "
        "PackedSeqParams) and a document's last token is not trained to predict the next document's first.",
    )
    reset_position_ids: bool = opt(
        False,
        "With --reset-attention-mask: positions restart at 0 at every document (else they run on over the "
        "sample; with RoPE only a document's relative positions matter, so both give the same losses).",
    )
    eod_mask_loss: bool = opt(False, "No loss on the token after an end-of-document token (Megatron-LM's).")
    packing: str = opt(
        "concat",
        "How documents fill samples: concat (concatenated and cut, as Megatron-LM) or best-fit (with "
        "--reset-attention-mask: whole documents, longer ones in pieces of a sample, best-fit decreasing into "
        "samples whose rest is padding; the start-up line reports the padding share).",
        choices=["concat", "best-fit"],
    )
    check_document_masking: bool = opt(
        False,
        "With --reset-attention-mask: before training, check every document of the first micro-batch: its "
        "losses in the packed sample must equal its losses alone (a cheap check of two documents always runs).",
    )

    def __post_init__(self) -> None:
        split = self.split.strip("'\" ")  # Megatron-LM's llama3 example passes --split "'99,1,0'"
        parts = split.replace("/", ",").split(",")
        ok = len(parts) in (1, 2, 3) and all(p.strip().replace(".", "", 1).isdigit() for p in parts)
        ok = ok and sum(float(p) for p in parts) > 0
        _check(ok, f"--split {self.split!r} must be up to three non-negative numbers like 969,30,1, not all 0")
        self.split = split
        for needed in TOKENIZER_TYPES[self.tokenizer_type]:
            what = {"tokenizer_model": "PATH", "vocab_size": "N"}.get(needed, "FILE")
            _check(
                getattr(self, needed) is not None,
                f"--tokenizer-type {self.tokenizer_type} needs --{needed.replace('_', '-')} {what}",
            )
        _check(self.vocab_size is None or self.vocab_size > 0, f"--vocab-size {self.vocab_size} must be positive")
        _check(
            not (self.mock_data and (self.data_path or self.data_file_list)),
            "--mock-data trains on synthetic data: give it without --data-path / --data-file-list",
        )
        for flag in ("reset_position_ids", "check_document_masking", "packing"):
            _check(
                self.reset_attention_mask or getattr(self, flag) in (False, "concat"),
                f"--{flag.replace('_', '-')} needs --reset-attention-mask (the document boundaries it packs)",
            )
        if self.data_path and len(self.data_path) > 1:
            _check(
                len(self.data_path) % 2 == 0,
                "--data-path with several datasets must be weight/prefix pairs: W1 PREFIX1 W2 PREFIX2 ...",
            )
            for w in self.data_path[0::2]:
                try:
                    ok = float(w) >= 0
                except ValueError:
                    ok = False
                _check(ok, f"--data-path weight {w!r} is not a non-negative number")


@dataclass
class CheckpointConfig:
    """Where checkpoints go and come from."""

    save: str | None = opt(None, "Folder to save checkpoints to.")
    load: str | None = opt(None, "Folder to load a checkpoint from (resumes when one exists).")
    save_interval: int | None = opt(None, "Save every N iterations (and always at the end when --save is set).")
    keep_last_checkpoints: int | None = opt(
        None, "Delete older checkpoints once a newer one is complete, keeping this many (default: keep all)."
    )
    save_retain_interval: int | None = opt(
        None,
        "Keep for good the checkpoints whose iteration is a multiple of N; the others are deleted once a newer one "
        "is complete (beyond the newest --keep-last-checkpoints, default 1).",
        metavar="N",
    )
    finetune: bool = opt(
        False, "Load only the weights from --load: iteration, optimizer, schedule and data position start afresh."
    )
    resize_vocabulary: bool = opt(
        False,
        "With --finetune: start from --load's weights under a tokenizer of another vocabulary size (the embedding "
        "and output rows of token ids both know are kept, new rows initialised as the model's init does). "
        "Without it, a --load saved with another vocabulary size is refused.",
    )
    no_load_optim: bool = opt(False, "Do not load the optimizer state (moments) from --load.")
    no_load_rng: bool = opt(False, "Do not load the random-number-generator states from --load.")
    universal_checkpoint: bool = opt(
        False,
        "--load is a universal (parallelism-free) checkpoint. Optional: --load recognises one by itself; "
        "accepted for Megatron-DeepSpeed scripts that pass it.",
    )
    ckpt_step: int | None = opt(None, "Load this iteration from --load instead of the latest.")
    async_save: bool = opt(
        False,
        "On GPU, write checkpoints from a background process while training goes on (the checkpoint appears, "
        "atomically, once complete). CPU runs save synchronously: the writer would compete for the same cores.",
    )

    def __post_init__(self) -> None:
        _check(self.save_interval is None or self.save_interval > 0, "--save-interval must be positive")
        _check(
            self.keep_last_checkpoints is None or self.keep_last_checkpoints >= 1,
            "--keep-last-checkpoints must be >= 1 (the newest complete checkpoint is never deleted)",
        )
        _check(self.ckpt_step is None or self.ckpt_step >= 0, "--ckpt-step must be >= 0")
        _check_positive(self, "save_retain_interval")
        _check(
            self.finetune or not self.resize_vocabulary,
            "--resize-vocabulary needs --finetune: a resumed run keeps its vocabulary (its optimizer state has its "
            "shape)",
        )


@dataclass
class LoggingConfig:
    """What is printed, evaluated and written to tensorboard."""

    log_interval: int = opt(10, "Print a metrics line every N iterations.")
    eval_interval: int = opt(100, "Evaluate on the validation split every N iterations.")
    eval_iters: int = opt(10, "Validation batches per evaluation (0 disables).")
    tensorboard_dir: str | None = opt(None, "Write tensorboard scalars here.")
    peak_tflops: float | None = opt(
        None, "Peak dense TFLOP/s of one device for MFU; default from a table of known GPUs (n/a on CPU)."
    )
    run_dir: str | None = opt(None, "Write config.json and the line log here (default: --save, if set).")
    # What more a log line reports (megatron_ext/training/telemetry.py, megatron_ext/training/timers.py)
    timing_log_level: int = opt(
        0,
        "Timers of the step's phases, min/max across ranks after each log line: 0 only checkpoint saves and "
        "evaluations (nothing inside a step, no device synchronisation); 1 also forward-backward, gradient "
        "all-reduce and the optimizer's phases; 2 also each micro-batch's data, forward and backward (1 and 2 "
        "synchronise the device around each timed phase).",
        choices=[0, 1, 2],
    )
    timing_log_option: str = opt(
        "minmax", "Timers across ranks: max, minmax, or all (each rank's).", choices=["max", "minmax", "all"]
    )
    barrier_with_level_1_timing: bool = opt(
        True,
        "Level-1 timers start at a barrier of all ranks, so a rank's time is its own work "
        "(--no-barrier-with-level-1-timing: not, as Megatron-LM's flag).",
    )
    log_timers_to_tensorboard: bool = opt(
        False, "Write the timers to tensorboard too: timers/<name>-time, seconds per step, max across ranks."
    )
    log_memory_to_tensorboard: bool = opt(
        False,
        "Write memory to tensorboard: memory/allocated_bytes, max_allocated_bytes, reserved_bytes, "
        "allocation_count (GPU), memory/rss_bytes, max_rss_bytes (CPU: this process's resident memory).",
    )
    log_params_norm: bool = opt(False, "The L2 norm of all parameters in each log line and tensorboard.")
    log_num_zeros_in_grad: bool = opt(
        False, "The number of zeros in the gradients of each logged step (megatron-core's count), line and tensorboard."
    )
    log_optimizer_states_to_tensorboard: bool = opt(
        False,
        "Norms of the Adam moments in tensorboard: optimizer/momentum_l2, variance_l2, variance_sqrt_l2, "
        "momentum_abs_max, variance_abs_max (every parameter once, over all ranks).",
    )
    log_world_size_to_tensorboard: bool = opt(False, "The number of ranks in tensorboard (train/world_size).")
    logging_level: int | None = opt(
        None,
        "Python logging level of every logger (10 DEBUG, 20 INFO, 30 WARNING, 40 ERROR); default: the "
        "MEGATRON_LOGGING_LEVEL variable, else unchanged.",
    )
    profile: bool = opt(
        False,
        "Record a torch profiler trace (CPU and device activities) of steps --profile-step-start to "
        "--profile-step-end, written beside the tensorboard logs (else in --run-dir).",
    )
    profile_step_start: int = opt(10, "First profiled step: the one that starts at this iteration (counted from 0).")
    profile_step_end: int = opt(12, "Profiling stops at this iteration (the step that starts here is not traced).")
    profile_ranks: list[int] = opt([0], "Ranks that record a trace.")
    wandb_project: str | None = opt(
        None,
        "Also log every tensorboard scalar to this Weights & Biases project (the wandb extra); offline when the "
        "service is unreachable or not logged in (`wandb sync` later), or as WANDB_MODE says.",
    )
    wandb_entity: str | None = opt(None, "Weights & Biases entity (team or user).")
    wandb_exp_name: str | None = opt(None, "Weights & Biases run name (default: wandb's).")
    wandb_save_dir: str | None = opt(None, "wandb writes its run into wandb/ here (default: the run folder).")

    def __post_init__(self) -> None:
        _check(self.log_interval > 0, "--log-interval must be positive")
        _check(self.eval_interval > 0, "--eval-interval must be positive")
        _check(self.eval_iters >= 0, "--eval-iters must be >= 0 (0 disables validation)")
        _check(
            0 <= self.profile_step_start < self.profile_step_end,
            f"--profile-step-start {self.profile_step_start} and --profile-step-end {self.profile_step_end}: "
            "expected 0 <= start < end",
        )
        _check(
            not self.profile or bool(self.tensorboard_dir or self.run_dir),
            "--profile writes its trace beside the tensorboard logs: give --tensorboard-dir (or --run-dir)",
        )


@dataclass
class DeepSpeedConfig:
    """Megatron-DeepSpeed's DeepSpeed flags. Training is megatron-core's (no DeepSpeed engine); when the run starts
    these and --deepspeed_config's JSON are mapped onto the flags above (megatron_ext/deepspeed_config.py), and the
    run's start-up note says how."""

    deepspeed: bool = opt(False, "Megatron-DeepSpeed's switch; accepted: training is megatron-core's either way.")
    deepspeed_config: str | None = opt(
        None,
        "A DeepSpeed JSON config, read when the run starts: batch sizes (checked against the flags and the world "
        "size), bf16/fp16 and loss scaling, ZeRO stage, gradient clipping, optimizer and scheduler blocks fill in "
        "flags left at their defaults; the rest is listed in the start-up note.",
        flag="--deepspeed_config",
        aliases=["--deepspeed-config"],
        metavar="FILE",
    )
    zero_stage: int | None = opt(
        None,
        "ZeRO stage: 1 or 2 turn on --use-distributed-optimizer (megatron-core's sharding of the optimizer state); "
        "3 (parameter sharding) stops the run at start-up; 0 changes nothing.",
        choices=[0, 1, 2, 3],
    )
    no_pipeline_parallel: bool = opt(
        False, "Megatron-DeepSpeed's no-pipeline switch: needs --pipeline-model-parallel-size 1 (no effect then)."
    )
    ds_sequence_parallel_size: int = opt(
        1,
        "DeepSpeed Ulysses sequence parallelism: 1 only (larger stops the run at start-up); --sequence-parallel is "
        "Megatron's, within the tensor-parallel group.",
    )
    deepspeed_activation_checkpointing: bool = opt(
        False,
        "DeepSpeed's checkpointing of the recomputed activations: recomputation here is megatron-core's "
        "(--recompute-activations, alias --checkpoint-activations); this switch alone recomputes nothing.",
    )

    def __post_init__(self) -> None:
        _check(self.ds_sequence_parallel_size >= 1, "--ds-sequence-parallel-size must be >= 1")


@dataclass
class VariantOptions:
    """A model variant's own options (a subclass per variant, built with `opt`: its fields are flags in a `--help`
    group named after the variant, saved in config.json and checkpoints under "variant_options"). The base, with
    no fields, is the options of variants that have none (gpt)."""

    def check(self, cfg: Config) -> None:
        """Checks against the rest of the configuration (e.g. layer counts against --num-layers), at parse time;
        raises ConfigError naming the flags. Checks of the options alone belong in `__post_init__`."""


def _counts(flag: str, text: str) -> list[int]:
    """'1,3,6,12' or '2B,4B' -> whole counts (`parse_count`), or ConfigError naming `flag`."""
    try:
        return [parse_count(part) for part in text.split(",")]
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"{flag} {text}: {e}") from None


@dataclass
class ProgressiveOptions(VariantOptions):
    """Progressive depth growth (Apollo, arXiv 2401.09192; megatron_ext/models/progressive.py): the full-depth
    model is built once; stage s trains N(s) unique layers, each micro-batch at a sampled depth whose layers map
    onto them; at a stage boundary the unique layers are copied to their new positions (the full-depth function
    is unchanged)."""

    progressive_layers: str | None = opt(
        None, "Unique layers of each stage, comma-separated, e.g. 1,3,6,12; each divides the next and --num-layers."
    )
    progressive_stages: str | None = opt(
        None,
        "Where each stage after the first starts, comma-separated counts in --progressive-stage-unit "
        "(e.g. 2B,4B,10B): one fewer than --progressive-layers, increasing.",
    )
    progressive_stage_unit: str = opt(
        "tokens", "Unit of --progressive-stages: consumed tokens, samples or iterations.",
        choices=["tokens", "samples", "iters"],
    )  # fmt: skip
    depth_sampling: str = opt(
        "lvps",
        "Depth of each training micro-batch: lvps (Apollo's low-value-prioritized sampling), uniform "
        "(N..--num-layers), full (always --num-layers).",
        choices=["lvps", "uniform", "full"],
    )
    growth: str = opt(
        "interpolate",
        "Which unique layer each position uses: interpolate (position j of depth D: floor(j N / D)) or stack "
        "(j mod N).",
        choices=["interpolate", "stack"],
    )
    growth_moments: str = opt(
        "copy",
        "Adam moments of the layers a growth writes: copy the source layer's, or reset them to zero.",
        choices=["copy", "reset"],
    )
    growth_lr_rewarm: int = opt(
        0, "After each growth, scale the schedule's LR by k/(N+1) for the k-th of N iterations (0: no rewarm)."
    )

    def layers(self) -> list[int]:
        return _counts("--progressive-layers", self.progressive_layers or "")

    def stages(self) -> list[int]:
        return _counts("--progressive-stages", self.progressive_stages) if self.progressive_stages else []

    def __post_init__(self) -> None:
        _check(
            self.progressive_layers is not None, "--model-variant progressive needs --progressive-layers, e.g. 1,3,6,12"
        )
        layers, stages = self.layers(), self.stages()
        _check(all(n > 0 for n in layers), f"--progressive-layers {self.progressive_layers}: counts must be positive")
        for a, b in zip(layers, layers[1:]):
            _check(a < b and b % a == 0, f"--progressive-layers {self.progressive_layers}: {a} does not divide {b} "
                   "(each stage's count must divide the next, larger one: growth keeps the function)")  # fmt: skip
        _check(
            len(stages) == len(layers) - 1,
            f"--progressive-stages needs {len(layers) - 1} start(s) for --progressive-layers {self.progressive_layers}"
            f", not {len(stages)}",
        )
        _check(
            all(a < b for a, b in zip([0, *stages], stages)),
            f"--progressive-stages {self.progressive_stages}: starts must be positive and increasing",
        )
        _check(self.growth_lr_rewarm >= 0, f"--growth-lr-rewarm {self.growth_lr_rewarm} must be >= 0")

    def check(self, cfg: Config) -> None:
        L = cfg.model.num_layers
        bad = [n for n in self.layers() if L % n]
        _check(not bad, f"--progressive-layers {self.progressive_layers}: {bad[0] if bad else 0} does not divide "
               f"--num-layers {L}")  # fmt: skip
        _check(self.layers()[-1] <= L, f"--progressive-layers: more than --num-layers {L}")
        _check(
            cfg.parallel.pipeline_model_parallel_size == 1,
            "--model-variant progressive needs --pipeline-model-parallel-size 1 (the unique layers sit on the first "
            "stage)",
        )
        _check(
            not cfg.parallel.overlap_grad_reduce,
            "--model-variant progressive cannot take --overlap-grad-reduce (a sampled depth leaves layers unused or "
            "runs them twice, which the overlapped reduction does not allow)",
        )


@dataclass
class ContextCompressorOptions(VariantOptions):
    """AceRAG's context compressor (megatron_ext/context_compressor.py): an encoder made of a frozen LM's
    embeddings, first layers and final norm turns a context into about n/r soft tokens that the LM reads instead
    of the text. The model shape and the tokenizer are the LM's; the reference's underscore spellings are accepted."""

    compressor_lm: str | None = opt(None, "The frozen LM: one of our checkpoints (a root or an iter_* folder).")
    encoder_num_layers: int = opt(
        8,
        "Layers of the encoder: the LM's first K layers (initialised from the LM, fully trained).",
        aliases=["--encoder_num_hidden_layers", "--encoder-num-hidden-layers", "--encoder_num_layers"],
    )
    comp_candidates: list[int] = opt([1, 2, 4, 8], "Compression ratios drawn from.", aliases=["--comp_candidates"])
    stage: str = opt(
        "pt",
        "pt: pre-training in window mode on text; ft: fine-tuning on prompt/context/answer records.",
        choices=["pt", "ft"],
    )
    window_mode: bool = opt(True, "Stage pt in window mode (the only pt mode built).", aliases=["--window_mode"])
    window: int = opt(1024, "Stage pt: tokens per window.")
    encoder_max_length: int = opt(
        4096,
        "Tokens the encoder sees at once (a chunk of whole windows; causal within it).",
        aliases=["--encoder_max_length"],
    )
    lm_max_length: int = opt(
        4096,
        "Stage ft: the LM's input length (a context longer than it allows keeps its first and last halves).",
        aliases=["--lm_max_length"],
    )
    min_length: int = opt(0, "Stage pt: documents shorter than this (tokens) are skipped.", aliases=["--min_length"])
    max_length: int = opt(65536, "Stage pt: documents longer than this (tokens) are skipped.", aliases=["--max_length"])
    pretraining_down_scaling_method: str = opt(
        "stride",
        "Stage pt: which encoder positions are kept (stride: the last of each group of r; random; terminal: the "
        "last ceil(n/r)).",
        choices=["stride", "random", "terminal"],
        aliases=["--pretraining_down_scaling_method"],
    )
    down_scaling_method: str = opt(
        "stride",
        "Stage ft: which encoder positions are kept.",
        choices=["stride", "random", "terminal"],
        aliases=["--down_scaling_method"],
    )
    train_data: list[str] | None = opt(
        None,
        'JSONL files: stage pt {"text": ...} records (default: the data lists, --data-path or the built-in corpus), '
        'stage ft {"prompt", "context", "answer"} records.',
        aliases=["--train_data"],
    )
    eval_data: list[str] | None = opt(
        None,
        "Held-out JSONL files of the same kind (default: --split's validation share of the training documents).",
        aliases=["--eval_data"],
    )

    def __post_init__(self) -> None:
        ratios = self.comp_candidates
        _check(bool(ratios) and min(ratios) >= 1, f"--comp-candidates {ratios}: ratios must be whole numbers >= 1")
        _check_positive(self, "encoder_num_layers", "window", "encoder_max_length", "lm_max_length", "max_length")
        _check(
            self.stage == "ft" or self.window_mode,
            "--stage pt without --window-mode is not built (part 2 of the compressor): use --window-mode",
        )
        for r in ratios:
            _check(
                self.window % r == 0 and self.encoder_max_length % r == 0,
                f"--comp-candidates {r} must divide --window {self.window} and --encoder-max-length "
                f"{self.encoder_max_length} (ceil(n/r) positions per whole window)",
            )
        _check(
            self.encoder_max_length % self.window == 0,
            f"--encoder-max-length {self.encoder_max_length} must be a multiple of --window {self.window}",
        )
        _check(self.min_length <= self.max_length, f"--min-length {self.min_length} > --max-length {self.max_length}")

    def check(self, cfg: Config) -> None:
        _check(self.compressor_lm is not None, "--model-variant context-compressor needs --compressor-lm CKPT")
        p = cfg.parallel
        _check(
            p.pipeline_model_parallel_size == 1,
            "--model-variant context-compressor: pipeline parallelism is not built (the encoder and the frozen LM "
            "run on one stage); use tensor and data parallelism",
        )
        _check(
            not p.sequence_parallel,
            "--model-variant context-compressor: --sequence-parallel is not built (the soft tokens would have to be "
            "placed before the scatter and the encoder's output gathered before positions are kept)",
        )
        _check(
            self.stage == "pt" or bool(self.train_data),
            "--stage ft needs --train-data FILE.jsonl of prompt/context/answer records",
        )


VARIANTS: dict[str, type[VariantOptions]] = {
    "gpt": VariantOptions,
    "progressive": ProgressiveOptions,
    "context-compressor": ContextCompressorOptions,
}
"""--model-variant names and their options sections. A built-in variant adds a line here (and its recipe to
megatron_ext/models/recipe.py's BUILTIN_RECIPES); others register with `models.recipe.register_variant`."""


def add_variant(name: str, options: type[VariantOptions] = VariantOptions) -> None:
    """Makes `name` a --model-variant choice with the options section `options` (flags in --help from then on)."""
    _check(
        name not in SECTIONS and VARIANTS.get(name, options) is options,
        f"model variant {name!r}: the name is taken (by a schema section or another variant's options)",
    )
    _check(dataclasses.is_dataclass(options) and issubclass(options, VariantOptions),
           f"model variant {name!r}: its options must be a dataclass deriving from config.VariantOptions")  # fmt: skip
    VARIANTS[name] = options


@dataclass
class VariantConfig:
    """Which model variant trains. Its recipe (megatron_ext/models/recipe.py) builds the model, reads the
    micro-batches and scores them; the variant's options are the group named after it."""

    model_variant: str = opt("gpt", "The model variant: gpt (megatron-core GPTModel), or a registered one.")

    def __post_init__(self) -> None:
        _check(
            self.model_variant in VARIANTS,
            f"--model-variant {self.model_variant!r} must be one of {', '.join(VARIANTS)}",
        )


@dataclass
class CompatConfig:
    """What a Megatron-LM command line gave beyond the schema's fields: the flags of megatron_ext/compat.py's
    tables (no effect here, or not built here) with their values, and how its reading changed a value as
    Megatron-LM does (e.g. --sequence-parallel off at tensor-parallel size 1). Not flags themselves; saved in
    config.json; the run prints them in one note at start-up (`startup_note`) and stops on a flag not built here
    (`check_built`)."""

    given: dict[str, Any] = field(default_factory=dict)
    readings: list[str] = field(default_factory=list)


@dataclass
class Config:
    """Everything a run needs; saved as JSON beside the checkpoints."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    variant: VariantConfig = field(default_factory=VariantConfig)
    variant_options: VariantOptions = field(default_factory=VariantOptions)  # of type VARIANTS[model_variant]
    compat: CompatConfig = field(default_factory=lambda: CompatConfig())

    def check_folders(self) -> None:
        """The folder flags must not name existing files (a typo like --save of a log file): checked at start-up,
        not in validation, since a config may be checked on another machine."""
        folders = {
            "--save": self.checkpoint.save,
            "--load": self.checkpoint.load,
            "--run-dir": self.logging.run_dir,
            "--tensorboard-dir": self.logging.tensorboard_dir,
            "--data-cache-path": self.data.data_cache_path,
        }
        for flag, folder in folders.items():
            problem = None if folder is None else folder_problem(folder)
            if problem is None and folder is not None and flag in ("--save", "--run-dir", "--tensorboard-dir"):
                problem = write_problem(folder)
            if problem is not None:
                raise ConfigError(f"{flag} {folder}: {problem}")

    def __post_init__(self) -> None:
        self._read_as_megatron()
        m, p = self.model, self.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        _check(
            m.num_attention_heads % tp == 0,
            f"--num-attention-heads {m.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}",
        )
        if m.num_query_groups is not None:
            _check(
                m.num_query_groups % tp == 0,
                f"--num-query-groups {m.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}",
            )
        self._check_pipeline_layers()
        vp = p.num_layers_per_virtual_pipeline_stage
        if vp is not None:
            _check(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
            _check(
                (m.num_layers // pp) % vp == 0,
                f"layers per pipeline stage ({m.num_layers // pp}) not divisible by "
                f"--num-layers-per-virtual-pipeline-stage {vp}",
            )
        if p.sequence_parallel:
            _check(
                m.seq_length % tp == 0,
                f"--seq-length {m.seq_length} is not divisible by --tensor-model-parallel-size {tp} "
                "(needed by --sequence-parallel)",
            )
        _check(
            not self.data.reset_attention_mask or pp == 1 or self.training.micro_batch_size == 1,
            "--reset-attention-mask with --pipeline-model-parallel-size > 1 needs --micro-batch-size 1 (a packed "
            "micro-batch passes between stages as one sequence)",
        )
        options = VARIANTS[self.variant.model_variant]
        if type(self.variant_options) is VariantOptions:  # not given: the variant's defaults
            self.variant_options = options()
        _check(
            type(self.variant_options) is options,
            f"--model-variant {self.variant.model_variant} takes {options.__name__} options, not "
            f"{type(self.variant_options).__name__}",
        )
        self.variant_options.check(self)
        check_schedule(self)

    def _check_pipeline_layers(self) -> None:
        """Layers split evenly over the pipeline stages, or unevenly with --decoder-first/last-pipeline-num-layers
        (the other stages share the rest evenly, as megatron-core's TransformerConfig requires)."""
        L, p = self.model.num_layers, self.parallel
        pp = p.pipeline_model_parallel_size
        ends = [n for n in (p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers) if n is not None]
        if not ends:
            _check(L % pp == 0, f"--num-layers {L} is not divisible by --pipeline-model-parallel-size {pp}")
            return
        middle, stages = L - sum(ends), pp - len(ends)
        _check(
            all(n >= 1 for n in ends)
            and middle >= stages
            and (stages == 0 or middle % stages == 0)
            and (stages > 0 or middle == 0),
            f"--num-layers {L} minus --decoder-first/last-pipeline-num-layers ({'+'.join(map(str, ends))}) must split "
            f"evenly over the other {stages} pipeline stage(s), at least one layer each",
        )
        _check(
            p.num_layers_per_virtual_pipeline_stage is None,
            "--decoder-first/last-pipeline-num-layers cannot take --num-layers-per-virtual-pipeline-stage",
        )

    def _read_as_megatron(self) -> None:
        """Combinations Megatron-LM resolves rather than refuses are resolved alike, each with a line in the
        start-up note (ALCF's helpers.sh passes --data-path beside --data-file-list; many scripts keep
        --sequence-parallel at tensor-parallel size 1)."""
        p, d = self.parallel, self.data
        if p.sequence_parallel and p.tensor_model_parallel_size == 1:
            p.sequence_parallel = False
            self.compat.readings.append(
                "--sequence-parallel is off: --tensor-model-parallel-size is 1 (as Megatron-LM)"
            )
        if d.data_path and d.data_file_list:
            d.data_path = None
            self.compat.readings.append("--data-path is ignored: --data-file-list gives the data (as ALCF's scripts)")
        whole = (
            "--recompute-activations recomputes whole layers here (full, uniform, 1 layer, as Megatron-DeepSpeed's "
            "--checkpoint-activations); Megatron-LM's recomputes the attention core: --recompute-granularity selective"
        )
        if self.training.recompute_activations and whole not in self.compat.readings:
            self.compat.readings.append(whole)

    @property
    def virtual_pipeline_size(self) -> int | None:
        vp = self.parallel.num_layers_per_virtual_pipeline_stage
        if vp is None:
            return None
        return self.model.num_layers // self.parallel.pipeline_model_parallel_size // vp

    def data_parallel_size(self, world_size: int) -> int:
        """Checks the world against the model-parallel sizes and returns the data-parallel size."""
        mp = self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size
        _check(
            world_size % mp == 0,
            f"world size {world_size} is not divisible by tensor x pipeline parallel size {mp}",
        )
        return world_size // mp

    def resolve_batch(self, world_size: int) -> None:
        """Fills and checks the global batch once the world size is known (before anything is built)."""
        t = self.training
        dp = self.data_parallel_size(world_size)
        per_step = t.micro_batch_size * dp
        if t.global_batch_size is None:
            t.global_batch_size = per_step
        _check(
            t.global_batch_size % per_step == 0,
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}",
        )
        for _, batch in t.batch_size_steps() if t.step_batch_size_schedule else []:
            _check(
                batch % per_step == 0,
                f"--step-batch-size-schedule batch size {batch} is not divisible by --micro-batch-size "
                f"{t.micro_batch_size} x data-parallel size {dp}",
            )
        if t.eval_global_batch_size is None:
            t.eval_global_batch_size = t.global_batch_size
        _check(
            t.eval_global_batch_size % per_step == 0,
            f"--eval-global-batch-size {t.eval_global_batch_size} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}",
        )
        if t.rampup_batch_size is not None:
            start, inc, _ = t.rampup_batch_size
            _check(
                start % per_step == 0 and inc % per_step == 0,
                f"--rampup-batch-size start {start} and increment {inc} must be multiples of micro batch x "
                f"data-parallel size ({per_step})",
            )
            _check(
                (t.global_batch_size - start) % inc == 0,
                f"--global-batch-size {t.global_batch_size} minus the ramp-up start {start} is not a multiple of "
                f"the increment {inc}",
            )
        pp = self.parallel.pipeline_model_parallel_size
        smallest = t.rampup_batch_size[0] if t.rampup_batch_size is not None else t.global_batch_size
        _check(
            self.virtual_pipeline_size is None or smallest // per_step >= pp,
            f"the interleaved pipeline schedule needs at least --pipeline-model-parallel-size {pp} micro-batches per "
            f"step, but the global batch {smallest} gives {smallest // per_step}: raise --global-batch-size",
        )
        if t.train_iters is None and t.train_samples is None:
            raise ConfigError("give the run length: --train-iters N or --train-samples N")

    # ---- JSON -------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        parts = {}
        options = VARIANTS.get(d.get("variant", {}).get("model_variant", "gpt"), VariantOptions)  # the saved variant's
        for name, sub in {**SECTIONS, "variant_options": options, "compat": CompatConfig}.items():
            known = {x.name for x in dataclasses.fields(sub)}
            given = d.get(name, {})
            unknown = set(given) - known
            _check(not unknown, f"unknown {name} options in saved config: {sorted(unknown)}")
            parts[name] = sub(**given)
        return cls(**parts)

    @classmethod
    def from_json(cls, path: str | Path) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---- the schedule a command line gives ----------------------------------------------------------------------


def run_length_samples(cfg: Config, global_batch_size: int | None = None) -> int:
    """Total training samples (the unit the schedule counts in, so it survives batch-size changes); iterations
    count `global_batch_size` samples each (default --global-batch-size)."""
    t = cfg.training
    if t.train_samples is not None:
        return t.train_samples
    assert t.train_iters is not None  # a run without a length: resolve_batch refuses it, check_schedule skips it
    return t.train_iters * (global_batch_size or t.global_batch_size)


def schedule_config(cfg: Config, start_samples: int = 0, global_batch_size: int | None = None) -> ScheduleConfig:
    """The command line's schedule in one unit (tokens if any length was given in tokens, else samples).

    `start_samples`: where the schedule starts in the run (--restart-lr-schedule at a checkpoint); by default
    the decay then ends with the run rather than a whole run length later. `global_batch_size`: the samples of an
    iteration, default --global-batch-size (`check_schedule` passes 1 before it is known).
    """
    o, sc = cfg.optimizer, cfg.schedule
    gbs = global_batch_size or cfg.training.global_batch_size
    lengths = {name: sc.length(name) for name in LR_LENGTHS}
    if lengths["lr_decay"] is None:
        lengths["lr_decay"] = (max(run_length_samples(cfg, gbs) - start_samples, 1), "samples")
    unit, values = resolve_lengths(lengths, global_batch_size=gbs, seq_length=cfg.model.seq_length)
    if sc.lr_warmup_fraction is not None:
        values["lr_warmup"] = sc.lr_warmup_fraction * values["lr_decay"]
    wd = o.weight_decay
    try:
        return ScheduleConfig(
            lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_init=sc.lr_warmup_init,
            lr_decay_style=sc.lr_decay_style,
            unit=unit,
            seq_length=cfg.model.seq_length,
            lr_warmup=values.get("lr_warmup", 0),
            lr_decay=values["lr_decay"],
            lr_wsd_decay_style=sc.lr_wsd_decay_style,
            lr_wsd_decay=values.get("lr_wsd_decay", 0),
            constant_lr=sc.constant_lr,
            lr_infinite_decay=values.get("lr_infinite_decay", 0),
            lr_cooldown=values.get("lr_cooldown", 0),
            lr_timescale=sc.lr_timescale,
            start_weight_decay=wd if sc.start_weight_decay is None else sc.start_weight_decay,
            end_weight_decay=wd if sc.end_weight_decay is None else sc.end_weight_decay,
            weight_decay_incr_style=sc.weight_decay_incr_style,
        )
    except ScheduleError as e:
        raise ConfigError(
            f"the LR schedule: {_schedule_message(str(e), cfg, unit, values['lr_decay'], start_samples)}"
        ) from e


_VALUE_FIELDS = "lr|min_lr|constant_lr|lr_warmup_init|lr_timescale|start_weight_decay|end_weight_decay"
_SCHEDULE_FLAGS = re.compile(rf"\b({_VALUE_FIELDS})\b")
_LENGTH_NAMES = re.compile(r"\b(" + "|".join(LR_LENGTHS) + r")\b")


def _schedule_message(message: str, cfg: Config, unit: str, decay: float, start_samples: int) -> str:
    """A ScheduleError in the command line's terms: its value fields as flags and, when it speaks of lengths
    (lr_decay, lr_warmup, ... in one unit, samples or tokens, whatever unit the flags gave), that unit and the
    length flags behind them."""
    message = _SCHEDULE_FLAGS.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)
    named = dict.fromkeys(_LENGTH_NAMES.findall(message))
    if not named:
        return message
    sc, gbs, seq = cfg.schedule, cfg.training.global_batch_size, cfg.model.seq_length
    lengths = {name: sc.length(name) for name in LR_LENGTHS}
    given = [f"--{n.replace('_', '-')}-{length[1]} {length[0]}" for n, length in lengths.items() if length]
    if lengths["lr_decay"] is None:
        end = "the end of the run"
        if start_samples:
            end = f"the rest of the run ({run_length_samples(cfg)} samples) after the restart at sample {start_samples}"
        given.append(f"lr_decay {decay:.15g}: {end}")
    if sc.lr_warmup_fraction is not None:
        given.append(f"--lr-warmup-fraction {sc.lr_warmup_fraction:g}")
    missing = [n for n in named if lengths[n] is None and n not in ("lr_decay", "lr_warmup")]
    given += [f"no --{n.replace('_', '-')}-iters/-samples/-tokens" for n in missing]
    # At parse time (check_schedule) without --global-batch-size, the lengths are all in iterations or in none.
    in_iters = any(length[1] == "iters" for length in lengths.values() if length)
    if gbs is None and (in_iters or (lengths["lr_decay"] is None and cfg.training.train_samples is None)):
        counted = "iterations"
    elif unit == "tokens":
        counted = f"tokens, a sample being --seq-length {seq}" + (f" and an iteration {gbs} samples" if gbs else "")
    else:
        counted = "samples" + (f", an iteration being --global-batch-size {gbs}" if gbs else "")
    return f"{message} (counted in {counted}; " + ", ".join(given) + ")"


def check_schedule(cfg: Config) -> None:
    """Resolves the command line's schedule as training will, so that a mistake in it stops the parse rather than
    the run's set-up. Left to the set-up while a length cannot be known: without a run length (and no
    --lr-decay-*), or with lengths in iterations beside lengths in samples or tokens while --global-batch-size is
    not given (its default, micro batch x data-parallel size, depends on the launch)."""
    t, sc = cfg.training, cfg.schedule
    units = {length[1] for name in LR_LENGTHS if (length := sc.length(name)) is not None}
    if sc.length("lr_decay") is None:
        if t.train_iters is None and t.train_samples is None:
            return
        units.add("iters" if t.train_samples is None else "samples")
    if t.global_batch_size is None and "iters" in units and units != {"iters"}:
        return
    schedule_config(cfg, global_batch_size=t.global_batch_size or 1)  # in iterations only: any batch size scales all


# ---- command line -------------------------------------------------------------------------------------------

SECTIONS: dict[str, type[Any]] = {
    name: section
    for name, section in typing.get_type_hints(Config).items()
    if name not in ("variant_options", "compat")  # a variant's options are a section of their own: VARIANTS
}


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def base_type(annotation: Any) -> tuple[type, bool]:
    """(element type, is_list) of an annotation such as `int | None` or `list[str] | None`."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_section(parser: argparse.ArgumentParser, section: str, cls: type) -> None:
    """Every field of the dataclass `cls` (built with `opt`) as a flag in its own `--help` group, stored under
    `section.field`: the schema's sections, and tools with a typed config of their own, render alike."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(section, (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        dest = f"{section}.{f.name}"
        names = [flag_of(f), *f.metadata.get("aliases", ()), *LEGACY_SPELLINGS.get(flag_of(f), ())]
        kind, is_list = base_type(hints[f.name])
        help_text = f.metadata["help"]
        if kind is bool:
            group.add_argument(*names, dest=dest, action="store_true", default=f.default, help=help_text)
            negative = "--no-" + flag_of(f)[2:]
            group.add_argument(negative, dest=dest, action="store_false", help=argparse.SUPPRESS)
            continue
        default = _default(f)
        nargs = f.metadata.get("nargs") or ("+" if is_list else None)
        group.add_argument(
            *names,
            dest=dest,
            type=parse_count if is_length(f) else kind,
            default=default,
            choices=f.metadata.get("choices"),
            nargs=nargs,
            metavar=f.metadata.get("metavar"),
            help=help_text,
        )


class TrainingParser(OneLineParser):
    """The training command line: a flag of a model family outside this project (megatron_ext/compat.py's
    REFUSED: mixture of experts, gated delta net, gpt-oss, ModelOpt) is refused in one line before any other
    check, wherever it stands on the line."""

    def parse_known_args(  # type: ignore[override]  # the same call; typeshed's overloads need not be repeated
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        for arg in argv:
            feature = refused_feature(arg)
            if feature is not None:
                self.exit(2, f"error: {arg.split('=', 1)[0]} is not supported ({feature})\n")
        return super().parse_known_args(argv, namespace)


def _add_accepted(group: argparse._ArgumentGroup, flag: str, accepted: Accepted, effect: str) -> None:
    """A flag of megatron_ext/compat.py's tables, stored under `_compat<flag>` (None when not given)."""
    help_text = f"{effect}: {accepted.reason}."
    if accepted.takes is None:
        group.add_argument(flag, dest=f"_compat{flag}", action="store_const", const=True, help=help_text)
    else:
        group.add_argument(
            flag, dest=f"_compat{flag}", type=accepted.takes, nargs=accepted.nargs, choices=accepted.choices,
            help=help_text,
        )  # fmt: skip


def build_parser(prog: str = "pretrain_gpt.py") -> argparse.ArgumentParser:
    """Every field of the schema as a flag; the run's and the schedule's lengths (`--train-iters`,
    `--lr-warmup-tokens`, ...) also take counts such as 300B (`parse_count`). `prog` names the tool in error
    lines (tools that read a training command line). Megatron-LM's flags without a field here (compat.py's
    NO_EFFECT and NOT_BUILT) are accepted too; prefix abbreviations are not (a mistyped flag cannot bind to one of
    ours)."""
    parser = TrainingParser(
        prog=prog,
        description="Train a GPT on megatron-core. Flags follow Megatron-LM; Megatron-DeepSpeed aliases accepted.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for section, cls in SECTIONS.items():
        add_section(parser, section, cls)
    for variant, options in VARIANTS.items():
        if dataclasses.fields(options):
            add_section(parser, variant, options)
    compat = parser.add_argument_group(
        "compatibility", "Megatron-LM and Megatron-DeepSpeed flags without a field here (megatron_ext/compat.py)."
    )
    for alias, (_, name, value) in VALUE_ALIASES.items():
        compat.add_argument(
            alias, dest=f"_alias{alias}", action="store_true", help=f"= --{name.replace('_', '-')} {value}"
        )
    for flag, accepted in NO_EFFECT.items():
        _add_accepted(compat, flag, accepted, "no effect here")
    for flag, accepted in NOT_BUILT.items():
        _add_accepted(compat, flag, accepted, "not built here (the run stops at start-up)")
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = "pretrain_gpt.py") -> Config:
    """Parses flags into a validated Config; raises ConfigError for a mistake in the values."""
    ns = vars(build_parser(prog).parse_args(argv))
    values: dict[str, dict[str, Any]] = {s: {} for s in [*SECTIONS, *VARIANTS]}
    compat = CompatConfig()
    for key, value in ns.items():
        if key.startswith("_compat"):
            if value is not None:
                compat.given[key[len("_compat") :]] = value
            continue
        if key.startswith("_alias"):
            section, name, target = VALUE_ALIASES[key[len("_alias") :]]
            if value and section:
                values[section][name] = target
            continue
        section, name = key.split(".", 1)
        values[section].setdefault(name, value)
    variant = values["variant"]["model_variant"]
    for other, other_options in VARIANTS.items():
        given = [f for f in dataclasses.fields(other_options) if values[other][f.name] != _default(f)]
        _check(
            other == variant or not given,
            f"{flag_of(given[0]) if given else ''} is an option of --model-variant {other}, not of {variant}",
        )
    options = VARIANTS[variant](**values[variant]) if variant in VARIANTS else VariantOptions()
    sections = {s: cls(**values[s]) for s, cls in SECTIONS.items()}
    return Config(**sections, variant_options=options, compat=compat)


def startup_note(cfg: Config) -> str | None:
    """The one note a run prints at start-up: each flag given that has no effect here, with why, and each
    value the reading of a Megatron-LM command line changed. None when there is nothing to say."""
    lines = [
        f"  {flag}{'' if value is True else f' {value}'}: {NO_EFFECT[flag].reason}"
        for flag, value in cfg.compat.given.items()
        if flag in NO_EFFECT and value not in NO_EFFECT[flag].fine
    ]
    lines += [f"  {reading}" for reading in cfg.compat.readings]
    return (
        "\n".join(["note: Megatron-LM flags with no effect here, or read as Megatron-LM reads them:", *lines])
        if lines
        else None
    )


def check_built(cfg: Config, transformer_engine_gpu: bool = False) -> None:
    """Stops the run at start-up on a flag that would change it but whose feature is not built here
    (megatron_ext/compat.py's NOT_BUILT, context parallelism, FP8 without Transformer Engine on a GPU), naming the
    flag; the configuration still parses and prints."""
    cp, fp8 = cfg.parallel.context_parallel_size, cfg.precision.fp8_format
    _check(cp == 1, f"--context-parallel-size {cp} is not built here (context parallelism): use 1")
    _check(
        fp8 is None or transformer_engine_gpu,
        f"--fp8-format {fp8} needs Transformer Engine on a GPU, which this run does not have: remove the --fp8-* flags",
    )
    _check(not cfg.precision.fp8_param_gather or fp8 is not None, "--fp8-param-gather needs --fp8-format")
    for flag, value in cfg.compat.given.items():
        accepted = NOT_BUILT.get(flag)
        if accepted is not None and value not in accepted.fine:
            shown = "" if value is True else f" {value}"
            raise ConfigError(f"{flag}{shown} is not built here ({accepted.reason}): remove it from the command line")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m megatron_ext.config [flags]` prints the resolved configuration as JSON. The train_alcf.sh
    variables are resolved by `python -m megatron_ext.alcf_env resolve` (alcf_env imports this module, not the
    other way round)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--from-env"]:
        print("error: --from-env moved: python -m megatron_ext.alcf_env resolve [...] [-- flags]", file=sys.stderr)
        sys.exit(2)
    try:
        cfg = parse_args(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
