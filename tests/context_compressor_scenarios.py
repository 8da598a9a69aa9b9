"""Context-compressor runs in one process group (tests/test_context_compressor.py launches it once under torchrun
with 2 processes); writes what each scenario measured as JSON (rank 0).

* `lm`: a tiny Llama-style LM trained on the n-gram corpus, saved at SAVE_AT (the frozen LM of the others); `lm2`
  another one (another seed).
* `dp2`: the compressor (stage pt, window mode) at TP=1, DP=2 for STEPS steps, saving at SAVE_AT: per-step losses,
  whether every LM tensor is bit-identical after training, whether an LM parameter is in the optimizer.
* `dp2_resume`: --load of that checkpoint, steps SAVE_AT+1..STEPS.
* `tp2`: as `dp2` at TP=2 (DP=1) from the same LM: the same losses.
* `other_lm`: resuming `dp2`'s checkpoint with `lm2`: the error line.
* `r1`: the encoder with all the LM's layers: its hidden states at every position (ratio 1) against the LM's own
  (stage pt documents read from the indexed n-gram corpus).
* `ft`: stage ft on prompt/context/answer records, then one evaluation (the reported losses and gaps closed).

usage: context_compressor_scenarios.py DATA_PREFIX WORKDIR OUT_JSON SCENARIO [SCENARIO ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from megatron_ext.platform import quiet_optional_dependency_warnings

quiet_optional_dependency_warnings()

import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megatron_ext.cli import UserError  # noqa: E402
from megatron_ext.config import parse_args  # noqa: E402
from megatron_ext.models.context_compressor import positions, soft_tokens  # noqa: E402
from megatron_ext.training import loop  # noqa: E402

STEPS, SAVE_AT = 4, 2
COMMON = "--hidden-dropout 0 --attention-dropout 0 --lr 1e-3 --log-interval 1 --seq-length 64".split()
LM = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --normalization RMSNorm --swiglu "
    "--position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights --micro-batch-size 2 "
    "--eval-iters 0"
).split()
COMPRESSOR = (
    "--model-variant context-compressor --encoder-num-layers 1 --comp_candidates 1 2 4 --window 8 "
    "--encoder_max_length 16 --max_length 64 --micro-batch-size 1 --global-batch-size 4 --eval-iters 1 "
    "--eval-interval 1000"
).split()


def run(argv: list[str], steps: int, **hooks: Any) -> dict[str, Any]:
    """Sets up a run, trains `steps` steps (or to its end), returns per-step losses and grad norms."""
    tr = loop.setup(parse_args([*COMMON, *argv]))
    found: dict[str, Any] = {"loss": [], "grad_norm": []}
    if "before" in hooks:
        hooks["before"](tr, found)
    for _ in range(steps):
        values = loop.train_step(tr)
        found["loss"].append(values["lm_loss"])
        found["grad_norm"].append(values["grad_norm"])
        if tr.cfg.checkpoint.save and tr.state.iteration == SAVE_AT:
            loop.save_checkpoint(tr)
    if "after" in hooks:
        hooks["after"](tr, found)
    tr.metrics.close()
    parallel_state.destroy_model_parallel()
    return found


def lm_frozen(tr: loop.Trainer, found: dict[str, Any]) -> None:
    lm = tr.recipe.lm  # type: ignore[attr-defined]  # the context compressor's recipe
    if "lm_before" not in found:
        found["lm_before"] = {k: v.clone() for k, v in lm.state_dict().items() if torch.is_tensor(v)}
        return
    before = found.pop("lm_before")
    after = {k: v for k, v in lm.state_dict().items() if torch.is_tensor(v)}
    found["lm_identical"] = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    in_optimizer = {id(p) for group in tr.optimizer.param_groups for p in group["params"]}
    found["lm_in_optimizer"] = any(id(p) in in_optimizer for p in lm.parameters())
    found["lm_requires_grad"] = any(p.requires_grad for p in lm.parameters())


def r1_hidden(tr: loop.Trainer, found: dict[str, Any]) -> None:
    lm = tr.recipe.lm  # type: ignore[attr-defined]
    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        soft = soft_tokens(tr.model[0], tokens, torch.arange(tokens.numel()))  # every position, in order
        lm.post_process = False  # the LM's own post-final-norm hidden states
        own = lm(tokens, positions(tokens), None).transpose(0, 1).reshape(-1, soft.shape[-1])
        lm.post_process = True
    found["max_abs_diff"] = float((soft - own).abs().max())
    found["scale"] = float(own.abs().max())


def evaluate(tr: loop.Trainer, found: dict[str, Any]) -> None:
    values = loop.evaluate(tr)["held-out"]
    found["eval"] = {**values, **tr.recipe.eval_metrics(values)}


def main() -> None:
    prefix, work, out, names = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
    lm_data = ["--data-path", prefix, "--data-cache-path", str(work / "cache")]
    docs = ["--train_data", str(work / "docs.jsonl"), "--data-cache-path", str(work / "cache")]
    records = ["--train-data", str(work / "records.jsonl"), "--eval-data", str(work / "records.jsonl")]
    compressor = [*COMPRESSOR, "--compressor-lm", str(work / "lm"), *docs, "--train-iters", str(STEPS)]
    results: dict[str, Any] = {}
    for name in names:
        if name in ("lm", "lm2"):
            seed = "1" if name == "lm" else "2"
            results[name] = run([*LM, *lm_data, "--train-iters", "3", "--seed", seed, "--save", str(work / name)], 3)
        elif name == "dp2":
            argv = [*compressor, "--save", str(work / "dp2")]
            results[name] = run(argv, STEPS, before=lm_frozen, after=lm_frozen)
        elif name == "dp2_resume":
            argv = [*compressor, "--load", str(work / "dp2"), "--ckpt-step", str(SAVE_AT)]
            results[name] = run(argv, STEPS - SAVE_AT)
        elif name == "tp2":
            results[name] = run([*compressor, "--tensor-model-parallel-size", "2"], STEPS)
        elif name == "other_lm":
            argv = [*compressor, "--load", str(work / "dp2"), "--compressor-lm", str(work / "lm2")]
            try:
                run(argv, 0)
                results[name] = None
            except UserError as e:
                results[name] = str(e)
                parallel_state.destroy_model_parallel()
        elif name == "r1":
            # documents from an indexed dataset (--data-path) instead of JSONL
            argv = [*COMPRESSOR, "--compressor-lm", str(work / "lm"), *lm_data, "--train-iters", "1"]
            argv += ["--encoder-num-layers", "2", "--comp_candidates", "1"]
            results[name] = run(argv, 0, after=r1_hidden)
        elif name == "ft":
            argv = [*compressor, "--stage", "ft", *records, "--lm_max_length", "40"]
            results[name] = run(argv, 2, after=evaluate)
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
