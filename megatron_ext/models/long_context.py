"""Long sequences on one device: the document-masking self-check and a memory-bounded cross-entropy.

Leakage across packed documents is silent (a packed mask ignored by one attention backend gives plausible losses),
so `check_document_masking` runs a packed sample and each of its documents alone through the model as built (the
attention backend in use) and stops in one line if a document's losses differ. `chunked_cross_entropy` never
holds all of a long sequence's logits: each chunk's are recomputed in backward (`--cross-entropy-chunk`).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from torch.utils.checkpoint import checkpoint

from megatron_ext.cli import UserError
from megatron_ext.models.recipe import Batch

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
"""Largest per-token loss difference between a document packed and alone, by parameter dtype (matmuls of other
shapes round differently; a leak at initialisation already moves losses by more than this in fp32)."""


class DocumentMaskingError(UserError, RuntimeError):
    """A document's losses in a packed sample differ from its losses alone: attention crosses documents."""


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, sequence_parallel: bool = False
) -> torch.Tensor:
    """Per-token losses [b, s] of the output layer `weight` (this rank's vocabulary rows) over `hidden` [s, b, h]
    (this rank's sequence part under `sequence_parallel`), `chunk` tokens at a time: each chunk's logits exist
    only while its loss, and in backward its gradient, is computed. Equal to megatron-core's output layer followed
    by `vocab_parallel_cross_entropy`, as GPTModel computes its loss."""
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    elif parallel_state.get_tensor_model_parallel_world_size() > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden)  # the input gradient is summed over the vocabulary
    s, b, h = hidden.shape
    rows, targets = hidden.reshape(s * b, h), labels.transpose(0, 1).reshape(s * b)
    losses = [
        checkpoint(_chunk_loss, rows[i : i + chunk], weight, targets[i : i + chunk], use_reentrant=False)
        for i in range(0, s * b, chunk)
    ]
    return torch.cat(losses).view(s, b).transpose(0, 1).contiguous()


def _chunk_loss(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(rows, weight)
    return tensor_parallel.vocab_parallel_cross_entropy(logits.unsqueeze(1), targets.unsqueeze(1)).squeeze(1)


def document_batches(sample: Batch, multiple: int) -> list[tuple[Batch, int]]:
    """Each document of a packed one-sample batch alone (no bounds, its positions as packed), padded at the end
    to a multiple of `multiple` tokens (sequence parallelism splits the sequence; causal attention keeps the
    padding out of the real tokens); with its number of real tokens."""
    bounds = sample["cu_seqlens"].tolist()
    row = {k: sample[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    return [
        ({k: F.pad(v[:, a:b], (0, -(b - a) % multiple)) for k, v in row.items()}, b - a) for a, b in pairwise(bounds)
    ]


def check_document_masking(
    forward: Callable[[Batch], torch.Tensor], samples: list[Batch], dtype: torch.dtype, multiple: int, full: bool
) -> str:
    """Runs `forward` (a batch -> per-token losses [1, tokens]: the model as trained, in eval mode) on packed
    one-sample batches of several documents each and on each of their documents alone; raises
    DocumentMaskingError in one line when a document's losses differ by more than TOLERANCE. `full`: every
    document; else (the start-up check) the second and the last document of the first sample. Returns the line
    to log."""
    if not samples:
        return "document masking not checked: no sample near the data position holds two documents"
    checked, worst = 0, 0.0
    with torch.no_grad():
        for i, sample in enumerate(samples if full else samples[:1]):
            packed = forward(sample).flatten().float()
            packed_mask = sample["loss_mask"].flatten().bool()
            bounds = sample["cu_seqlens"].tolist()
            alone_runs = document_batches(sample, multiple)
            for d in range(1, len(alone_runs)) if full else sorted({1, len(alone_runs) - 1}):
                alone_batch, length = alone_runs[d]
                alone = forward(alone_batch).flatten()[:length].float()
                window = slice(bounds[d], bounds[d + 1])
                diff = (alone - packed[window])[packed_mask[window]].abs()
                difference = float(diff.max()) if diff.numel() else 0.0
                worst = max(worst, difference)
                checked += 1
                if difference > TOLERANCE[dtype]:
                    raise DocumentMaskingError(
                        f"document masking leaks: document {d + 1} of {len(alone_runs)} in packed sample {i} has "
                        f"losses up to {difference:.3g} away from the same document alone (tolerance "
                        f"{TOLERANCE[dtype]:g}): the attention backend lets packed documents see each other"
                    )
    return f"document masking checked: {checked} documents packed and alone, largest loss difference {worst:.2g}"
