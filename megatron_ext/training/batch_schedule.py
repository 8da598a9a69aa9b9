"""The global batch size over the run: constant, megatron-core's ramp-up, or --step-batch-size-schedule's steps.

megatron-core keeps the number of micro-batches in one global calculator (read by the loop through
`get_num_microbatches` / `get_current_global_batch_size`); a step schedule is a calculator of its own put in its
place, so the loop, the LR schedule (advanced by the samples of each step) and the data position (in samples) follow
it unchanged, and a resumed run picks the step of its consumed samples.
"""

from __future__ import annotations

from megatron.core import num_microbatches_calculator as calculators
from megatron.core.num_microbatches_calculator import NumMicroBatchesCalculator, init_num_microbatches_calculator

from megatron_ext.config import Config


class StepBatchSizeCalculator(NumMicroBatchesCalculator):
    """Global batch size `batch` from `tokens` consumed tokens on, for each (tokens, batch) step."""

    def __init__(self, steps: list[tuple[int, int]], seq_length: int, micro_batch_size: int, dp_size: int) -> None:
        self.steps, self.seq_length, self.micro_batch_size = steps, seq_length, micro_batch_size
        self.per_step = micro_batch_size * dp_size
        self.update(0, consistency_check=False)

    def update(self, consumed_samples: int, consistency_check: bool, verbose: bool = False) -> None:
        tokens = consumed_samples * self.seq_length
        batch = next(b for start, b in reversed(self.steps) if tokens >= start)
        self.current_global_batch_size = self.current_running_global_batch_size = batch
        self.num_micro_batches = batch // self.per_step


def init_batch_sizes(cfg: Config, rank: int, dp_size: int) -> None:
    """Sets up megatron-core's micro-batch calculator for this run's batch-size schedule."""
    t = cfg.training
    calculators.destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(rank, t.rampup_batch_size, t.global_batch_size, t.micro_batch_size, dp_size)
    if t.step_batch_size_schedule is not None:
        steps = StepBatchSizeCalculator(t.batch_size_steps(), cfg.model.seq_length, t.micro_batch_size, dp_size)
        calculators._GLOBAL_NUM_MICROBATCHES_CALCULATOR = steps  # megatron-core's one calculator, no setter
