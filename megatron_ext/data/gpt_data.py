"""Training and validation samples for a run: data lists -> corpus blends -> this rank's micro-batches.

Every rank reads its own micro-batches (tensor- and pipeline-parallel peers read the same indices), so no
broadcast of batches is needed; blend index caches are built once by rank 0 in --data-cache-path and shared.

The position in the data is the number of samples consumed since the current blend began, which does not depend
on the data-parallel size. When the data list's weights change between a checkpoint and its resume (continual
pre-training), a new blend starts where the old one stopped: each corpus continues from its own consumed count,
so no sample of any corpus is seen twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

import torch

from megatron_ext.config import Config, ConfigError
from megatron_ext.data.blend import BlendSpec, CorpusBlend
from megatron_ext.data.builtin_corpus import build_builtin_corpus
from megatron_ext.data.data_list import DataEntry, parse_data_lists, parse_data_path, validate
from megatron_ext.data.mock import MOCK_CORPUS, build_mock_corpus
from megatron_ext.data.tokenizers import Tokenizer

BUILTIN_CORPUS = "stdlib"


def training_entries(cfg: Config, tokenizer: Tokenizer) -> list[DataEntry]:
    """The training files: --data-file-list, --data-path, --mock-data or the built-in corpus; validated
    (file:line errors)."""
    if cfg.data.data_file_list:
        entries = parse_data_lists(cfg.data.data_file_list)
    elif cfg.data.data_path:
        entries = parse_data_path(cfg.data.data_path)
    elif cfg.data.mock_data:
        prefix = build_mock_corpus(Path(cfg.data.data_cache_path) / MOCK_CORPUS, tokenizer, cfg.model.seq_length)
        entries = [DataEntry(1.0, prefix, MOCK_CORPUS, "--mock-data")]
    else:
        prefix = build_builtin_corpus(Path(cfg.data.data_cache_path) / "builtin", tokenizer)
        entries = [DataEntry(1.0, prefix, BUILTIN_CORPUS, "built-in corpus")]
    validate(entries)
    return entries


def _spec(cfg: Config, entries: list[DataEntry], split: str, split_index: int) -> BlendSpec:
    files = tuple((e.weight, e.prefix, e.corpus) for e in entries)
    return BlendSpec(files, cfg.model.seq_length, cfg.training.seed, split, split_index, cfg.data.packing)


def _signature(spec: BlendSpec) -> str:
    """Identifies a mixture: the files, their weights and corpus labels."""
    return hashlib.sha256(json.dumps(sorted(spec.files)).encode()).hexdigest()[:16]


class _Packing(TypedDict):
    """CorpusBlend's keyword arguments for document marking, typed so that `**` checks them."""

    eod_mask_loss: bool
    document_boundaries: bool
    reset_position_ids: bool


def _packing(cfg: Config) -> _Packing:
    """How samples mark their documents (Megatron-LM's --reset-attention-mask, --reset-position-ids,
    --eod-mask-loss)."""
    d = cfg.data
    return {
        "eod_mask_loss": d.eod_mask_loss,
        "document_boundaries": d.reset_attention_mask,
        "reset_position_ids": d.reset_position_ids,
    }


@dataclass
class DataState:
    """Where the training data stands; saved in every checkpoint."""

    signature: str = ""
    segment_start: int = 0  # samples consumed (whole run) when the current blend began
    start_offsets: dict[str, int] = field(default_factory=dict)  # per corpus, consumed before the current blend
    consumed_per_corpus: dict[str, int] = field(default_factory=dict)  # at the checkpoint


@dataclass
class MicroBatches:
    """Yields this data-parallel rank's micro-batches from a position in the global sample order.

    Global batch g covers samples [c, c + gbs) where c is the samples consumed before it; each micro-batch step
    takes mbs x dp consecutive samples and rank r reads its slice [r x mbs, (r + 1) x mbs). The position counts
    samples, so the order does not depend on the data-parallel size.
    """

    dataset: torch.utils.data.Dataset
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    consumed_samples: int = 0
    vocab_size: int | None = None  # token ids must be below it: data made with another tokenizer is refused
    problem: str | None = None  # why training cannot go on on this data (the loop stops every rank on it)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        n = len(self.dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; blends have one
        indices = [(start + i) % n for i in range(self.micro_batch_size)]
        batch = collate([self.dataset[i] for i in indices])
        if self.vocab_size is not None:
            self._check_vocabulary(batch, indices, self.vocab_size)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    def _check_vocabulary(self, batch: dict[str, torch.Tensor], indices: list[int], vocab_size: int) -> None:
        """One max per micro-batch; past the vocabulary, `problem` names the data file (F.embedding's IndexError
        did not) and the ids are replaced by 0 with no loss, so that this step runs to its global reduction, where
        every rank learns of the problem and stops (megatron_ext/training/loop.py), none waiting for this one."""
        if max(int(batch["tokens"].max()), int(batch["labels"].max())) < vocab_size:
            return
        if self.problem is None:
            self.problem = self._vocabulary_problem(batch, indices, vocab_size)
        bad = (batch["tokens"] >= vocab_size) | (batch["labels"] >= vocab_size)
        batch["tokens"] = batch["tokens"].masked_fill(batch["tokens"] >= vocab_size, 0)
        batch["labels"] = batch["labels"].masked_fill(batch["labels"] >= vocab_size, 0)
        batch["loss_mask"] = batch["loss_mask"].masked_fill(bad, 0)

    def _vocabulary_problem(self, batch: dict[str, torch.Tensor], indices: list[int], vocab_size: int) -> str:
        row = int(torch.maximum(batch["tokens"], batch["labels"]).max(dim=1).values.ge(vocab_size).nonzero()[0])
        source, top = (
            self.dataset.token_source(indices[row], vocab_size)
            if isinstance(self.dataset, CorpusBlend)
            else (f"sample {indices[row]}", int(batch["tokens"][row].max()))
        )
        return (
            f"{source}: token id {top} is beyond the tokenizer's vocabulary of {vocab_size} (--tokenizer-type "
            "and --tokenizer-model): the data was made with another tokenizer; preprocess it with this one"
        )


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks samples into a micro-batch [b, s]. Samples with document bounds give `cu_seqlens` over the
    micro-batch's b x s tokens read in order (every sample boundary is a document boundary) and `max_seqlen`,
    the longest document (megatron-core's packed "thd" description, megatron_ext/models/gpt.packed_seq_params)."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    if "cu_seqlens" in samples[0]:
        s = batch["tokens"].size(1)
        cu = torch.cat([samples[0]["cu_seqlens"][:1]] + [x["cu_seqlens"][1:] + i * s for i, x in enumerate(samples)])
        batch["cu_seqlens"] = cu
        batch["max_seqlen"] = (cu[1:] - cu[:-1]).max()
    return batch


@dataclass
class TrainData:
    """The training blend and the bookkeeping that makes it resumable and re-weightable."""

    blend: CorpusBlend
    state: DataState
    note: str = ""

    def position(self, consumed_samples: int) -> int:
        return consumed_samples - self.state.segment_start

    def state_dict(self, consumed_samples: int) -> dict:
        """The state to checkpoint once `consumed_samples` samples of the run have been used."""
        consumed = self.blend.consumed_per_corpus(self.position(consumed_samples))
        return asdict(DataState(self.state.signature, self.state.segment_start, self.state.start_offsets, consumed))


def build_train_data(
    cfg: Config, entries: list[DataEntry], run_samples: int, consumed_samples: int, saved: dict | None, eod: int
) -> TrainData:
    """The training blend for the rest of the run, continuing a checkpoint's data position if given."""
    spec = _spec(cfg, entries, cfg.data.split, 0)
    signature = _signature(spec)
    note = ""
    if saved is None:
        state = DataState(signature)
    elif saved["signature"] == signature:
        state = DataState(**saved)
    else:
        state = DataState(signature, consumed_samples, dict(saved["consumed_per_corpus"]))
        note = (
            "the data mixture differs from the checkpoint's: each corpus continues after the samples it already "
            f"gave ({', '.join(f'{c} {n}' for c, n in sorted(state.start_offsets.items()))})"
        )
    cache = Path(cfg.data.data_cache_path) / "blend"
    try:
        blend = CorpusBlend(
            spec, max(run_samples - state.segment_start, 1), cache, state.start_offsets, eod, **_packing(cfg)
        )
    except ValueError as e:
        raise ConfigError(f"training data: {e}") from e
    if spec.packing == "best-fit":
        share = f"best-fit packing: {blend.padding_share():.1%} of the training samples' tokens are padding"
        note = f"{note}; {share}" if note else share
    return TrainData(blend, state, note)


def build_validation_sets(cfg: Config, train_entries: list[DataEntry], num_samples: int, eod: int) -> dict:
    """One validation set per corpus: from --valid-data-file-list (whole files), else each training corpus's
    validation split. A corpus whose split holds no document is left out."""
    if cfg.data.valid_data_file_list:
        entries, split = parse_data_lists(cfg.data.valid_data_file_list), "1,0,0"
        validate(entries)
        index = 0
    else:
        entries, split, index = train_entries, cfg.data.split, 1
    sets: dict[str, CorpusBlend] = {}
    cache = Path(cfg.data.data_cache_path) / "blend"
    for corpus in sorted({e.corpus for e in entries}):
        files = [e for e in entries if e.corpus == corpus and e.weight > 0]
        if not files or num_samples == 0:
            continue
        try:
            sets[corpus] = CorpusBlend(_spec(cfg, files, split, index), num_samples, cache, eod=eod, **_packing(cfg))
        except ValueError as e:  # e.g. a corpus too small to leave documents for the validation split
            if cfg.data.valid_data_file_list:
                raise ConfigError(f"--valid-data-file-list, corpus {corpus}: {e}") from e
    return sets
