"""Environment-variable runs for `train_alcf.sh`: the variable table, model presets, derived sizes, launch command.

On ALCF machines users set a few variables (`MODEL_ARCH=7B TP=2 TRAIN_TOKENS=... bash train_alcf.sh`) instead of
typing flags. This module is the one place those variables mean anything: each is turned into the
`pretrain_gpt.py` flag of the typed schema (`megatron_ext.config`) and validated by it, so the bash script only
picks the launcher. The job's shape (hosts from `$PBS_NODEFILE` or Slurm, ranks per node) gives the world size,
from which the data-parallel size, the global batch and the run length in iterations are derived and checked.
Every mistake is one `error: ...` line naming the variable, before anything is launched.

Entry points: `python -m megatron_ext.config --from-env [--launcher L ... --] [pretrain flags]` (what
`train_alcf.sh` runs), and `python -m megatron_ext.alcf_env docs|progress RUN_DIR` (docs tables, chained jobs).
Nothing here imports torch: the resolver starts in a fraction of a second on a login node.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext import config as schema
from megatron_ext.config import Config, ConfigError, OneLineParser
from megatron_ext.distributed import expand_hostlist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pretrain_gpt.py"
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
LAUNCHERS = ("python", "torchrun", "mpiexec", "srun")
MPI_FLAVORS = ("mpich", "openmpi")


class EnvError(ValueError):
    """A variable is missing, malformed or inconsistent; the message is one line naming it and what is expected."""


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


def preset_parameters(p: Preset, vocab: int = 32000) -> int:
    """Parameter count of a preset with a `vocab`-token vocabulary (untied input and output embeddings)."""
    head_dim = p.hidden_size // p.heads
    attention = p.hidden_size * (p.heads + 2 * p.kv_heads) * head_dim + p.heads * head_dim * p.hidden_size
    mlp = 3 * p.hidden_size * p.ffn_hidden_size
    layer = attention + mlp + 2 * p.hidden_size
    return p.num_layers * layer + p.hidden_size + 2 * vocab * p.hidden_size


# ---- the variable table ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Var:
    """One environment variable: what it sets (a schema flag when it maps to one), its default and help."""

    name: str
    section: str
    default: str
    help: str
    flag: str | None = None  # the pretrain_gpt.py flag the value is passed to, as is
    preset: str | None = None  # Preset field that gives the default


# fmt: off
VARIABLES: tuple[Var, ...] = (
    # model
    Var("MODEL_ARCH", "model", "tiny", "Model preset: " + ", ".join(PRESETS) + " (see the preset table)."),
    Var("NLAYERS", "model", "preset", "Transformer layers.", "--num-layers", "num_layers"),
    Var("HIDDEN", "model", "preset", "Hidden size.", "--hidden-size", "hidden_size"),
    Var("HEADS", "model", "preset", "Attention heads.", "--num-attention-heads", "heads"),
    Var("NUM_KV_HEAD", "model", "preset", "Key/value heads (GQA groups).", "--num-query-groups", "kv_heads"),
    Var("FFN_HIDDEN_SIZE", "model", "preset", "SwiGLU MLP hidden size.", "--ffn-hidden-size", "ffn_hidden_size"),
    Var("SEQ", "model", "preset", "Sequence length.", "--seq-length", "seq_length"),
    # parallelism and the job's shape
    Var("TP", "parallel", "1", "Tensor-parallel size.", "--tensor-model-parallel-size"),
    Var("PP", "parallel", "1", "Pipeline-parallel size.", "--pipeline-model-parallel-size"),
    Var("SP", "parallel", "1",
        "Sequence parallelism: 1 is off; a value equal to TP turns on Megatron sequence parallelism over the "
        "tensor-parallel group (it takes no extra ranks, unlike DeepSpeed-Ulysses degrees).", "--sequence-parallel"),
    Var("NGPU_PER_HOST", "parallel", "detected",
        "Ranks per node: the node's GPUs (CUDA_VISIBLE_DEVICES, nvidia-smi, XPU), else SLURM_NTASKS_PER_NODE, "
        "else one per physical core of a CPU-only node."),
    Var("CPUS_PER_RANK", "parallel", "detected", "CPUs per rank (mpiexec -d, srun --cpus-per-task, OMP_NUM_THREADS)."),
    Var("ZERO_STAGE", "parallel", "0",
        "From ALCF DeepSpeed scripts: 1 or 2 use megatron-core's distributed optimizer (optimizer state sharded "
        "over data-parallel ranks); 3 is not supported.", "--use-distributed-optimizer"),
    Var("USE_DEEPSPEED", "parallel", "0",
        "Accepted from ALCF scripts: there is no DeepSpeed engine; 1 makes ZERO_STAGE default to 1."),
    # batch and run length
    Var("MICRO_BATCH", "batch", "preset", "Samples per micro-batch per data-parallel rank.", "--micro-batch-size",
        "micro_batch"),
    Var("GRAD_ACC_STEPS", "batch", "1", "Gradient-accumulation steps (derived from GLOBAL_BATCH when only it is set)."),
    Var("GLOBAL_BATCH", "batch", "derived",
        "Samples per step: MICRO_BATCH x GRAD_ACC_STEPS x DP when not set; checked against them when set.",
        "--global-batch-size"),
    Var("TRAIN_TOKENS", "batch", "",
        "Run length in tokens (22000000000, 22e9, 22B): TRAIN_ITERS = ceil(TRAIN_TOKENS / (SEQ x GLOBAL_BATCH))."),
    Var("TRAIN_ITERS", "batch", "preset",
        "Run length in iterations (instead of TRAIN_TOKENS); 50 for the tiny preset, the others need one of the two.",
        "--train-iters", "train_iters"),
    Var("SEED", "batch", "1234", "Random seed.", "--seed"),
    Var("DTYPE", "batch", "auto", "bf16, fp16 or fp32; auto is bf16 on GPUs, fp32 on CPUs."),
    Var("USE_ACTIVATION_CHECKPOINTING", "batch", "0", "1: recompute activations in backward.",
        "--recompute-activations"),
    # optimizer
    Var("OPT", "optimizer", "adamw", "adamw (adam is the same AdamW) or sgd.", "--optimizer"),
    Var("LR", "optimizer", "0.0002", "Peak learning rate.", "--lr"),
    Var("MIN_LR", "optimizer", "0", "Learning rate at the end of the decay.", "--min-lr"),
    Var("WEIGHT_DECAY", "optimizer", "0.1", "AdamW weight decay.", "--weight-decay"),
    Var("ADAM_BETA1", "optimizer", "0.9", "Adam beta1.", "--adam-beta1"),
    Var("ADAM_BETA2", "optimizer", "0.95", "Adam beta2.", "--adam-beta2"),
    Var("ADAM_EPS", "optimizer", "1e-05", "Adam epsilon.", "--adam-eps"),
    Var("CLIP_GRAD", "optimizer", "1.0", "Gradient-norm clipping (0 disables).", "--clip-grad"),
    # schedule
    Var("LR_DECAY_STYLE", "schedule", "cosine",
        "constant, linear, cosine, inverse-square-root, WSD, infinite-cosine, infinite-inv-sqrt.", "--lr-decay-style"),
    Var("LR_WARMUP_FRACTION", "schedule", "0.05", "Warmup as a fraction of the decay length.", "--lr-warmup-fraction"),
    Var("LR_WARMUP_FRAC", "schedule", "", "Alias of LR_WARMUP_FRACTION (the name ALCF scripts read).",
        "--lr-warmup-fraction"),
    Var("LR_DECAY_ITERS", "schedule", "", "Where the LR reaches MIN_LR; default: the end of the run.",
        "--lr-decay-iters"),
    Var("OVERRIDE_CKPT_OPT_PARAM", "schedule", "0", "1: on resume follow these LR settings, not the checkpoint's.",
        "--override-opt_param-scheduler"),
    # data
    Var("DATA_FILE_LIST", "data", "", "Data list(s) (`weight prefix [corpus]` lines); unset: the built-in corpus.",
        "--data-file-list"),
    Var("TOKENIZER_TYPE", "data", "ByteTokenizer",
        "ByteTokenizer, SentencePieceTokenizer, GPTSentencePieceTokenizer or HuggingFaceTokenizer.",
        "--tokenizer-type"),
    Var("TOKENIZER_MODEL", "data", "", "SentencePiece .model or Hugging Face tokenizer file/folder.",
        "--tokenizer-model"),
    Var("DATA_CACHE_PATH", "data", "data_cache", "Index caches (and the built-in corpus).", "--data-cache-path"),
    # checkpoints
    Var("SAVE", "checkpoint", "checkpoints/ARCH_nlL_hsH_seqS_DATA",
        "Checkpoint folder; the default depends on the model and data only, never on the node count.", "--save"),
    Var("LOAD", "checkpoint", "SAVE", "Checkpoint to start from (regular or universal); must exist when set.",
        "--load"),
    Var("SAVE_INTERVAL", "checkpoint", "50", "Save every N iterations (and at the end, and on a signal).",
        "--save-interval"),
    Var("CONTINUE", "checkpoint", "0",
        "1: continue this run from SAVE, ignoring LOAD and the one-time flags (--finetune, --no-load-optim, "
        "--no-load-rng, --restart-lr-schedule, --universal-checkpoint, --ckpt-step); chained jobs set it."),
    # logging
    Var("LOG_INTERVAL", "logging", "1", "Print a metrics line every N iterations.", "--log-interval"),
    Var("EVAL_INTERVAL", "logging", "100", "Validate every N iterations.", "--eval-interval"),
    Var("EVAL_ITERS", "logging", "20", "Validation batches per evaluation.", "--eval-iters"),
    Var("NO_TENSORBOARD", "logging", "0", "1: no tensorboard logs (default: RUN_DIR/tensorboard).",
        "--tensorboard-dir"),
    Var("WANDB_PROJECT", "logging", "",
        "Weights & Biases project: the run prints the `wandb sync` command for its tensorboard logs (no W&B "
        "client runs inside training)."),
    Var("RUN_DIR", "logging", "runs/alcf/DATE-TIME_ARCH_JOBID",
        "The run folder: .env, config.json, launch.sh, output.log, train.log, tensorboard/.", "--run-dir"),
    Var("EXIT_DURATION_MINS", "logging", "",
        "Save and exit after this many minutes (the job templates use a signal instead).", "--exit-duration-in-mins"),
    # launch
    Var("LAUNCH_WITH", "launch", "auto",
        "auto (PBS: mpiexec, Slurm: srun, else torchrun, or python for one rank), mpiexec (also mpirun, MPICH), "
        "srun, torchrun or python."),
    Var("DRY_RUN", "launch", "0", "1: print the resolved variables, configuration and command, launch nothing."),
    Var("PYTHON", "launch", ".venv/bin/python", "Interpreter for the resolver and the ranks (else python3)."),
)
# fmt: on
VAR_BY_NAME = {v.name: v for v in VARIABLES}
SECTIONS = ("model", "parallel", "batch", "optimizer", "schedule", "data", "checkpoint", "logging", "launch")

# Variables whose value is passed to their flag unchanged (the rest are interpreted below).
DIRECT = (
    "NLAYERS", "HIDDEN", "HEADS", "NUM_KV_HEAD", "FFN_HIDDEN_SIZE", "SEQ", "TP", "PP", "MICRO_BATCH", "SEED", "LR",
    "MIN_LR", "WEIGHT_DECAY", "ADAM_BETA1", "ADAM_BETA2", "ADAM_EPS", "CLIP_GRAD", "LR_DECAY_STYLE",
    "LR_DECAY_ITERS", "TOKENIZER_TYPE", "TOKENIZER_MODEL", "DATA_CACHE_PATH", "SAVE_INTERVAL", "LOG_INTERVAL",
    "EVAL_INTERVAL", "EVAL_ITERS", "EXIT_DURATION_MINS", "GLOBAL_BATCH",
)  # fmt: skip
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


def _schema_fields() -> dict[str, tuple[str, dataclasses.Field, type]]:
    """Every schema flag (and alias) -> (dest "section.name", field, element type)."""
    out: dict[str, tuple[str, dataclasses.Field, type]] = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind, _ = schema.base_type(hints[f.name])
            for flag in (schema.flag_of(f), *f.metadata.get("aliases", ())):
                out[flag] = (f"{section.name}.{f.name}", f, kind)
    return out


FIELDS = _schema_fields()


def dest_of(flag: str) -> str:
    return FIELDS[flag][0]


# ---- job, accelerators, hosts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Where the run happens: a PBS or Slurm job (its hosts), or this machine."""

    kind: str  # "pbs" | "slurm" | "local"
    hosts: tuple[str, ...]
    nodefile: str | None = None
    job_id: str | None = None


def detect_job(env: Mapping[str, str]) -> Job:
    """Hosts from $PBS_NODEFILE (unique, in order) inside PBS, from the Slurm node list inside Slurm."""
    if env.get("PBS_JOBID"):
        path = env.get("PBS_NODEFILE", "")
        if not path:
            raise EnvError("PBS_NODEFILE is not set although PBS_JOBID is; expected the job's host file")
        try:
            lines = Path(path).read_text().split()
        except OSError as e:
            raise EnvError(f"PBS_NODEFILE={path} cannot be read ({e.strerror}); expected the job's host file") from None
        hosts = tuple(dict.fromkeys(lines))
        if not hosts:
            raise EnvError(f"PBS_NODEFILE={path} is empty; expected one host name per line")
        return Job("pbs", hosts, path, env["PBS_JOBID"])
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if job_id:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        try:
            hosts = tuple(expand_hostlist(nodelist)) if nodelist else ()
        except ValueError as e:
            raise EnvError(f"SLURM_JOB_NODELIST={nodelist!r} is malformed ({e})") from None
        count = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or ""
        if not hosts and count.isdigit() and int(count) > 0:
            hosts = tuple(f"node{i}" for i in range(int(count)))
        if not hosts:
            raise EnvError(
                "SLURM_JOB_NODELIST and SLURM_JOB_NUM_NODES are not set although SLURM_JOB_ID is; "
                "expected to run inside an allocation (sbatch or salloc)"
            )
        return Job("slurm", hosts, None, job_id)
    return Job("local", (socket.gethostname(),))


def detect_accelerators(env: Mapping[str, str]) -> tuple[str, int]:
    """(kind, count) of this node's GPUs without importing torch where possible: ("cpu", 0) when none."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return "cuda", len([d for d in visible.split(",") if d.strip()])
    if visible is None and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
        if count:
            return "cuda", count
    if env.get("ZE_AFFINITY_MASK"):
        return "xpu", len(env["ZE_AFFINITY_MASK"].split(","))
    if list(Path("/dev/dri").glob("renderD*")) or Path("/dev/kfd").exists():  # Intel or AMD GPUs: ask torch
        try:
            import torch

            if hasattr(torch, "xpu") and torch.xpu.is_available():
                return "xpu", torch.xpu.device_count()
            if torch.cuda.is_available():
                return "cuda", torch.cuda.device_count()
        except Exception:  # noqa: BLE001 - any failure means: no usable accelerator
            pass
    return "cpu", 0


def cpu_counts() -> tuple[int, int]:
    """(logical CPUs this process may use, physical cores among them)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:
        physical = logical
    return logical, max(1, min(logical, physical))


# ---- the plan -------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything train_alcf.sh needs: resolved variables, derived sizes, the validated config and the command."""

    values: dict[str, tuple[str, str]] = field(default_factory=dict)  # NAME -> (value, source)
    derived: dict[str, str] = field(default_factory=dict)
    explain: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)
    config: Config | None = None
    command: list[str] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)
    run_dir: str = ""
    signal: str = "TERM"
    dry_run: bool = False


def _value(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, stripped; None when unset or empty (as `${VAR:-default}` in bash)."""
    raw = env.get(name)
    return raw.strip() if raw is not None and raw.strip() else None


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
    if choices and raw not in choices:
        raise EnvError(f"{name}={raw!r} is not one of {', '.join(map(str, choices))}")
    return raw


def _given_dests(extra: Sequence[str]) -> set[str]:
    """The schema fields that the pass-through command line sets (argparse with every default suppressed)."""
    parser = schema.build_parser()
    for action in parser._actions:  # set_defaults() would put the SUPPRESS marker into the namespace
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(list(extra))))
    for alias, (section, name, _) in schema.VALUE_ALIASES.items():
        if f"_alias{alias}" in given and section:
            given.add(f"{section}.{name}")
    return {g for g in given if not g.startswith("_alias")}


def _reword(message: str, names: Mapping[str, str]) -> str:
    """A schema message with each flag that came from a variable shown as `VAR (--flag)`."""

    def sub(m: re.Match[str]) -> str:
        flag = m.group(0)
        return f"{names[flag]} ({flag})" if flag in names else flag

    return re.sub(r"--[A-Za-z0-9_-]+", sub, message)


def _strip_one_time(extra: Sequence[str]) -> tuple[list[str], list[str]]:
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
    plan = Plan(dry_run=_bool(env, "DRY_RUN"))
    vals = plan.values
    cont = _bool(env, "CONTINUE")
    extra = list(extra)
    if cont:
        extra, dropped = _strip_one_time(extra)
        if dropped:
            plan.notes.append(f"CONTINUE=1: continuing from SAVE; ignored {' '.join(dropped)}")
    given = _given_dests(extra)

    def setv(name: str, value: str, source: str) -> None:
        vals[name] = (value, source)

    # -- model preset and shape
    arch_raw = _value(env, "MODEL_ARCH") or "tiny"
    arch = next((k for k in PRESETS if k.lower() == arch_raw.lower()), None)
    if arch is None:
        raise EnvError(f"MODEL_ARCH={arch_raw!r} is not a preset; expected one of {', '.join(PRESETS)}")
    preset = PRESETS[arch]
    setv("MODEL_ARCH", arch, "env" if _value(env, "MODEL_ARCH") else "default")

    # -- job shape: hosts x ranks per node
    job = detect_job(env)
    accel, n_accel = detect_accelerators(env)
    logical, physical = cpu_counts()
    if _value(env, "NGPU_PER_HOST"):
        ppn, ppn_source = _int("NGPU_PER_HOST", _value(env, "NGPU_PER_HOST") or ""), "env"
    elif job.kind == "slurm" and _value(env, "SLURM_NTASKS_PER_NODE"):
        tasks = (_value(env, "SLURM_NTASKS_PER_NODE") or "").split("(")[0]
        ppn, ppn_source = _int("SLURM_NTASKS_PER_NODE", tasks), "SLURM_NTASKS_PER_NODE"
    elif n_accel:
        ppn, ppn_source = n_accel, f"{n_accel} {accel} device(s)"
    else:
        ppn, ppn_source = physical, f"no GPU: one rank per physical core ({physical} of {logical} CPUs)"
    setv("NGPU_PER_HOST", str(ppn), "env" if ppn_source == "env" else "detected")
    cpus = _value(env, "CPUS_PER_RANK")
    slurm_cpus = _value(env, "SLURM_CPUS_PER_TASK") if job.kind == "slurm" else None
    if cpus:
        cpus_per_rank, cpus_source = _int("CPUS_PER_RANK", cpus), "env"
    elif slurm_cpus:
        cpus_per_rank, cpus_source = _int("SLURM_CPUS_PER_TASK", slurm_cpus), "SLURM_CPUS_PER_TASK"
    else:
        cpus_per_rank, cpus_source = max(1, logical // ppn), f"detected: {logical} CPUs / {ppn} ranks"
    setv("CPUS_PER_RANK", str(cpus_per_rank), cpus_source)
    world = len(job.hosts) * ppn
    plan.derived["NHOSTS"] = str(len(job.hosts))
    plan.derived["WORLD_SIZE"] = str(world)
    where = {"pbs": f"PBS_NODEFILE {job.nodefile}", "slurm": "the Slurm node list", "local": "this machine"}[job.kind]
    plan.explain.append(
        f"WORLD_SIZE={world} = {len(job.hosts)} host(s) from {where} x NGPU_PER_HOST {ppn} ({ppn_source})"
    )

    # -- launcher (picked by train_alcf.sh; checked here against the job)
    if launcher == "auto":
        launcher = {"pbs": "mpiexec", "slurm": "srun"}.get(job.kind, "torchrun" if world > 1 else "python")
    if launcher not in LAUNCHERS:
        raise EnvError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if launcher in ("python", "torchrun") and len(job.hosts) > 1:
        raise EnvError(
            f"LAUNCH_WITH={launcher} runs on one node but the job has {len(job.hosts)} hosts; "
            "expected mpiexec (PBS) or srun (Slurm)"
        )
    if launcher == "python" and world > 1:
        raise EnvError(f"LAUNCH_WITH=python starts one process but NGPU_PER_HOST is {ppn}; expected NGPU_PER_HOST=1")
    plan.derived["LAUNCHER"] = launcher if launcher != "mpiexec" else f"mpiexec ({mpi_flavor})"

    # -- variables -> flags
    argv: list[str] = list(LLAMA_FLAGS) + ["--rotary-base", str(preset.rotary_base)]
    # flag -> variable, for error messages: every flag a variable can set, unless the command line sets it
    names = {v.flag: v.name for v in reversed(VARIABLES) if v.flag and dest_of(v.flag) not in given}

    def emit(name: str, flag: str, args: Sequence[str], value: str, source: str) -> None:
        dest = dest_of(flag)
        clash = [g for g in GROUPS.get(dest, (dest,)) if g in given]
        setv(name, value, f"{source}, overridden by the command line" if clash else source)
        if clash:
            if source == "env":
                plan.notes.append(f"{name}={value} is overridden by the command line ({', '.join(clash)})")
            return
        argv.extend(args)
        names[flag] = name

    for name in DIRECT:
        var = VAR_BY_NAME[name]
        assert var.flag is not None
        raw = _value(env, name)
        source = "env"
        if raw is None and var.preset:
            preset_value = getattr(preset, var.preset)
            raw, source = (None if preset_value is None else str(preset_value)), "preset"
        if raw is None and var.default not in ("", "preset", "derived"):
            raw, source = var.default, "default"
        if raw is None:
            setv(name, "", "unset")
            continue
        emit(name, var.flag, [var.flag, _typed(name, var.flag, raw)], raw, source)

    warm = _value(env, "LR_WARMUP_FRACTION")
    frac = _value(env, "LR_WARMUP_FRAC")
    for name, raw in (("LR_WARMUP_FRACTION", warm), ("LR_WARMUP_FRAC", frac)):
        if raw:
            _typed(name, "--lr-warmup-fraction", raw)
    if warm and frac and float(warm) != float(frac):
        raise EnvError(f"LR_WARMUP_FRACTION={warm} and its alias LR_WARMUP_FRAC={frac} disagree; set one of them")
    warm_name = "LR_WARMUP_FRAC" if frac and not warm else "LR_WARMUP_FRACTION"
    warm_value = warm or frac or VAR_BY_NAME["LR_WARMUP_FRACTION"].default
    emit(warm_name, "--lr-warmup-fraction", ["--lr-warmup-fraction", warm_value], warm_value,
         "env" if warm or frac else "default")  # fmt: skip
    other = "LR_WARMUP_FRACTION" if warm_name == "LR_WARMUP_FRAC" else "LR_WARMUP_FRAC"
    setv(other, warm_value, f"alias of {warm_name}")

    data_lists = _value(env, "DATA_FILE_LIST")
    if data_lists:
        emit("DATA_FILE_LIST", "--data-file-list", ["--data-file-list", *data_lists.split()], data_lists, "env")
    else:
        setv("DATA_FILE_LIST", "", "unset: built-in corpus")

    tp_raw = _value(env, "TP") or "1"
    sp = _value(env, "SP") or "1"
    sp_n = _int("SP", sp, minimum=0)
    if sp_n > 1:
        tp_n = _int("TP", tp_raw)
        if sp_n != tp_n:
            raise EnvError(
                f"SP={sp_n} must be 1 (off) or equal to TP={tp_n}: Megatron sequence parallelism splits the sequence "
                "over the tensor-parallel group (DeepSpeed-Ulysses degrees are not supported)"
            )
        emit("SP", "--sequence-parallel", ["--sequence-parallel"], sp, "env")
    else:
        setv("SP", sp, "env" if _value(env, "SP") else "default")

    deepspeed = _bool(env, "USE_DEEPSPEED")
    setv("USE_DEEPSPEED", "1" if deepspeed else "0", "env" if _value(env, "USE_DEEPSPEED") else "default")
    zero_raw = _value(env, "ZERO_STAGE")
    zero = _int("ZERO_STAGE", zero_raw, minimum=0) if zero_raw else (1 if deepspeed else 0)
    if zero > 2:
        raise EnvError(
            f"ZERO_STAGE={zero} (parameter sharding) is not supported; expected 0, or 1/2 for the distributed "
            "optimizer, with TP/PP to split the weights"
        )
    if zero:
        emit("ZERO_STAGE", "--use-distributed-optimizer", ["--use-distributed-optimizer"], str(zero),
             "env" if zero_raw else "USE_DEEPSPEED=1")  # fmt: skip
        plan.notes.append(
            f"ZERO_STAGE={zero}: mapped to --use-distributed-optimizer (megatron-core shards the optimizer state "
            "over data-parallel ranks and reduce-scatters gradients; no DeepSpeed engine)"
        )
    else:
        setv("ZERO_STAGE", "0", "env" if zero_raw else "default")
    if deepspeed:
        plan.notes.append("USE_DEEPSPEED=1: accepted for ALCF scripts; training runs on megatron-core, not DeepSpeed")

    dtype = (_value(env, "DTYPE") or "auto").lower()
    dtype = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}.get(dtype, dtype)
    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise EnvError(f"DTYPE={_value(env, 'DTYPE')!r} is not a precision; expected bf16, fp16, fp32 or auto")
    if dtype == "auto":
        dtype, dtype_source = ("bf16", "detected") if n_accel else ("fp32", "detected")
    else:
        dtype_source = "env"
    emit("DTYPE", "--bf16", [] if dtype == "fp32" else [f"--{dtype}"], dtype, dtype_source)

    opt = (_value(env, "OPT") or "adamw").lower()
    opt_flag = {"adamw": "adam", "adam": "adam", "sgd": "sgd"}.get(opt)
    if opt_flag is None:
        raise EnvError(f"OPT={opt!r} is not supported; expected adamw (or adam, the same AdamW) or sgd")
    emit("OPT", "--optimizer", ["--optimizer", opt_flag], opt, "env" if _value(env, "OPT") else "default")

    for name in ("USE_ACTIVATION_CHECKPOINTING", "OVERRIDE_CKPT_OPT_PARAM"):
        var = VAR_BY_NAME[name]
        assert var.flag is not None
        on = _bool(env, name)
        if on:
            emit(name, var.flag, [var.flag], "1", "env")
        else:
            setv(name, "0", "env" if _value(env, name) else "default")

    # -- first parse: the schema checks shapes, parallel sizes, schedule and data settings
    def parse(args: list[str]) -> Config:
        try:
            return schema.parse_args(args)
        except ConfigError as e:
            raise ConfigError(_reword(str(e), names)) from None

    cfg0 = parse([*argv, *extra])
    tp, pp = cfg0.parallel.tensor_model_parallel_size, cfg0.parallel.pipeline_model_parallel_size
    try:
        dp = cfg0.data_parallel_size(world)
    except ConfigError:
        raise EnvError(
            f"WORLD_SIZE {world} ({len(job.hosts)} host(s) x NGPU_PER_HOST {ppn}) is not divisible by TP {tp} x "
            f"PP {pp} = {tp * pp}; expected a multiple: change NGPU_PER_HOST, the node count, TP or PP"
        ) from None
    plan.derived["DP"] = str(dp)
    plan.explain.append(f"DP={dp} = WORLD_SIZE {world} / (TP {tp} x PP {pp})")

    # -- batch: GLOBAL_BATCH = MICRO_BATCH x GRAD_ACC_STEPS x DP
    mb = cfg0.training.micro_batch_size
    gas_raw = _value(env, "GRAD_ACC_STEPS")
    gas = _int("GRAD_ACC_STEPS", gas_raw) if gas_raw else None
    gb_given = cfg0.training.global_batch_size
    if gb_given is not None and gas is not None and gb_given != mb * gas * dp:
        raise EnvError(
            f"GLOBAL_BATCH={gb_given} does not equal MICRO_BATCH {mb} x GRAD_ACC_STEPS {gas} x DP {dp} = "
            f"{mb * gas * dp}; expected them to agree: unset GRAD_ACC_STEPS (then derived) or GLOBAL_BATCH"
        )
    if gb_given is None:
        gb = mb * (gas or 1) * dp
        plan.explain.append(f"GLOBAL_BATCH={gb} = MICRO_BATCH {mb} x GRAD_ACC_STEPS {gas or 1} x DP {dp}")
        argv += ["--global-batch-size", str(gb)]
        names["--global-batch-size"] = "GLOBAL_BATCH"
        setv("GLOBAL_BATCH", str(gb), "derived")
        setv("GRAD_ACC_STEPS", str(gas or 1), "env" if gas else "default")
    else:
        gb = gb_given
        derived_gas = gb // (mb * dp) if gas is None else gas
        plan.explain.append(
            f"GLOBAL_BATCH={gb} given: GRAD_ACC_STEPS {derived_gas} = GLOBAL_BATCH {gb} / (MICRO_BATCH {mb} x DP {dp})"
        )
        setv("GRAD_ACC_STEPS", str(derived_gas), "env" if gas else "derived")
    plan.derived["GLOBAL_BATCH"] = str(gb)

    # -- run length
    seq = cfg0.model.seq_length
    tokens_raw, iters_raw = _value(env, "TRAIN_TOKENS"), _value(env, "TRAIN_ITERS")
    cli_length = [g for g in GROUPS["training.train_iters"] if g in given]
    setv("TRAIN_TOKENS", tokens_raw or "", "env" if tokens_raw else "unset")
    if cli_length:
        if tokens_raw or iters_raw:
            plan.notes.append(f"TRAIN_TOKENS/TRAIN_ITERS ignored: the command line gives {', '.join(cli_length)}")
        iters = cfg0.training.train_iters
        plan.explain.append(f"run length from the command line ({', '.join(cli_length)})")
    else:
        if tokens_raw and iters_raw:
            raise EnvError(f"TRAIN_TOKENS={tokens_raw} and TRAIN_ITERS={iters_raw} are both set; expected one of them")
        if tokens_raw:
            tokens = parse_count("TRAIN_TOKENS", tokens_raw)
            iters = schema.iterations_for_tokens(tokens, seq, gb)
            plan.explain.append(
                f"TRAIN_ITERS={iters} = ceil(TRAIN_TOKENS {tokens:,} / (SEQ {seq} x GLOBAL_BATCH {gb})) "
                f"({iters * seq * gb:,} tokens)"
            )
            setv("TRAIN_ITERS", str(iters), "derived")
        elif iters_raw:
            iters = _int("TRAIN_ITERS", iters_raw)
            setv("TRAIN_ITERS", str(iters), "env")
            plan.explain.append(f"TRAIN_ITERS={iters} ({iters * seq * gb:,} tokens = TRAIN_ITERS x SEQ x GLOBAL_BATCH)")
        elif preset.train_iters is not None:
            iters = preset.train_iters
            setv("TRAIN_ITERS", str(iters), "preset")
            plan.explain.append(f"TRAIN_ITERS={iters} (MODEL_ARCH={arch} default)")
        else:
            raise EnvError(
                f"MODEL_ARCH={arch} needs a run length; expected TRAIN_TOKENS (e.g. 2T or $((2*10**12))) or TRAIN_ITERS"
            )
        argv += ["--train-iters", str(iters)]
        names["--train-iters"] = "TRAIN_ITERS"
    plan.derived["TRAIN_ITERS"] = str(iters)
    sc = cfg0.schedule
    if sc.lr_warmup_fraction is not None and iters is not None:
        decay = sc.lr_decay_iters or iters
        plan.explain.append(
            f"warmup {sc.lr_warmup_fraction:g} x {decay:,} decay iterations = "
            f"{sc.lr_warmup_fraction * decay:,.1f} iterations"
        )

    # -- checkpoints and the run folder
    data_tag = Path(cfg0.data.data_file_list[0]).stem if cfg0.data.data_file_list else "builtin"
    m = cfg0.model
    default_save = f"checkpoints/{arch}_nl{m.num_layers}_hs{m.hidden_size}_seq{m.seq_length}_{data_tag}"
    save = cfg0.checkpoint.save if "checkpoint.save" in given else _value(env, "SAVE") or default_save
    setv("SAVE", save, "env" if _value(env, "SAVE") else "default")
    load_explicit = None
    if not cont:
        load_explicit = "--load" if "checkpoint.load" in given else "LOAD" if _value(env, "LOAD") else None
    load = (cfg0.checkpoint.load if load_explicit == "--load" else _value(env, "LOAD")) if load_explicit else save
    assert load is not None
    if cont and _value(env, "LOAD"):
        plan.notes.append(f"CONTINUE=1: LOAD={_value(env, 'LOAD')} ignored, resuming from SAVE")
    setv("LOAD", load, "env" if load_explicit else "SAVE")
    if load_explicit and not Path(load).exists():
        raise EnvError(f"{load_explicit}={load} does not exist; expected a checkpoint folder (unset LOAD to resume "
                       "from SAVE)")  # fmt: skip
    saved_at = _latest_iteration(save)
    finetune = cfg0.checkpoint.finetune and not cont
    loaded_at = checkpoint_iteration(load)
    start = 0 if finetune or loaded_at is None else loaded_at
    if load_explicit and saved_at is not None and Path(load).resolve() != Path(save).resolve():
        if loaded_at is None and not finetune:
            plan.notes.append(f"SAVE={save} holds iteration {saved_at}; LOAD={load} continues from its own iteration")
        elif start < saved_at:
            how = "--finetune starts at iteration 0" if finetune else f"LOAD holds iteration {start}"
            raise EnvError(
                f"SAVE={save} already holds a checkpoint (iteration {saved_at}) but {how} (LOAD={load}): its "
                "checkpoints would fall behind; set CONTINUE=1 to continue the run in SAVE, or choose a new SAVE"
            )
    plan.derived["START_ITERATION"] = str(start)
    plan.derived["WORKDIR"] = os.getcwd()  # relative SAVE/LOAD/RUN_DIR are relative to it
    if loaded_at is not None and not finetune:
        plan.explain.append(f"resuming from {load} at iteration {loaded_at}")
        if gb_given is None:
            plan.notes.append(
                f"resuming with a derived GLOBAL_BATCH {gb}: it follows the node count; set GLOBAL_BATCH to the "
                "earlier jobs' value to keep the batch when the node count changes"
            )
    argv += ["--save", save, "--load", load]
    names.update({"--save": "SAVE", "--load": "LOAD"})

    run_dir = _value(env, "RUN_DIR")
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        run_dir = f"runs/alcf/{stamp}_{arch}" + (f"_{job.job_id.split('.')[0]}" if job.job_id else f"_{os.getppid()}")
    setv("RUN_DIR", run_dir, "env" if _value(env, "RUN_DIR") else "default")
    plan.run_dir = run_dir
    argv += ["--run-dir", run_dir, "--exit-signal-handler"]
    names["--run-dir"] = "RUN_DIR"
    no_tb = _bool(env, "NO_TENSORBOARD")
    setv("NO_TENSORBOARD", "1" if no_tb else "0", "env" if _value(env, "NO_TENSORBOARD") else "default")
    wandb = _value(env, "WANDB_PROJECT")
    setv("WANDB_PROJECT", wandb or "", "env" if wandb else "unset")
    if not no_tb and "logging.tensorboard_dir" not in given:
        argv += ["--tensorboard-dir", f"{run_dir}/tensorboard"]
    if wandb:
        if no_tb:
            raise EnvError(f"WANDB_PROJECT={wandb} needs the tensorboard logs; expected NO_TENSORBOARD unset or 0")
        plan.notes.append(
            f"WANDB_PROJECT={wandb}: no W&B client runs inside training; upload the curves with "
            f"`wandb sync --sync-tensorboard -p {wandb} {run_dir}/tensorboard`"
        )

    # -- data and tokenizer files exist (one line now, not a failure on every rank later)
    lists = [*(cfg0.data.data_file_list or []), *(cfg0.data.valid_data_file_list or [])]
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
    if lists and cfg0.data.tokenizer_type == "ByteTokenizer" and not explicit_tokenizer:
        plan.notes.append(
            "DATA_FILE_LIST with TOKENIZER_TYPE=ByteTokenizer: set TOKENIZER_TYPE and TOKENIZER_MODEL to the "
            "tokenizer the data was preprocessed with, unless it was ByteTokenizer"
        )
    tok = cfg0.data.tokenizer_model
    if tok and not Path(tok).exists():
        raise EnvError(f"TOKENIZER_MODEL={tok} does not exist; expected a tokenizer file or folder")

    # -- final parse and the schema's batch checks at this world size
    plan.argv = [*argv, *extra]
    cfg = parse(plan.argv)
    try:
        cfg.resolve_batch(world)
        cfg.check_folders()
    except ConfigError as e:
        raise ConfigError(_reword(str(e), names)) from None
    plan.config = cfg

    # -- the command
    python = python or sys.executable
    exports = {"OMP_NUM_THREADS": env.get("OMP_NUM_THREADS") or str(cpus_per_rank)}
    plan.exports = exports
    program = [python, str(SCRIPT), *plan.argv]
    if launcher == "python":
        plan.command, plan.signal = program, "TERM"
    elif launcher == "torchrun":
        torchrun = Path(python).parent / "torchrun"
        head = [str(torchrun)] if torchrun.is_file() else [python, "-m", "torch.distributed.run"]
        plan.command = [*head, "--standalone", "--nproc-per-node", str(ppn), *program[1:]]
        plan.signal = "TERM"
    elif launcher == "srun":
        plan.command = [
            "srun", "--nodes", str(len(job.hosts)), "--ntasks", str(world), "--ntasks-per-node", str(ppn),
            "--cpus-per-task", str(cpus_per_rank), "--kill-on-bad-exit=1", *program,
        ]  # fmt: skip
        plan.signal = "USR1"
    elif mpi_flavor == "openmpi":
        cmd = [mpi_exe, "-np", str(world), "--map-by", f"ppr:{ppn}:node"]
        cmd += ["--hostfile", job.nodefile] if job.nodefile else []
        cmd += ["--bind-to", "none", "-x", "PATH", "-x", "OMP_NUM_THREADS"]
        cmd += ["-x", "LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else []
        cmd += ["--oversubscribe"] if ppn > logical else []
        cmd += ["--allow-run-as-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        plan.command, plan.signal = [*cmd, *program], "USR1"
    else:
        cmd = [mpi_exe, "--np", str(world), "--ppn", str(ppn)]
        cmd += ["--hostfile", job.nodefile] if job.nodefile else []
        cmd += ["--cpu-bind", "depth", "-d", str(cpus_per_rank)]
        plan.command, plan.signal = [*cmd, *program], "USR1"
    for name in ("LAUNCH_WITH", "DRY_RUN", "PYTHON", "CONTINUE"):
        raw = _value(env, name)
        setv(name, raw or VAR_BY_NAME[name].default, "env" if raw else "default")
    setv("PYTHON", python, "env" if _value(env, "PYTHON") else "default")
    return plan


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
    assert plan.config is not None
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


def main(argv: Sequence[str] | None = None) -> int:
    """`--from-env [--launcher L] [--mpi-flavor F] [--mpi-exe E] [--emit FILE] -- [pretrain flags]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    own, extra = (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else ([], args)
    p = OneLineParser(prog="python -m megatron_ext.config --from-env")
    p.add_argument("--launcher", default="auto", choices=("auto", *LAUNCHERS))
    p.add_argument("--mpi-flavor", default="mpich", choices=MPI_FLAVORS)
    p.add_argument("--mpi-exe", default="mpiexec")
    p.add_argument("--emit", help="write the shell assignments train_alcf.sh sources here")
    opts = p.parse_args(own)
    try:
        plan = resolve(os.environ, extra, launcher=opts.launcher, mpi_flavor=opts.mpi_flavor, mpi_exe=opts.mpi_exe)
    except (EnvError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(plan), flush=True)
    if plan.dry_run:
        assert plan.config is not None
        print("configuration:\n" + json.dumps(plan.config.to_dict(), indent=2, sort_keys=True))
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
    sub.add_parser("resolve", help="same as `python -m megatron_ext.config --from-env`", add_help=False)
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
