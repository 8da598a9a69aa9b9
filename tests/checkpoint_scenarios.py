"""Resume and reshard scenarios in one process group; writes per-step losses as JSON (rank 0).

Launched by tests/test_universal.py once with 1 process and once under torchrun with 2, so the start-up cost is
paid twice. All runs train the same model for STEPS steps on the same data:

* `reference` (1 process): steps 1..STEPS, saving at SAVE_AT; then writes the universal form of that checkpoint.
* `resume` (1 process): --load of the reference checkpoint, steps SAVE_AT+1..STEPS (exact resume at (1,1,1)).
* `<layout>` (tp2, pp2, dp2_distopt, or univ1 for one process): --load of the universal folder in that layout
  (reshard), steps SAVE_AT+1..STEPS, saving at SAVE_AT+1; then `<layout>_resume`: --load of that save in the same
  layout, steps SAVE_AT+2..STEPS (exact resume in the layout).
* `<layout>_no_moments`: as `<layout>` with --no-load-optim (a control: the moments matter).
* `resharded_<layout>`: --load of the checkpoint that `from-universal` wrote for that layout (by the test, between
  the launches), steps SAVE_AT+1..STEPS: the same curve as `<layout>`.
* `async` / `async_resume`: the reference run saving through megatron-core's background writer (--async-save: on
  a machine with a GPU the runs use it and this is the GPU test of --async-save), then a resume from that
  checkpoint.

usage: checkpoint_scenarios.py DATA_PREFIX WORKDIR OUT_JSON SCENARIO [SCENARIO ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_ext.platform import quiet_optional_dependency_warnings

quiet_optional_dependency_warnings()

import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue  # noqa: E402

from megatron_ext.config import parse_args  # noqa: E402
from megatron_ext.training.loop import finish_saves, save_checkpoint, setup, train_step  # noqa: E402

STEPS, SAVE_AT = 6, 3
BASE = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
    "--seq-length 64 --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
    "--untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0 --lr 4e-3 "
    "--lr-decay-style constant --micro-batch-size 2 --global-batch-size 8 --eval-iters 0 --log-interval 1000 "
    f"--make-vocab-size-divisible-by 1 --train-iters {STEPS}"
).split()
LAYOUTS = {
    "univ1": [],
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "dp2_distopt": ["--use-distributed-optimizer"],
}


def _run(argv: list[str], save_at: int | None = None, background: Path | None = None) -> list[float]:
    """Steps to STEPS (saving at `save_at`); with `background`, saves go through the async writer (--async-save,
    which on a GPU sets it up itself and on CPU saves synchronously, so the test hands CPU runs the same writer),
    and a checkpoint visible before its finalization is recorded as a failure."""
    tr = setup(parse_args([*argv, "--async-save"] if background is not None else argv))
    if background is not None and tr.async_saves is None:
        tr.async_saves = AsyncCallsQueue()
    losses = []
    while tr.state.iteration < STEPS:
        losses.append(train_step(tr)["lm_loss"])
        finish_saves(tr, blocking=False)
        if tr.state.iteration == save_at:
            save_checkpoint(tr)
            if background is not None and (background / "latest_checkpointed_iteration.txt").exists():
                losses.append(float("nan"))  # published before the writer was finalized
    finish_saves(tr)
    parallel_state.destroy_model_parallel()
    return losses


def run(name: str, common: list[str], work: Path) -> list[float]:
    if name == "reference":
        losses = _run([*common, "--save", str(work / "reference")], save_at=SAVE_AT)
        if torch.distributed.get_rank() == 0:
            from megatron_ext.convert.universal import to_universal

            to_universal(work / "reference", work / "universal", SAVE_AT, progress=False)
        torch.distributed.barrier()
        return losses
    if name == "resume":
        return _run([*common, "--load", str(work / "reference")])
    if name == "async":
        return _run([*common, "--save", str(work / "async")], save_at=SAVE_AT, background=work / "async")
    if name == "async_resume":
        return _run([*common, "--load", str(work / "async")])
    if name.startswith("resharded_"):  # written by `convert_checkpoint.py from-universal` for that layout
        return _run([*common, *LAYOUTS[name.removeprefix("resharded_")], "--load", str(work / name)])
    layout = name.removesuffix("_resume").removesuffix("_no_moments")
    flags = [*common, *LAYOUTS[layout]]
    if name.endswith("_resume"):
        return _run([*flags, "--load", str(work / layout)])
    if name.endswith("_no_moments"):
        return _run([*flags, "--load", str(work / "universal"), "--no-load-optim"])
    return _run([*flags, "--load", str(work / "universal"), "--save", str(work / layout)], save_at=SAVE_AT + 1)


def main() -> None:
    prefix, work, out, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
    common = [*BASE, "--data-path", prefix, "--data-cache-path", str(work / "cache")]
    results: dict[str, object] = {name: run(name, common, work) for name in names}
    results["settings"] = {"save_at": SAVE_AT, "base": BASE}
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
