"""The .bin/.idx writer: megatron-core reads it, it matches megatron-core's builder byte for byte, and it is
atomic (an interrupted write leaves nothing behind and never damages an existing prefix)."""

import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_ext.data.indexed import IndexedDatasetWriter, read_documents, token_dtype


def _docs(vocab_size: int, n: int = 20, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab_size, size=int(rng.integers(1, 300))) for _ in range(n)]
    docs[3] = np.zeros(0, dtype=np.int64)  # an empty document is legal in the format
    docs[-1][-1] = vocab_size - 1  # the largest id survives the dtype
    return docs


def _write(prefix, vocab_size, docs, lengths=None) -> None:
    with IndexedDatasetWriter(prefix, vocab_size) as writer:
        for i, doc in enumerate(docs):
            writer.add_document(doc, lengths[i] if lengths else None)
        writer.finalize()


def test_round_trip(tmp_path):
    docs = _docs(258)
    prefix = str(tmp_path / "ds")
    _write(prefix, 258, docs)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]
    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs) and ds.index.dtype == np.uint16
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
    got = list(read_documents(prefix))
    assert len(got) == len(docs)
    for a, b in zip(got, docs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("vocab_size", [258, 65499, 65500, 200_000])
def test_bytes_equal_megatron_builder(tmp_path, vocab_size):
    docs = _docs(vocab_size)
    # The third document holds three sequences, as multi-sequence (e.g. sentence-split) documents do.
    lengths = [[len(d)] for d in docs]
    lengths[2] = [1, len(docs[2]) - 3, 2]
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    _write(ours, vocab_size, docs, lengths)

    builder = IndexedDatasetBuilder(theirs + ".bin", dtype=DType.optimal_dtype(vocab_size))
    for doc, lens in zip(docs, lengths):
        builder.add_document(torch.from_numpy(doc), lens)
    builder.finalize(theirs + ".idx")

    for ext in (".bin", ".idx"):
        with open(ours + ext, "rb") as a, open(theirs + ext, "rb") as b:
            assert a.read() == b.read(), ext
    ds = IndexedDataset(ours)
    assert len(ds) == len(docs) + 2
    np.testing.assert_array_equal(ds[2], docs[2][:1])
    np.testing.assert_array_equal(next(x for i, x in enumerate(read_documents(ours)) if i == 2), docs[2])


@pytest.mark.parametrize("vocab_size", [2, 258, 32000, 65499, 65500, 128256])
def test_dtype_choice(vocab_size):
    expected = np.uint16 if vocab_size < 65500 else np.int32
    assert token_dtype(vocab_size) == expected == DType.optimal_dtype(vocab_size)


def test_exception_inside_with_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "ds", 258) as writer:
            writer.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_close_without_finalize_leaves_no_files(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "ds", 258)
    writer.add_document([1, 2, 3])
    assert len(os.listdir(tmp_path)) == 1  # only the temporary .bin
    writer.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="closed"):
        writer.add_document([1])


def test_interrupted_rewrite_keeps_old_prefix(tmp_path):
    prefix = str(tmp_path / "ds")
    _write(prefix, 258, [np.array([1, 2, 3])])
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetWriter(prefix, 258) as writer:
            writer.add_document([4, 5, 6, 7])
            raise KeyboardInterrupt
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_clean_exit_finalizes_and_overwrites(tmp_path):
    prefix = str(tmp_path / "ds")
    _write(prefix, 258, [np.array([1, 2, 3])])
    with IndexedDatasetWriter(prefix, 258) as writer:
        writer.add_document(np.array([9, 8], dtype=np.uint8))
    assert (writer.num_documents, writer.num_tokens) == (1, 2)
    assert [d.tolist() for d in read_documents(prefix)] == [[9, 8]]
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]


@pytest.mark.parametrize(
    "tokens, lengths, pattern",
    [
        ([0, 258], None, r"\[0, 258\)"),
        ([-1, 3], None, r"\[0, 258\)"),
        ([1, 2, 3], [1, 1], "do not add up"),
        ([[1, 2]], None, "1-D"),
        ([0.5, 1.0], None, "integers"),
    ],
)
def test_rejects_bad_documents(tmp_path, tokens, lengths, pattern):
    with IndexedDatasetWriter(tmp_path / "ds", 258) as writer:
        with pytest.raises(ValueError, match=pattern):
            writer.add_document(tokens, lengths)
        writer.close()
    assert os.listdir(tmp_path) == []


def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no tokens"):
        with IndexedDatasetWriter(tmp_path / "ds", 258):
            pass
    assert os.listdir(tmp_path) == []
