"""Model wrapping (fp16/bf16, DDP), optimizer and learning-rate schedule, all from megatron-core."""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_ext.config import Config


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
    return get_megatron_optimizer(config, model)  # type: ignore[arg-type]


def run_length_samples(cfg: Config) -> int:
    """Total training samples (the unit the schedule counts in, so it survives batch-size changes)."""
    t = cfg.training
    if t.train_samples is not None:
        return t.train_samples
    assert t.train_iters is not None and t.global_batch_size is not None
    return t.train_iters * t.global_batch_size


def build_scheduler(cfg: Config, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """Warmup then decay, counted in samples as Megatron-LM does."""
    o, t = cfg.optimizer, cfg.training
    assert t.global_batch_size is not None
    total = run_length_samples(cfg)
    decay = o.lr_decay_iters * t.global_batch_size if o.lr_decay_iters is not None else total
    warmup = (
        int(o.lr_warmup_fraction * decay)
        if o.lr_warmup_fraction is not None
        else o.lr_warmup_iters * t.global_batch_size
    )
    return OptimizerParamScheduler(
        optimizer,
        init_lr=o.lr_warmup_init,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(decay, warmup + 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
    )
