"""A model variant defined outside the package, as a user would: a GPT whose loss counts every second token.

Registered through megatron_ext.models.recipe.register_variant, with options of its own (a `--counted-parity`
flag, checked when the command line is parsed), a second reported loss (the tokens it leaves out), a hook before
every step and a state that travels in checkpoints (the steps it has seen). tests/test_variants.py registers it
in-process for the parse-time tests and runs this file for training:

usage: toy_variant.py WORKDIR FLAG [FLAG ...]   trains, checkpoints and resumes (also from the universal form of
                                                the checkpoint) through loop.setup/train; writes WORKDIR/result.json
                                                (the first step's losses against plain PyTorch)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_ext.config import Config, ConfigError, VariantOptions, opt

NAME = "every-other"


@dataclass
class EveryOtherOptions(VariantOptions):
    """Which tokens the every-other variant trains on."""

    counted_parity: int = opt(0, "Train on the tokens at even (0) or odd (1) positions.")

    def __post_init__(self) -> None:
        if self.counted_parity not in (0, 1):
            raise ConfigError(f"--counted-parity {self.counted_parity} must be 0 or 1")

    def check(self, cfg: Config) -> None:
        if cfg.model.seq_length % 2:
            raise ConfigError(f"--model-variant {NAME} needs an even --seq-length, not {cfg.model.seq_length}")


def register() -> None:
    """Defines the recipe (importing megatron-core only now) and registers the variant."""
    import torch

    from megatron_ext.models.gpt import GPTRecipe
    from megatron_ext.models.recipe import register_variant

    class EveryOtherRecipe(GPTRecipe):
        losses = ("lm_loss", "left_out_loss")
        options: EveryOtherOptions

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.steps_seen = 0

        def forward_step(self, batch: dict, chunk: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            output, masks = super().forward_step(batch, chunk)
            mask = masks["lm_loss"]
            counted = torch.arange(mask.shape[-1], device=mask.device) % 2 == self.options.counted_parity
            return output, {"lm_loss": mask * counted, "left_out_loss": mask * ~counted}

        def before_step(self, progress: Any, model: list, optimizer: Any) -> str:
            self.steps_seen += 1
            return f"every-other: step {self.steps_seen} at iteration {progress.iteration}"

        def state_dict(self) -> dict[str, Any]:
            return {"steps_seen": self.steps_seen}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.steps_seen = state["steps_seen"]

    register_variant(NAME, EveryOtherRecipe, EveryOtherOptions)


def first_step_by_hand(tr: Any) -> dict[str, float]:
    """The first step's two losses from the model's logits with plain PyTorch (before the step changes weights)."""
    import torch
    import torch.nn.functional as F

    batch = next(tr.recipe.train_batches(0))
    with torch.no_grad():
        logits = tr.model[0](batch["tokens"], batch["position_ids"], None)
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none").view_as(
        batch["labels"]
    )
    counted = (torch.arange(ce.shape[1]) % 2 == tr.cfg.variant_options.counted_parity).float()
    mask = batch["loss_mask"].float()
    return {
        "lm_loss": float((ce * mask * counted).sum() / (mask * counted).sum()),
        "left_out_loss": float((ce * mask * (1 - counted)).sum() / (mask * (1 - counted)).sum()),
    }


def main() -> None:
    from megatron.core import parallel_state

    from megatron_ext.config import parse_args
    from megatron_ext.convert.universal import to_universal
    from megatron_ext.training import loop

    work, flags = Path(sys.argv[1]), sys.argv[2:]
    register()

    result: dict[str, Any] = {}
    tr = loop.setup(parse_args([*flags, "--run-dir", str(work / "whole")]))
    result["by_hand"] = first_step_by_hand(tr)
    values = loop.train_step(tr)
    result["first_step"] = {k: values[k] for k in ("lm_loss", "left_out_loss")}
    loop.train(tr)  # on to the end
    tr.metrics.close()
    parallel_state.destroy_model_parallel()
    runs = [
        ["--save", str(work / "ckpt"), "--exit-interval", "2"],
        ["--save", str(work / "ckpt"), "--load", str(work / "ckpt")],
        ["--run-dir", str(work / "from_universal"), "--load", str(work / "universal")],  # written in between
    ]
    for extra in runs:
        tr = loop.setup(parse_args([*flags, *extra]))
        loop.train(tr)
        tr.metrics.close()
        parallel_state.destroy_model_parallel()
        if extra[-1] == "2":
            to_universal(work / "ckpt", work / "universal", 2, progress=False)
    (work / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
