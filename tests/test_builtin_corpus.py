"""The built-in stdlib corpus: megatron-core reads it, it is faithful, cached, deterministic and safe to
build from several processes at once."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.data.builtin_corpus import (
    SKIP_DIRS,
    build_builtin_corpus,
    iter_documents,
    load_manifest,
    stdlib_files,
)
from megatron_ext.data.tokenizers import ByteTokenizer

N_DOCS = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, build_builtin_corpus(out, ByteTokenizer(), max_documents=N_DOCS)


def test_file_list_is_sorted_and_filtered():
    files = stdlib_files()
    rels = [rel for rel, _ in files]
    assert rels == sorted(rels) and len(rels) > 100
    assert all(rel.endswith(".py") for rel in rels)
    assert not any(set(rel.split("/")[:-1]) & SKIP_DIRS for rel in rels)
    assert "os.py" in rels and "json/decoder.py" in rels


def test_builds_and_megatron_reads_it(built):
    out, prefix = built
    assert prefix == str(out / "stdlib_byte_text_document")
    ds = IndexedDataset(prefix)
    assert len(ds) == N_DOCS and ds.index.dtype == np.uint16
    tok = ByteTokenizer()
    expected = [text for _, text in itertools.islice(iter_documents(stdlib_files()), N_DOCS)]
    for i, text in enumerate(expected):
        doc = ds[i]
        assert doc[-1] == tok.eod and tok.eod not in doc[:-1]
        assert tok.detokenize(doc.tolist()) == text
    manifest = load_manifest(prefix)
    assert manifest["documents"] == N_DOCS
    assert manifest["tokens"] == int(ds.sequence_lengths.sum()) == sum(len(t.encode()) + 1 for t in expected)
    assert manifest["tokenizer"] == "byte" and manifest["python"] == sys.version.split()[0]


def test_first_document_is_first_module_source(built):
    _, prefix = built
    rel, path = stdlib_files()[0]
    ds = IndexedDataset(prefix)  # keep it referenced: its arrays are views of an mmap it closes on collection
    doc = ds[0]
    assert ByteTokenizer().detokenize(doc.tolist()) == path.read_text(encoding="utf-8")


def test_second_call_is_a_noop(built):
    out, prefix = built
    stamps = {ext: os.stat(prefix + ext).st_mtime_ns for ext in (".bin", ".idx", ".json")}
    assert build_builtin_corpus(out, ByteTokenizer(), max_documents=N_DOCS) == prefix
    assert {ext: os.stat(prefix + ext).st_mtime_ns for ext in stamps} == stamps


def test_deterministic_across_directories(built, tmp_path):
    _, prefix = built
    other = build_builtin_corpus(tmp_path / "again", ByteTokenizer(), max_documents=N_DOCS)
    for ext in (".bin", ".idx", ".json"):
        with open(prefix + ext, "rb") as a, open(other + ext, "rb") as b:
            assert a.read() == b.read(), ext


def test_changed_inputs_rebuild(tmp_path):
    prefix = build_builtin_corpus(tmp_path, ByteTokenizer(), max_documents=2)
    assert len(IndexedDataset(prefix)) == 2
    assert build_builtin_corpus(tmp_path, ByteTokenizer(), max_documents=3) == prefix
    assert len(IndexedDataset(prefix)) == 3
    # A damaged .bin (wrong size for the manifest) is rebuilt too.
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    build_builtin_corpus(tmp_path, ByteTokenizer(), max_documents=3)
    assert os.path.getsize(prefix + ".bin") == 2 * load_manifest(prefix)["tokens"]


def test_concurrent_builds_and_cli(tmp_path):
    cmd = [sys.executable, "-m", "megatron_ext.data.builtin_corpus", "--out", str(tmp_path)]
    cmd += ["--max-documents", "40"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    prefix = str(tmp_path / "stdlib_byte_text_document")
    manifest = load_manifest(prefix)
    for stdout, _ in outputs:
        lines = stdout.splitlines()
        assert lines[0] == prefix
        assert lines[1].startswith(f"documents=40 tokens={manifest['tokens']} seconds=")
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".lock"] + [os.path.basename(prefix) + ext for ext in (".bin", ".idx", ".json")]
    )
    assert len(IndexedDataset(prefix)) == 40


def test_cli_rejects_bad_tokenizer(tmp_path):
    cmd = [sys.executable, "-m", "megatron_ext.data.builtin_corpus", "--out", str(tmp_path)]
    proc = subprocess.run(
        cmd + ["--tokenizer-type", "SentencePieceTokenizer"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "--tokenizer-model is required" in proc.stderr


def test_megatron_gpt_dataset_accepts_tokenizer(built, tmp_path):
    # The tokenizer goes straight into megatron-core's config: it reads eod/pad/vocab_size and hashes
    # unique_identifiers into its index cache key.
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    _, prefix = built
    tok = ByteTokenizer()
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=64,
        blend=([prefix], None),
        split="1,0,0",
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [50, 0, 0], lambda: True, config).build()
    sample = train[0]
    assert sample["tokens"].shape == (64,) and int(sample["tokens"].max()) < tok.vocab_size
    assert json.dumps(tok.unique_identifiers)
