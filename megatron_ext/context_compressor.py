"""AceRAG's context compressor as `--model-variant context-compressor`: the recipe (megatron_ext/models/recipe.py)
that loads the frozen LM from `--compressor-lm` (one of our checkpoints), trains an encoder made of its embeddings,
first K layers and final norm, and scores the LM reading the encoder's soft tokens in place of a context.

The trained model, the only one in the optimizer and in checkpoints, is the encoder: a K-layer GPT with tied
embeddings whose config becomes the run's model section (so inspect_checkpoint and convert_checkpoint to-hf read
it as such). The LM is kept by the recipe in eval mode with `requires_grad=False`; checkpoints name its path and
a fingerprint of its manifest, and a resume with another LM is refused. Tensor and data parallelism as in
training; pipeline and sequence parallelism are refused when parsed (config.ContextCompressorOptions.check).
Samples: megatron_ext/data/context_compressor.py; model pieces: megatron_ext/models/context_compressor.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_ext.config import Config, ConfigError, ContextCompressorOptions
from megatron_ext.data import context_compressor as data
from megatron_ext.data.gpt_data import training_entries
from megatron_ext.data.indexed import read_documents
from megatron_ext.data.tokenizers import Tokenizer, padded_vocab_size
from megatron_ext.models import gpt
from megatron_ext.models.context_compressor import as_encoder, copy_lm_layers, lm_losses, soft_tokens
from megatron_ext.models.recipe import Batch, Progress, Recipe, register_variant
from megatron_ext.models.size import num_parameters
from megatron_ext.platform import DTYPES, Platform
from megatron_ext.training import inference, layout

RUN_MODEL_FIELDS = ("seq_length", "hidden_dropout", "attention_dropout", "attention_backend")
"""Model flags the run keeps from its own command line; the rest of the model is the LM's."""


def lm_fingerprint(ckpt: Path) -> str:
    """sha256 of the LM checkpoint's manifest (file names and sizes of a finished save) and common state (its run's
    config, iteration, counters, RNG): the sizes alone are the same for every LM of one shape."""
    digest = hashlib.sha256()
    for name in (layout.MANIFEST, layout.COMMON_STATE):
        path = ckpt / name
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()


def lm_checkpoint(load: str) -> Path:
    """The LM's iter_* folder, verified against its manifest; a miss is one ConfigError naming --compressor-lm."""
    try:
        return inference.find_checkpoint(load)
    except layout.CheckpointNotFound as e:
        raise ConfigError(f"--compressor-lm: {e}".replace("--load ", "")) from None


def encoder_config(cfg: Config, lm_model: dict[str, Any], layers: int) -> Config:
    """The run's config with the LM's model section cut to the encoder: `layers` layers, tied embeddings (the
    encoder has no output layer); the run's sequence length, dropout and attention backend."""
    lm_layers = lm_model["num_layers"]
    if not 1 <= layers <= lm_layers:
        raise ConfigError(f"--encoder-num-layers {layers}: the LM has {lm_layers} layers (1..{lm_layers})")
    model = {**lm_model, **{k: getattr(cfg.model, k) for k in RUN_MODEL_FIELDS}}
    model.update(num_layers=layers, untie_embeddings_and_output_weights=False)
    return dataclasses.replace(cfg, model=type(cfg.model)(**model))


class ContextCompressorRecipe(Recipe):
    """The encoder trained against the frozen LM's loss (module docstring)."""

    options: ContextCompressorOptions
    lm: GPTModel

    def __init__(self, cfg: Config, platform: Platform, tokenizer: Tokenizer) -> None:
        options = cfg.variant_options
        assert isinstance(options, ContextCompressorOptions) and options.compressor_lm is not None  # checked at parse
        self.lm_path = lm_checkpoint(options.compressor_lm)
        saved, common = inference.read_config(self.lm_path)
        lm_vocab = common.get("vocab_size")
        if lm_vocab is not None and lm_vocab != tokenizer.vocab_size:
            d = saved.get("data", {})
            raise ConfigError(
                f"--compressor-lm {self.lm_path} was trained with a tokenizer of {lm_vocab} ids (--tokenizer-type "
                f"{d.get('tokenizer_type')} --tokenizer-model {d.get('tokenizer_model')}), this run's has "
                f"{tokenizer.vocab_size}: give the LM's tokenizer flags"
            )
        self.lm_cfg, saved_tp = inference.inference_config(saved, cfg.parallel.tensor_model_parallel_size)
        lm_model = dataclasses.asdict(self.lm_cfg.model)
        self.lm_cfg = dataclasses.replace(
            cfg, model=type(cfg.model)(**{**lm_model, **{k: getattr(cfg.model, k) for k in RUN_MODEL_FIELDS[1:]}})
        )
        cfg.model = encoder_config(cfg, lm_model, options.encoder_num_layers).model
        super().__init__(cfg, platform, tokenizer)
        divisible = self.lm_cfg.model.make_vocab_size_divisible_by
        self.vocab_size = padded_vocab_size(tokenizer.vocab_size, divisible, saved_tp)
        tp = cfg.parallel.tensor_model_parallel_size
        if self.vocab_size % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp}: the LM's padded vocabulary {self.vocab_size} is not divisible "
                "by it (reshard the LM first: tools/convert_checkpoint.py reshard --target-tp N)"
            )
        self.fingerprint = lm_fingerprint(self.lm_path)
        self.losses = ("lm_loss", *data.eval_losses(self.options))  # type: ignore[misc]  # depend on the ratios
        self._tokens = torch.zeros(2, dtype=torch.float64)  # encoder and LM tokens of this step, this rank

    # ---- the model -------------------------------------------------------------------------------------------

    def transformer_config(self) -> TransformerConfig:
        return gpt.transformer_config(self.cfg, self.platform)

    def build_model(self, config: TransformerConfig, vp_stage: int | None) -> torch.nn.Module:
        """The encoder, initialised from the LM, which is built and loaded here and kept frozen."""
        lm_config = gpt.transformer_config(self.lm_cfg, self.platform)
        self.lm = gpt.build_model(self.lm_cfg, self.platform, lm_config, self.vocab_size)
        inference.read_weights(self.lm, self.lm_path)
        self.lm.to(device=self.device, dtype=DTYPES[self.cfg.precision.params_dtype]).eval()
        self.lm.requires_grad_(False)
        encoder = as_encoder(gpt.build_model(self.cfg, self.platform, config, self.vocab_size, vp_stage))
        copy_lm_layers(encoder, self.lm)
        return encoder.to(self.device)

    def num_parameters(self) -> int:
        return num_parameters(self.cfg, self.vocab_size)

    # ---- data ------------------------------------------------------------------------------------------------

    def _items(self) -> tuple[list[Any], list[Any], str]:
        """(training items, held-out items, a note): documents (stage pt) or records (stage ft)."""
        o, tok = self.options, self.tokenizer
        if o.stage == "ft":
            assert o.train_data is not None  # ContextCompressorOptions.check

            def parse(record: Any) -> data.Record:
                return data.read_record(record, tok.tokenize)

            train = data.read_jsonl(o.train_data, "--train-data", parse)
            held = data.read_jsonl(o.eval_data, "--eval-data", parse) if o.eval_data else None
            return *self._held_out(train, held), f"{len(train)} prompt/context/answer records"

        def docs(texts: list[str]) -> list[np.ndarray]:
            return [np.asarray(tok.tokenize(t), dtype=np.int64) for t in texts]

        if o.train_data:
            train = docs(data.read_jsonl(o.train_data, "--train-data", data.text_of))
        else:
            train = [d.astype(np.int64) for e in training_entries(self.cfg, tok) for d in read_documents(e.prefix)]
        held = docs(data.read_jsonl(o.eval_data, "--eval-data", data.text_of)) if o.eval_data else None
        shortest = max(o.min_length, o.window + 2)  # two windows, the last of two tokens at least
        fits = [d for d in train if shortest <= len(d) <= o.max_length]
        note = f"{len(fits)} of {len(train)} documents of {shortest}..{o.max_length} tokens"
        if held is not None:
            held = [d for d in held if shortest <= len(d) <= o.max_length]
        return *self._held_out(fits, held), note

    def _held_out(self, items: list[Any], held: list[Any] | None) -> tuple[list[Any], list[Any]]:
        """(training, held-out): --eval-data's, else --split's validation share of `items` (seeded choice)."""
        if held is not None:
            return items, held
        weights = [float(x) for x in self.cfg.data.split.split(",")]
        share = weights[1] / sum(weights) if len(weights) > 1 else 0.0
        count = min(max(1, round(share * len(items))), len(items) - 1) if share > 0 and len(items) > 1 else 0
        order = np.random.default_rng([self.cfg.training.seed, 2]).permutation(len(items))
        chosen = set(order[:count].tolist())
        return [x for i, x in enumerate(items) if i not in chosen], [items[i] for i in sorted(chosen)]

    def build_data(self, run_samples: int, consumed_samples: int, saved: dict[str, Any] | None) -> str:
        train, held, note = self._items()
        if not train:
            raise ConfigError(f"--model-variant context-compressor: no training sample ({note})")
        if saved is not None and saved.get("items") != len(train):
            raise ConfigError(f"the checkpoint's data had {saved.get('items')} training items, this run's has "
                              f"{len(train)}: resume on the same data (or --finetune)")  # fmt: skip
        o, seed = self.options, self.cfg.training.seed
        make_train = data.record_sample if o.stage == "ft" else data.window_sample
        make_eval = data.record_eval_sample if o.stage == "ft" else data.window_eval_sample
        self.train_set = data.SampleSet(train, make_train, o, seed)
        self.valid_set = data.SampleSet(held, make_eval, o, seed, shuffle=False) if held else None
        layers = f"encoder of {self.cfg.model.num_layers} of the {self.lm_cfg.model.num_layers} layers"
        return (
            f"context compressor, stage {o.stage}: {note}; {len(train)} for training, {len(held)} held out; frozen LM "
            f"{self.lm_path} ({layers}), ratios {' '.join(map(str, o.comp_candidates))}"
        )

    def _micro_batches(self, samples: data.SampleSet, position: int, wrap: bool) -> data.MicroBatches:
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        return data.MicroBatches(samples, self.cfg.training.micro_batch_size, dp_rank, dp_size, position, wrap)

    def train_batches(self, consumed_samples: int) -> Iterator[Batch]:
        return self._micro_batches(self.train_set, consumed_samples, wrap=True)

    def validation_sets(self) -> list[str]:
        return ["held-out"] if self.valid_set is not None and self.cfg.logging.eval_iters > 0 else []

    def valid_batches(self, name: str) -> Iterator[Batch]:
        assert self.valid_set is not None
        return self._micro_batches(self.valid_set, 0, wrap=False)

    def data_state(self, consumed_samples: int) -> dict[str, Any]:
        return {"items": len(self.train_set), "consumed_samples": consumed_samples}

    # ---- one micro-batch, one step ---------------------------------------------------------------------------

    def forward_step(self, batch: Batch, chunk: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        soft = soft_tokens(chunk, batch["enc_tokens"], batch["soft_src"])
        output = lm_losses(self.lm, batch["tokens"], batch["labels"], soft, batch["soft_dst"])
        zero = torch.zeros_like(batch["labels"], dtype=torch.float32)
        masks = {name: batch.get(f"mask/{name}", zero) for name in self.losses}
        if "mask/lm_loss" not in batch:  # validation: lm_loss is the compressed contexts' loss, all ratios
            masks["lm_loss"] = sum((m for n, m in masks.items() if n.startswith("r")), zero)
        if torch.is_grad_enabled():
            self._tokens += torch.tensor([batch["enc_tokens"].numel(), batch["tokens"].numel()])
        return output, masks

    def step_flops(self, progress: Progress, global_batch: int) -> float:
        """Encoder tokens x its training FLOPs per token plus LM tokens x 2/3 of the LM's (forward and the input
        gradient; no weight gradients), summed over data-parallel replicas."""
        tokens = self._tokens.clone()
        self._tokens.zero_()
        if parallel_state.get_data_parallel_world_size() > 1:
            tokens = tokens.to(self.device)
            torch.distributed.all_reduce(tokens, group=parallel_state.get_data_parallel_group())
        encoder, lm = tokens.tolist()
        per_lm_token = gpt.flops_per_token(self.lm_cfg, self.vocab_size) * 2 / 3
        return encoder * gpt.flops_per_token(self.cfg, self.vocab_size) + lm * per_lm_token

    def eval_metrics(self, losses: dict[str, float]) -> dict[str, float]:
        """The share of the no-context -> full-context gap each ratio closes."""
        if "nocontext_loss" not in losses or "full_loss" not in losses:
            return {}
        gap = losses["nocontext_loss"] - losses["full_loss"]
        out = {}
        for r in sorted(set(self.options.comp_candidates)):
            name = data.ratio_loss(r)
            if name in losses:
                out[f"gap_closed_r{r}"] = (losses["nocontext_loss"] - losses[name]) / gap if gap > 0 else math.nan
        return out

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"compressor_lm": str(self.lm_path.resolve()), "lm_fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("lm_fingerprint")
        if saved is not None and saved != self.fingerprint:
            raise ConfigError(
                f"--compressor-lm {self.lm_path} is not the LM this encoder was trained against "
                f"({state.get('compressor_lm')}, fingerprint {saved[:12]}.., this one {self.fingerprint[:12]}..)"
            )


register_variant("context-compressor", ContextCompressorRecipe, ContextCompressorOptions)
