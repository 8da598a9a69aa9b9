"""--mock-data: synthetic training data, so a pasted Megatron-LM command line runs without data files.

Documents of random length (1/4 to 2 samples) of uniformly random token ids other than the tokenizer's
end-of-document id, each followed by it, written once as a .bin/.idx dataset under --data-cache-path (keyed by the
vocabulary) and then read like any other: splits, blending, resume and validation work unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megatron_ext.data.builtin_corpus import _file_lock
from megatron_ext.data.indexed import IndexedDatasetWriter
from megatron_ext.data.tokenizers import Tokenizer

MOCK_CORPUS = "mock"
MOCK_TOKENS = 1 << 20  # the dataset's size: longer runs go through it in epochs, as through any small corpus
_SEED = 1234  # fixed: the data does not change with --seed (which orders the samples)


def build_mock_corpus(out_dir: str | Path, tokenizer: Tokenizer, seq_length: int) -> str:
    """Writes (or reuses) the mock dataset for this tokenizer and sample length; returns its prefix."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = max(MOCK_TOKENS, 64 * (seq_length + 1))
    prefix = str(out / f"mock_{tokenizer.name}_v{tokenizer.vocab_size}_s{seq_length}_{tokens}")
    with _file_lock(out / ".lock"):
        if os.path.exists(prefix + ".idx"):  # published last, atomically: the pair is whole
            return prefix
        rng = np.random.default_rng(_SEED)
        with IndexedDatasetWriter(prefix, tokenizer.vocab_size) as writer:
            written = 0
            while written < tokens:
                n = int(rng.integers(max(seq_length // 4, 1), 2 * seq_length + 1))
                doc = np.empty(n + 1, dtype=np.int64)
                ids = rng.integers(0, max(tokenizer.vocab_size - 1, 1), n)
                doc[:-1] = ids + (ids >= tokenizer.eod)  # every id but end-of-document
                doc[-1] = tokenizer.eod
                writer.add_document(doc)
                written += n + 1
    return prefix
