"""The strong-shift builder (megatron_ext/data/shift.py): a seeded token permutation, applied to a corpus
losslessly (the inverse gives back the source's bytes), read by megatron-core, with one-line mistakes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.data.builtin_corpus import iter_documents, stdlib_files
from megatron_ext.data.indexed import IndexedDatasetWriter
from megatron_ext.data.shift import inverse_permutation, main, token_permutation
from megatron_ext.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six stdlib modules, the second split into two sequences (the index must survive unchanged)."""
    prefix = tmp_path_factory.mktemp("shift") / "d0"
    with IndexedDatasetWriter(prefix, TOK.vocab_size) as writer:
        for k, (_, text) in enumerate(iter_documents(stdlib_files()[:6])):
            doc = np.append(TOK.tokenize_array(text), TOK.eod)
            writer.add_document(doc, [10, doc.size - 10] if k == 1 else None)
    return prefix


def test_permutation_is_seeded_and_keeps_the_special_ids() -> None:
    perm = token_permutation(TOK.vocab_size, (TOK.eod, TOK.pad), seed=1)
    assert sorted(perm.tolist()) == list(range(TOK.vocab_size))  # a bijection
    assert perm[TOK.eod] == TOK.eod and perm[TOK.pad] == TOK.pad
    assert np.array_equal(perm, token_permutation(TOK.vocab_size, (TOK.pad, TOK.eod), seed=1))  # deterministic
    assert not np.array_equal(perm, token_permutation(TOK.vocab_size, (TOK.eod, TOK.pad), seed=2))
    assert (perm[:256] == np.arange(256)).sum() < 8  # almost every byte means something else
    assert np.array_equal(inverse_permutation(perm)[perm], np.arange(TOK.vocab_size))


def test_shift_maps_every_token_and_maps_back(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """D1 = perm(D0) token by token (checked against a dict lookup), same index; --inverse gives D0's bytes."""
    d1, back = corpus.parent / "d1" / "d1", corpus.parent / "back"
    assert main(["--input", str(corpus), "--output-prefix", str(d1), "--seed", "7"]) == 0
    assert main(["--input", str(d1), "--output-prefix", str(back), "--seed", "7", "--inverse"]) == 0
    assert "under permutation seed 7" in capsys.readouterr().out
    assert back.with_suffix(".bin").read_bytes() == corpus.with_suffix(".bin").read_bytes()
    assert back.with_suffix(".idx").read_bytes() == corpus.with_suffix(".idx").read_bytes()
    assert d1.with_suffix(".idx").read_bytes() == corpus.with_suffix(".idx").read_bytes()

    lookup = dict(enumerate(token_permutation(TOK.vocab_size, (TOK.eod, TOK.pad), 7).tolist()))
    src, dst = IndexedDataset(str(corpus)), IndexedDataset(str(d1))  # megatron-core reads the shifted corpus
    assert len(dst) == len(src) == 7 and list(dst.document_indices) == list(src.document_indices)
    for i in range(len(src)):
        assert dst[i].tolist() == [lookup[t] for t in src[i].tolist()]
    assert (
        b"def " in corpus.with_suffix(".bin").read_bytes()[::2]
        and b"def " not in d1.with_suffix(".bin").read_bytes()[::2]
    )
    again = corpus.parent / "again"
    main(["--input", str(corpus), "--output-prefix", str(again), "--seed", "7"])
    assert again.with_suffix(".bin").read_bytes() == d1.with_suffix(".bin").read_bytes()  # deterministic


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "{tmp}/none", "--output-prefix", "{tmp}/x"], "--input {tmp}/none: "),
        (["--input", "{src}", "--output-prefix", "{src}"], "--output-prefix is --input"),
        (["--input", "{src}", "--output-prefix", "{tmp}/x", "--seed", "-1"], "--seed -1 must be >= 0"),
        (["--input", "{wide}", "--output-prefix", "{tmp}/x"], "4-byte tokens, but a vocabulary of 258 ids"),
    ],
)
def test_mistakes_are_one_line_and_write_nothing(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    wide = tmp_path / "wide"  # a corpus of a 100k-id vocabulary (int32 tokens): not ByteTokenizer's
    with IndexedDatasetWriter(wide, 100_000) as writer:
        writer.add_document([1, 2, 99_999])
    fill = {"tmp": str(tmp_path), "src": str(corpus), "wide": str(wide)}
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(**fill) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
