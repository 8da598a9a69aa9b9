"""Per-phase timers of the training step (`--timing-log-level`), reported as Megatron-LM reports them.

megatron-core times its own phases when its configs carry a timers object (`TransformerConfig.timers`: the
forward-backward schedule, forward and backward compute, the gradient all-reduce in finalize_model_grads;
`OptimizerConfig.timers`: the optimizer's inner phases), so the object is megatron-core's `Timers`, given the
phases it does not see: reading a micro-batch, the whole optimizer step, a checkpoint save, an evaluation.
A timer above the chosen level is megatron-core's do-nothing timer: level 0 times nothing inside a step and
never synchronises the device (level 1 and 2 timers synchronise it at their start and stop, as Megatron-LM's).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from megatron.core.timers import Timers

# The step's phases in Megatron-LM's order (its training_log's timers_to_log), then ours: every rank asks for
# the same names when they are gathered; the ones no rank ran are left out of the report.
STEP_TIMERS = (
    "forward-backward",
    "forward-compute",
    "backward-compute",
    "batch-generator",
    "forward-recv",
    "forward-send",
    "backward-recv",
    "backward-send",
    "forward-send-forward-recv",
    "forward-send-backward-recv",
    "backward-send-forward-recv",
    "backward-send-backward-recv",
    "forward-backward-send-forward-backward-recv",
    "layernorm-grads-all-reduce",
    "embedding-grads-all-reduce",
    "all-grads-sync",
    "params-all-gather",
    "optimizer-copy-to-main-grad",
    "optimizer-unscale-and-check-inf",
    "optimizer-clip-main-grad",
    "optimizer-count-zeros",
    "optimizer-inner-step",
    "optimizer-copy-main-to-model-params",
    "optimizer",
)
# Timed where they happen (level 0: they are rare) and reported right after, as Megatron-LM does.
EVENT_TIMERS = ("save-checkpoint", "evaluate")


class StepTimers(Timers):
    """megatron-core's Timers plus a context manager per phase and the min/max report of a log window."""

    def __init__(self, level: int, option: str = "minmax") -> None:
        super().__init__(level, option)

    @contextlib.contextmanager
    def phase(self, name: str, level: int, barrier: bool = False) -> Iterator[None]:
        timer = self(name, log_level=level)
        timer.start(barrier=barrier)
        try:
            yield
        finally:
            timer.stop()

    def report(self, names: tuple[str, ...], steps: int) -> tuple[str | None, dict[str, float]]:
        """(the printed block, or None when nothing was timed; the max across ranks of each timer in seconds per
        step) for `names`, then resets them. Collective: every rank calls it with the same names."""
        with warnings.catch_warnings():  # megatron-core gathers with a torch call torch now calls deprecated
            warnings.filterwarnings("ignore", ".*all_gather_into_tensor.* is deprecated", FutureWarning)
            text = self.get_all_timers_string(list(names), normalizer=steps, reset=False)
            # megatron-core's own reduction (Timers.write, which writes to a fixed tag, reads it the same way)
            times = self._get_global_min_max_time(list(names), reset=True, barrier=False, normalizer=steps)
        return text, {name: high for name, (_, high) in times.items()}


def timed(timers: StepTimers | None, name: str, level: int) -> contextlib.AbstractContextManager:
    """`timers.phase(name, level)`, or nothing where no timers are set (evaluation runs without them)."""
    return contextlib.nullcontext() if timers is None else timers.phase(name, level)
