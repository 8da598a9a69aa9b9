"""Bad inputs and faults that must end in one `error:` line naming the culprit and the fix, with nothing lost: the
--nan-policy advice, --load of what is not a checkpoint, full and read-only disks, and a failed run that leaves its
run folder as it was."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_ext.config import parse_args
from megatron_ext.training.loop import TrainingStopped, TrainState, check_non_finite


@pytest.mark.parametrize(
    ("flags", "advice"),
    [
        (["--nan-policy", "stop"], "use --nan-policy skip."),
        (["--max-skipped-steps", "2"], "raise --max-skipped-steps (2)."),
    ],
)
def test_nan_stop_advises_a_change_not_the_policy_in_effect(flags: list[str], advice: str) -> None:
    """Under skip, a run stopped by --max-skipped-steps was told to 'use --nan-policy skip', which it did."""
    tr = SimpleNamespace(cfg=parse_args(flags), state=TrainState(iteration=7, skipped_in_a_row=3))
    with pytest.raises(TrainingStopped) as e:
        check_non_finite(tr, {"skipped": 1.0, "lm_loss": float("nan"), "grad_norm": float("nan")})  # type: ignore[arg-type]
    assert str(e.value).startswith("iteration 7: non-finite loss nan or grad norm nan (3 in a row)")
    assert str(e.value).endswith(f"Lower --lr, check the data, or {advice}") and "\n" not in str(e.value)
