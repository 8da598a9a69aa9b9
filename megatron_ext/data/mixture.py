"""What a mixture of data lists gives a run: per-corpus usage and epochs, warnings, and a plot of the shares.

Shared by the data tools (inspect_data, mix_datasets, cpt_plan, build_data_cache). Token budgets are written as
researchers write them (2e12, 300B, 2T: `config.parse_count`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_ext.config import parse_count
from megatron_ext.data.data_list import DataEntry, DataListError, corpus_table, mix_lists


def parse_token_count(text: str) -> int:
    """``2000000``, ``2e12``, ``1.5T``, ``300B``: how researchers write training budgets (`config.parse_count`)."""
    try:
        value = parse_count(text)
    except argparse.ArgumentTypeError:
        value = 0
    if value <= 0:
        raise DataListError(f"--train-tokens {text!r}: expected a positive count such as 2000000, 2e12, 300B or 2T")
    return value


@dataclass(frozen=True)
class CorpusUsage:
    """One corpus over a run: how much of it is on disk and how much of it training would read."""

    corpus: str
    files: int
    tokens: int
    share: float
    sampled_tokens: float
    epochs: float
    max_file_epochs: float


def usage(entries: list[DataEntry], tokens: np.ndarray, train_tokens: int, fraction: float = 1.0) -> list[CorpusUsage]:
    """Per-corpus usage for a run of ``train_tokens`` over the ``fraction`` of each file that is the train split;
    also each corpus's worst file, whose epochs can exceed its corpus's when weights are not proportional to size."""
    total = math.fsum(e.weight for e in entries)
    file_epochs = {}
    for e, n in zip(entries, tokens):
        sampled = e.weight / total * train_tokens
        file_epochs[e.prefix] = sampled / (int(n) * fraction) if n else math.inf
    rows = []
    for row in corpus_table(entries, tokens):
        sampled = row.share * train_tokens
        worst = max(file_epochs[e.prefix] for e in entries if e.corpus == row.corpus)
        epochs = sampled / (row.tokens * fraction) if row.tokens else math.inf
        rows.append(CorpusUsage(row.corpus, row.files, row.tokens, row.share, sampled, epochs, worst))
    return rows


def warnings_for(rows: list[CorpusUsage], max_epochs: float) -> list[str]:
    """One WARNING line per corpus over the limit, and per corpus with a file over it (uneven weights)."""
    lines = []
    for r in rows:
        if r.epochs > max_epochs:
            lines.append(
                f"WARNING: corpus {r.corpus} would be repeated {r.epochs:.3g} times (> --max-epochs {max_epochs:g})"
            )
        elif r.max_file_epochs > max_epochs * (1 + 1e-9):  # tolerance: float noise in weight = tokens lists
            lines.append(
                f"WARNING: corpus {r.corpus}: some file would be repeated {r.max_file_epochs:.3g} times "
                f"(> --max-epochs {max_epochs:g}) although the corpus as a whole is at {r.epochs:.3g}"
            )
    return lines


@dataclass(frozen=True)
class MixInput:
    """One ``W LIST`` pair from --inputs, parsed and validated."""

    weight: float
    path: str
    entries: list[DataEntry]


def plot_mixture(inputs: Sequence[MixInput], path: str) -> None:
    """Horizontal bars of each corpus's share, stacked by the input list it came from; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = math.fsum(m.weight for m in inputs)
    corpora = sorted({e.corpus for m in inputs for e in m.entries})
    row = {c: i for i, c in enumerate(corpora)}
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.3 * len(corpora)))
    left = [0.0] * len(corpora)
    for m in inputs:
        shares = [0.0] * len(corpora)
        for e in mix_lists([(1.0, m.entries)]) if m.entries else []:  # the list's own proportions, summing to 1
            shares[row[e.corpus]] += 100 * (m.weight / total) * e.weight
        ax.barh(corpora, shares, left=left, label=f"{os.path.basename(m.path)} ({100 * m.weight / total:.3g}%)")
        left = [a + b for a, b in zip(left, shares)]
    for y, share in enumerate(left):
        ax.text(share, y, f" {share:.3g}%", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of samples (%)")
    ax.set_xlim(0, max(left) * 1.15 or 1)
    ax.set_title("data mixture by corpus")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"  # keep the extension: it picks the image format
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        plt.close(fig)
