"""Model wrapping (fp16/bf16, DDP), optimizer and learning-rate schedule, all from megatron-core."""

from __future__ import annotations

import re

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_ext.config import LR_LENGTHS, Config, ConfigError
from megatron_ext.training.schedules import ParamScheduler, ScheduleConfig, ScheduleError, resolve_lengths


def wrap_model(cfg: Config, config: TransformerConfig, chunks: list[torch.nn.Module]) -> list[DistributedDataParallel]:
    """Float16Module for bf16/fp16, then megatron-core DDP (contiguous grad buffers, optional ZeRO-1 layout)."""
    if cfg.precision.bf16 or cfg.precision.fp16:
        chunks = [Float16Module(config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # we check the reduced norm ourselves and skip or stop
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    for m in wrapped:
        m.broadcast_params()  # identical initial weights on every data-parallel replica
    return wrapped


def build_optimizer(cfg: Config, model: list[DistributedDataParallel]) -> MegatronOptimizer:
    o, prec = cfg.optimizer, cfg.precision
    config = McoreOptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad,
        bf16=prec.bf16,
        fp16=prec.fp16,
        params_dtype={"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            prec.params_dtype
        ],
        loss_scale=prec.loss_scale,
        initial_loss_scale=prec.initial_loss_scale,
        min_loss_scale=prec.min_loss_scale,
        loss_scale_window=prec.loss_scale_window,
        hysteresis=prec.hysteresis,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model)  # type: ignore[arg-type]
    use_fused_adam_on_cpu(optimizer)
    return optimizer


def torch_optimizers(optimizer: MegatronOptimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron-core optimizer (chained or not)."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in chained if isinstance(getattr(o, "optimizer", None), torch.optim.Optimizer)]


def use_fused_adam_on_cpu(optimizer: MegatronOptimizer) -> None:
    """Adam/AdamW on CPU through torch's fused kernel (one pass per tensor instead of about ten).

    Without Apex or Transformer Engine, megatron-core steps with torch's Adam/AdamW as constructed by default:
    on CPU a Python loop of about ten element-wise passes per parameter. megatron-core uses a fused Adam where it
    has one (Apex/TE on GPU); `fused=True` is torch's on CPU: the same update up to fp32 rounding (measured with
    the benchmark model's parameter shapes: within 3e-7 after 30 steps). Only the live parameter groups are
    switched: a saved state dict keeps the groups as megatron-core built them (no `fused` entry to carry to
    another device) and loading one switches back.
    """
    for opt in torch_optimizers(optimizer):
        if not isinstance(opt, torch.optim.Adam):  # AdamW subclasses Adam
            continue
        params = [p for group in opt.param_groups for p in group["params"]]
        if not params or any(p.device.type != "cpu" or not p.dtype.is_floating_point for p in params):
            continue
        if any(group.get("foreach") or group.get("differentiable") for group in opt.param_groups):
            continue
        _set_fused(opt, True)
        opt.register_state_dict_post_hook(_saved_as_built)
        opt.register_load_state_dict_post_hook(lambda o: _set_fused(o, True))


def _set_fused(opt: torch.optim.Optimizer, fused: bool | None) -> None:
    """Sets `fused` where torch's Adam reads it at each step (and for groups added later)."""
    opt.defaults["fused"] = fused
    for group in opt.param_groups:
        group["fused"] = fused


def _saved_as_built(opt: torch.optim.Optimizer, state_dict: dict) -> dict:
    """State-dict post-hook: the saved groups say `fused: None`, as megatron-core built them."""
    for group in state_dict.get("param_groups", []):
        if group.get("fused"):
            group["fused"] = None
    return state_dict


def run_length_samples(cfg: Config) -> int:
    """Total training samples (the unit the schedule counts in, so it survives batch-size changes)."""
    t = cfg.training
    if t.train_samples is not None:
        return t.train_samples
    assert t.train_iters is not None and t.global_batch_size is not None
    return t.train_iters * t.global_batch_size


def schedule_config(cfg: Config, start_samples: int = 0) -> ScheduleConfig:
    """The command line's schedule in one unit (tokens if any length was given in tokens, else samples).

    `start_samples`: where the schedule starts in the run (--restart-lr-schedule at a checkpoint); by default
    the decay then ends with the run rather than a whole run length later.
    """
    o, sc, t = cfg.optimizer, cfg.schedule, cfg.training
    assert t.global_batch_size is not None
    lengths = {name: sc.length(name) for name in LR_LENGTHS}
    if lengths["lr_decay"] is None:
        lengths["lr_decay"] = (max(run_length_samples(cfg) - start_samples, 1), "samples")
    unit, values = resolve_lengths(lengths, global_batch_size=t.global_batch_size, seq_length=cfg.model.seq_length)
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


def build_scheduler(cfg: Config, optimizer: MegatronOptimizer) -> ParamScheduler:
    """LR and weight-decay schedule, advanced by samples each step (lengths in tokens are converted)."""
    return ParamScheduler(optimizer, schedule_config(cfg))


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
    counted = f"samples, an iteration being --global-batch-size {gbs}"
    if unit == "tokens":
        counted = f"tokens, a sample being --seq-length {seq} and an iteration {gbs} samples"
    return f"{message} (counted in {counted}; " + ", ".join(given) + ")"
