"""Environment-variable runs for `train_alcf.sh`: the variable table, model presets, derived sizes.

On ALCF machines users set a few variables (`MODEL_ARCH=7B TP=2 TRAIN_TOKENS=... bash train_alcf.sh`) instead of
typing flags. This module is the one place those variables mean anything: each is turned into the
`pretrain_gpt.py` flag of the typed schema (`megatron_ext.config`) and validated by it, so the bash script only
picks the launcher. The job's shape (hosts from `$PBS_NODEFILE` or Slurm, ranks per node: `megatron_ext.launch`)
gives the world size, from which the data-parallel size, the global batch and the run length in iterations are
derived and checked. Every mistake is one `error: ...` line naming the variable, before anything is launched.

Entry points: `python -m megatron_ext.alcf_env resolve [--launcher L ... --] [pretrain flags]` (what
`train_alcf.sh` runs), `python -m megatron_ext.alcf_env docs|progress RUN_DIR` (docs tables, chained jobs).
Nothing here imports torch: the resolver starts in a fraction of a second on a login node.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import shlex
import sys
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_ext import config as schema
from megatron_ext import resources
from megatron_ext.cli import UserError
from megatron_ext.config import Config, ConfigError, OneLineParser
from megatron_ext.launch import (
    LAUNCHERS,
    MPI_FLAVORS,
    EnvError,
    Job,
    JobShape,
    choose_launcher,
    cpu_counts,
    detect_accelerators,
    detect_job,
    launch_command,
)
from megatron_ext.models.size import num_parameters

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pretrain_gpt.py"
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


# ---- model presets --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A model shape; every preset is Llama-style (RMSNorm, SwiGLU, RoPE, GQA, untied embeddings, no biases)."""

    num_layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    ffn_hidden_size: int
    seq_length: int
    rotary_base: int = 10000
    micro_batch: int = 1
    train_iters: int | None = None  # a default run length (only for the laptop preset)
    about: str = ""


PRESETS: dict[str, Preset] = {
    "tiny": Preset(2, 64, 4, 2, 192, 128, micro_batch=2, train_iters=50, about="laptop CPU smoke run (default)"),
    "125M": Preset(12, 768, 12, 12, 2048, 2048, about="GPT-3 Small shape"),
    "1B": Preset(16, 2048, 32, 8, 8192, 4096, rotary_base=500000, about="Llama-3.2-1B shape"),
    "llama3-3B": Preset(28, 3072, 24, 8, 8192, 8192, rotary_base=500000, about="Llama-3.2-3B shape"),
    "7B": Preset(32, 4096, 32, 8, 11008, 4096, about="AuroraGPT-7B as on ALCF (Llama-2-7B with GQA)"),
    "70B": Preset(80, 8192, 64, 8, 28672, 4096, about="Llama-2-70B shape"),
}
LLAMA_FLAGS = (
    "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--hidden-dropout", "0",
    "--attention-dropout", "0",
)  # fmt: skip


def preset_flags(p: Preset) -> list[str]:
    """The model flags of a preset: Llama-style, its RoPE base and the shape its variables default to."""
    model = [v for v in VARIABLES if v.section == "model"]
    shape = [arg for v in model if v.preset and v.flag for arg in (v.flag, str(getattr(p, v.preset)))]
    return [*LLAMA_FLAGS, "--rotary-base", str(p.rotary_base), *shape]


def preset_parameters(p: Preset, vocab: int = 32000) -> int:
    """Parameter count of a preset with a `vocab`-token vocabulary (untied input and output embeddings): the
    schema's model, counted as training counts it."""
    return num_parameters(schema.parse_args(preset_flags(p)), vocab)


# ---- the variable table ---------------------------------------------------------------------------------------


def _schema_fields() -> dict[str, tuple[str, dataclasses.Field, type]]:
    """Every schema flag (and alias) -> (dest "section.name", field, element type)."""
    out: dict[str, tuple[str, dataclasses.Field, type]] = {}
    for section, cls in {**schema.SECTIONS, **schema.VARIANTS}.items():  # a variant's options: its own section
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind, _ = schema.base_type(hints[f.name])
            for flag in (schema.flag_of(f), *f.metadata.get("aliases", ())):
                out[flag] = (f"{section}.{f.name}", f, kind)
    return out


FIELDS = _schema_fields()


def dest_of(flag: str) -> str:
    return FIELDS[flag][0]


@dataclass(frozen=True)
class Var:
    """One environment variable: what it sets (a schema flag when it maps to one), its default and help (by
    default the help of its flag: said once, in the schema)."""

    name: str
    section: str
    default: str
    flag: str | None = None  # the pretrain_gpt.py flag the value is passed to, as is
    preset: str | None = None  # Preset field that gives the default
    help: str = ""


# fmt: off
_TABLE: tuple[Var, ...] = (
    # model
    Var("MODEL_ARCH", "model", "tiny", help="Model preset: " + ", ".join(PRESETS) + " (see the preset table)."),
    Var("NLAYERS", "model", "preset", "--num-layers", "num_layers"),
    Var("HIDDEN", "model", "preset", "--hidden-size", "hidden_size"),
    Var("HEADS", "model", "preset", "--num-attention-heads", "heads"),
    Var("NUM_KV_HEAD", "model", "preset", "--num-query-groups", "kv_heads"),
    Var("FFN_HIDDEN_SIZE", "model", "preset", "--ffn-hidden-size", "ffn_hidden_size", help="SwiGLU MLP hidden size."),
    Var("SEQ", "model", "preset", "--seq-length", "seq_length"),
    Var("ROPE_THETA", "model", "preset", "--rotary-base", "rotary_base"),
    Var("INIT_METHOD_STD", "model", "", "--init-method-std"),
    Var("NO_FLASH_ATTN", "model", "0", "--attention-backend", help=(
        "1: no flash attention, megatron-core's DotProductAttention (--attention-backend unfused), as ALCF's "
        "scripts drop --use-flash-attn; 0: --attention-backend's default.")),
    Var("NHEADS", "model", "", help="Alias of HEADS (ALCF's helpers.sh reads HEADS, then NHEADS)."),
    Var("NUM_LAYERS", "model", "", help="Alias of NLAYERS (ALCF's helpers.sh reads NLAYERS, then NUM_LAYERS)."),
    Var("MODEL_VARIANT", "model", "", "--model-variant"),
    Var("PROGRESSIVE_LAYERS", "model", "", "--progressive-layers"),  # progressive growth: ALCF/notes/progressive.md
    Var("PROGRESSIVE_STAGES", "model", "", "--progressive-stages"),
    Var("PROGRESSIVE_STAGE_UNIT", "model", "", "--progressive-stage-unit"),
    Var("DEPTH_SAMPLING", "model", "", "--depth-sampling"),
    Var("GROWTH", "model", "", "--growth"),
    Var("GROWTH_MOMENTS", "model", "", "--growth-moments"),
    Var("GROWTH_LR_REWARM", "model", "", "--growth-lr-rewarm"),
    # parallelism and the job's shape
    Var("TP", "parallel", "1", "--tensor-model-parallel-size"),
    Var("PP", "parallel", "1", "--pipeline-model-parallel-size"),
    Var("SP", "parallel", "1", "--sequence-parallel", help=(
        "Sequence parallelism: 1 is off; a value equal to TP turns on Megatron sequence parallelism over the "
        "tensor-parallel group (it takes no extra ranks, unlike DeepSpeed-Ulysses degrees).")),
    Var("NGPU_PER_HOST", "parallel", "detected", help=(
        "Ranks per node: the node's GPUs (CUDA_VISIBLE_DEVICES, nvidia-smi, XPU), else SLURM_NTASKS_PER_NODE, "
        "else one per physical core of a CPU-only node.")),
    Var("CPUS_PER_RANK", "parallel", "detected",
        help="CPUs per rank (mpiexec -d, srun --cpus-per-task, OMP_NUM_THREADS)."),
    Var("GPUS_PER_NODE", "parallel", "", help="Alias of NGPU_PER_HOST (the name of ALCF's DeepSpeed hostfile)."),
    Var("HOSTFILE", "parallel", "", help=(
        "The job's hosts, one per line, instead of PBS_NODEFILE (as ALCF's helpers.sh): inside a PBS job only, "
        "e.g. to run on part of the allocation.")),
    Var("ZERO_STAGE", "parallel", "0", "--use-distributed-optimizer", help=(
        "From ALCF DeepSpeed scripts: 1 or 2 use megatron-core's distributed optimizer (optimizer state sharded "
        "over data-parallel ranks); 3 is not supported.")),
    Var("USE_DEEPSPEED", "parallel", "0",
        help="Accepted from ALCF scripts: there is no DeepSpeed engine; 1 makes ZERO_STAGE default to 1."),
    # batch and run length
    Var("MICRO_BATCH", "batch", "preset", "--micro-batch-size", "micro_batch"),
    Var("GRAD_ACC_STEPS", "batch", "1",
        help="Gradient-accumulation steps (derived from GLOBAL_BATCH when only it is set)."),
    Var("GLOBAL_BATCH", "batch", "derived", "--global-batch-size",
        help="Samples per step: MICRO_BATCH x GRAD_ACC_STEPS x DP when not set; checked against them when set."),
    Var("TRAIN_TOKENS", "batch", "", help=(
        "Run length in tokens (22000000000, 22e9, 22B): TRAIN_ITERS = ceil(TRAIN_TOKENS / (SEQ x GLOBAL_BATCH)).")),
    Var("TRAIN_ITERS", "batch", "preset", "--train-iters", "train_iters", help=(
        "Run length in iterations (instead of TRAIN_TOKENS); 50 for the tiny preset, the others need one of the "
        "two.")),
    Var("SEED", "batch", "1234", "--seed"),
    Var("DTYPE", "batch", "auto", help="bf16, fp16 or fp32; auto is bf16 on GPUs, fp32 on CPUs."),
    Var("USE_ACTIVATION_CHECKPOINTING", "batch", "0", "--recompute-activations"),
    Var("ACT_CKPT_NUM_LAYERS", "batch", "1", "--recompute-num-layers", help=(
        "Layers recomputed as one chunk with USE_ACTIVATION_CHECKPOINTING=1 (--recompute-num-layers; no effect "
        "without it).")),
    Var("TRAIN_ITER", "batch", "", help="Alias of TRAIN_ITERS (ALCF's helpers.sh reads TRAIN_ITERS, then TRAIN_ITER)."),
    # optimizer
    Var("OPT", "optimizer", "adamw", "--optimizer", help="adamw (adam is the same AdamW) or sgd."),
    Var("OPTIMIZER", "optimizer", "", help="Alias of OPT (ALCF's helpers.sh reads OPT, then OPTIMIZER, then OPTIM)."),
    Var("OPTIM", "optimizer", "", help="Alias of OPT."),
    Var("LR", "optimizer", "0.0002", "--lr"),
    Var("MIN_LR", "optimizer", "0", "--min-lr"),
    Var("WEIGHT_DECAY", "optimizer", "0.1", "--weight-decay"),
    Var("ADAM_BETA1", "optimizer", "0.9", "--adam-beta1"),
    Var("ADAM_BETA2", "optimizer", "0.95", "--adam-beta2"),
    Var("ADAM_EPS", "optimizer", "1e-05", "--adam-eps"),
    Var("CLIP_GRAD", "optimizer", "1.0", "--clip-grad"),
    # schedule
    Var("LR_DECAY_STYLE", "schedule", "cosine", "--lr-decay-style"),
    Var("LR_WARMUP_FRACTION", "schedule", "0.05", "--lr-warmup-fraction"),
    Var("LR_WARMUP_FRAC", "schedule", "", "--lr-warmup-fraction",
        help="Alias of LR_WARMUP_FRACTION (the name ALCF scripts read)."),
    Var("LR_DECAY_ITERS", "schedule", "", "--lr-decay-iters"),
    Var("OVERRIDE_CKPT_OPT_PARAM", "schedule", "0", "--override-opt_param-scheduler"),
    # data
    Var("DATA_FILE_LIST", "data", "", "--data-file-list",
        help="Data list(s) (`weight prefix [corpus]` lines); unset: the built-in corpus."),
    Var("TOKENIZER_TYPE", "data", "ByteTokenizer", "--tokenizer-type",
        help=f"One of {', '.join(schema.TOKENIZER_TYPES)} (--tokenizer-type's values)."),
    Var("TOKENIZER_MODEL", "data", "", "--tokenizer-model"),
    Var("DATA_CACHE_PATH", "data", "data_cache", "--data-cache-path"),
    Var("TRAIN_SPLIT", "data", "990", "--split", help=(
        "Train weight of each dataset's split: with VAL_SPLIT and TEST_SPLIT, --split TRAIN,VAL,TEST (ALCF's "
        "defaults 990,10,0 for the ones unset); none set: --split's default.")),
    Var("VAL_SPLIT", "data", "10", "--split", help="Validation weight of the split (see TRAIN_SPLIT)."),
    Var("TEST_SPLIT", "data", "0", "--split", help="Test weight of the split (see TRAIN_SPLIT)."),
    # checkpoints
    Var("SAVE", "checkpoint", "checkpoints/ARCH_nlL_hsH_seqS_DATA", "--save",
        help="Checkpoint folder; the default depends on the model and data only, never on the node count."),
    Var("CKPT_DIR", "checkpoint", "", help="Alias of SAVE (ALCF's checkpoint folder, which LOAD defaults to too)."),
    Var("LOAD", "checkpoint", "SAVE", "--load",
        help="Checkpoint to start from (regular or universal); must exist when set."),
    Var("SAVE_INTERVAL", "checkpoint", "50", "--save-interval"),
    Var("CONTINUE", "checkpoint", "0", help=(
        "1: continue this run from SAVE, ignoring LOAD and the one-time flags (--finetune, --no-load-optim, "
        "--no-load-rng, --restart-lr-schedule, --universal-checkpoint, --ckpt-step); chained jobs set it.")),
    # logging
    Var("LOG_INTERVAL", "logging", "1", "--log-interval"),
    Var("EVAL_INTERVAL", "logging", "100", "--eval-interval"),
    Var("EVAL_ITERS", "logging", "20", "--eval-iters"),
    Var("NO_TENSORBOARD", "logging", "0", "--tensorboard-dir",
        help="1: no tensorboard logs (default: RUN_DIR/tensorboard)."),
    Var("WANDB_PROJECT", "logging", "", "--wandb-project"),
    Var("RUN_DIR", "logging", "runs/alcf/DATE-TIME_ARCH_JOBID", "--run-dir",
        help="The run folder: .env, config.json, launch.sh, output.log, train.log, tensorboard/."),
    Var("EXIT_DURATION_MINS", "logging", "", "--exit-duration-in-mins"),
    Var("TIMING_LOG_LEVEL", "logging", "", "--timing-log-level"),
    # launch
    Var("LAUNCH_WITH", "launch", "auto", help=(
        "auto (PBS: mpiexec, Slurm: srun, else torchrun, or python for one rank), mpiexec (also mpirun, MPICH), "
        "srun, torchrun or python.")),
    Var("DRY_RUN", "launch", "0", help=(
        "1: print the resolved variables, configuration and command, and an estimate of memory per rank and run "
        "time (megatron_ext/resources.py); launch nothing.")),
    Var("DEVICE_MEMORY_GB", "launch", "", help=(
        "Memory of one accelerator in GB, for DRY_RUN's estimate (default: the device table's entry for the GPU "
        "nvidia-smi names, or for the ALCF machine of the host).")),
    Var("PYTHON", "launch", ".venv/bin/python", help="Interpreter for the resolver and the ranks (else python3)."),
)
# fmt: on
VARIABLES: tuple[Var, ...] = tuple(
    dataclasses.replace(v, help=v.help or FIELDS[v.flag][1].metadata["help"]) if v.flag else v for v in _TABLE
)
VAR_BY_NAME = {v.name: v for v in VARIABLES}
SECTIONS = ("model", "parallel", "batch", "optimizer", "schedule", "data", "checkpoint", "logging", "launch")

# Variables whose value is passed to their flag unchanged (the rest are interpreted below).
DIRECT = (
    "NLAYERS", "HIDDEN", "HEADS", "NUM_KV_HEAD", "FFN_HIDDEN_SIZE", "SEQ", "TP", "PP", "MICRO_BATCH", "SEED", "LR",
    "MIN_LR", "WEIGHT_DECAY", "ADAM_BETA1", "ADAM_BETA2", "ADAM_EPS", "CLIP_GRAD", "LR_DECAY_STYLE",
    "LR_DECAY_ITERS", "TOKENIZER_TYPE", "TOKENIZER_MODEL", "DATA_CACHE_PATH", "SAVE_INTERVAL", "LOG_INTERVAL",
    "EVAL_INTERVAL", "EVAL_ITERS", "EXIT_DURATION_MINS", "GLOBAL_BATCH", "INIT_METHOD_STD", "WANDB_PROJECT",
    "TIMING_LOG_LEVEL", "MODEL_VARIANT", "PROGRESSIVE_LAYERS", "PROGRESSIVE_STAGES", "PROGRESSIVE_STAGE_UNIT",
    "DEPTH_SAMPLING", "GROWTH", "GROWTH_MOMENTS", "GROWTH_LR_REWARM",
)  # fmt: skip
# helpers.sh's other names of variables (alias -> the variable); two that are set must agree.
ALIASES = {
    "NHEADS": "HEADS", "NUM_LAYERS": "NLAYERS", "GPUS_PER_NODE": "NGPU_PER_HOST", "TRAIN_ITER": "TRAIN_ITERS",
    "OPTIMIZER": "OPT", "OPTIM": "OPT", "CKPT_DIR": "SAVE", "HOSTFILE": "PBS_NODEFILE",
}  # fmt: skip
# Fields set on the command line make these schema fields' env values step aside (mutually exclusive groups).
GROUPS: dict[str, tuple[str, ...]] = {
    "schedule.lr_warmup_fraction": (
        "schedule.lr_warmup_fraction", "schedule.lr_warmup_iters", "schedule.lr_warmup_samples",
        "schedule.lr_warmup_tokens",
    ),
    "schedule.lr_decay_iters": ("schedule.lr_decay_iters", "schedule.lr_decay_samples", "schedule.lr_decay_tokens"),
    "training.train_iters": ("training.train_iters", "training.train_samples"),
    "precision.bf16": ("precision.bf16", "precision.fp16"),
    "data.data_file_list": ("data.data_file_list", "data.data_path"),
}  # fmt: skip
# Flags dropped from the command line by CONTINUE=1: they only make sense for a run's first job.
ONE_TIME_FLAGS = {
    "--finetune": 0, "--no-load-optim": 0, "--no-load-rng": 0, "--restart-lr-schedule": 0,
    "--universal-checkpoint": 0, "--load": 1, "--ckpt-step": 1,
}  # fmt: skip
# DTYPE's spellings: the schema's precision names, torch's dtype names and `half`.
DTYPE_NAMES = {**{dtype: name for name, dtype in schema.PRECISIONS.items()}, "half": "fp16"}


# ---- reading a variable ---------------------------------------------------------------------------------------


def _value(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, stripped; None when unset or empty (as `${VAR:-default}` in bash)."""
    raw = env.get(name)
    return raw.strip() if raw is not None and raw.strip() else None


def _source(env: Mapping[str, str], name: str, otherwise: str = "default") -> str:
    """Where a variable's value came from: "env" when it is set, else `otherwise`."""
    return "env" if _value(env, name) else otherwise


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = _value(env, name)
    if raw is None:
        return False
    if raw.lower() in TRUE:
        return True
    if raw.lower() in FALSE:
        return False
    raise EnvError(f"{name}={raw!r} is not a switch; expected 1 or 0")


def _int(name: str, raw: str, minimum: int = 1) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise EnvError(f"{name}={raw!r} is not an integer; expected a whole number >= {minimum}") from None
    if value < minimum:
        raise EnvError(f"{name}={value} is out of range; expected a whole number >= {minimum}")
    return value


def parse_count(name: str, raw: str) -> int:
    """22000000000, 22e9, 22B, 2T, 1_000 -> a positive count (`config.parse_count`, the length flags' type)."""
    try:
        value = schema.parse_count(raw)
    except argparse.ArgumentTypeError:
        raise EnvError(f"{name}={raw!r} is not a count; expected e.g. 22000000000, 22e9, 22B or 2T") from None
    if value < 1:
        raise EnvError(f"{name}={raw!r} is out of range; expected a positive whole number of tokens")
    return value


def _typed(name: str, flag: str, raw: str) -> str:
    """Checks `raw` against the schema field's type and choices, so a typo names the variable, not the flag."""
    _, f, kind = FIELDS[flag]
    if schema.is_length(f):
        try:
            schema.parse_count(raw)
        except argparse.ArgumentTypeError:
            what = f.metadata["help"].rstrip(".").lower()
            raise EnvError(f"{name}={raw!r} is not a count; expected {what} (e.g. 2000, 5e9 or 300B)") from None
    elif kind in (int, float):
        try:
            kind(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise EnvError(f"{name}={raw!r} is not {what}; expected {f.metadata['help'].rstrip('.').lower()}") from None
    choices = f.metadata.get("choices")
    if choices and (kind(raw) if kind in (int, float) else raw) not in choices:
        raise EnvError(f"{name}={raw!r} is not one of {', '.join(map(str, choices))}")
    return raw


def _flag_value(flag: str, text: str | None) -> Any:
    """A flag's argument as the schema's field holds it (a switch, None, is True)."""
    _, f, kind = FIELDS[flag]
    if text is None:
        return True
    return schema.parse_count(text) if schema.is_length(f) else kind(text)


# ---- the plan -------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """What the resolver tells: every variable's value and where it came from, the derived sizes, the arithmetic
    behind them and notes."""

    values: dict[str, tuple[str, str]] = field(default_factory=dict)  # NAME -> (value, source)
    derived: dict[str, str] = field(default_factory=dict)
    explain: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def set(self, name: str, value: str, source: str) -> None:
        self.values[name] = (value, source)


@dataclass(kw_only=True)
class Plan(Report):
    """Everything train_alcf.sh needs: resolved variables, derived sizes, the validated config and the command
    (built once all of them are known; the steps before tell through a Report)."""

    argv: list[str]
    config: Config
    command: list[str]
    exports: dict[str, str]
    run_dir: str
    signal: str = "TERM"
    dry_run: bool = False


@dataclass(frozen=True)
class Setting:
    """A variable's value and its source; with a flag, the arguments it adds unless the command line sets a field
    of the flag's group (then the command line wins)."""

    name: str
    value: str
    source: str
    flag: str | None = None
    args: tuple[str, ...] = ()
    note: str | None = None


@dataclass
class Flags:
    """The variables as pretrain_gpt.py flags, and which variable each flag came from (for error messages)."""

    argv: list[str]
    names: dict[str, str]


# ---- the command line passed through --------------------------------------------------------------------------


def strip_one_time(extra: Sequence[str]) -> tuple[list[str], list[str]]:
    """(extra without the one-time flags, the flags dropped) for CONTINUE=1."""
    kept, dropped, skip = [], [], 0
    for arg in extra:
        if skip:
            skip -= 1
            dropped.append(arg)
            continue
        name = arg.split("=", 1)[0]
        if name in ONE_TIME_FLAGS:
            dropped.append(arg)
            skip = 0 if "=" in arg else ONE_TIME_FLAGS[name]
            continue
        kept.append(arg)
    return kept, dropped


def given_dests(extra: Sequence[str]) -> set[str]:
    """The schema fields that the pass-through command line sets. argparse fills in a default only where the
    namespace has no value yet, so a namespace holding a marker for every field tells given from default."""
    unset = object()
    fields = {dest for dest, _, _ in FIELDS.values()}
    aliases = {f"_alias{alias}": target for alias, target in schema.VALUE_ALIASES.items()}
    namespace = argparse.Namespace(**dict.fromkeys([*fields, *aliases], unset))
    parsed = vars(schema.build_parser().parse_args(list(extra), namespace))
    given = {dest for dest in fields if parsed[dest] is not unset}
    return given | {f"{s}.{name}" for key, (s, name, _) in aliases.items() if s and parsed[key] is not unset}


def name_variables(message: str, names: Mapping[str, str]) -> str:
    """A schema message with each flag that came from a variable shown as `VAR (--flag)`: the schema words every
    mistake once, in flags; a flag is a whole `--word` of the message."""
    return re.sub(r"--[A-Za-z0-9_-]+", lambda m: f"{names[m[0]]} ({m[0]})" if m[0] in names else m[0], message)


# ---- variables -> flags ---------------------------------------------------------------------------------------


def model_preset(env: Mapping[str, str], report: Report) -> str:
    """MODEL_ARCH as the name of a preset (any case)."""
    raw = _value(env, "MODEL_ARCH") or "tiny"
    arch = next((k for k in PRESETS if k.lower() == raw.lower()), None)
    if arch is None:
        raise EnvError(f"MODEL_ARCH={raw!r} is not a preset; expected one of {', '.join(PRESETS)}")
    report.set("MODEL_ARCH", arch, _source(env, "MODEL_ARCH"))
    return arch


def job_shape(env: Mapping[str, str], report: Report) -> JobShape:
    """The job's hosts x NGPU_PER_HOST ranks (given, Slurm's tasks per node, the node's GPUs or its physical
    cores), with CPUS_PER_RANK each (given, Slurm's CPUs per task or the node's CPUs shared out)."""
    job = detect_job(env)
    accel, n_accel = detect_accelerators(env)
    logical, physical = cpu_counts()
    ppn_raw, tasks = _value(env, "NGPU_PER_HOST"), _value(env, "SLURM_NTASKS_PER_NODE")
    if ppn_raw:
        ppn, ppn_source = _int("NGPU_PER_HOST", ppn_raw), "env"
    elif job.kind == "slurm" and tasks:
        ppn, ppn_source = _int("SLURM_NTASKS_PER_NODE", tasks.split("(")[0]), "SLURM_NTASKS_PER_NODE"
    elif n_accel:
        ppn, ppn_source = n_accel, f"{n_accel} {accel} device(s)"
    else:
        ppn, ppn_source = physical, f"no GPU: one rank per physical core ({physical} of {logical} CPUs)"
    report.set("NGPU_PER_HOST", str(ppn), "env" if ppn_source == "env" else "detected")
    cpus = _value(env, "CPUS_PER_RANK")
    slurm_cpus = _value(env, "SLURM_CPUS_PER_TASK") if job.kind == "slurm" else None
    if cpus:
        cpus_per_rank, cpus_source = _int("CPUS_PER_RANK", cpus), "env"
    elif slurm_cpus:
        cpus_per_rank, cpus_source = _int("SLURM_CPUS_PER_TASK", slurm_cpus), "SLURM_CPUS_PER_TASK"
    else:
        cpus_per_rank, cpus_source = max(1, logical // ppn), f"detected: {logical} CPUs / {ppn} ranks"
    report.set("CPUS_PER_RANK", str(cpus_per_rank), cpus_source)
    shape = JobShape(job, ppn, cpus_per_rank, n_accel)
    world = shape.world_size
    report.derived["NHOSTS"] = str(len(job.hosts))
    report.derived["WORLD_SIZE"] = str(world)
    where = {"pbs": f"PBS_NODEFILE {job.nodefile}", "slurm": "the Slurm node list", "local": "this machine"}[job.kind]
    report.explain.append(
        f"WORLD_SIZE={world} = {len(job.hosts)} host(s) from {where} x NGPU_PER_HOST {ppn} ({ppn_source})"
    )
    return shape


def _direct_settings(env: Mapping[str, str], preset: Preset) -> list[Setting]:
    """The variables passed to their flag as they are: the value set, else the preset's, else the default."""
    out = []
    for name in DIRECT:
        var = VAR_BY_NAME[name]
        assert var.flag is not None
        raw, source = _value(env, name), "env"
        if raw is None and var.preset:
            preset_value = getattr(preset, var.preset)
            raw, source = (None if preset_value is None else str(preset_value)), "preset"
        if raw is None and var.default not in ("", "preset", "derived"):
            raw, source = var.default, "default"
        if raw is None:
            out.append(Setting(name, "", "unset"))
        else:
            out.append(Setting(name, raw, source, var.flag, (var.flag, _typed(name, var.flag, raw))))
    return out


def _warmup_settings(env: Mapping[str, str]) -> list[Setting]:
    """LR_WARMUP_FRACTION or its alias LR_WARMUP_FRAC (they must agree when both are set)."""
    warm, frac = _value(env, "LR_WARMUP_FRACTION"), _value(env, "LR_WARMUP_FRAC")
    for name, raw in (("LR_WARMUP_FRACTION", warm), ("LR_WARMUP_FRAC", frac)):
        if raw:
            _typed(name, "--lr-warmup-fraction", raw)
    if warm and frac and float(warm) != float(frac):
        raise EnvError(f"LR_WARMUP_FRACTION={warm} and its alias LR_WARMUP_FRAC={frac} disagree; set one of them")
    name = "LR_WARMUP_FRAC" if frac and not warm else "LR_WARMUP_FRACTION"
    other = "LR_WARMUP_FRACTION" if name == "LR_WARMUP_FRAC" else "LR_WARMUP_FRAC"
    value = warm or frac or VAR_BY_NAME["LR_WARMUP_FRACTION"].default
    flag = "--lr-warmup-fraction"
    return [
        Setting(name, value, "env" if warm or frac else "default", flag, (flag, value)),
        Setting(other, value, f"alias of {name}"),
    ]


def _data_setting(env: Mapping[str, str]) -> Setting:
    lists = _value(env, "DATA_FILE_LIST")
    if not lists:
        return Setting("DATA_FILE_LIST", "", "unset: built-in corpus")
    return Setting("DATA_FILE_LIST", lists, "env", "--data-file-list", ("--data-file-list", *lists.split()))


def _sequence_parallel_setting(env: Mapping[str, str]) -> Setting:
    """SP: 1 is off, TP turns on Megatron sequence parallelism (no DeepSpeed-Ulysses degrees)."""
    sp = _value(env, "SP") or "1"
    sp_n = _int("SP", sp, minimum=0)
    if sp_n <= 1:
        return Setting("SP", sp, _source(env, "SP"))
    tp_n = _int("TP", _value(env, "TP") or "1")
    if sp_n != tp_n:
        raise EnvError(
            f"SP={sp_n} must be 1 (off) or equal to TP={tp_n}: Megatron sequence parallelism splits the sequence "
            "over the tensor-parallel group (DeepSpeed-Ulysses degrees are not supported)"
        )
    return Setting("SP", sp, "env", "--sequence-parallel", ("--sequence-parallel",))


def _zero_settings(env: Mapping[str, str]) -> list[Setting]:
    """ZERO_STAGE 1/2 (default 1 with USE_DEEPSPEED=1) -> megatron-core's distributed optimizer."""
    deepspeed = _bool(env, "USE_DEEPSPEED")
    zero_raw = _value(env, "ZERO_STAGE")
    zero = _int("ZERO_STAGE", zero_raw, minimum=0) if zero_raw else (1 if deepspeed else 0)
    if zero > 2:
        raise EnvError(
            f"ZERO_STAGE={zero} (parameter sharding) is not supported; expected 0, or 1/2 for the distributed "
            "optimizer, with TP/PP to split the weights"
        )
    flag = "--use-distributed-optimizer"
    stage = Setting("ZERO_STAGE", "0", _source(env, "ZERO_STAGE"))
    if zero:
        note = (
            f"ZERO_STAGE={zero}: mapped to --use-distributed-optimizer (megatron-core shards the optimizer state "
            "over data-parallel ranks and reduce-scatters gradients; no DeepSpeed engine)"
        )
        stage = Setting("ZERO_STAGE", str(zero), "env" if zero_raw else "USE_DEEPSPEED=1", flag, (flag,), note)
    note = "USE_DEEPSPEED=1: accepted for ALCF scripts; training runs on megatron-core, not DeepSpeed"
    source = _source(env, "USE_DEEPSPEED")
    return [stage, Setting("USE_DEEPSPEED", str(int(deepspeed)), source, note=note if deepspeed else None)]


def _dtype_setting(env: Mapping[str, str], devices: int) -> Setting:
    """DTYPE (bf16, fp16, fp32 or their dtype names); auto is bf16 on GPUs, fp32 on CPUs."""
    raw = _value(env, "DTYPE")
    dtype = DTYPE_NAMES.get((raw or "auto").lower(), (raw or "auto").lower())
    if dtype not in ("auto", *schema.PRECISIONS):
        raise EnvError(f"DTYPE={raw!r} is not a precision; expected bf16, fp16, fp32 or auto")
    source = "env"
    if dtype == "auto":
        dtype, source = ("bf16" if devices else "fp32"), "detected"
    return Setting("DTYPE", dtype, source, "--bf16", () if dtype == "fp32" else (f"--{dtype}",))


def _optimizer_setting(env: Mapping[str, str]) -> Setting:
    opt = (_value(env, "OPT") or "adamw").lower()
    flag = {"adamw": "adam", "adam": "adam", "sgd": "sgd"}.get(opt)
    if flag is None:
        raise EnvError(f"OPT={opt!r} is not supported; expected adamw (or adam, the same AdamW) or sgd")
    return Setting("OPT", opt, _source(env, "OPT"), "--optimizer", ("--optimizer", flag))


def _switch_settings(env: Mapping[str, str]) -> list[Setting]:
    out = []
    for name in ("USE_ACTIVATION_CHECKPOINTING", "OVERRIDE_CKPT_OPT_PARAM"):
        flag = VAR_BY_NAME[name].flag
        assert flag is not None
        on = _bool(env, name)
        out.append(Setting(name, "1", "env", flag, (flag,)) if on else Setting(name, "0", _source(env, name)))
    backend = ("--attention-backend", "unfused")
    no_flash = _bool(env, "NO_FLASH_ATTN")
    out.append(Setting("NO_FLASH_ATTN", "1", "env", backend[0], backend) if no_flash else
               Setting("NO_FLASH_ATTN", "0", _source(env, "NO_FLASH_ATTN")))  # fmt: skip
    return out


def _rope_setting(env: Mapping[str, str], preset: Preset) -> Setting:
    """ROPE_THETA: the RoPE base instead of the preset's (which the preset's flags pass)."""
    raw, flag = _value(env, "ROPE_THETA"), "--rotary-base"
    if raw is None:
        return Setting("ROPE_THETA", str(preset.rotary_base), "preset")
    return Setting("ROPE_THETA", raw, "env", flag, (flag, _typed("ROPE_THETA", flag, raw)))


def _recompute_layers_setting(env: Mapping[str, str]) -> Setting:
    """ACT_CKPT_NUM_LAYERS: layers per recomputed chunk, passed only with USE_ACTIVATION_CHECKPOINTING=1."""
    raw, flag = _value(env, "ACT_CKPT_NUM_LAYERS"), "--recompute-num-layers"
    layers = str(_int("ACT_CKPT_NUM_LAYERS", raw)) if raw else "1"
    if not _bool(env, "USE_ACTIVATION_CHECKPOINTING"):
        note = f"ACT_CKPT_NUM_LAYERS={raw} has no effect without USE_ACTIVATION_CHECKPOINTING=1" if raw else None
        return Setting("ACT_CKPT_NUM_LAYERS", layers, _source(env, "ACT_CKPT_NUM_LAYERS"), note=note)
    return Setting("ACT_CKPT_NUM_LAYERS", layers, _source(env, "ACT_CKPT_NUM_LAYERS"), flag, (flag, layers))


def _split_settings(env: Mapping[str, str]) -> list[Setting]:
    """TRAIN_SPLIT, VAL_SPLIT, TEST_SPLIT -> --split T,V,T (helpers.sh's defaults for those unset) when any is set."""
    names = ("TRAIN_SPLIT", "VAL_SPLIT", "TEST_SPLIT")
    values = [_value(env, n) or VAR_BY_NAME[n].default for n in names]
    for name, value in zip(names, values):
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not weight >= 0:
            raise EnvError(f"{name}={value!r} is not a number >= 0; expected a weight of the split, e.g. 990")
    if not any(_value(env, n) for n in names):
        return [Setting(n, "", "unset: --split's default") for n in names]
    split = ",".join(values)
    first = Setting(names[0], values[0], _source(env, names[0]), "--split", ("--split", split))
    return [first, *(Setting(n, v, _source(env, n)) for n, v in zip(names[1:], values[1:]))]


def variables_to_flags(env: Mapping[str, str], preset: Preset, devices: int, given: set[str], report: Report) -> Flags:
    """Every variable as its pretrain_gpt.py flags, after the preset's Llama-style flags; a variable whose flag
    group the command line sets steps aside (with a note when the variable was set)."""
    settings = [
        *_direct_settings(env, preset), *_warmup_settings(env), _data_setting(env), _sequence_parallel_setting(env),
        *_zero_settings(env), _dtype_setting(env, devices), _optimizer_setting(env), *_switch_settings(env),
        _recompute_layers_setting(env), *_split_settings(env), _rope_setting(env, preset),
    ]  # fmt: skip
    argv = [*LLAMA_FLAGS, "--rotary-base", str(preset.rotary_base)]
    # flag -> variable, for error messages: every flag a variable can set, unless the command line sets it
    names = {v.flag: v.name for v in reversed(VARIABLES) if v.flag and dest_of(v.flag) not in given}
    for s in settings:
        dest = dest_of(s.flag) if s.flag else ""
        clash = [g for g in GROUPS.get(dest, (dest,)) if g in given] if s.flag else []
        report.set(s.name, s.value, f"{s.source}, overridden by the command line" if clash else s.source)
        if clash and s.source == "env":
            report.notes.append(f"{s.name}={s.value} is overridden by the command line ({', '.join(clash)})")
        elif s.flag and not clash:
            argv.extend(s.args)
            names[s.flag] = s.name
        if s.note:
            report.notes.append(s.note)
    return Flags(argv, names)


def parse_config(argv: Sequence[str], names: Mapping[str, str]) -> Config:
    """The schema's validated config of `argv`; its mistakes name the variables the flags came from."""
    try:
        return schema.parse_args(list(argv))
    except ConfigError as e:
        raise ConfigError(name_variables(str(e), names)) from None


# ---- derived sizes --------------------------------------------------------------------------------------------


def data_parallel_size(cfg: Config, shape: JobShape, report: Report) -> int:
    """DP = WORLD_SIZE / (TP x PP), which must divide."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    world = shape.world_size
    try:
        dp = cfg.data_parallel_size(world)
    except ConfigError:
        raise EnvError(
            f"WORLD_SIZE {world} ({len(shape.job.hosts)} host(s) x NGPU_PER_HOST {shape.ranks_per_node}) is not "
            f"divisible by TP {tp} x PP {pp} = {tp * pp}; expected a multiple: change NGPU_PER_HOST, the node "
            "count, TP or PP"
        ) from None
    report.derived["DP"] = str(dp)
    report.explain.append(f"DP={dp} = WORLD_SIZE {world} / (TP {tp} x PP {pp})")
    return dp


def global_batch(env: Mapping[str, str], cfg: Config, dp: int, report: Report) -> tuple[int, bool]:
    """(GLOBAL_BATCH, whether derived): MICRO_BATCH x GRAD_ACC_STEPS x DP, or the one given, which must agree."""
    mb = cfg.training.micro_batch_size
    gas_raw = _value(env, "GRAD_ACC_STEPS")
    gas = _int("GRAD_ACC_STEPS", gas_raw) if gas_raw else None
    given = cfg.training.global_batch_size
    if given is not None and gas is not None and given != mb * gas * dp:
        raise EnvError(
            f"GLOBAL_BATCH={given} does not equal MICRO_BATCH {mb} x GRAD_ACC_STEPS {gas} x DP {dp} = "
            f"{mb * gas * dp}; expected them to agree: unset GRAD_ACC_STEPS (then derived) or GLOBAL_BATCH"
        )
    if given is None:
        gb = mb * (gas or 1) * dp
        report.explain.append(f"GLOBAL_BATCH={gb} = MICRO_BATCH {mb} x GRAD_ACC_STEPS {gas or 1} x DP {dp}")
        report.set("GLOBAL_BATCH", str(gb), "derived")
        report.set("GRAD_ACC_STEPS", str(gas or 1), "env" if gas else "default")
    else:
        gb = given
        derived_gas = gb // (mb * dp) if gas is None else gas
        report.explain.append(
            f"GLOBAL_BATCH={gb} given: GRAD_ACC_STEPS {derived_gas} = GLOBAL_BATCH {gb} / (MICRO_BATCH {mb} x DP {dp})"
        )
        report.set("GRAD_ACC_STEPS", str(derived_gas), "env" if gas else "derived")
    report.derived["GLOBAL_BATCH"] = str(gb)
    return gb, given is None


def run_length(
    env: Mapping[str, str], cfg: Config, gb: int, arch: str, given: set[str], report: Report
) -> tuple[int | None, bool]:
    """(TRAIN_ITERS, whether to pass it): from the command line's length, TRAIN_TOKENS, TRAIN_ITERS or the
    preset's default run."""
    seq, preset = cfg.model.seq_length, PRESETS[arch]
    tokens_raw, iters_raw = _value(env, "TRAIN_TOKENS"), _value(env, "TRAIN_ITERS")
    cli_length = [g for g in GROUPS["training.train_iters"] if g in given]
    report.set("TRAIN_TOKENS", tokens_raw or "", _source(env, "TRAIN_TOKENS", "unset"))
    iters: int | None
    if cli_length:
        if tokens_raw or iters_raw:
            report.notes.append(f"TRAIN_TOKENS/TRAIN_ITERS ignored: the command line gives {', '.join(cli_length)}")
        iters = cfg.training.train_iters
        report.explain.append(f"run length from the command line ({', '.join(cli_length)})")
    elif tokens_raw and iters_raw:
        raise EnvError(f"TRAIN_TOKENS={tokens_raw} and TRAIN_ITERS={iters_raw} are both set; expected one of them")
    elif tokens_raw:
        tokens = parse_count("TRAIN_TOKENS", tokens_raw)
        iters = schema.iterations_for_tokens(tokens, seq, gb)
        report.explain.append(
            f"TRAIN_ITERS={iters} = ceil(TRAIN_TOKENS {tokens:,} / (SEQ {seq} x GLOBAL_BATCH {gb})) "
            f"({iters * seq * gb:,} tokens)"
        )
        report.set("TRAIN_ITERS", str(iters), "derived")
    elif iters_raw:
        iters = _int("TRAIN_ITERS", iters_raw)
        report.set("TRAIN_ITERS", str(iters), "env")
        report.explain.append(f"TRAIN_ITERS={iters} ({iters * seq * gb:,} tokens = TRAIN_ITERS x SEQ x GLOBAL_BATCH)")
    elif preset.train_iters is not None:
        iters = preset.train_iters
        report.set("TRAIN_ITERS", str(iters), "preset")
        report.explain.append(f"TRAIN_ITERS={iters} (MODEL_ARCH={arch} default)")
    else:
        raise EnvError(
            f"MODEL_ARCH={arch} needs a run length; expected TRAIN_TOKENS (e.g. 2T or $((2*10**12))) or TRAIN_ITERS"
        )
    report.derived["TRAIN_ITERS"] = str(iters)
    sc = cfg.schedule
    if sc.lr_warmup_fraction is not None and iters is not None:
        decay = sc.lr_decay_iters or iters
        report.explain.append(
            f"warmup {sc.lr_warmup_fraction:g} x {decay:,} decay iterations = "
            f"{sc.lr_warmup_fraction * decay:,.1f} iterations"
        )
    return iters, not cli_length


# ---- checkpoints, run folder, inputs --------------------------------------------------------------------------


def _latest_iteration(path: str) -> int | None:
    """The iteration named by a checkpoint folder's tracker file, None when there is none."""
    from megatron_ext.training import layout  # import-free module: no torch

    try:
        return layout.latest_iteration(path)
    except (layout.CheckpointNotFound, OSError):
        return None


def checkpoint_iteration(path: str) -> int | None:
    """The iteration a --load folder holds: its tracker's, a universal folder's (universal.json), an iter_N folder's."""
    latest = _latest_iteration(path)
    if latest is not None:
        return latest
    try:
        return int(json.loads((Path(path) / "universal.json").read_text())["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    m = re.fullmatch(r"iter_(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def checkpoint_paths(
    env: Mapping[str, str], cfg: Config, arch: str, given: set[str], batch_derived: bool, report: Report
) -> tuple[str, str]:
    """(SAVE, LOAD): SAVE names the model and data, never the node count; LOAD defaults to SAVE (resume) and must
    not start behind the checkpoints SAVE already holds. CONTINUE=1 resumes from SAVE whatever LOAD says."""
    cont = _bool(env, "CONTINUE")
    data_tag = Path(cfg.data.data_file_list[0]).stem if cfg.data.data_file_list else "builtin"
    m = cfg.model
    default_save = f"checkpoints/{arch}_nl{m.num_layers}_hs{m.hidden_size}_seq{m.seq_length}_{data_tag}"
    env_save, env_load = _value(env, "SAVE"), _value(env, "LOAD")
    cli_save = cfg.checkpoint.save if "checkpoint.save" in given else None
    save = cli_save if cli_save is not None else env_save or default_save
    report.set("SAVE", save, _source(env, "SAVE"))
    explicit = None if cont else "--load" if "checkpoint.load" in given else "LOAD" if env_load else None
    load = (cfg.checkpoint.load if explicit == "--load" else env_load) if explicit else save
    assert load is not None
    if cont and env_load:
        report.notes.append(f"CONTINUE=1: LOAD={env_load} ignored, resuming from SAVE")
    report.set("LOAD", load, "env" if explicit else "SAVE")
    if explicit and not Path(load).exists():
        raise EnvError(
            f"{explicit}={load} does not exist; expected a checkpoint folder (unset LOAD to resume from SAVE)"
        )
    saved_at = _latest_iteration(save)
    finetune = cfg.checkpoint.finetune and not cont
    loaded_at = checkpoint_iteration(load)
    start = 0 if finetune or loaded_at is None else loaded_at
    if explicit and saved_at is not None and Path(load).resolve() != Path(save).resolve():
        if loaded_at is None and not finetune:
            report.notes.append(f"SAVE={save} holds iteration {saved_at}; LOAD={load} continues from its own iteration")
        elif start < saved_at:
            how = "--finetune starts at iteration 0" if finetune else f"LOAD holds iteration {start}"
            raise EnvError(
                f"SAVE={save} already holds a checkpoint (iteration {saved_at}) but {how} (LOAD={load}): its "
                "checkpoints would fall behind; set CONTINUE=1 to continue the run in SAVE, or choose a new SAVE"
            )
    report.derived["START_ITERATION"] = str(start)
    report.derived["WORKDIR"] = os.getcwd()  # relative SAVE/LOAD/RUN_DIR are relative to it
    if loaded_at is not None and not finetune:
        report.explain.append(f"resuming from {load} at iteration {loaded_at}")
        if batch_derived:
            report.notes.append(
                f"resuming with a derived GLOBAL_BATCH {report.derived['GLOBAL_BATCH']}: it follows the node count; "
                "set GLOBAL_BATCH to the earlier jobs' value to keep the batch when the node count changes"
            )
    return save, load


def run_folder(
    env: Mapping[str, str], arch: str, job: Job, given: set[str], report: Report, now: float | None = None
) -> tuple[str, str | None]:
    """(RUN_DIR, the tensorboard folder to pass, None when NO_TENSORBOARD=1 or the command line gives one)."""
    run_dir = _value(env, "RUN_DIR")
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        run_dir = f"runs/alcf/{stamp}_{arch}" + (f"_{job.job_id.split('.')[0]}" if job.job_id else f"_{os.getppid()}")
    report.set("RUN_DIR", run_dir, _source(env, "RUN_DIR"))
    no_tb = _bool(env, "NO_TENSORBOARD")
    report.set("NO_TENSORBOARD", "1" if no_tb else "0", _source(env, "NO_TENSORBOARD"))
    tensorboard = None if no_tb or "logging.tensorboard_dir" in given else f"{run_dir}/tensorboard"
    return run_dir, tensorboard


def check_inputs(env: Mapping[str, str], cfg: Config, given: set[str], report: Report) -> None:
    """The data lists and the tokenizer file exist (one line now, not a failure on every rank later)."""
    lists = [*(cfg.data.data_file_list or []), *(cfg.data.valid_data_file_list or [])]
    if lists:
        from megatron_ext.data.data_list import DataListError, parse_data_lists, validate

        for path in lists:
            if not Path(path).is_file():
                raise EnvError(f"DATA_FILE_LIST: {path} is not a file; expected a data list (`weight prefix` lines)")
        try:
            validate(parse_data_lists(lists))
        except DataListError as e:
            raise EnvError(f"DATA_FILE_LIST: {e}") from None
    explicit_tokenizer = "data.tokenizer_type" in given or _value(env, "TOKENIZER_TYPE")
    if lists and cfg.data.tokenizer_type == "ByteTokenizer" and not explicit_tokenizer:
        report.notes.append(
            "DATA_FILE_LIST with TOKENIZER_TYPE=ByteTokenizer: set TOKENIZER_TYPE and TOKENIZER_MODEL to the "
            "tokenizer the data was preprocessed with, unless it was ByteTokenizer"
        )
    tok = cfg.data.tokenizer_model
    if tok and not Path(tok).exists():
        raise EnvError(f"TOKENIZER_MODEL={tok} does not exist; expected a tokenizer file or folder")


def complete_config(
    cfg: Config, derived: Sequence[tuple[str, str | None]], given: set[str], world: int, names: Mapping[str, str]
) -> Config:
    """`cfg` with the derived flags set, as parsing them before the pass-through command line gives (a field that
    line sets keeps its value), its batch resolved at this world size and its folders checked."""
    changes: dict[str, dict[str, Any]] = {}
    for flag, text in derived:
        section, name = dest_of(flag).split(".")
        if dest_of(flag) not in given:
            changes.setdefault(section, {})[name] = _flag_value(flag, text)
    try:
        sections = {s: dataclasses.replace(getattr(cfg, s), **values) for s, values in changes.items()}
        cfg = dataclasses.replace(cfg, **sections)
        cfg.resolve_batch(world)
        cfg.check_folders()
    except ConfigError as e:
        raise ConfigError(name_variables(str(e), names)) from None
    return cfg


# ---- helpers.sh's other names, and names that look like ours ---------------------------------------------------


def resolve_aliases(env: Mapping[str, str], report: Report) -> dict[str, str]:
    """The environment with helpers.sh's other names (ALIASES) set as the variables they stand for; a variable
    and its aliases that are set must agree. HOSTFILE replaces PBS_NODEFILE, inside a PBS job only."""
    out = dict(env)
    by: dict[str, str] = {}  # variable -> the name its value came from
    for alias, name in ALIASES.items():
        value = _value(env, alias)
        if value is None:
            continue
        if alias == "HOSTFILE":
            inside = bool(_value(env, "PBS_JOBID"))
            report.set(alias, value, "env: replaces PBS_NODEFILE" if inside else "ignored: not inside a PBS job")
            if inside:
                out[name] = value
            else:
                report.notes.append(f"HOSTFILE={value} ignored: it replaces PBS_NODEFILE inside a PBS job only")
            continue
        source = by.get(name) or (name if _value(env, name) else None)
        if source is not None and _value(out, name) != value:
            raise EnvError(
                f"{alias}={value} and {source}={_value(out, name)} disagree ({alias} is an alias of {name}); set one"
            )
        out[name], by[name] = value, by.get(name, alias)
        report.set(alias, value, f"alias of {name}")
    return out


def did_you_mean(env: Mapping[str, str]) -> list[str]:
    """A note for each variable that is not ours but looks like one of ours (TRAIN_TOKEN: TRAIN_TOKENS?): a typo
    would otherwise leave the default in place silently."""
    known = list(VAR_BY_NAME)
    notes = []
    for name in sorted(env):
        if name not in VAR_BY_NAME and re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            if close:
                notes.append(f"{name} is not a train_alcf.sh variable; did you mean {close[0]}?")
    return notes


# ---- the whole resolution -------------------------------------------------------------------------------------


def resolve(
    env: Mapping[str, str],
    extra: Sequence[str] = (),
    *,
    launcher: str = "auto",
    mpi_flavor: str = "mpich",
    mpi_exe: str = "mpiexec",
    python: str | None = None,
    now: float | None = None,
) -> Plan:
    """Turns the environment (plus pass-through flags) into a validated Config and the launch command.

    Raises EnvError (a variable) or ConfigError (the schema, reworded to name the variables) for any mistake.
    """
    told, dry_run = Report(), _bool(env, "DRY_RUN")
    told.notes += did_you_mean(env)
    env = resolve_aliases(env, told)
    extra = list(extra)
    if _bool(env, "CONTINUE"):
        extra, dropped = strip_one_time(extra)
        if dropped:
            told.notes.append(f"CONTINUE=1: continuing from SAVE; ignored {' '.join(dropped)}")
    given = given_dests(extra)
    arch = model_preset(env, told)
    shape = job_shape(env, told)
    launcher = choose_launcher(launcher, shape)
    told.derived["LAUNCHER"] = launcher if launcher != "mpiexec" else f"mpiexec ({mpi_flavor})"

    flags = variables_to_flags(env, PRESETS[arch], shape.devices, given, told)
    cfg = parse_config([*flags.argv, *extra], flags.names)
    dp = data_parallel_size(cfg, shape, told)
    gb, batch_derived = global_batch(env, cfg, dp, told)
    iters, pass_iters = run_length(env, cfg, gb, arch, given, told)
    save, load = checkpoint_paths(env, cfg, arch, given, batch_derived, told)
    run_dir, tensorboard = run_folder(env, arch, shape.job, given, told, now)
    check_inputs(env, cfg, given, told)

    derived: list[tuple[str, str | None]] = [("--global-batch-size", str(gb))] if batch_derived else []
    derived += [("--train-iters", str(iters))] if pass_iters else []
    derived += [("--save", save), ("--load", load), ("--run-dir", run_dir), ("--exit-signal-handler", None)]
    derived += [("--tensorboard-dir", tensorboard)] if tensorboard else []
    argv = [*flags.argv, *(a for flag, text in derived for a in (flag, text) if a is not None), *extra]
    names = {**flags.names, "--save": "SAVE", "--load": "LOAD"}
    config = complete_config(cfg, derived, given, shape.world_size, names)

    python = python or sys.executable
    exports = {"OMP_NUM_THREADS": env.get("OMP_NUM_THREADS") or str(shape.cpus_per_rank)}
    program = [python, str(SCRIPT), *argv]
    command, signal = launch_command(launcher, program, shape, mpi_flavor=mpi_flavor, mpi_exe=mpi_exe, env=env)
    for name in ("LAUNCH_WITH", "DRY_RUN", "CONTINUE"):
        told.set(name, _value(env, name) or VAR_BY_NAME[name].default, _source(env, name))
    told.set("PYTHON", python, _source(env, "PYTHON"))
    return Plan(
        **vars(told), argv=argv, config=config, command=command, exports=exports, run_dir=run_dir, signal=signal,
        dry_run=dry_run,
    )  # fmt: skip


# ---- output ---------------------------------------------------------------------------------------------------


def report(plan: Plan) -> str:
    """What train_alcf.sh prints at the start: every variable with its value and source, derived sizes, notes."""
    lines = ["train_alcf.sh variables (value, where it came from):"]
    for section in SECTIONS:
        for var in VARIABLES:
            if var.section == section and var.name in plan.values:
                value, source = plan.values[var.name]
                lines.append(f"  {var.name + '=' + value:<48} {source}")
    lines.append("derived:")
    lines += [f"  {line}" for line in plan.explain]
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"launch with {plan.derived['LAUNCHER']}: {shlex.join(plan.command)}")
    return "\n".join(lines)


def dotenv(plan: Plan) -> str:
    """The resolved variables and derived values as `NAME='value'` lines (sourceable by bash)."""
    out = ["# train_alcf.sh: the resolved variables of this run, then the derived values"]
    out += [f"{v.name}={shlex.quote(plan.values[v.name][0])}" for v in VARIABLES if v.name in plan.values]
    out += ["# derived"] + [f"{k}={shlex.quote(v)}" for k, v in plan.derived.items()]
    return "\n".join(out) + "\n"


def write_run_dir(plan: Plan) -> None:
    """The run folder: .env, config.json and launch.sh (the exact command, runnable again)."""
    run = Path(plan.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / ".env").write_text(dotenv(plan))
    plan.config.to_json(run / "config.json")
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in plan.exports.items())
    script = f"#!/usr/bin/env bash\n# launched by train_alcf.sh\ncd {shlex.quote(os.getcwd())}\n{exports}"
    (run / "launch.sh").write_text(script + f"exec {shlex.join(plan.command)}\n")
    (run / "launch.sh").chmod(0o755)


def emit_shell(plan: Plan) -> str:
    """What train_alcf.sh sources: the run folder, the signal to forward and the command as a bash array."""
    lines = [
        f"RUN_DIR={shlex.quote(plan.run_dir)}",
        f"LAUNCH_SIGNAL={plan.signal}",
        f"LAUNCH_CMD=({' '.join(shlex.quote(a) for a in plan.command)})",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in plan.exports.items()]
    return "\n".join(lines) + "\n"


def resource_lines(plan: Plan, env: Mapping[str, str]) -> list[str]:
    """DRY_RUN's estimate of memory per rank and time (megatron_ext/resources.py), with the run's tokenizer's
    vocabulary padded as training pads it (32,000 tokens, the presets' count, when the tokenizer cannot be read)."""
    from megatron_ext.data.tokenizers import build_tokenizer, padded_vocab_size

    cfg = plan.config
    try:
        vocab = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model).vocab_size
    except (OSError, ValueError, ImportError):
        vocab = 32000
    rows = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)
    tokens = schema.run_length_samples(cfg) * cfg.model.seq_length
    world, dp = int(plan.derived["WORLD_SIZE"]), int(plan.derived["DP"])
    return resources.report(cfg, rows, dp, world, tokens, env)


def main(argv: Sequence[str] | None = None) -> int:
    """`resolve [--launcher L] [--mpi-flavor F] [--mpi-exe E] [--emit FILE] -- [pretrain flags]`: what
    train_alcf.sh runs (ALCF/helpers.sh) before it launches."""
    args = list(sys.argv[1:] if argv is None else argv)
    own, extra = (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else ([], args)
    p = OneLineParser(prog="python -m megatron_ext.alcf_env resolve")
    p.add_argument("--launcher", default="auto", choices=("auto", *LAUNCHERS))
    p.add_argument("--mpi-flavor", default="mpich", choices=MPI_FLAVORS)
    p.add_argument("--mpi-exe", default="mpiexec")
    p.add_argument("--emit", help="write the shell assignments train_alcf.sh sources here")
    opts = p.parse_args(own)
    try:
        plan = resolve(os.environ, extra, launcher=opts.launcher, mpi_flavor=opts.mpi_flavor, mpi_exe=opts.mpi_exe)
        needs = resource_lines(plan, os.environ) if plan.dry_run else []
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(plan), flush=True)
    if plan.dry_run:
        print("configuration:\n" + json.dumps(plan.config.to_dict(), indent=2, sort_keys=True))
        print("\n".join(needs))
        print("DRY_RUN=1: nothing launched")
    else:
        write_run_dir(plan)
        print(f"run folder: {plan.run_dir}")
    if opts.emit:
        Path(opts.emit).write_text(emit_shell(plan) + f"DRY_RUN={int(plan.dry_run)}\n")
    return 0


# ---- docs and chained jobs ------------------------------------------------------------------------------------


def variables_markdown() -> str:
    """The variable table of ALCF/README.md, generated from VARIABLES so the docs cannot drift."""
    rows = ["| variable | default | flag | meaning |", "|---|---|---|---|"]
    for section in SECTIONS:
        for v in (v for v in VARIABLES if v.section == section):
            default = f"`{v.default}`" if v.default else ""
            flag = f"`{v.flag}`" if v.flag else ""
            rows.append(f"| `{v.name}` | {default} | {flag} | {v.help.replace('|', '/')} |")
    return "\n".join(rows)


def presets_markdown() -> str:
    """The MODEL_ARCH table of ALCF/README.md."""
    rows = [
        "| MODEL_ARCH | layers | hidden | heads | KV heads | FFN | SEQ | RoPE base | params (32k vocab) | shape |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in PRESETS.items():
        n = preset_parameters(p)
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
        rows.append(
            f"| `{name}` | {p.num_layers} | {p.hidden_size} | {p.heads} | {p.kv_heads} | {p.ffn_hidden_size} | "
            f"{p.seq_length} | {p.rotary_base} | {size} | {p.about} |"
        )
    return "\n".join(rows)


def read_dotenv(path: str | Path) -> dict[str, str]:
    """A run folder's .env as a dict (the `NAME='value'` lines written by dotenv())."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            parts = shlex.split(value)
            out[name] = parts[0] if parts else ""
    return out


def progress(run_dir: str | Path) -> tuple[int, int, int]:
    """(iteration at the start of the run, latest saved iteration, TRAIN_ITERS) of a run folder."""
    env = read_dotenv(Path(run_dir) / ".env")
    latest = _latest_iteration(str(Path(env.get("WORKDIR", ".")) / env["SAVE"]))
    return int(env.get("START_ITERATION", "0")), latest or 0, int(env["TRAIN_ITERS"])


def _cli(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="python -m megatron_ext.alcf_env", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("docs", help="print the MODEL_ARCH and variable tables (markdown)")
    pr = sub.add_parser("progress", help="print `START LATEST TRAIN_ITERS` of a run folder (chained jobs)")
    pr.add_argument("run_dir")
    sub.add_parser(
        "resolve", help="resolve the variables into the config and launch command (train_alcf.sh)", add_help=False
    )
    args, rest = p.parse_known_args(argv)
    if args.cmd == "resolve":
        return main(rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "docs":
        print(presets_markdown() + "\n\n" + variables_markdown())
        return 0
    try:
        start, latest, target = progress(args.run_dir)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {args.run_dir}: no resolved run folder ({e})", file=sys.stderr)
        return 2
    print(start, latest, target)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
