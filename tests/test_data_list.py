"""Data lists: parsing (columns, comments, relative paths, corpus labels), the one-line file:line errors for every
malformed case, the .idx token reader against megatron-core, full-precision atomic writing, and validation speed
on 2,500 files."""

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.data_list import (
    DataEntry,
    DataListError,
    corpus_table,
    find_problems,
    parse_data_list,
    parse_data_lists,
    parse_data_path,
    read_index,
    token_counts,
    validate,
    write_data_list,
)
from megatron_ext.data.indexed import IndexedDatasetWriter


def make_dataset(prefix: Path, n_tokens: int, vocab_size: int = 258, docs: int = 2) -> str:
    """A small real .bin/.idx pair of ``n_tokens`` tokens split into ``docs`` documents."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tokens = np.arange(n_tokens) % vocab_size
    with IndexedDatasetWriter(prefix, vocab_size) as w:
        for part in np.array_split(tokens, docs):
            w.add_document(part)
    return str(prefix)


def write_list(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def data(tmp_path):
    """Three datasets in two corpus folders: books/a (100 tokens), books/b (50), web/c (30, int32 tokens)."""
    make_dataset(tmp_path / "books" / "a", 100)
    make_dataset(tmp_path / "books" / "b", 50)
    make_dataset(tmp_path / "web" / "c", 30, vocab_size=70000)
    return tmp_path


def problem(entries) -> str:
    with pytest.raises(DataListError) as info:
        validate(entries)
    message = str(info.value)
    assert "\n" not in message
    return message


def parse_error(path) -> str:
    with pytest.raises(DataListError) as info:
        parse_data_list(path)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---- parsing ----------------------------------------------------------------------------------------------


def test_three_and_two_columns_comments_and_relative_paths(data):
    lst = write_list(
        data / "lists" / "mix.txt",
        "# a full-line comment\n"
        "\n"
        "0.5 ../books/a  fiction   # a trailing comment\n"
        "   \t\n"
        f"2 {data}/books/b\n"
        "1e-12 ../web/c\n",
    )
    entries = parse_data_list(lst)
    assert entries == [
        DataEntry(0.5, str(data / "books" / "a"), "fiction", f"{lst}:3"),
        DataEntry(2.0, str(data / "books" / "b"), "books", f"{lst}:5"),
        DataEntry(1e-12, str(data / "web" / "c"), "web", f"{lst}:6"),
    ]
    validate(entries)


def test_relative_prefixes_do_not_depend_on_the_working_directory(data, monkeypatch):
    lst = write_list(data / "lists" / "l.txt", "1 ../books/a\n")
    monkeypatch.chdir("/")
    assert parse_data_list(lst)[0].prefix == str(data / "books" / "a")
    monkeypatch.chdir(data / "lists")
    assert parse_data_list("l.txt")[0].prefix == str(data / "books" / "a")


def test_hash_inside_a_path_is_not_a_comment_and_a_bom_is_ignored(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_bytes("\ufeff1 /data/run#2/a corpus#1 # comment\r\n".encode())
    assert parse_data_list(lst) == [DataEntry(1.0, "/data/run#2/a", "corpus#1", f"{lst}:1")]


def test_several_lists_concatenate_and_duplicates_across_them_name_both_lines(data):
    a = write_list(data / "a.txt", "1 books/a\n1 books/b\n")
    b = write_list(data / "b.txt", "# c\n1 web/c\n3 books/b\n")
    entries = parse_data_lists([a, b])
    assert [e.source for e in entries] == [f"{a}:1", f"{a}:2", f"{b}:2", f"{b}:3"]
    msg = problem(entries)
    assert msg.startswith(f"{b}:3: duplicate prefix {data / 'books' / 'b'}, already listed at {a}:2;")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 a b c\n", ":1: 4 columns; expected 'weight prefix [corpus]' (2 or 3, no spaces in paths)"),
        ("# x\n1\n", ":2: 1 columns; expected 'weight prefix [corpus]' (2 or 3, no spaces in paths)"),
        ("1 a\nheavy a corpus\n", ":2: weight 'heavy' is not a number; expected 'weight prefix [corpus]'"),
        ("# only comments\n\n", ": no datasets listed; expected lines 'weight prefix [corpus]'"),
    ],
)
def test_malformed_lines(tmp_path, text, expected):
    lst = write_list(tmp_path / "l.txt", text)
    assert parse_error(lst) == f"{lst}{expected}"


def test_unreadable_list(tmp_path):
    assert parse_error(tmp_path / "nope.txt").startswith(f"{tmp_path / 'nope.txt'}: cannot read data list")
    binary = tmp_path / "x.idx"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    assert parse_error(binary) == f"{binary}: not a UTF-8 text file; expected lines 'weight prefix [corpus]'"


@pytest.mark.parametrize(
    ("weight", "expected"),
    [
        ("-0.5", "weight -0.5 is negative; expected a number >= 0"),
        ("nan", "weight nan is not finite; expected a number >= 0"),
        ("inf", "weight inf is not finite; expected a number >= 0"),
        ("-inf", "weight -inf is not finite; expected a number >= 0"),
    ],
)
def test_bad_weights(data, weight, expected):
    lst = write_list(data / "l.txt", f"1 books/a\n{weight} books/b\n")
    assert problem(parse_data_list(lst)) == f"{lst}:2: {expected}"


def test_all_weights_zero(data):
    lst = write_list(data / "l.txt", "0 books/a\n0.0 books/b\n")
    assert problem(parse_data_list(lst)) == f"{lst}: all 2 weights are zero; expected at least one positive"
    validate(parse_data_list(write_list(data / "m.txt", "0 books/a\n1e-300 books/b\n")))  # one positive is enough


def test_missing_files(data):
    (data / "web" / "c.bin").unlink()
    lst = write_list(data / "l.txt", "1 books/a\n1 books/missing\n1 web/c\n1 books/a.idx\n")
    problems = find_problems(parse_data_list(lst))
    assert problems[0] == (f"{lst}:2: {data}/books/missing.idx not found; expected a .bin/.idx pair at this prefix")
    assert problems[1] == f"{lst}:3: {data}/web/c.bin not found; expected a .bin next to c.idx"
    assert problems[2].startswith(f"{lst}:4: {data}/books/a.idx.idx not found;")
    assert problems[2].endswith("; drop the extension, list the prefix")
    assert problem(parse_data_list(lst)) == problems[0] + " (and 2 more problems)"


def test_bin_size_mismatch_and_corrupt_index(data):
    with open(data / "books" / "b.bin", "ab") as f:
        f.write(b"\0\0")  # one uint16 token too many
    (data / "web" / "c.idx").write_bytes((data / "web" / "c.idx").read_bytes()[:40])  # truncated index
    lst = write_list(data / "l.txt", "1 books/a\n1 books/b\n1 web/c\n")
    entries = parse_data_list(lst)
    problems = find_problems(entries)
    assert problems[0] == (
        f"{lst}:2: {data}/books/b.bin has 102 bytes but the .idx implies 100 (50 tokens x 2 bytes); "
        "the pair is mismatched or truncated"
    )
    assert problems[1].startswith(f"{lst}:3: {data}/web/c.idx is truncated: 40 bytes, its header implies ")
    assert len(problems) == 2
    validate(entries, check_sizes=False)  # existence only


def test_not_an_index(data):
    (data / "books" / "a.idx").write_bytes(b"not an index at all, just text here")
    lst = write_list(data / "l.txt", "1 books/a\n")
    assert problem(parse_data_list(lst)) == (
        f"{lst}:1: {data}/books/a.idx is not a Megatron .idx file (bad header); re-run preprocessing for this prefix"
    )


def test_data_path():
    assert parse_data_path(["/d/books/a"]) == [DataEntry(1.0, "/d/books/a", "books", "--data-path:1")]
    assert parse_data_path(["0.3", "/d/books/a", "7", "/d/web/b"]) == [
        DataEntry(0.3, "/d/books/a", "books", "--data-path:1"),
        DataEntry(7.0, "/d/web/b", "web", "--data-path:2"),
    ]
    with pytest.raises(DataListError, match=r"^--data-path: 3 items; expected pairs 'weight prefix'"):
        parse_data_path(["1", "/d/a", "2"])
    with pytest.raises(DataListError, match=r"^--data-path:2: weight '/d/b' is not a number; expected pairs 'weight"):
        parse_data_path(["1", "/d/a", "/d/b", "2"])


# ---- reading the .idx ---------------------------------------------------------------------------------------


def test_token_counts_match_megatron_core(data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    make_dataset(data / "multi" / "m", 257, docs=5)
    entries = [DataEntry(1.0, str(data / p), "x", "t") for p in ("books/a", "books/b", "web/c", "multi/m")]
    counts = token_counts(entries)
    assert counts.dtype == np.int64 and counts.tolist() == [100, 50, 30, 257]
    for entry, n in zip(entries, counts):
        ds = IndexedDataset(entry.prefix)
        assert int(ds.sequence_lengths.sum()) == n
        info = read_index(entry.prefix + ".idx")
        assert info.bin_size == os.path.getsize(entry.prefix + ".bin")
        assert (info.sequences, info.documents) == (len(ds), len(ds.document_indices))
        del ds


def test_corpus_table(data):
    lst = write_list(data / "l.txt", "3 books/a\n1 books/b\n4 web/c\n")
    rows = corpus_table(parse_data_list(lst))
    assert [(r.corpus, r.files, r.tokens, r.weight, r.share) for r in rows] == [
        ("books", 2, 150, 4.0, 0.5),
        ("web", 1, 30, 4.0, 0.5),
    ]


# ---- writing ------------------------------------------------------------------------------------------------


def test_write_round_trips_every_weight_exactly(tmp_path):
    weights = [1e-12, 5e-324, 0.1, 1 / 3, 2.5e15, 0.0, math.pi]
    entries = [DataEntry(w, f"/d/c{i}/p{i}", f"corpus{i % 2}", "t") for i, w in enumerate(weights)]
    out = tmp_path / "sub" / "out.txt"
    write_data_list(entries, out, header="made by a test\nsecond line")
    text = out.read_text()
    assert text.startswith("# made by a test\n# second line\n1e-12 /d/c0/p0 corpus0\n")
    back = parse_data_list(out)
    assert [e.weight for e in back] == weights
    assert [(e.prefix, e.corpus) for e in back] == [(e.prefix, e.corpus) for e in entries]
    assert os.listdir(out.parent) == ["out.txt"]  # no temporary left behind


def test_write_refuses_unwritable_fields_and_keeps_the_old_list(tmp_path):
    out = write_list(tmp_path / "out.txt", "old\n")
    for bad in (DataEntry(1.0, "/d/a b", "c", "x:1"), DataEntry(1.0, "/d/a", "my corpus", "x:1")):
        with pytest.raises(DataListError, match=r"^x:1: .* cannot be written to a data list"):
            write_data_list([bad], out)
    assert out.read_text() == "old\n" and os.listdir(tmp_path) == ["out.txt"]


def test_relative_prefix_is_written_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_data_list([DataEntry(1.0, "books/a", "books", "t")], tmp_path / "lists" / "l.txt")
    assert parse_data_list(tmp_path / "lists" / "l.txt")[0].prefix == str(tmp_path / "books" / "a")


# ---- speed --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_validate_2500_files_is_fast(tmp_path):
    """ALCF lists hold thousands of shards: validation must be stat + header reads, not dataset opens."""
    make_dataset(tmp_path / "proto", 64, docs=4)
    idx, bin_ = (tmp_path / "proto.idx").read_bytes(), (tmp_path / "proto.bin").read_bytes()
    lines = []
    for i in range(2500):
        folder = tmp_path / f"corpus{i % 25}"
        folder.mkdir(exist_ok=True)
        (folder / f"shard{i}.idx").write_bytes(idx)  # plain copies: 2,500 fsync'ed writer runs would be slow
        (folder / f"shard{i}.bin").write_bytes(bin_)
        lines.append(f"{i + 1} corpus{i % 25}/shard{i}\n")
    lst = write_list(tmp_path / "big.txt", "".join(lines))
    start = time.perf_counter()
    entries = parse_data_list(lst)
    validate(entries)
    counts = token_counts(entries)
    rows = corpus_table(entries, counts)
    elapsed = time.perf_counter() - start
    print(f"parse + validate + token_counts + corpus_table of 2,500 files: {elapsed:.3f} s")
    assert len(entries) == 2500 and int(counts.sum()) == 2500 * 64 and len(rows) == 25
    assert elapsed < 5.0
