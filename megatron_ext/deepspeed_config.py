"""Megatron-DeepSpeed's DeepSpeed flags and ``--deepspeed_config FILE`` mapped onto the schema when a run starts.

The AuroraGPT runs our users continue pass ``--deepspeed --deepspeed_config ds_config.json --zero-stage 1`` and a
JSON written by ALCF's helpers.sh. Training here is megatron-core's, so nothing of DeepSpeed runs: each setting of
the JSON that has a counterpart becomes the schema's value, and the run's one start-up note
(config.startup_note) says what was taken, what differs and what has no counterpart. The rules:

- Batch sizes (``train_batch_size``, ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``) must
  agree with each other and the data-parallel size (DeepSpeed's own check) and with the command line; a flag left
  at its default takes the JSON's value. A conflict is one ``error:`` line.
- Precision (``bf16``/``fp16``): the same; the loss-scale settings of ``fp16`` fill in flags left at defaults.
- ZeRO stage 1 or 2 is megatron-core's distributed optimizer (a note says what it shards); stage 3 stops the run.
- ``gradient_clipping``, ``optimizer`` and ``scheduler`` blocks fill in the flags left at defaults; where the command
  line set another value it is kept and the note names both.
- Everything else (logging, profilers, communication buckets, offload, ...) is listed in one line of the note.

The JSON is read only here, at start-up (``python -m megatron_ext.config`` prints the flags as given), with the
world size: DeepSpeed's batch check needs the data-parallel size.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

from megatron_ext.config import SECTIONS, Config, ConfigError, flag_of

# DeepSpeed optimizer types that are AdamW here (FusedAdam's adam_w_mode defaults to true) and SGD.
ADAM_TYPES = {"adam", "adamw", "fusedadam", "cpuadam", "deepspeedcpuadam"}
SGD_TYPES = {"sgd"}
SCHEDULER_TYPES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
# DeepSpeed's defaults for a scheduler's missing params (deepspeed/runtime/lr_schedules.py).
_WARMUP_DEFAULTS = {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000, "warmup_type": "log"}
_COSINE_DEFAULTS = {"warmup_min_ratio": 0.0, "warmup_num_steps": 1000, "cos_min_ratio": 0.0001, "warmup_type": "log"}
_LENGTH_GROUPS = {  # a length given on the command line in any unit keeps the JSON's out of the whole group
    "schedule.lr_warmup_iters": ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_tokens", "lr_warmup_fraction"),
    "schedule.lr_decay_iters": ("lr_decay_iters", "lr_decay_samples", "lr_decay_tokens"),
}


def _fields() -> dict[str, dataclasses.Field]:
    return {f"{s}.{f.name}": f for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str | bool) or value is None else f"{value:g}"


class _Mapping:
    """One JSON's mapping: the changes per section and the lines of the note."""

    def __init__(self, cfg: Config, source: str, world_size: int) -> None:
        self.cfg, self.source, self.world_size = cfg, source, world_size
        self.fields = _fields()
        self.changes: dict[str, dict[str, Any]] = {}
        self.taken: list[str] = []
        self.kept: list[str] = []
        self.ignored: list[str] = []
        self.notes: list[str] = []

    def current(self, dest: str) -> Any:
        section, name = dest.split(".")
        return self.changes.get(section, {}).get(name, getattr(getattr(self.cfg, section), name))

    def at_default(self, dest: str) -> bool:
        section, _ = dest.split(".")
        names = _LENGTH_GROUPS.get(dest, (dest.split(".")[1],))
        return all(getattr(getattr(self.cfg, section), n) == self.fields[f"{section}.{n}"].default for n in names)

    def take(self, dest: str, value: Any, key: str, conflict: str = "keep") -> None:
        """`key`'s value for the field `dest`: taken where the command line left the default; else equal, kept
        with a note (conflict="keep") or one error line (conflict="error")."""
        flag = flag_of(self.fields[dest])
        if value == self.current(dest):
            return
        if not self.at_default(dest):
            if conflict == "error":
                raise ConfigError(
                    f"{self.source}: {key} {_show(value)} conflicts with {flag} {_show(self.current(dest))}; "
                    "expected the same value (or leave the flag out)"
                )
            self.kept.append(f"{key} {_show(value)} (the command line's {flag} {_show(self.current(dest))} is kept)")
            return
        section, name = dest.split(".")
        self.changes.setdefault(section, {})[name] = value
        self.taken.append(f"{key} -> {flag} {_show(value)}")

    def number(self, value: Any, name: str, kind: type = float) -> Any:
        """`value` (from the JSON at `name`) as a float or int, or one error line."""
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (kind is int and value != int(value)):
            expected = "an integer" if kind is int else "a number"
            raise ConfigError(f"{self.source}: {name} {json.dumps(value)} is not {expected}")
        return kind(value)

    def block(self, ds: dict[str, Any], key: str) -> dict[str, Any]:
        value = ds.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.source}: {key} must be an object {{...}}, not {json.dumps(value)}")
        return value

    def rest(self, block: dict[str, Any], prefix: str, handled: Collection[str]) -> None:
        """The keys of `block` not in `handled`, for the note's "ignored" line."""
        self.ignored += [f"{prefix}{k}" for k in block if k not in handled]


def read(path: str) -> dict[str, Any]:
    """The JSON object of ``--deepspeed_config``, or one error line naming the file (and line) and the problem."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--deepspeed_config {path}: cannot read ({e.strerror or e})") from None
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed_config {path}: expected a JSON object {{...}}, not {type(ds).__name__}")
    return ds


def _auto(value: Any) -> Any:
    """HF-style "auto" means: ours decides."""
    return None if value == "auto" else value


def _batch(m: _Mapping, ds: dict[str, Any]) -> None:
    """DeepSpeed's rule: train_batch_size = micro x accumulation x data-parallel size, any two giving the third."""
    names = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    tbs, mbs, gas = (None if _auto(ds.get(k)) is None else m.number(ds.get(k), k, int) for k in names)
    p = m.cfg.parallel
    dp = m.cfg.data_parallel_size(m.world_size)
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    where = f"data-parallel size {dp} (world size {m.world_size} / TP {tp} / PP {pp})"
    if tbs is not None and mbs is not None and gas is not None and tbs != mbs * gas * dp:
        raise ConfigError(
            f"{m.source}: train_batch_size {tbs} is not train_micro_batch_size_per_gpu {mbs} x "
            f"gradient_accumulation_steps {gas} x {where}"
        )
    if mbs is not None:
        m.take("training.micro_batch_size", mbs, "train_micro_batch_size_per_gpu", conflict="error")
    if tbs is None and gas is not None:
        tbs = m.current("training.micro_batch_size") * gas * dp
        m.take("training.global_batch_size", tbs, f"gradient_accumulation_steps {gas} (x micro batch x {where})",
               conflict="error")  # fmt: skip
    elif tbs is not None:
        m.take("training.global_batch_size", tbs, "train_batch_size", conflict="error")


def _precision(m: _Mapping, ds: dict[str, Any]) -> None:
    bf16, fp16 = m.block(ds, "bf16") or m.block(ds, "bfloat16"), m.block(ds, "fp16")
    on = {name: _auto(block.get("enabled")) for name, block in (("bf16", bf16), ("fp16", fp16))}
    if on["bf16"] and on["fp16"]:
        raise ConfigError(f"{m.source}: bf16 and fp16 are both enabled; expected one")
    for name, enabled in on.items():
        other = "fp16" if name == "bf16" else "bf16"
        if enabled and getattr(m.cfg.precision, other):
            raise ConfigError(f"{m.source}: {name}.enabled true conflicts with --{other}; expected one precision")
        if enabled is not None:
            m.take(f"precision.{name}", bool(enabled), f"{name}.enabled", conflict="error")
    m.rest(bf16, "bf16.", ["enabled"])
    scale_keys = {"loss_scale_window": int, "hysteresis": int, "min_loss_scale": float}
    if on["fp16"]:
        if "loss_scale" in fp16:
            scale = m.number(fp16.get("loss_scale"), "fp16.loss_scale")
            m.take("precision.loss_scale", scale or None, "fp16.loss_scale")  # 0: dynamic
        if "initial_scale_power" in fp16:
            power = m.number(fp16.get("initial_scale_power"), "fp16.initial_scale_power", int)
            m.take("precision.initial_loss_scale", 2.0**power, f"fp16.initial_scale_power {power}")
        for key, kind in scale_keys.items():
            if key in fp16:
                m.take(f"precision.{key}", m.number(fp16.get(key), f"fp16.{key}", kind), f"fp16.{key}")
        m.rest(fp16, "fp16.", ["enabled", "loss_scale", "initial_scale_power", *scale_keys])
    else:
        m.rest(fp16, "fp16.", ["enabled"])


def zero_stage_note(stage: int, source: str) -> str | None:
    """ZeRO stage 1/2 -> the distributed optimizer's note; 3 -> ConfigError (parameter sharding is not built)."""
    if stage == 3:
        raise ConfigError(
            f"{source} 3 is not supported here (ZeRO-3 shards the parameters); expected 0, 1 or 2 (megatron-core's "
            "distributed optimizer), or tensor/pipeline parallelism to split the model"
        )
    if stage not in (0, 1, 2):
        raise ConfigError(f"{source} {stage}: expected 0, 1, 2 (or 3, which is not supported here)")
    if stage == 0:
        return None
    return (
        f"{source} {stage} -> --use-distributed-optimizer: megatron-core's distributed optimizer shards the Adam "
        "state and fp32 master weights over the data-parallel ranks and reduce-scatters the gradients (ZeRO-1's "
        "memory saving; the bf16/fp16 gradient buffer stays whole, as ZeRO-2 would shard it)"
    )


def _zero(m: _Mapping, ds: dict[str, Any]) -> None:
    zero = m.block(ds, "zero_optimization")
    if "stage" in zero:
        stage = m.number(zero.get("stage"), "zero_optimization.stage", int)
        note = zero_stage_note(stage, f"{m.source}: zero_optimization.stage")
        if note and not m.current("parallel.use_distributed_optimizer"):  # else already on (--zero-stage's note)
            m.notes.append(note)
            m.take("parallel.use_distributed_optimizer", True, "zero_optimization.stage")
    if "overlap_comm" in zero:
        m.take("parallel.overlap_grad_reduce", bool(zero["overlap_comm"]), "zero_optimization.overlap_comm")
    m.rest(zero, "zero_optimization.", ["stage", "overlap_comm"])


def _optimizer(m: _Mapping, ds: dict[str, Any]) -> None:
    block = m.block(ds, "optimizer")
    if not block:
        return
    kind = str(block.get("type", ""))
    params = block.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{m.source}: optimizer.params must be an object {{...}}")
    if kind.lower() in ADAM_TYPES:
        m.take("optimizer.optimizer", "adam", f"optimizer.type {kind}")
        if "betas" in params:
            betas = params["betas"]
            if not (isinstance(betas, list) and len(betas) == 2):
                raise ConfigError(f"{m.source}: optimizer.params.betas {json.dumps(betas)}; expected [beta1, beta2]")
            for i, dest in enumerate(("optimizer.adam_beta1", "optimizer.adam_beta2")):
                m.take(dest, m.number(betas[i], f"optimizer.params.betas[{i}]"), f"optimizer.params.betas[{i}]")
        if "eps" in params:
            m.take("optimizer.adam_eps", m.number(params.get("eps"), "optimizer.params.eps"), "optimizer.params.eps")
        if params.get("adam_w_mode") is False or params.get("bias_correction") is False:
            m.notes.append(
                f"{m.source}: optimizer {kind} with adam_w_mode/bias_correction false differs here: AdamW with "
                "decoupled weight decay and bias correction is used"
            )
        handled = ["lr", "weight_decay", "betas", "eps", "adam_w_mode", "bias_correction"]
    elif kind.lower() in SGD_TYPES:
        m.take("optimizer.optimizer", "sgd", f"optimizer.type {kind}")
        if "momentum" in params:
            m.take("optimizer.sgd_momentum", m.number(params.get("momentum"), "optimizer.params.momentum"),
                   "optimizer.params.momentum")  # fmt: skip
        handled = ["lr", "weight_decay", "momentum"]
    else:
        raise ConfigError(
            f"{m.source}: optimizer.type {kind!r} is not supported here; expected Adam, AdamW or SGD (or remove the "
            "block: --optimizer decides)"
        )
    for key, dest in (("lr", "optimizer.lr"), ("weight_decay", "optimizer.weight_decay")):
        if key in params:
            m.take(dest, m.number(params.get(key), f"optimizer.params.{key}"), f"optimizer.params.{key}")
    m.rest(params, "optimizer.params.", handled)
    m.rest(block, "optimizer.", ["type", "params"])


def _scheduler(m: _Mapping, ds: dict[str, Any]) -> None:
    block = m.block(ds, "scheduler")
    if not block:
        return
    kind = block.get("type")
    if kind not in SCHEDULER_TYPES:
        raise ConfigError(
            f"{m.source}: scheduler.type {json.dumps(kind)} is not supported here; expected one of "
            f"{', '.join(SCHEDULER_TYPES)} (or remove the block: the --lr-* flags decide)"
        )
    given = block.get("params", {})
    if not isinstance(given, dict):
        raise ConfigError(f"{m.source}: scheduler.params must be an object {{...}}")
    cosine = kind == "WarmupCosineLR"
    params = {**(_COSINE_DEFAULTS if cosine else _WARMUP_DEFAULTS), **given}
    style = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}[kind]
    m.take("schedule.lr_decay_style", style, f"scheduler.type {kind}")
    steps = m.number(params.get("warmup_num_steps"), "scheduler.params.warmup_num_steps", int)
    m.take("schedule.lr_warmup_iters", steps, "scheduler.params.warmup_num_steps")
    if kind != "WarmupLR":
        if "total_num_steps" not in params:
            raise ConfigError(f"{m.source}: scheduler {kind} needs params.total_num_steps")
        total = m.number(params.get("total_num_steps"), "scheduler.params.total_num_steps", int)
        m.take("schedule.lr_decay_iters", total, "scheduler.params.total_num_steps")
    if cosine:  # ratios of the optimizer's lr
        lr = m.current("optimizer.lr")
        ratio = m.number(params.get("warmup_min_ratio"), "scheduler.params.warmup_min_ratio")
        m.take("schedule.lr_warmup_init", ratio * lr, "scheduler.params.warmup_min_ratio x lr")
        ratio = m.number(params.get("cos_min_ratio"), "scheduler.params.cos_min_ratio")
        m.take("optimizer.min_lr", ratio * lr, "scheduler.params.cos_min_ratio x lr")
    else:
        m.take("optimizer.lr", m.number(params.get("warmup_max_lr"), "scheduler.params.warmup_max_lr"),
               "scheduler.params.warmup_max_lr")  # fmt: skip
        m.take("schedule.lr_warmup_init", m.number(params.get("warmup_min_lr"), "scheduler.params.warmup_min_lr"),
               "scheduler.params.warmup_min_lr")  # fmt: skip
        if kind == "WarmupDecayLR":
            m.take("optimizer.min_lr", 0.0, "scheduler WarmupDecayLR (decays to 0)")
    if params["warmup_type"] != "linear":
        m.notes.append(
            f"{m.source}: scheduler.params.warmup_type {json.dumps(params['warmup_type'])} differs here: the "
            "warmup is linear"
        )
    m.rest(given, "scheduler.params.", ["warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                                         "total_num_steps", "warmup_min_ratio", "cos_min_ratio"])  # fmt: skip
    m.rest(block, "scheduler.", ["type", "params"])


def _clipping(m: _Mapping, ds: dict[str, Any]) -> None:
    if "gradient_clipping" in ds:
        clip = m.number(ds.get("gradient_clipping"), "gradient_clipping")
        m.take("optimizer.clip_grad", clip, "gradient_clipping")
    elif m.current("optimizer.clip_grad") > 0:
        m.notes.append(
            f"{m.source}: no gradient_clipping (DeepSpeed would not clip): --clip-grad "
            f"{m.current('optimizer.clip_grad'):g} clips here"
        )


def _activation_checkpointing(m: _Mapping, ds: dict[str, Any]) -> None:
    block = m.block(ds, "activation_checkpointing")
    if block:
        m.notes.append(
            f"{m.source}: activation_checkpointing ({', '.join(sorted(block))}): recomputation here is "
            "megatron-core's (--recompute-activations); how DeepSpeed partitions or offloads the checkpoints has no "
            "counterpart (the results are the same)"
        )


# The JSON's keys that have a counterpart here, and what they become (tools/compat_table.py prints this table);
# a top-level key not named here is listed as ignored in the start-up note.
JSON_COUNTERPARTS: dict[str, str] = {
    "train_batch_size": "--global-batch-size; must equal micro batch x accumulation steps x data-parallel size",
    "train_micro_batch_size_per_gpu": "--micro-batch-size",
    "gradient_accumulation_steps": "--global-batch-size = micro batch x steps x data-parallel size",
    "bf16.enabled (or bfloat16)": "--bf16",
    "fp16.enabled": "--fp16",
    "fp16.loss_scale": "--loss-scale (0: dynamic scaling)",
    "fp16.initial_scale_power": "--initial-loss-scale 2^N",
    "fp16.loss_scale_window, hysteresis, min_loss_scale": "--loss-scale-window, --hysteresis, --min-loss-scale",
    "zero_optimization.stage": "1, 2: --use-distributed-optimizer; 3: the run stops at start-up",
    "zero_optimization.overlap_comm": "--overlap-grad-reduce",
    "gradient_clipping": "--clip-grad (absent: a note, as DeepSpeed would not clip)",
    "optimizer": "type Adam, AdamW, FusedAdam, CPUAdam: --optimizer adam (AdamW); SGD: sgd; params lr, betas, eps, "
    "weight_decay, momentum: --lr, --adam-beta1/2, --adam-eps, --weight-decay, --sgd-momentum; other types stop "
    "the run",
    "scheduler": "WarmupLR: constant; WarmupDecayLR: linear to 0; WarmupCosineLR: cosine; warmup_num_steps, "
    "total_num_steps, warmup_min_lr/max_lr, warmup_min_ratio, cos_min_ratio: the --lr-* flags; other types stop "
    "the run",
    "activation_checkpointing": "a note: recomputation is megatron-core's (--recompute-activations)",
}
_HANDLED = {key.split(".")[0].split(" ")[0] for key in JSON_COUNTERPARTS} | {"bfloat16"}


def map_json(
    cfg: Config, ds: dict[str, Any], source: str, world_size: int
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The changes per section that the JSON ``ds`` asks for, and the lines of the note."""
    m = _Mapping(cfg, source, world_size)
    for part in (_batch, _precision, _zero, _optimizer, _scheduler, _clipping, _activation_checkpointing):
        part(m, ds)
    m.rest(ds, "", _HANDLED)
    lines = []
    if m.taken:
        lines.append(f"{source}: taken: {', '.join(m.taken)}")
    if m.kept:
        lines.append(f"{source}: differs from the command line: {', '.join(m.kept)}")
    lines += m.notes
    if m.ignored:
        lines.append(f"{source}: no counterpart here, ignored: {', '.join(sorted(m.ignored))}")
    return m.changes, lines


def _flags(cfg: Config) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """What the DeepSpeed flags themselves mean here (the changes and the note's lines); refusals in one line."""
    ds, p = cfg.deepspeed, cfg.parallel
    if ds.ds_sequence_parallel_size > 1:
        raise ConfigError(
            f"--ds-sequence-parallel-size {ds.ds_sequence_parallel_size} is not supported here (DeepSpeed Ulysses "
            "sequence parallelism); expected 1 (--sequence-parallel is Megatron's, within the tensor-parallel group)"
        )
    if ds.no_pipeline_parallel and p.pipeline_model_parallel_size > 1:
        raise ConfigError(
            f"--no-pipeline-parallel with --pipeline-model-parallel-size {p.pipeline_model_parallel_size}: expected "
            "one of them (DeepSpeed's switch turns pipelining off)"
        )
    changes: dict[str, dict[str, Any]] = {}
    lines = []
    if ds.zero_stage is not None:
        note = zero_stage_note(ds.zero_stage, "--zero-stage")
        if note and not p.use_distributed_optimizer:
            changes["parallel"] = {"use_distributed_optimizer": True}
            lines.append(note)
    if ds.deepspeed_activation_checkpointing:
        what = "every layer is recomputed" if cfg.training.recompute_activations else "nothing is recomputed"
        lines.append(
            f"--deepspeed-activation-checkpointing: recomputation is megatron-core's, as --recompute-activations "
            f"says ({what})"
        )
    if ds.deepspeed and ds.deepspeed_config is None:
        lines.append("--deepspeed: training is megatron-core's here (no DeepSpeed engine)")
    return changes, lines


def apply(cfg: Config, world_size: int) -> Config:
    """The run's configuration with the DeepSpeed flags and ``--deepspeed_config`` mapped onto the schema (the
    same object when none is given); the note's lines join ``cfg.compat.readings``. Raises ConfigError (one line)
    for a conflict or what is not supported."""
    changes, lines = _flags(cfg)
    path = cfg.deepspeed.deepspeed_config
    if path is not None:
        mapped = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **v) for s, v in changes.items()})
        json_changes, json_lines = map_json(mapped, read(path), f"--deepspeed_config {path}", world_size)
        for section, values in json_changes.items():
            changes.setdefault(section, {}).update(values)
        lines += json_lines
    if not changes and not lines:
        return cfg
    sections = {s: dataclasses.replace(getattr(cfg, s), **values) for s, values in changes.items()}
    compat = dataclasses.replace(cfg.compat, readings=[*cfg.compat.readings, *lines])
    return dataclasses.replace(cfg, **sections, compat=compat)
