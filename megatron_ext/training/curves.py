"""A run's loss curves from its tensorboard events, against tokens, and validation loss in bits per byte.

Loss per token depends on the tokenizer (a byte-level token carries one byte, a SentencePiece token three or
four); bits per byte does not, so runs with different tokenizers compare:
bits/byte = loss (nats/token) x tokens / bytes of the validation text / ln 2, with the tokens and bytes counted on
the validation documents the run evaluates on (the eod after each document is a token the loss counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_ext.config import Config
from megatron_ext.data.blend import split_range
from megatron_ext.data.data_list import parse_data_lists
from megatron_ext.data.gpt_data import training_entries
from megatron_ext.data.tokenizers import Tokenizer

TRAIN_LOSS = "train/lm_loss"
TRAIN_BATCH = "train/global_batch_size"


@dataclass
class Curve:
    """One scalar series: iterations, the tokens consumed at each, values."""

    steps: np.ndarray
    tokens: np.ndarray
    values: np.ndarray


def read_scalars(tensorboard_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tag -> (steps, values) of every scalar in the folder's event files; a step logged twice (a resumed run
    repeating iterations after its last checkpoint) keeps its latest value."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={SCALARS: 0})
    events.Reload()
    out = {}
    for tag in events.Tags()[SCALARS]:
        latest = {e.step: e.value for e in sorted(events.Scalars(tag), key=lambda e: e.wall_time)}
        steps = np.array(sorted(latest), dtype=np.int64)
        out[tag] = (steps, np.array([latest[s] for s in steps], dtype=np.float64))
    return out


def loss_curves(scalars: dict[str, tuple[np.ndarray, np.ndarray]], seq_length: int) -> dict[str, Curve]:
    """'train' and 'valid/<corpus>' loss curves with tokens consumed, from the logged global batch sizes (each
    log window's batch size times its iterations, so a batch-size ramp-up is followed)."""
    if TRAIN_LOSS not in scalars or TRAIN_BATCH not in scalars:
        raise ValueError(f"no {TRAIN_LOSS} and {TRAIN_BATCH} scalars: not a training run's tensorboard folder")
    batch_steps, batches = scalars[TRAIN_BATCH]
    windows = np.diff(batch_steps, prepend=0)
    known_steps = np.concatenate([[0], batch_steps])
    known_tokens = np.concatenate([[0], np.cumsum(windows * batches * seq_length)])

    def curve(tag: str) -> Curve:
        steps, values = scalars[tag]
        return Curve(steps, np.interp(steps, known_steps, known_tokens), values)

    curves = {"train": curve(TRAIN_LOSS)}
    for tag in sorted(scalars):
        if tag.startswith("valid/") and tag.endswith("/lm_loss"):
            curves[tag.removesuffix("/lm_loss")] = curve(tag)
    return curves


def validation_prefixes(cfg: Config, tokenizer: Tokenizer) -> dict[str, tuple[list[str], str, int]]:
    """corpus -> (dataset prefixes, split, split index) of the text the run validates on, chosen as
    megatron_ext.data.gpt_data.build_validation_sets chooses it."""
    if cfg.data.valid_data_file_list:
        entries, split, index = parse_data_lists(cfg.data.valid_data_file_list), "1,0,0", 0
    else:
        entries, split, index = training_entries(cfg, tokenizer), cfg.data.split, 1
    out: dict[str, tuple[list[str], str, int]] = {}
    for e in entries:
        if e.weight > 0:
            out.setdefault(e.corpus, ([], split, index))[0].append(e.prefix)
    return out


def bytes_per_token(prefixes: list[str], split: str, split_index: int, tokenizer: Tokenizer) -> float:
    """UTF-8 bytes of the split's documents (detokenized) per token the loss counts (eod included)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = text_bytes = 0
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        lo, hi = split_range(split, split_index, len(dataset.sequence_lengths))
        for i in range(lo, hi):
            ids = np.asarray(dataset[i])
            tokens += ids.size
            text_bytes += len(tokenizer.detokenize(ids[ids != tokenizer.eod]).encode("utf-8"))
    if tokens == 0 or text_bytes == 0:
        raise ValueError(f"no validation text in {', '.join(prefixes)} (split {split}, part {split_index})")
    return text_bytes / tokens


def bits_per_byte(loss_nats: float, bytes_per_tok: float) -> float:
    """Loss in nats per token -> bits per byte of text."""
    return loss_nats / bytes_per_tok / math.log(2)


def plot_loss_curves(
    curves: dict[str, Curve], out: str | Path, bytes_per_tok: float | None = None, title: str = ""
) -> None:
    """Train and validation loss against tokens; with bytes_per_tok, a right axis in bits per byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, c in curves.items():
        style = {"marker": "o", "markersize": 4} if name != "train" else {"linewidth": 1.2}
        ax.plot(c.tokens, c.values, label=name, **style)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if bytes_per_tok:
        factor = 1 / bytes_per_tok / math.log(2)
        scale = (lambda x: np.multiply(x, factor), lambda y: np.divide(y, factor))  # nats <-> bits, on array-likes
        right = ax.secondary_yaxis("right", functions=scale)
        right.set_ylabel("bits per byte of the validation text")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
