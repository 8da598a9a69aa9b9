"""Model wrapping (fp16/bf16, DDP), optimizer (megatron-core's) and the learning-rate scheduler built on it."""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_ext.config import Config, schedule_config
from megatron_ext.platform import DTYPES
from megatron_ext.training.schedules import ParamScheduler


def wrap_model(cfg: Config, config: TransformerConfig, chunks: list[torch.nn.Module]) -> list[DistributedDataParallel]:
    """Float16Module for bf16/fp16, then megatron-core DDP (contiguous grad buffers, optional ZeRO-1 layout)."""
    if cfg.precision.bf16 or cfg.precision.fp16:
        chunks = [Float16Module(config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not (cfg.parallel.grad_reduce_in_bf16 and cfg.precision.bf16),
        fp8_param_gather=cfg.precision.fp8_param_gather,
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
        params_dtype=DTYPES[prec.params_dtype],
        loss_scale=prec.loss_scale,
        initial_loss_scale=prec.initial_loss_scale,
        min_loss_scale=prec.min_loss_scale,
        loss_scale_window=prec.loss_scale_window,
        hysteresis=prec.hysteresis,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        decoupled_lr=o.decoupled_lr,
        decoupled_min_lr=o.decoupled_min_lr,
    )
    optimizer = get_megatron_optimizer(config, model)
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


def lr_range(cfg: Config, group: dict, lr: float, min_lr: float) -> tuple[float, float]:
    """A param group's (peak, minimum) LR: the schedule's, or --decoupled-lr/--decoupled-min-lr for the
    embedding and output layer's group (megatron-core marks it: not `default_config`)."""
    o = cfg.optimizer
    if o.decoupled_lr is None or group.get("default_config", True):
        return lr, min_lr
    return o.decoupled_lr, min_lr if o.decoupled_min_lr is None else o.decoupled_min_lr


def build_scheduler(cfg: Config, optimizer: MegatronOptimizer) -> ParamScheduler:
    """LR and weight-decay schedule, advanced by samples each step (lengths in tokens are converted)."""
    return ParamScheduler(optimizer, schedule_config(cfg))
