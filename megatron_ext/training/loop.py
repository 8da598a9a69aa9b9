"""The training loop: `setup()` builds a run, `train_step()` does one optimizer step, `train()` runs to the end.

The model, its micro-batches, their per-token losses and the FLOPs of a step come from the model variant's recipe
(megatron_ext/models/recipe.py): nothing here is specific to one variant.

Loss is a per-token mean over the whole global batch: micro-batches return (loss sum, token count), the
gradients are divided by the global token count in megatron-core's finalize_model_grads, so gradient accumulation
and data parallelism give the same step as one large batch. A step whose loss or gradient norm is not finite
is never applied.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    get_current_global_batch_size,
    get_num_microbatches,
    update_num_microbatches,
)
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig

from megatron_ext import deepspeed_config, distributed, platform
from megatron_ext.cli import UserError
from megatron_ext.config import (
    Config,
    ConfigError,
    check_built,
    parse_args,
    run_length_samples,
    schedule_config,
    startup_note,
)
from megatron_ext.data.tokenizers import Tokenizer, tokenizer_of
from megatron_ext.models.gpt import HAVE_TE
from megatron_ext.models.recipe import Batch, Recipe, build_recipe
from megatron_ext.training import checkpointing, telemetry, universal
from megatron_ext.training.batch_schedule import init_batch_sizes
from megatron_ext.training.metrics import MetricsLogger
from megatron_ext.training.optim import build_optimizer, build_scheduler, lr_range, wrap_model
from megatron_ext.training.schedules import ParamScheduler
from megatron_ext.training.telemetry import Telemetry
from megatron_ext.training.timers import StepTimers, timed


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); the message says why."""


class EveryRankStops(ConfigError):
    """A user mistake every rank learnt in the same collective: each prints it, then all meet in a barrier before
    exiting, so a launcher that ends the others when one exits cannot cut a rank off before its line."""


@dataclass
class TrainState:
    """Progress counters, saved in every checkpoint."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    consumed_flops: float = 0.0  # training FLOPs so far (all ranks), for loss against compute
    skipped_in_a_row: int = 0
    skipped_total: int = 0


@dataclass
class Trainer:
    """Everything a run is made of; built by `setup()`."""

    cfg: Config
    platform: platform.Platform
    device: torch.device
    tokenizer: Tokenizer
    recipe: Recipe  # the model variant: builds, feeds and scores the model
    config: TransformerConfig
    model: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    scheduler: ParamScheduler
    train_data: list[Iterator[Batch]]  # one iterator per model chunk (virtual pipeline stages read the same batches)
    metrics: MetricsLogger
    telemetry: Telemetry  # timers, profiler and what the logging flags add (megatron_ext/training/telemetry.py)
    state: TrainState = field(default_factory=TrainState)
    stop_requested: bool = False
    started: float = field(default_factory=time.monotonic)
    async_saves: AsyncCallsQueue | None = None  # --async-save on GPU: checkpoints being written in the background


def _is_loss_rank() -> bool:
    """Ranks whose loss values enter the global sums: last pipeline stage, first tensor-parallel rank."""
    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def loss_func(
    masks: dict[str, torch.Tensor], output: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token losses -> (lm_loss sum, its token count, [sum, count] of each masked loss to report); megatron-core
    divides the gradients by the global count."""
    losses = output.float().reshape(-1)
    reports = {}
    for name, mask in masks.items():
        weights = mask.reshape(-1).float()
        reports[name] = torch.stack([(losses * weights).sum(), weights.sum()])
    loss_sum, tokens = reports["lm_loss"]
    return loss_sum, tokens.to(torch.int), {k: v.detach() for k, v in reports.items()}


def forward_step(
    recipe: Recipe, timers: StepTimers | None, data: Iterator[Batch], model: torch.nn.Module
) -> tuple[torch.Tensor, partial]:
    with timed(timers, "batch-generator", 2):
        batch = next(data)
    output, masks = recipe.forward_step(batch, model)
    return output, partial(loss_func, masks)


def _global_sums(tr: Trainer, reports: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """[sum, count] of each of the recipe's losses over every data-parallel replica, known on every rank. A data
    problem of any rank (recipe.data_problem) travels in the same reduction and stops every rank with its line."""
    names = tr.recipe.losses
    total = torch.zeros(len(names) + 1, 2, dtype=torch.float64, device=tr.device)  # the last row: data problems
    if _is_loss_rank():
        for r in reports:
            total[:-1] += torch.stack([r[name] for name in names]).to(total)
    problem = tr.recipe.data_problem()
    total[-1, 0] = problem is not None
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(total)
    if total[-1, 0] > 0:
        problems: list[str | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(problems, problem)
        raise EveryRankStops(next(p for p in problems if p is not None))
    return total[:-1]


def _means(tr: Trainer, sums: torch.Tensor) -> dict[str, float]:
    """Each loss's per-token mean; a reported loss without tokens here (e.g. one scored on validation only) is left
    out rather than shown as 0."""
    pairs = zip(tr.recipe.losses, sums.tolist())
    return {name: s / max(c, 1) for name, (s, c) in pairs if c > 0 or name == "lm_loss"}


def _run_microbatches(tr: Trainer, data: list[Iterator[Batch]], num_microbatches: int, forward_only: bool) -> list:
    cfg = tr.cfg
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, tr.recipe, tr.config.timers),
        data_iterator=data if len(data) > 1 else data[0],
        model=tr.model if len(tr.model) > 1 else tr.model[0],
        num_microbatches=num_microbatches,
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.training.micro_batch_size,
        forward_only=forward_only,
    )


def train_step(tr: Trainer) -> dict[str, float]:
    """One optimizer step over the current global batch; returns loss, grad norm, lr, skipped."""
    update_num_microbatches(tr.state.consumed_samples, consistency_check=True)
    num_microbatches, global_batch = get_num_microbatches(), get_current_global_batch_size()
    note = tr.recipe.before_step(tr.state, tr.model, tr.optimizer)
    if note:
        tr.metrics.print(note)
    for chunk in tr.model:
        chunk.zero_grad_buffer()
    tr.optimizer.zero_grad()
    reports = _run_microbatches(tr, tr.train_data, num_microbatches, forward_only=False)
    means = _means(tr, _global_sums(tr, reports))
    loss = means["lm_loss"]
    flops = tr.recipe.step_flops(tr.state, global_batch)

    # Apply the step only if everything is finite: megatron-core's step() would update with a NaN norm.
    with tr.telemetry.optimizer_phase():
        found_inf = tr.optimizer.prepare_grads()
        clip = tr.cfg.optimizer.clip_grad
        grad_norm = tr.optimizer.clip_grad_norm(clip) if clip > 0 else tr.optimizer.get_grad_norm()
        grad_values = tr.telemetry.grads_ready()
        finite = not found_inf and math.isfinite(grad_norm) and math.isfinite(loss)
        if not tr.cfg.training.check_for_nan_in_loss_and_grad:
            finite = not found_inf  # fp16 overflow is still skipped (the loss scaler shrinks)
        applied = finite and tr.optimizer.step_with_ready_grads()
    if applied:
        tr.scheduler.step(increment=global_batch)
        tr.state.skipped_in_a_row = 0
    else:
        tr.state.skipped_in_a_row += 1
        tr.state.skipped_total += 1
    tr.state.iteration += 1
    tr.state.consumed_samples += global_batch
    tr.state.consumed_tokens += global_batch * tr.cfg.model.seq_length
    tr.state.consumed_flops += flops
    return {
        **means,
        **grad_values,
        "grad_norm": grad_norm,
        "lr": tr.optimizer.param_groups[0]["lr"],
        "loss_scale": tr.optimizer.get_loss_scale().item(),
        "global_batch_size": global_batch,
        "skipped": 0.0 if applied else 1.0,
        "skipped_steps": tr.state.skipped_total,
        "step_flops": flops,
        "consumed_flops": tr.state.consumed_flops,
    }


def check_non_finite(tr: Trainer, values: dict[str, float]) -> None:
    """Applies --nan-policy to a step's result: report a skipped step, or raise TrainingStopped."""
    if values["skipped"] and tr.cfg.precision.fp16 and math.isfinite(values["lm_loss"]):
        return  # an fp16 overflow: the loss scaler handles it
    t = tr.cfg.training
    if values["skipped"] and (t.nan_policy == "stop" or tr.state.skipped_in_a_row > t.max_skipped_steps):
        limit = f"raise --max-skipped-steps ({t.max_skipped_steps})"
        more = "use --nan-policy skip" if t.nan_policy == "stop" else limit
        raise TrainingStopped(
            f"iteration {tr.state.iteration}: non-finite loss {values['lm_loss']} or grad norm "
            f"{values['grad_norm']} ({tr.state.skipped_in_a_row} in a row); the step was not applied, the weights "
            f"are unchanged. Lower --lr, check the data, or {more}."
        )
    if values["skipped"]:
        tr.metrics.print(f"iter {tr.state.iteration}: non-finite loss or gradient; step skipped")


def evaluate(tr: Trainer) -> dict[str, dict[str, float]]:
    """Mean per-token validation losses of each validation set over --eval-iters batches of
    --eval-global-batch-size samples (the same batches at every evaluation, so the numbers are comparable over
    the run)."""
    cfg = tr.cfg
    dp_size = parallel_state.get_data_parallel_world_size()
    num_microbatches = cfg.training.eval_global_batch_size // (cfg.training.micro_batch_size * dp_size)
    for chunk in tr.model:
        chunk.eval()
    losses = {}
    for name in tr.recipe.validation_sets():
        data = [tr.recipe.valid_batches(name) for _ in tr.model]
        total = torch.zeros(len(tr.recipe.losses), 2, dtype=torch.float64)
        with torch.no_grad():
            for _ in range(cfg.logging.eval_iters):
                reports = _run_microbatches(tr, data, num_microbatches, forward_only=True)
                total += _global_sums(tr, reports).cpu()
        losses[name] = _means(tr, total)
    for chunk in tr.model:
        chunk.train()
    return losses


def save_checkpoint(tr: Trainer) -> None:
    ck = tr.cfg.checkpoint
    assert ck.save is not None  # called only with --save
    extra = {
        "train_state": asdict(tr.state),
        "data_state": tr.recipe.data_state(tr.state.consumed_samples),
        "recipe_state": tr.recipe.state_dict(),
        "config": tr.cfg.to_dict(),
        "vocab_size": tr.tokenizer.vocab_size,  # the universal format keeps only these embedding rows
    }
    with tr.telemetry.saving(tr.state.iteration):
        start = time.perf_counter()
        finish_saves(tr)  # one save in flight at a time: the next one clears unfinished folders
        path = checkpointing.save(
            ck.save,
            tr.state.iteration,
            tr.model,
            tr.optimizer,
            tr.scheduler,
            extra,
            ck.keep_last_checkpoints,
            tr.async_saves,
            ck.save_retain_interval,
        )
        seconds = time.perf_counter() - start
        tr.metrics.exclude(seconds)
        done = "handed to the background writer" if tr.async_saves else "saved"
        tr.metrics.print(f"{done} checkpoint {path} in {seconds:.1f}s")


def finish_saves(tr: Trainer, blocking: bool = True) -> None:
    """Publishes background saves that are complete (all of them when blocking). Collective."""
    if tr.async_saves is not None:
        tr.async_saves.maybe_finalize_async_calls(blocking=blocking)


def _finished(tr: Trainer) -> bool:
    t = tr.cfg.training
    if t.train_samples is not None:
        return tr.state.consumed_samples >= t.train_samples
    return tr.state.iteration >= (t.train_iters or 0)


def _stop_now(tr: Trainer) -> bool:
    """Exit interval or duration reached, or a signal seen, on any rank (all ranks agree)."""
    limit = tr.cfg.training.exit_duration_in_mins
    out_of_time = limit is not None and time.monotonic() - tr.started > 60 * limit
    flag = torch.tensor([1.0 if tr.stop_requested or out_of_time else 0.0], device=tr.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    exit_interval = tr.cfg.training.exit_interval
    return bool(flag.item()) or bool(exit_interval and tr.state.iteration % exit_interval == 0)


def train(tr: Trainer) -> TrainState:
    """Runs until the configured length, an exit interval or a signal; evaluates, logs and saves on the way."""
    cfg = tr.cfg
    total_iters = cfg.training.train_iters
    tr.metrics.print(
        f"training {tr.recipe.num_parameters():,} parameters ({cfg.variant.model_variant}) from iteration "
        f"{tr.state.iteration} ({tr.state.consumed_samples} samples consumed)"
    )
    tr.metrics.start_window()
    while not _finished(tr):
        with tr.telemetry.step(tr.state.iteration):
            values = train_step(tr)
        check_non_finite(tr, values)
        tr.metrics.count(int(values["global_batch_size"]) * cfg.model.seq_length, values["step_flops"])
        it = tr.state.iteration
        if it % cfg.logging.log_interval == 0:
            tr.telemetry.log(it, total_iters, values)
        if it % cfg.logging.eval_interval == 0:
            _log_eval(tr)
        finish_saves(tr, blocking=False)
        save_due = cfg.checkpoint.save_interval and it % cfg.checkpoint.save_interval == 0
        stop = _stop_now(tr)
        if cfg.checkpoint.save and (save_due or stop):
            save_checkpoint(tr)
        if stop:
            finish_saves(tr)
            tr.metrics.print(f"exiting at iteration {it} (exit interval, duration or signal)")
            return tr.state
    if cfg.logging.eval_interval and tr.state.iteration % cfg.logging.eval_interval != 0:
        _log_eval(tr)
    if cfg.checkpoint.save and not (
        cfg.checkpoint.save_interval and tr.state.iteration % cfg.checkpoint.save_interval == 0
    ):
        save_checkpoint(tr)
    finish_saves(tr)
    return tr.state


def _log_eval(tr: Trainer) -> None:
    with tr.telemetry.evaluation(tr.state.iteration):
        start = time.perf_counter()
        results = evaluate(tr)
        tr.metrics.exclude(time.perf_counter() - start)  # keep evaluation out of the training throughput
    for name, values in results.items():
        values.update(tr.recipe.eval_metrics(values))
        loss, ppl = values["lm_loss"], math.exp(min(values["lm_loss"], 20))
        others = "".join(f" | {k} {v:.4f}" for k, v in values.items() if k != "lm_loss")
        tr.metrics.print(f"validation at iter {tr.state.iteration} | {name} | loss {loss:.4f} | ppl {ppl:.3f}{others}")
        tr.metrics.scalars(tr.state.iteration, {**values, "ppl": ppl}, prefix=f"valid/{name}/")


def setup(cfg: Config) -> Trainer:
    """Starts the process group, builds model, optimizer, schedule and data, and resumes from --load."""
    plat = platform.select(cfg.parallel.device, cfg.parallel.distributed_backend)
    cfg.check_folders()
    check_built(cfg, HAVE_TE and plat.device_type == "cuda")
    if cfg.training.deterministic_mode:  # before any kernel runs (cuBLAS reads its workspace setting once)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    world_size = distributed.discover().world_size
    cfg = deepspeed_config.apply(cfg, world_size)  # --deepspeed_config's JSON is read here, not when parsed
    cfg.resolve_batch(world_size)  # every size mistake surfaces before any collective
    telemetry.prepare(cfg)
    info = distributed.init_process_group(plat.backend, cfg.parallel.distributed_timeout_minutes)
    platform.setup_device(plat, info.local_rank)
    distributed.initialize_model_parallel(
        cfg.parallel.tensor_model_parallel_size,
        cfg.parallel.pipeline_model_parallel_size,
        cfg.virtual_pipeline_size,
    )
    model_parallel_cuda_manual_seed(cfg.training.seed)
    torch.manual_seed(cfg.training.seed + 100 * parallel_state.get_pipeline_model_parallel_rank())

    t = cfg.training
    init_batch_sizes(cfg, info.rank, parallel_state.get_data_parallel_world_size())

    tokenizer = tokenizer_of(cfg.data)
    recipe = build_recipe(cfg, plat, tokenizer)
    vpp = cfg.virtual_pipeline_size
    config = recipe.transformer_config()
    chunks = [recipe.build_model(config, vp_stage=i if vpp else None) for i in range(vpp or 1)]
    model = wrap_model(cfg, config, chunks)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync

    run_dir = cfg.logging.run_dir or cfg.checkpoint.save
    rank0 = info.rank == 0
    if rank0 and run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    metrics = telemetry.open_metrics(cfg, plat.device_type, info.rank, info.world_size, run_dir)
    if (note := startup_note(cfg)) is not None:
        metrics.print(note)
    state, extra = _resume(cfg, model, optimizer, scheduler, recipe, metrics.print)

    saved_data = extra.get("data_state") if extra else None
    note = recipe.build_data(run_length_samples(cfg), state.consumed_samples, saved_data)
    if note:
        metrics.print(note)
    train_data = [recipe.train_batches(state.consumed_samples) for _ in model]
    device = plat.current_device()
    tr = Trainer(
        cfg, plat, device, tokenizer, recipe, config, model, optimizer, scheduler, train_data, metrics,
        Telemetry(cfg, device, config, model, optimizer, metrics, info.rank), state,
    )  # fmt: skip
    if rank0 and run_dir:  # only once set up: a run that fails on its data or --load leaves the folder as it was
        cfg.to_json(Path(run_dir) / "config.json")
    if cfg.checkpoint.async_save and plat.device_type == "cuda":
        tr.async_saves = AsyncCallsQueue()
    elif cfg.checkpoint.async_save:
        metrics.print("--async-save: CPU runs save synchronously (a background writer would share the cores)")
    if t.exit_signal_handler:

        def request_stop(signum: int, frame: object) -> None:
            tr.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)
    return tr


def _resume(
    cfg: Config,
    model: list[DistributedDataParallel],
    optimizer: MegatronOptimizer,
    scheduler: ParamScheduler,
    recipe: Recipe,
    log: Callable[[str], None],
) -> tuple[TrainState, dict[str, Any] | None]:
    """Loads --load as the checkpoint flags say (the recipe's state too); returns the progress to continue from
    and the checkpoint's other entries (None when starting afresh, --finetune included)."""
    ck = cfg.checkpoint
    if not ck.load:
        return TrainState(), None
    fresh_optimizer = ck.finetune or ck.no_load_optim
    d = cfg.data
    tokenizer = f"--tokenizer-type {d.tokenizer_type}" + (
        f" --tokenizer-model {d.tokenizer_model}" if d.tokenizer_model else ""
    )
    vocabulary = checkpointing.Vocabulary(recipe.tokenizer.vocab_size, tokenizer, ck.resize_vocabulary)
    extra = checkpointing.load(
        ck.load, model, None if fresh_optimizer else optimizer, load_rng=not (ck.finetune or ck.no_load_rng),
        log=log, iteration=ck.ckpt_step, vocabulary=vocabulary,
    )  # fmt: skip
    if extra is None:
        if ck.finetune:
            raise ConfigError(f"--finetune: no checkpoint in --load {ck.load}")
        log(f"no checkpoint in --load {ck.load} yet: starting from iteration 0")
        return TrainState(), None
    if ck.universal_checkpoint and not universal.is_universal(extra["path"]):
        log(f"--universal-checkpoint: {extra['path']} is a regular checkpoint and loads as one")
    if fresh_optimizer:
        optimizer.reload_model_params()  # the fp32 master weights follow the loaded weights
    if ck.finetune:
        log(f"fine-tuning from the weights of {extra['path']}: iteration, optimizer, schedule and data position "
            "start afresh")  # fmt: skip
        return TrainState(), None
    variant = (extra.get("config") or {}).get("variant", {}).get("model_variant", "gpt")
    ours = cfg.variant.model_variant
    if variant != ours:
        raise ConfigError(f"--load {extra['path']} holds a --model-variant {variant} run, not {ours}: pass --finetune "
                          "to start from its weights")  # fmt: skip
    recipe.load_state_dict(extra.get("recipe_state") or {})
    state = TrainState(**extra["train_state"])
    log(f"resumed from {extra['path']} at iteration {state.iteration}")
    if extra.get("scheduler") is None:  # imported from DeepSpeed or Megatron-LM
        scheduler.step(state.consumed_samples)
        log(f"no LR schedule state in {extra['path']}: the command line's schedule at {state.consumed_samples} "
            f"samples:\n{scheduler.describe()}")  # fmt: skip
    else:
        log(resume_schedule(cfg, scheduler, optimizer, extra["scheduler"], state.consumed_samples))
    return state, extra


def resume_schedule(
    cfg: Config,
    scheduler: ParamScheduler,
    optimizer: MegatronOptimizer,
    saved_state: dict[str, Any],
    consumed_samples: int = 0,
) -> str:
    """Decides which schedule a resumed run follows, makes the optimizer use it, and says so.

    The checkpoint's schedule is followed unless the command line differs; a difference needs an explicit
    choice (--override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler), and --restart-lr-schedule
    starts the command line's schedule from position 0 here (rewarm, or a cooldown from this checkpoint).
    """
    sc = cfg.schedule
    saved = scheduler.saved_config(saved_state)
    differs = saved.diff(scheduler.config)
    if sc.restart_lr_schedule:
        scheduler.config = schedule_config(cfg, start_samples=consumed_samples)
        note = "restarting the LR schedule at this checkpoint"
    elif differs and sc.override_opt_param_scheduler:
        scheduler.load_state_dict(saved_state, keep_config=True)
        note = f"following the command line's schedule (differs from the checkpoint's in {', '.join(differs)})"
    elif differs and not sc.use_checkpoint_opt_param_scheduler:
        raise ConfigError(
            f"the LR schedule differs from the checkpoint's in {', '.join(differs)}: pass "
            "--override-opt_param-scheduler to follow the command line, --use-checkpoint-opt_param-scheduler to "
            "keep the checkpoint's, or --restart-lr-schedule to start the new schedule here"
        )
    else:
        scheduler.load_state_dict(saved_state)
        note = "following the checkpoint's schedule"
        if differs:
            note += f" (the command line's {', '.join(differs)} ignored)"
    # The optimizer's param groups came from the checkpoint with its peak/min LR; make them the followed ones.
    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = lr_range(cfg, group, scheduler.config.lr, scheduler.config.min_lr)
    scheduler.step(0)
    return f"{note}:\n{scheduler.describe()}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parse, set up, train; user mistakes end in one line and exit status 2."""
    platform.quiet_optional_dependency_warnings()
    try:
        cfg = parse_args(argv)
        tr = setup(cfg)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(tr)
    except (TrainingStopped, UserError) as e:  # e.g. a recipe's check before the first step
        sys.stderr.write(f"error: {e}\n")  # one write: ranks sharing a pipe cannot interleave within the line
        sys.stderr.flush()
        if isinstance(e, EveryRankStops):
            torch.distributed.barrier()
        return 1
    finally:
        if tr.async_saves is not None:
            tr.async_saves.close()  # waits for and publishes a save still being written
        tr.telemetry.close()
        distributed.destroy()
    return 0
