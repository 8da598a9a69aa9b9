"""Training and validation samples: megatron-core GPTDatasets over a blend, read in a resumable order.

Every rank reads its own micro-batches (tensor- and pipeline-parallel peers read the same indices), so no
broadcast of batches is needed; megatron-core's builder writes index caches once (rank 0) and shares them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.config import Config, ConfigError
from megatron_ext.data.builtin_corpus import build_builtin_corpus
from megatron_ext.data.tokenizers import Tokenizer


def blend_from_config(cfg: Config, tokenizer: Tokenizer) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights) from --data-path, or the built-in corpus when none is given."""
    paths = cfg.data.data_path
    if not paths:
        out = Path(cfg.data.data_cache_path) / "builtin"
        return [build_builtin_corpus(out, tokenizer)], None
    if len(paths) == 1:
        prefixes, weights = paths, None
    else:
        prefixes, weights = paths[1::2], [float(w) for w in paths[0::2]]
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).is_file():
                raise ConfigError(f"--data-path: {prefix}{ext} does not exist")
    return prefixes, weights


def build_datasets(
    cfg: Config, tokenizer: Tokenizer, train_samples: int, valid_samples: int
) -> tuple[GPTDataset, GPTDataset | None]:
    """Train and validation datasets sized for the whole run (indices are built or loaded from the cache)."""
    prefixes, weights = blend_from_config(cfg, tokenizer)
    config = GPTDatasetConfig(
        random_seed=cfg.training.seed,
        sequence_length=cfg.model.seq_length,
        blend=(prefixes, weights),
        split=cfg.data.split,
        path_to_cache=str(Path(cfg.data.data_cache_path) / "index"),
        tokenizer=tokenizer,  # type: ignore[arg-type]
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    # Unused splits are dropped (keeping the boundaries of the others, as Megatron-LM's --split defines them):
    # megatron-core's GPTDataset loops forever on a split that holds no document.
    sizes = [train_samples, valid_samples, 0]
    config.split_matrix = [rng if n > 0 else None for rng, n in zip(config.split_matrix, sizes)]
    _check_splits_not_empty(prefixes, config.split_matrix, cfg.data.split)
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    if train is None:
        raise ConfigError(f"--split {cfg.data.split} leaves no training data")
    return train, valid  # type: ignore[return-value]


def _check_splits_not_empty(prefixes: list[str], split_matrix: list, split: str) -> None:
    for prefix in prefixes:
        documents = len(IndexedDataset(prefix).document_indices) - 1
        for name, rng in zip(("training", "validation"), split_matrix):
            if rng is not None and round(rng[1] * documents) - round(rng[0] * documents) == 0:
                raise ConfigError(
                    f"--split {split} leaves no {name} document of the {documents} in {prefix}: "
                    "change --split" + (" or set --eval-iters 0" if name == "validation" else "")
                )


@dataclass
class MicroBatches:
    """Yields this data-parallel rank's micro-batches from a position in the global sample order.

    Global batch g covers samples [c, c + gbs) where c is the samples consumed before it; each micro-batch step
    takes mbs x dp consecutive samples and rank r reads its slice [r x mbs, (r + 1) x mbs). The position is the
    number of samples consumed, so the order does not depend on the data-parallel size.
    """

    dataset: torch.utils.data.Dataset
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    consumed_samples: int = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        n = len(self.dataset)  # type: ignore[arg-type]
        samples = [self.dataset[(start + i) % n] for i in range(self.micro_batch_size)]
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])
