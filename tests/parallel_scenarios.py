"""Runs training scenarios in one process group and writes their per-step losses as JSON (rank 0).

Launched by tests/test_parallel.py, once with 1 process (the reference) and once under torchrun with 2
(tensor, pipeline, data, sequence parallel, distributed optimizer, interleaving, NaN injection), so the costly
start-up (imports, process group) is paid twice rather than once per scenario.

usage: parallel_scenarios.py DATA_PREFIX OUT_JSON SCENARIO [SCENARIO ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_ext.platform import quiet_optional_dependency_warnings

quiet_optional_dependency_warnings()

import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megatron_ext.config import parse_args  # noqa: E402
from megatron_ext.models.full_weights import full_weights_single_rank, load_full_weights  # noqa: E402
from megatron_ext.training.loop import TrainingStopped, check_non_finite, setup, train_step  # noqa: E402

STEPS = 5
# A small Llama-style model, dropout off so that layouts can be compared exactly.
BASE = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --seq-length 64 "
    "--swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
    "--untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0 --lr 4e-3 "
    "--lr-decay-style constant --micro-batch-size 2 --global-batch-size 8 --eval-iters 0 --log-interval 1000 "
    "--make-vocab-size-divisible-by 1"
).split()

TIED = ["--no-untie-embeddings-and-output-weights"]
# name -> (flags, the single-process scenario whose initial weights it starts from)
SCENARIOS: dict[str, tuple[list[str], str]] = {
    "reference": ([], "reference"),
    "reference_tied": (TIED, "reference_tied"),
    "tp2": (["--tensor-model-parallel-size", "2"], "reference"),
    "tp2_sp": (["--tensor-model-parallel-size", "2", "--sequence-parallel"], "reference"),
    "pp2": (["--pipeline-model-parallel-size", "2"], "reference"),
    "pp2_tied": (["--pipeline-model-parallel-size", "2", *TIED], "reference_tied"),
    "pp2_interleaved": (
        ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
        "reference",
    ),
    "dp2": ([], "reference"),
    "dp2_distopt": (["--use-distributed-optimizer"], "reference"),
    "dp2_distopt_overlap": (["--use-distributed-optimizer", "--overlap-grad-reduce"], "reference"),
    "recompute": (["--recompute-activations"], "reference"),
    "recompute_selective": (["--recompute-granularity", "selective"], "reference"),
    "recompute_block": (["--checkpoint-activations", "--activations-checkpoint-method", "block"], "reference"),
    "pp2_uneven": (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"], "reference"),
    "bf16": (["--bf16"], "reference"),
    "fp16": (["--fp16", "--initial-loss-scale", "32"], "reference"),
}


def _params(tr: object) -> list[torch.Tensor]:
    return [p.detach().clone() for chunk in tr.model for p in chunk.parameters()]  # type: ignore[attr-defined]


def _layers(tr: object) -> int:
    """Transformer layers on this rank (the first pipeline stage on rank 0)."""
    names = [n for chunk in tr.model for n, _ in chunk.named_parameters()]  # type: ignore[attr-defined]
    return len({n.split("decoder.layers.")[1].split(".")[0] for n in names if "decoder.layers." in n})


def run(name: str, prefix: str, workdir: Path) -> dict[str, object]:
    flags, start_from = SCENARIOS[name.removesuffix("_nan").removesuffix("_nanstop")]
    argv = [*BASE, *flags, "--data-path", prefix, "--data-cache-path", str(workdir / "cache"), "--train-iters", "5"]
    if name.endswith("_nanstop"):
        argv += ["--nan-policy", "stop"]
    tr = setup(parse_args(argv))
    # Layouts draw different initial weights; every scenario starts from its reference's, cut to its layout.
    init = workdir / f"init_{start_from}.pt"
    if name == start_from:
        torch.save(full_weights_single_rank(tr.model), init)
    else:
        load_full_weights(tr.model, torch.load(init))
        tr.optimizer.reload_model_params()
    result: dict[str, object] = {"losses": [], "grad_norms": [], "layers": _layers(tr)}
    try:
        for step in range(STEPS):
            hook = None
            if name.endswith(("_nan", "_nanstop")) and step == 2:
                # Poison this rank's output on the last stage: the global loss and gradient become NaN.
                last = tr.model[-1].module
                if getattr(last, "post_process", False) and torch.distributed.get_rank() == 0:
                    hook = last.output_layer.register_forward_hook(lambda m, i, o: (o[0] * float("nan"), o[1]))
                before = _params(tr)
            try:
                values = train_step(tr)
                check_non_finite(tr, values)
            finally:
                if hook is not None:
                    hook.remove()
            if name.endswith("_nan") and step == 2:
                after = _params(tr)
                result["unchanged_by_nan_step"] = all(torch.equal(a, b) for a, b in zip(before, after))
                result["skipped_step"] = values["skipped"]
            result["losses"].append(values["lm_loss"])  # type: ignore[union-attr]
            result["grad_norms"].append(values["grad_norm"])  # type: ignore[union-attr]
    except TrainingStopped:
        result["stopped_at"] = tr.state.iteration
        result["weights_finite"] = all(bool(torch.isfinite(p).all()) for p in _params(tr))
    parallel_state.destroy_model_parallel()
    return result


def main() -> None:
    prefix, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    results = {name: run(name, prefix, Path(out).parent) for name in names}
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
