"""Progressive-growth scenarios (megatron_ext/models/progressive.py) in one process group, launched by
tests/test_progressive.py once with 1 process (the references) and once under torchrun with 2 (TP=2, DP=2 with the
distributed optimizer), so the start-up is paid twice rather than once per scenario.

usage: progressive_scenarios.py DATA_PREFIX OUT_JSON SCENARIO [SCENARIO ...]
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
from megatron.core.transformer.transformer_block import TransformerBlock  # noqa: E402

from megatron_ext.config import parse_args  # noqa: E402
from megatron_ext.models.full_weights import full_weights_single_rank, load_full_weights  # noqa: E402
from megatron_ext.models.gpt import flops_per_token  # noqa: E402
from megatron_ext.models.progressive import ProgressiveRecipe, layer_map  # noqa: E402
from megatron_ext.training.loop import Trainer, save_checkpoint, setup, train_step  # noqa: E402

STEPS = 6
# 4 layers grown 1 -> 2 -> 4 at iterations 2 and 4; dropout off so that layouts compare exactly.
BASE = (
    "--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --swiglu --normalization RMSNorm "
    "--position-embedding-type rope --disable-bias-linear --hidden-dropout 0 --attention-dropout 0 --lr 4e-3 "
    "--lr-decay-style constant --micro-batch-size 2 --global-batch-size 8 --eval-iters 0 --log-interval 1000 "
    "--make-vocab-size-divisible-by 1 --model-variant progressive --progressive-layers 1,2,4 "
    "--progressive-stages 2,4 --progressive-stage-unit iters"
).split()

# name -> (flags, the single-process scenario whose initial weights it starts from)
SCENARIOS: dict[str, tuple[list[str], str]] = {
    "reference": ([], "reference"),
    "reset": (["--growth-moments", "reset"], "reference"),
    "stack": (["--growth", "stack"], "reference"),
    "rewarm": (["--growth-lr-rewarm", "2"], "reference"),
    "recompute": (["--recompute-activations"], "reference"),
    "bf16": (["--bf16"], "reference"),
    "tp2": (["--tensor-model-parallel-size", "2"], "reference"),
    "tp2_sp": (["--tensor-model-parallel-size", "2", "--sequence-parallel"], "reference"),
    "dp2_distopt": (["--use-distributed-optimizer"], "reference"),
    "dp2_distopt_reset": (["--use-distributed-optimizer", "--growth-moments", "reset"], "reference"),
}


def _start(argv: list[str], name: str, start_from: str, workdir: Path) -> Trainer:
    """A trainer whose initial weights are its reference's (layouts draw different ones), cut to its layout."""
    tr = setup(parse_args(argv))
    init = workdir / f"init_{start_from}.pt"
    if name == start_from and torch.distributed.get_world_size() == 1:
        torch.save(full_weights_single_rank(tr.model), init)
    else:
        load_full_weights(tr.model, torch.load(init))
        tr.optimizer.reload_model_params()
    return tr


def _finish(tr: Trainer) -> None:
    tr.metrics.close()
    parallel_state.destroy_model_parallel()


def _moments(tr: Trainer, layer: int) -> list[torch.Tensor]:
    """exp_avg of a layer's parameters (non-distributed optimizer: keyed by the fp32 parameter itself)."""
    block = tr.recipe.blocks[0]  # type: ignore[attr-defined]
    state = tr.optimizer.chained_optimizers[0].optimizer.state
    return [state[p]["exp_avg"].clone() for p in block.layers[layer].parameters()]


def _full_depth_losses(tr: Trainer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    chunk = tr.model[0]
    chunk.eval()
    with torch.no_grad():
        out = tr.recipe.forward_step(batch, chunk)[0].detach().clone()
    chunk.train()
    return out


def run(name: str, prefix: str, workdir: Path) -> dict[str, Any]:
    """Per-step losses and FLOPs; the single-process copy, reset and stack runs also grow a model in place
    (`growth_keeps_output`)."""
    flags, start_from = SCENARIOS[name]
    argv = [*BASE, *flags, "--data-path", prefix, "--data-cache-path", str(workdir / "cache"), "--train-iters", "6"]
    tr = _start(argv, name, start_from, workdir)
    # A full-depth step as the GPT recipe counts it (megatron_ext/models/gpt.py).
    gbs, seq = tr.cfg.training.global_batch_size, tr.cfg.model.seq_length
    result: dict[str, Any] = {
        "losses": [],
        "flops": [],
        "gpt_step_flops": flops_per_token(tr.cfg, tr.recipe.vocab_size) * gbs * seq,
    }
    for _ in range(STEPS):
        values = train_step(tr)
        result["losses"].append(values["lm_loss"])
        result["flops"].append(values["step_flops"])
    _finish(tr)
    if name in ("reference", "stack", "reset"):
        result["growth"] = growth_keeps_output(argv, name == "reset")
    return result


def growth_keeps_output(argv: list[str], reset: bool) -> dict[str, list[bool]]:
    """Trains 2 steps (1 unique layer), then grows twice in place: the full-depth per-token losses of a batch stay
    exactly equal, the grown layers' weights are their sources', their Adam moments too (zero with reset; the
    layers that stay where they are keep theirs)."""
    tr = setup(parse_args(argv))
    recipe: ProgressiveRecipe = tr.recipe  # type: ignore[assignment]
    batch = next(recipe.train_batches(0))
    for _ in range(2):
        train_step(tr)
    out: dict[str, list[bool]] = {"equal_outputs": [], "moments_as_flagged": [], "weights_copied": []}
    for _ in range(2):
        old = recipe.unique
        before = _full_depth_losses(tr, batch)
        moments = [_moments(tr, k) for k in range(old)]
        weights = [[p.detach().clone() for p in recipe.blocks[0].layers[k].parameters()] for k in range(old)]
        recipe.grow(tr.optimizer)
        after = _full_depth_losses(tr, batch)
        out["equal_outputs"].append(bool(torch.equal(before, after)) and bool(before.abs().sum() > 0))
        sources = layer_map(recipe.options.growth, old, recipe.unique)
        expected = [
            [torch.zeros_like(m) for m in moments[s]] if reset and s != k else moments[s] for k, s in enumerate(sources)
        ]
        out["moments_as_flagged"].append(
            all(torch.equal(a, b) for k in range(recipe.unique) for a, b in zip(_moments(tr, k), expected[k]))
            and any(bool(m.abs().sum() > 0) for m in moments[0])
        )
        out["weights_copied"].append(
            all(
                torch.equal(p, w)
                for k, s in enumerate(sources)
                for p, w in zip(recipe.blocks[0].layers[k].parameters(), weights[s])
            )
        )
        train_step(tr)  # the new layers' moments become non-zero before the next growth
    _finish(tr)
    return out


def resume(prefix: str, workdir: Path, stop: int, flags: list[str]) -> dict[str, Any]:
    """Trains to `stop`, saves, resumes in a new set-up and trains to STEPS: the losses of the resumed steps."""
    ckpt = workdir / f"ckpt_{stop}_{len(flags)}"
    argv = [*BASE, *flags, "--data-path", prefix, "--data-cache-path", str(workdir / "cache"), "--train-iters", "6"]
    tr = setup(parse_args([*argv, "--save", str(ckpt)]))
    losses = [train_step(tr)["lm_loss"] for _ in range(stop)]
    save_checkpoint(tr)
    _finish(tr)
    tr = setup(parse_args([*argv, "--save", str(ckpt), "--load", str(ckpt)]))
    losses += [train_step(tr)["lm_loss"] for _ in range(STEPS - stop)]
    _finish(tr)
    return {"losses": losses}


def shared_gradients(prefix: str, workdir: Path, recompute: bool) -> dict[str, Any]:
    """The gradient of a unique layer run at several positions equals the sum of the gradients of independent
    copies of it at those positions (a plain megatron-core block of distinct layers); with recompute, the plan is
    changed between forward and backward, as the next micro-batch would."""
    argv = [*BASE, "--data-path", prefix, "--data-cache-path", str(workdir / "cache"), "--train-iters", "1"]
    tr = setup(parse_args(argv + (["--recompute-activations"] if recompute else [])))
    recipe: ProgressiveRecipe = tr.recipe  # type: ignore[assignment]
    gpt: Any = recipe.build_model(tr.config, None)  # bare (no DDP): gradients in .grad
    recipe.blocks = recipe.blocks[-1:]
    recipe.stage = 1  # 2 unique layers
    plan = layer_map("interpolate", 2, 4)  # depth 4: 0,0,1,1
    reference: Any = recipe.build_model(tr.config, None)
    reference.decoder.__class__ = TransformerBlock  # megatron-core's own forward and recompute
    reference.load_state_dict(gpt.state_dict())
    with torch.no_grad():
        for j, k in enumerate(plan):  # position j: a copy of unique layer k
            for mine, theirs in zip(reference.decoder.layers[j].parameters(), gpt.decoder.layers[k].parameters()):
                mine.copy_(theirs)
    batch = next(recipe.train_batches(0))
    gpt.decoder.plan = plan
    out = gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    gpt.decoder.plan = [3, 2, 1, 0]  # another micro-batch's plan: must not reach this one's backward
    out.sum().backward()
    reference(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).sum().backward()
    errors = []
    for k in range(2):
        copies = [reference.decoder.layers[j] for j, u in enumerate(plan) if u == k]
        for name, p in gpt.decoder.layers[k].named_parameters():
            summed = torch.stack([dict(c.named_parameters())[name].grad for c in copies]).sum(0)
            errors.append(float((p.grad - summed).abs().max() / summed.abs().max()))
    unused = [p.grad for k in (2, 3) for p in gpt.decoder.layers[k].parameters()]
    embedding = gpt.embedding.word_embeddings.weight.grad
    _finish(tr)
    return {
        "max_relative_error": max(errors),
        "unused_have_no_grad": all(g is None for g in unused),
        "embedding_equal": bool(torch.allclose(embedding, reference.embedding.word_embeddings.weight.grad, atol=1e-7)),
    }


def main() -> None:
    prefix, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    workdir = Path(out).parent
    results: dict[str, Any] = {}
    for name in names:
        if name.startswith("resume_"):
            stop, _, rewarm = name.removeprefix("resume_").partition("_")  # resume_3_rewarm: with its flags
            results[name] = resume(prefix, workdir, int(stop), SCENARIOS[rewarm][0] if rewarm else [])
        elif name.startswith("shared_gradients"):
            results[name] = shared_gradients(prefix, workdir, recompute=name.endswith("_recompute"))
        else:
            results[name] = run(name, prefix, workdir)
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
