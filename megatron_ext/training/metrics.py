"""Metric lines for batch-job logs, tensorboard (and wandb) scalars, throughput and MFU."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from megatron_ext.resources import device_spec


def peak_tflops(device_type: str, override: float | None) -> float | None:
    """Peak TFLOP/s of this device, or None (MFU is then shown as n/a)."""
    if override is not None:
        return override
    if device_type != "cuda":
        return None
    device = device_spec(torch.cuda.get_device_name())  # the device table's dense bf16 peak
    return device.peak_tflops if device else None


def memory_gib(device_type: str) -> float:
    """Peak device memory (GPU) or resident memory of this process (CPU), in GiB."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class MetricsLogger:
    """Prints one line per log interval on rank 0 and mirrors every scalar to tensorboard and, given a wandb run
    (`--wandb-project`, megatron_ext/training/telemetry.py), to wandb under the same names."""

    def __init__(
        self,
        enabled: bool,
        world_size: int,
        device_type: str,
        peak: float | None,
        tensorboard_dir: str | None,
        log_file: Path | None,
        wandb_run: Any = None,
    ) -> None:
        self.enabled = enabled
        self.world_size = world_size
        self.device_type = device_type
        self.peak = peak
        self.writer: Any = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        self.log_file = log_file.open("a") if enabled and log_file else None
        self.wandb_run = wandb_run
        self._window_tokens = 0
        self._window_flops = 0.0
        self._window_steps = 0
        self._window_start = time.perf_counter()

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        if self.log_file:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def count(self, tokens: int, flops: float) -> None:
        """Adds a step's tokens and training FLOPs (all ranks; they may vary by step) to the current window."""
        self._window_tokens += tokens
        self._window_flops += flops
        self._window_steps += 1

    def start_window(self) -> None:
        """Starts the first log window when training starts (not when the logger was made, before the set-up)."""
        self._window_start = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Removes time spent outside training steps (evaluation, saving) from the current window."""
        self._window_start += seconds

    def step(self, iteration: int, total_iters: int | None, values: dict[str, float]) -> dict[str, float]:
        """Closes a log window: adds throughput figures, prints and records them; returns all values."""
        elapsed = time.perf_counter() - self._window_start
        tokens_per_s = self._window_tokens / max(elapsed, 1e-9)
        tflops = self._window_flops / max(elapsed, 1e-9) / 1e12 / self.world_size
        values = {
            **values,
            "step_time_s": elapsed / max(self._window_steps, 1),
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops,
            "memory_gib": memory_gib(self.device_type),
        }
        if self.peak:
            values["mfu"] = tflops / self.peak
        self._window_tokens, self._window_flops, self._window_steps = 0, 0.0, 0
        total = f"/{total_iters}" if total_iters else ""
        parts = [f"iter {iteration}{total}"]
        for key, fmt in (
            ("lm_loss", "loss {:.4f}"),
            ("lr", "lr {:.3e}"),
            ("grad_norm", "grad_norm {:.3f}"),
            ("params_norm", "params_norm {:.3f}"),
            ("num_zeros", "num_zeros {:.0f}"),
            ("loss_scale", "loss_scale {:.0f}"),
            ("global_batch_size", "batch {:.0f}"),
            ("tokens_per_s", "tokens/s {:.0f}"),
            ("tflops_per_device", "TFLOP/s/dev {:.2f}"),
            ("step_time_s", "step {:.3f}s"),
            ("memory_gib", "mem {:.2f}GiB"),
            ("skipped_steps", "skipped {:.0f}"),
            ("consumed_flops", "FLOPs {:.3e}"),
        ):
            if key in values and values[key] is not None and not (key == "loss_scale" and values[key] == 1.0):
                parts.append(fmt.format(values[key]))
        parts.append(f"MFU {100 * values['mfu']:.1f}%" if "mfu" in values else "MFU n/a")
        self.print(" | ".join(parts))
        self.scalars(iteration, values, prefix="train/")
        self._window_start = time.perf_counter()  # the next window starts after this line is written
        return values

    def scalars(self, iteration: int, values: dict[str, float], prefix: str) -> None:
        finite = {prefix + k: v for k, v in values.items() if v is not None and math.isfinite(v)}
        if self.writer is not None:
            for tag, value in finite.items():
                self.writer.add_scalar(tag, value, iteration)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(finite, step=iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.log_file:
            self.log_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
