"""The model-variant interface ("recipe"): everything the training loop knows about a model.

The loop (megatron_ext/training/loop.py) builds, feeds, scores, saves and resumes a model only through a `Recipe`,
so a variant (progressive depth, a context compressor over a frozen LM, packed document-masked GPT batches, ...)
is a subclass registered under a `--model-variant` name, never a branch in the loop. What stays the loop's:
megatron-core DDP wrapping and the optimizer (over the parameters with `requires_grad`), the schedule, the
pipeline schedules, the per-token loss reduction over the global batch, checkpoint files, logging.

A variant's options are a `config.VariantOptions` dataclass: flags in their own `--help` group, config.json and the
checkpoint's config, validated at parse time (`check` sees the whole config). A variant outside this package:

    register_variant("half-loss", HalfLossRecipe, HalfLossOptions)   # before parse_args / loop.main
    loop.main(["--model-variant", "half-loss", ...])

The GPT recipe (megatron_ext/models/gpt.py) is the default variant and the base for GPT-like ones.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

import torch
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.transformer import TransformerConfig

from megatron_ext.config import Config, ConfigError, VariantOptions, add_variant
from megatron_ext.data.tokenizers import Tokenizer, padded_vocab_size
from megatron_ext.platform import Platform

Batch = dict[str, Any]
"""One micro-batch as a recipe reads it: tensors (tokens, labels, masks, packed-sequence boundaries, ...)."""


class Progress(Protocol):
    """Where the run stands (the loop's TrainState): what hooks and FLOP counts may depend on."""

    iteration: int
    consumed_samples: int
    consumed_tokens: int


class Recipe(abc.ABC):
    """How one model variant is built, fed, scored and checkpointed. One instance per run, made by `build_recipe`
    once the process group and the device are set up.

    The trained model is what `build_model` returns (one chunk per pipeline stage): parameters with
    `requires_grad=False` in it are saved but not trained; a module the recipe keeps to itself (a frozen LM read
    through `forward_step`) is neither trained nor saved: the recipe's `state_dict` may name where it came from.
    """

    losses: ClassVar[tuple[str, ...]] = ("lm_loss",)
    """Names of the losses `forward_step` gives masks for: `lm_loss` (trained on), then any reported beside it
    (averaged over the global batch and validation sets like lm_loss, logged and sent to tensorboard)."""

    def __init__(self, cfg: Config, platform: Platform, tokenizer: Tokenizer) -> None:
        self.cfg = cfg
        self.options = cfg.variant_options
        self.platform = platform
        self.device = platform.current_device()
        self.tokenizer = tokenizer
        self.vocab_size = padded_vocab_size(
            tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size
        )
        """The embedding rows: the tokenizer's vocabulary padded for tensor parallelism (as Megatron-LM)."""

    # ---- the model -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def transformer_config(self) -> TransformerConfig:
        """megatron-core's config of the trained model (DDP, the pipeline schedules and the optimizer read it)."""

    @abc.abstractmethod
    def build_model(self, config: TransformerConfig, vp_stage: int | None) -> torch.nn.Module:
        """The trained model's chunk for this rank's pipeline stage (and virtual stage `vp_stage`), on the device.
        Frozen modules the variant also needs are built here too and kept by the recipe."""

    @abc.abstractmethod
    def num_parameters(self) -> int:
        """Trained parameters of the whole (unsharded) model, for the start-up line."""

    # ---- data ------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def build_data(self, run_samples: int, consumed_samples: int, saved: dict[str, Any] | None) -> str:
        """Prepares training and validation data for a run of `run_samples` samples, continuing a checkpoint's
        `data_state` (`saved`, None when starting afresh) after `consumed_samples`; returns a note to print ('')."""

    @abc.abstractmethod
    def train_batches(self, consumed_samples: int) -> Iterator[Batch]:
        """This data-parallel rank's training micro-batches from the run's position `consumed_samples` (the same
        order whatever the data-parallel size: the loop resumes exactly)."""

    @abc.abstractmethod
    def validation_sets(self) -> list[str]:
        """Names of the validation sets (e.g. one per corpus), each reported on its own."""

    @abc.abstractmethod
    def valid_batches(self, name: str) -> Iterator[Batch]:
        """This rank's micro-batches of validation set `name`, from its start (the same batches at every
        evaluation, so the numbers compare over the run)."""

    def data_problem(self) -> str | None:
        """Why training cannot go on, found in this rank's micro-batches so far (e.g. token ids beyond the
        vocabulary), or None. The loop asks every rank after each step's micro-batches and stops all of them."""
        return None

    @abc.abstractmethod
    def data_state(self, consumed_samples: int) -> dict[str, Any]:
        """The data position to checkpoint once `consumed_samples` samples are used (`build_data` reads it)."""

    # ---- one micro-batch, one step ---------------------------------------------------------------------------

    @abc.abstractmethod
    def forward_step(self, batch: Batch, chunk: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Runs `batch` through `chunk`: (output, masks). On the last pipeline stage `output` holds per-token losses
        and `masks` one weight per token (0/1, or a weighting) for each name in `losses`, of `output`'s shape; the
        loop sums losses x mask and divides by the global mask sum. On other stages `output` is what the next stage
        receives (masks unused)."""

    @abc.abstractmethod
    def step_flops(self, progress: Progress, global_batch: int) -> float:
        """Training FLOPs (forward + backward, all ranks) of the step just run over `global_batch` samples, at
        `progress` (the run before that step): a variant whose cost varies by step (sampled depth) says so here."""

    def before_step(self, progress: Progress, model: list[torch.nn.Module], optimizer: MegatronOptimizer) -> str | None:
        """Called before each step (at `progress`) with the DDP-wrapped model chunks and the optimizer, e.g. to grow
        the model and copy its optimizer moments; returns a line to log, or None. Collective if it communicates."""
        return None

    def eval_metrics(self, losses: dict[str, float]) -> dict[str, float]:
        """Numbers derived from one validation set's mean losses (e.g. the share of a gap closed), logged and sent
        to tensorboard beside them."""
        return {}

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The recipe's own state (plain Python values), saved in every checkpoint beside the model."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()` from a checkpoint being resumed ({} when it holds none); raises ConfigError when
        the checkpoint cannot continue this run (e.g. another frozen LM)."""
        return None


_RECIPES: dict[str, type[Recipe]] = {}
BUILTIN_RECIPES = {
    "gpt": "megatron_ext.models.gpt",
    "progressive": "megatron_ext.models.progressive",
    "context-compressor": "megatron_ext.context_compressor",  # reads its frozen LM's checkpoint: above training/
}
"""Built-in variant -> the module that registers its recipe, imported when the variant is chosen (so that
choosing one does not import the others)."""


def register_variant(name: str, recipe: type[Recipe], options: type[VariantOptions] = VariantOptions) -> None:
    """Makes `--model-variant name` train with `recipe`, its options (flags, validation) being `options`."""
    add_variant(name, options)
    _RECIPES[name] = recipe


def build_recipe(cfg: Config, platform: Platform, tokenizer: Tokenizer) -> Recipe:
    """The recipe of `cfg`'s model variant."""
    name = cfg.variant.model_variant
    if name not in _RECIPES and name in BUILTIN_RECIPES:
        importlib.import_module(BUILTIN_RECIPES[name])
    if name not in _RECIPES:
        raise ConfigError(f"--model-variant {name}: no recipe registered (models.recipe.register_variant)")
    return _RECIPES[name](cfg, platform, tokenizer)
