"""What a run reports beside its loss and throughput, as Megatron-LM's logging flags ask (`LoggingConfig`):
per-phase timers (megatron_ext/training/timers.py), memory, the parameter norm, zeros in the gradients, the
Adam moments' norms, a torch profiler trace of chosen steps, the logging level and wandb.

The loop talks to one `Telemetry` (a step, the optimizer phase, the gradients being ready, a log line, an
evaluation, a save); which flag does what is decided here, so the loop has no branch per flag.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import netrc
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import psutil
import torch
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import param_is_not_shared

from megatron_ext.config import Config, ConfigError
from megatron_ext.training.metrics import MetricsLogger, peak_tflops
from megatron_ext.training.timers import STEP_TIMERS, StepTimers

WANDB_SERVICE = "https://api.wandb.ai"


def prepare(cfg: Config) -> None:
    """What comes before anything is built: the logging level, and a wandb run that could not start."""
    lg = cfg.logging
    level = lg.logging_level
    if level is None and os.environ.get("MEGATRON_LOGGING_LEVEL"):
        text = os.environ["MEGATRON_LOGGING_LEVEL"]
        if not text.strip().isdigit():
            raise ConfigError(f"MEGATRON_LOGGING_LEVEL={text}: expected a number such as 20 (INFO) or 10 (DEBUG)")
        level = int(text)
    if level is not None:
        logging.basicConfig(level=level)
        logging.getLogger().setLevel(level)
    if lg.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "--wandb-project: the wandb client is not installed: pip install 'megatron_ext[wandb]' (or drop the flag)"
        )
    if lg.wandb_project and not (lg.wandb_save_dir or lg.run_dir or cfg.checkpoint.save):
        raise ConfigError("--wandb-project needs a folder for its run: give --wandb-save-dir (or --run-dir or --save)")


def open_metrics(cfg: Config, device_type: str, rank: int, world_size: int, run_dir: str | None) -> MetricsLogger:
    """The metrics logger of this rank (lines, tensorboard and wandb on rank 0 only)."""
    lg = cfg.logging
    wandb_run, note = start_wandb(cfg, run_dir) if rank == 0 and lg.wandb_project else (None, None)
    metrics = MetricsLogger(
        enabled=rank == 0,
        world_size=world_size,
        device_type=device_type,
        peak=peak_tflops(device_type, lg.peak_tflops),
        tensorboard_dir=lg.tensorboard_dir,
        log_file=Path(run_dir) / "train.log" if rank == 0 and run_dir else None,
        wandb_run=wandb_run,
    )
    if note:
        metrics.print(note)
    return metrics


def wandb_mode(service: str = WANDB_SERVICE, timeout: float = 3.0) -> tuple[Literal["online", "offline"], str]:
    """("online" or "offline", why): offline when the service cannot be reached (compute nodes) or no API key is
    set (WANDB_API_KEY, or `wandb login`'s netrc entry): the run is then written for `wandb sync`."""
    host = urlsplit(service).hostname or service
    port = urlsplit(service).port or 443
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return "offline", f"{host} cannot be reached"
    if os.environ.get("WANDB_API_KEY"):
        return "online", f"{host}"
    try:
        logged_in = netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return ("online", host) if logged_in else ("offline", "no API key (wandb login, or WANDB_API_KEY)")


def start_wandb(cfg: Config, run_dir: str | None) -> tuple[Any, str]:
    """A wandb run of this training run (rank 0), and the line that says where it goes."""
    import wandb

    lg = cfg.logging
    assert lg.wandb_save_dir or run_dir  # prepare() checked
    folder = Path(lg.wandb_save_dir or str(run_dir))  # wandb writes into its wandb/ there
    folder.mkdir(parents=True, exist_ok=True)
    given = os.environ.get("WANDB_MODE")  # read by wandb itself
    mode, why = (None, "WANDB_MODE") if given else wandb_mode(os.environ.get("WANDB_BASE_URL", WANDB_SERVICE))
    run = wandb.init(
        project=lg.wandb_project,
        entity=lg.wandb_entity,
        name=lg.wandb_exp_name,
        dir=str(folder),
        config=cfg.to_dict(),
        mode=mode,
    )
    if (given or mode) == "offline":
        return run, f"wandb: offline ({why}): upload later with `wandb sync {Path(run.dir).parent}`"
    return run, f"wandb: {given or mode} ({why}), {run.url or folder}"


def memory_scalars(device_type: str) -> dict[str, float]:
    """This process's memory: the device allocator's counters (GPU), else resident memory and its peak."""
    if device_type == "cpu":
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {"rss_bytes": psutil.Process().memory_info().rss, "max_rss_bytes": 1024 * peak_kib}
    stats = getattr(torch, device_type).memory_stats()
    return {
        "allocated_bytes": stats.get("allocated_bytes.all.current", 0),
        "max_allocated_bytes": stats.get("allocated_bytes.all.peak", 0),
        "reserved_bytes": stats.get("reserved_bytes.all.current", 0),
        "allocation_count": stats.get("allocation.all.current", 0),
    }


def _counted_once(param: torch.Tensor) -> bool:
    """A parameter (or its optimizer's main copy) counted on this rank: not a tied copy of another, not a
    tensor-parallel replica (norms on TP ranks and layernorm weights live on every TP rank)."""
    return param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param)


@torch.no_grad()
def params_norm(model: list[torch.nn.Module], device: torch.device) -> float:
    """L2 norm of all parameters of the model (every model-parallel rank's part once; data-parallel replicas
    are identical). Collective over the model-parallel group."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for chunk in model:
        for p in chunk.parameters():
            if _counted_once(p):
                total += p.detach().float().square().sum().to(total)
    torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return math.sqrt(total.item())


@torch.no_grad()
def optimizer_state_norms(optimizer: MegatronOptimizer, device: torch.device) -> dict[str, float]:
    """L2 norms and largest magnitudes of Adam's moments (exp_avg, exp_avg_sq) over every parameter once, on any
    layout: each (sub-)optimizer's sums are reduced over its gradient-statistics group (the model-parallel
    ranks, all ranks with the distributed optimizer), as megatron-core reduces the gradient norm. Collective."""
    squares = torch.zeros(3, dtype=torch.float64, device=device)  # sum m^2, sum v^2, sum v (= sum sqrt(v)^2)
    maxima = torch.zeros(2, dtype=torch.float64, device=device)  # max |m|, max v
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        sub_squares, sub_maxima = torch.zeros_like(squares), torch.zeros_like(maxima)
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state.get(p, {})
                if "exp_avg" not in state or state["exp_avg"].numel() == 0 or not _counted_once(p):
                    continue
                m, v = state["exp_avg"].float(), state["exp_avg_sq"].float()
                sub_squares += torch.stack([m.square().sum(), v.square().sum(), v.sum()]).to(sub_squares)
                sub_maxima = torch.maximum(sub_maxima, torch.stack([m.abs().max(), v.max()]).to(sub_maxima))
        stats_group = sub.get_grad_stats_parallel_group()
        torch.distributed.all_reduce(sub_squares, group=stats_group)
        torch.distributed.all_reduce(sub_maxima, op=torch.distributed.ReduceOp.MAX, group=stats_group)
        squares += sub_squares
        maxima = torch.maximum(maxima, sub_maxima)
    m2, v2, v1 = squares.sqrt().tolist()
    m_max, v_max = maxima.tolist()
    return {
        "momentum_l2": m2,
        "variance_l2": v2,
        "variance_sqrt_l2": v1,
        "momentum_abs_max": m_max,
        "variance_abs_max": v_max,
    }


class StepProfiler:
    """A torch profiler trace of the steps that start at iterations [start, end) (Megatron-LM's --profile-step-
    start/-end), written as a Chrome/Perfetto trace into `folder`. Each loop iteration is marked
    `ProfilerStep#<iteration>` from its step's start to the next one's (its evaluation and save included), as
    torch.profiler's own step marks are."""

    def __init__(self, start: int, end: int, folder: Path, rank: int, device_type: str, log: Callable) -> None:
        self.start, self.end, self.folder, self.rank, self.log = start, end, folder, rank, log
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device_type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        elif device_type == "xpu":
            self.activities.append(torch.profiler.ProfilerActivity.XPU)
        self.profiler: torch.profiler.profile | None = None
        self.mark: Any = None
        self.steps: list[int] = []

    def before(self, iteration: int) -> None:
        self._close_mark()
        if not self.start <= iteration < self.end:
            return
        if self.profiler is None:
            self.profiler = torch.profiler.profile(activities=self.activities, record_shapes=True)
            self.profiler.start()
        self.mark = torch.profiler.record_function(f"ProfilerStep#{iteration}")
        self.mark.__enter__()
        self.steps.append(iteration)

    def after(self, iteration: int) -> None:
        """`iteration`: the count of steps done, this one included."""
        if iteration >= self.end:
            self.finish()

    def _close_mark(self) -> None:
        if self.mark is not None:
            self.mark.__exit__(None, None, None)
            self.mark = None

    def finish(self) -> None:
        """Stops and writes the trace (also when the run ends before --profile-step-end)."""
        self._close_mark()
        if self.profiler is None:
            return
        self.profiler.stop()
        first, last = self.steps[0], self.steps[-1]
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"profile_rank{self.rank}_iter{first + 1}-{last + 1}.pt.trace.json"
        self.profiler.export_chrome_trace(str(path))
        self.profiler = None
        self.log(
            f"profiler: the steps logged as iter {first + 1}-{last + 1} on rank {self.rank} are in {path}: open it "
            "at https://ui.perfetto.dev (or chrome://tracing)"
        )


class Telemetry:
    """The one object the loop reports to; `LoggingConfig`'s flags decide what each call records."""

    def __init__(
        self,
        cfg: Config,
        device: torch.device,
        config: TransformerConfig,
        model: list[Any],
        optimizer: MegatronOptimizer,
        metrics: MetricsLogger,
        rank: int,
    ) -> None:
        lg = self.cfg = cfg.logging
        self.device, self.config, self.model, self.optimizer, self.metrics = device, config, model, optimizer, metrics
        self.timers = StepTimers(lg.timing_log_level, lg.timing_log_option)
        # megatron-core times its own phases through its configs' timers (forward-backward, all-grads-sync, ...)
        for c in [config, *(sub.config for sub in getattr(optimizer, "chained_optimizers", [optimizer]))]:
            c.timers = self.timers
            c.barrier_with_L1_time = lg.barrier_with_level_1_timing
        self.profiler: StepProfiler | None = None
        if lg.profile and rank in lg.profile_ranks:
            folder = Path(lg.tensorboard_dir or str(lg.run_dir))
            log = metrics.print if rank == 0 else lambda line: print(line, flush=True)
            self.profiler = StepProfiler(lg.profile_step_start, lg.profile_step_end, folder, rank, device.type, log)
        self.steps = 0  # steps since the last log line
        self.count_zeros = False  # this step is logged and --log-num-zeros-in-grad

    @contextlib.contextmanager
    def step(self, iteration: int) -> Iterator[None]:
        """Around one training step that starts at `iteration` (steps done so far)."""
        self.count_zeros = self.cfg.log_num_zeros_in_grad and (iteration + 1) % self.cfg.log_interval == 0
        if self.profiler is not None:
            start = time.perf_counter()
            self.profiler.before(iteration)
            self.metrics.exclude(time.perf_counter() - start)
        yield
        self.steps += 1
        if self.profiler is not None:
            start = time.perf_counter()
            self.profiler.after(iteration + 1)
            self.metrics.exclude(time.perf_counter() - start)  # writing the trace is not part of the step

    def optimizer_phase(self) -> contextlib.AbstractContextManager:
        """Around the optimizer's part of a step (Megatron-LM's level-1 'optimizer' timer)."""
        return self.timers.phase("optimizer", 1, barrier=self.cfg.barrier_with_level_1_timing)

    def grads_ready(self) -> dict[str, float]:
        """Called once the gradients are final (unscaled, reduced, clipped): the values to log about them."""
        if not self.count_zeros:
            return {}
        with self.timers.phase("optimizer-count-zeros", 1):
            return {"num_zeros": float(self.optimizer.count_zeros())}

    def log(self, iteration: int, total_iters: int | None, values: dict[str, float]) -> None:
        """The log line of `iteration` and everything the flags add to it. Collective (all ranks call it)."""
        lg = self.cfg
        start = time.perf_counter()  # what is measured here is kept out of the step time
        if lg.log_params_norm:
            values = {**values, "params_norm": params_norm(self.model, self.device)}
        if lg.log_world_size_to_tensorboard:
            values = {**values, "world_size": torch.distributed.get_world_size()}
        self.metrics.exclude(time.perf_counter() - start)
        self.metrics.step(iteration, total_iters, values)
        start = time.perf_counter()
        if lg.log_memory_to_tensorboard:
            self.metrics.scalars(iteration, memory_scalars(self.device.type), prefix="memory/")
        if lg.log_optimizer_states_to_tensorboard:
            self.metrics.scalars(iteration, optimizer_state_norms(self.optimizer, self.device), prefix="optimizer/")
        if lg.timing_log_level > 0:
            self._report(iteration, STEP_TIMERS, max(self.steps, 1))
        self.steps = 0
        self.metrics.exclude(time.perf_counter() - start)

    def _report(self, iteration: int, names: tuple[str, ...], steps: int) -> None:
        text, times = self.timers.report(names, steps)
        if text:
            self.metrics.print(text)
        if self.cfg.log_timers_to_tensorboard:
            self.metrics.scalars(iteration, {f"{name}-time": t for name, t in times.items()}, prefix="timers/")

    @contextlib.contextmanager
    def evaluation(self, iteration: int) -> Iterator[None]:
        """Around an evaluation: timed as a whole ('evaluate'), its forward passes not counted as training
        phases (megatron-core's timers are taken off its config meanwhile, as Megatron-LM does)."""
        self.config.timers = None
        try:
            with self.timers.phase("evaluate", 0):
                yield
        finally:
            self.config.timers = self.timers
        self._report(iteration, ("evaluate",), 1)

    @contextlib.contextmanager
    def saving(self, iteration: int) -> Iterator[None]:
        """Around a checkpoint save ('save-checkpoint')."""
        with self.timers.phase("save-checkpoint", 0):
            yield
        self._report(iteration, ("save-checkpoint",), 1)

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.finish()
        self.metrics.close()
