"""tools/preprocess_data.py: jsonl (plain, gz, zst, folders) to .bin/.idx that megatron-core reads back exactly,
deterministic for any worker count, one-line errors, and all-or-nothing outputs even when interrupted."""

import errno
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.data import preprocess as pp
from megatron_ext.data.tokenizers import ByteTokenizer, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "def f(x):\n\treturn x  # café, naïve, 日本語, emoji 🚀",
    "",  # an empty document is kept (with --append-eod it is just the eod)
    "The quick brown fox jumps over the lazy dog. " * 20,
    'quotes " and \\ backslashes and \u2028 separators',
] + [f"line {i}: " + "token " * (i % 13) for i in range(40)]


def _write_jsonl(path: Path, docs: list[dict], blank_lines: bool = False) -> Path:
    text = "".join(json.dumps(d) + ("\n\n" if blank_lines and i % 7 == 0 else "\n") for i, d in enumerate(docs))
    data = text.encode("utf-8")
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def _docs(prefix: str) -> list[np.ndarray]:
    ds = IndexedDataset(prefix)
    assert len(ds) == len(ds.document_indices) - 1  # one sequence per document
    return [np.array(ds[i]) for i in range(len(ds))]


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _bytes(prefix: str) -> tuple[bytes, bytes]:
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 5),
        model_writer=model,
        vocab_size=400,  # byte_fallback alone needs 256 pieces
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    path.write_bytes(model.getvalue())
    return path


# ---- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer_type,workers", [("ByteTokenizer", 1), ("SentencePieceTokenizer", 2)])
def test_round_trip(tmp_path, sp_model, tokenizer_type, workers):
    model = sp_model if tokenizer_type != "ByteTokenizer" else None
    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)], blank_lines=True)
    stats = pp.preprocess([data], tmp_path / "out" / "c", tokenizer_type, model, append_eod=True, workers=workers)
    tok = build_tokenizer(tokenizer_type, model)
    prefix = str(tmp_path / "out" / "c_text_document")
    assert stats.outputs == {"text": prefix} and stats.documents == len(TEXTS) and stats.bad_lines == 0
    assert stats.bytes_read == data.stat().st_size
    got = _docs(prefix)
    assert len(got) == len(TEXTS)
    for doc, text in zip(got, TEXTS):
        np.testing.assert_array_equal(doc, np.append(tok.tokenize_array(text), tok.eod))
    assert stats.tokens["text"] == sum(len(d) for d in got)
    assert IndexedDataset(prefix).index.dtype == np.uint16
    assert _files(tmp_path / "out") == ["c_text_document.bin", "c_text_document.idx"]


def test_compressed_inputs_match_plain(tmp_path):
    docs = [{"text": t} for t in TEXTS]
    outs = {}
    for name in ("d.jsonl", "d.jsonl.gz", "d.jsonl.zst"):
        data = _write_jsonl(tmp_path / name, docs)
        pp.preprocess([data], tmp_path / name.replace(".", "_"), "ByteTokenizer", append_eod=True)
        outs[name] = _bytes(str(tmp_path / name.replace(".", "_")) + "_text_document")
    assert outs["d.jsonl.gz"] == outs["d.jsonl"] and outs["d.jsonl.zst"] == outs["d.jsonl"]


def test_folder_input_takes_jsonl_files_sorted(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    parts = [TEXTS[:10], TEXTS[10:25], TEXTS[25:]]
    for name, texts in zip(("c.jsonl.zst", "a.jsonl", "b.jsonl.gz"), (parts[2], parts[0], parts[1])):
        _write_jsonl(folder / name, [{"text": t} for t in texts])
    (folder / "notes.txt").write_text("not an input")
    (folder / "sub").mkdir()
    _write_jsonl(folder / "sub" / "z.jsonl", [{"text": "not read: folders are not searched recursively"}])
    assert [p.name for p in pp.find_inputs([folder])] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]

    stats = pp.preprocess([folder], tmp_path / "out", "ByteTokenizer")
    assert [d.astype(np.uint8).tobytes() for d in _docs(stats.outputs["text"])] == [t.encode() for t in TEXTS]
    # The same as naming the files, and a folder can be mixed with files.
    files = [folder / "a.jsonl", folder / "b.jsonl.gz", folder / "c.jsonl.zst"]
    pp.preprocess(files, tmp_path / "files", "ByteTokenizer")
    assert _bytes(stats.outputs["text"]) == _bytes(str(tmp_path / "files_text_document"))
    both = pp.preprocess([folder, folder / "a.jsonl"], tmp_path / "both", "ByteTokenizer")
    assert both.documents == len(TEXTS) + 10


def test_multiple_json_keys(tmp_path):
    docs = [{"text": t, "title": f"title {i}", "other": 1} for i, t in enumerate(TEXTS)]
    data = _write_jsonl(tmp_path / "data.jsonl", docs)
    stats = pp.preprocess([data], tmp_path / "m", "ByteTokenizer", json_keys=["text", "title"], append_eod=True)
    assert _files(tmp_path) == sorted(
        ["data.jsonl", "m_text_document.bin", "m_text_document.idx", "m_title_document.bin", "m_title_document.idx"]
    )
    for key in ("text", "title"):
        got = _docs(stats.outputs[key])
        assert [d[:-1].astype(np.uint8).tobytes().decode() for d in got] == [d[key] for d in docs]
        assert all(d[-1] == ByteTokenizer.EOD for d in got)


def test_worker_counts_give_identical_bytes(tmp_path):
    docs = [{"text": t} for t in TEXTS * 3]
    data = _write_jsonl(tmp_path / "data.jsonl", docs, blank_lines=True)
    outs = []
    for workers, chunk in ((1, 256), (2, 1), (2, 7), (3, 5)):
        prefix = tmp_path / f"w{workers}c{chunk}"
        pp.preprocess([data], prefix, "ByteTokenizer", append_eod=True, workers=workers, chunk_size=chunk)
        outs.append(_bytes(f"{prefix}_text_document"))
    assert all(o == outs[0] for o in outs[1:])


# ---- errors -----------------------------------------------------------------------------------------------


def _bad_data(tmp_path: Path, bad_line: str, lineno: int = 17) -> None:
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(1, 30)]
    lines[lineno - 1] = bad_line
    (tmp_path / "data.jsonl").write_bytes(("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape"))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    "bad_line,message",
    [
        ('{"txt": "x"}', "data.jsonl:17: no key 'text'"),
        ('{"text": "x"', "data.jsonl:17: not a valid JSON line"),
        ('["text"]', "data.jsonl:17: not a JSON object"),
        ('{"text": null}', "data.jsonl:17: key 'text' is NoneType, not a string"),
        ('{"text": "\\ud800"}', "data.jsonl:17: text is not valid Unicode (lone surrogate)"),
        ('{"text": "caf\udce9"}', "data.jsonl:17: not valid UTF-8 (byte 13)"),
    ],
)
def test_bad_line_is_one_line_error_and_writes_nothing(tmp_path, monkeypatch, capsys, bad_line, message, workers):
    monkeypatch.chdir(tmp_path)
    _bad_data(tmp_path, bad_line)
    rc = pp.main(
        ["--input", "data.jsonl", "--output-prefix", "out", "--tokenizer-type", "ByteTokenizer"]
        + ["--workers", str(workers), "--chunk-size", "4"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {message}\n"
    assert _files(tmp_path) == ["data.jsonl"]


def test_skip_bad_lines_counts_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _bad_data(tmp_path, '{"txt": "x"}', lineno=3)
    with open("data.jsonl", "a") as f:
        f.write("not json\n")
    argv = ["--input", "data.jsonl", "--output-prefix", "out", "--tokenizer-type", "ByteTokenizer", "--skip-bad-lines"]
    assert pp.main(argv) == 0
    out = capsys.readouterr().out
    assert "documents 28 " in out and "skipped bad lines 2" in out and "tokens/s" in out and "MB/s" in out
    assert [d.astype(np.uint8).tobytes().decode() for d in _docs("out_text_document")] == [
        f"doc {i}" for i in range(1, 30) if i != 3
    ]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--input", "missing.jsonl"], "error: missing.jsonl: no such file or folder\n"),
        (["--input", "empty"], "error: empty: folder holds no .jsonl, .jsonl.gz, .jsonl.zst files\n"),
        (["--input", "data.jsonl", "--json-keys", "text", "text"], "error: --json-keys text text: a key is repeated\n"),
        (["--input", "blank.jsonl"], "error: blank.jsonl: no documents\n"),
        (["--input", "data.jsonl", "--workers", "0"], "error: --workers must be at least 1, got 0\n"),
    ],
)
def test_input_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    _write_jsonl(tmp_path / "data.jsonl", [{"text": "x"}])
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    (tmp_path / "empty").mkdir()
    assert pp.main([*argv, "--output-prefix", "out", "--tokenizer-type", "ByteTokenizer"]) == 2
    assert capsys.readouterr().err == message
    assert _files(tmp_path) == ["blank.jsonl", "data.jsonl", "empty"]


def test_output_prefix_under_a_file_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write_jsonl(tmp_path / "data.jsonl", [{"text": "x"}])
    argv = ["--input", "data.jsonl", "--output-prefix", "data.jsonl/out", "--tokenizer-type", "ByteTokenizer"]
    assert pp.main(argv) == 2
    expected = f"error: --output-prefix data.jsonl/out: {tmp_path / 'data.jsonl'} is a file; expected a folder\n"
    assert capsys.readouterr().err == expected
    assert _files(tmp_path) == ["data.jsonl"]


def test_error_keeps_existing_output(tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in TEXTS])
    pp.preprocess([good], tmp_path / "out", "ByteTokenizer")
    before = _bytes(str(tmp_path / "out_text_document"))
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"nope": "b"}])
    with pytest.raises(pp.PreprocessError, match="bad.jsonl:2: no key 'text'"):
        pp.preprocess([bad], tmp_path / "out", "ByteTokenizer")
    assert _bytes(str(tmp_path / "out_text_document")) == before
    assert _files(tmp_path) == ["bad.jsonl", "good.jsonl", "out_text_document.bin", "out_text_document.idx"]


@pytest.mark.parametrize(
    ("code", "reason"), [(errno.EROFS, "read-only file system"), (errno.ENOSPC, "no space left on device")]
)
def test_an_unwritable_output_folder_is_one_line_error(tmp_path, monkeypatch, capsys, code, reason):
    """A read-only folder (at the first write) or a disk that fills (mid-run): an OSError traceback before."""
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in TEXTS])
    pp.preprocess([good], tmp_path / "out" / "x", "ByteTokenizer")
    before = _bytes(str(tmp_path / "out" / "x_text_document"))

    def fail(self, tokens):
        raise OSError(code, os.strerror(code), self._bin_tmp)

    monkeypatch.setattr(pp.IndexedDatasetWriter, "add_document", fail)
    argv = ["--input", str(good), "--output-prefix", str(tmp_path / "out" / "x"), "--tokenizer-type", "ByteTokenizer"]
    assert pp.main(argv) == 2
    assert (
        capsys.readouterr().err
        == f"error: --output-prefix {tmp_path / 'out' / 'x'}: cannot write in {tmp_path / 'out'}: {reason}\n"
    )
    assert _bytes(str(tmp_path / "out" / "x_text_document")) == before
    assert _files(tmp_path / "out") == ["x_text_document.bin", "x_text_document.idx"]  # no temporaries left


def test_the_temporaries_of_a_killed_run_are_removed_by_the_next(tmp_path):
    """SIGKILL leaves `.tmp-PID` files (no clean-up runs); the next run removes those whose process is gone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [tmp_path / f"out_text_document.{ext}.tmp-{int(dead.stdout)}" for ext in ("bin", "idx")]
    live = tmp_path / f"out_text_document.bin.tmp-{os.getppid()}"  # a run still writing: kept
    other = tmp_path / f"other_text_document.bin.tmp-{int(dead.stdout)}"  # another prefix's: not ours to judge
    for path in (*stale, live, other):
        path.write_bytes(b"x" * 100)
    pp.preprocess([_write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])], tmp_path / "out", "ByteTokenizer")
    assert _files(tmp_path) == sorted(
        ["d.jsonl", "out_text_document.bin", "out_text_document.idx", live.name, other.name]
    )


@pytest.mark.parametrize("failure", ["raise", "die"])
def test_worker_failure_leaves_nothing(tmp_path, monkeypatch, failure):
    """A worker that raises surfaces its exception; one that dies fails the run instead of hanging Pool."""
    original = ByteTokenizer.tokenize_array

    def flaky(self, text):
        if text == "boom":
            if failure == "die":
                os._exit(3)
            raise RuntimeError("tokenizer exploded")
        return original(self, text)

    monkeypatch.setattr(ByteTokenizer, "tokenize_array", flaky)  # forked workers inherit the patch
    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": t} for t in TEXTS[:20] + ["boom"] + TEXTS[20:]])
    match = "tokenizer exploded" if failure == "raise" else "worker died"
    with pytest.raises(RuntimeError, match=match):
        pp.preprocess([data], tmp_path / "out", "ByteTokenizer", workers=2, chunk_size=2)
    assert _files(tmp_path) == ["data.jsonl"]


# ---- interrupts -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    """Many tiny documents: per-document work dominates, so a run lasts seconds on a few MB."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    path.write_text("".join(f'{{"text": "document number {i} of the big file"}}\n' for i in range(400_000)))
    return path


@pytest.mark.parametrize(
    "signum,workers",
    [(signal.SIGINT, 2), (signal.SIGTERM, 2), (signal.SIGTERM, 1)],
    ids=["SIGINT-w2", "SIGTERM-w2", "SIGTERM-w1"],
)
def test_interrupt_leaves_no_partial_output(tmp_path, big_jsonl, signum, workers):
    # A good dataset from an earlier run must survive an interrupted re-run into the same prefix.
    small = _write_jsonl(tmp_path / "small.jsonl", [{"text": t} for t in TEXTS])
    pp.preprocess([small], tmp_path / "out", "ByteTokenizer")
    before = _bytes(str(tmp_path / "out_text_document"))

    argv = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(big_jsonl)]
    argv += ["--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "ByteTokenizer", "--append-eod"]
    argv += ["--workers", str(workers), "--chunk-size", "2000"]
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an inherited
    # SIG_IGN: restore the default so that Ctrl-C is tested wherever the suite runs.
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Interrupt once tokens are being written, i.e. truly mid-way (the temporary .bin is growing).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        tmp = [p for p in tmp_path.iterdir() if ".bin.tmp" in p.name]
        if tmp and tmp[0].stat().st_size > 0:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, (out, err)
    assert f"interrupted ({signal.Signals(signum).name})" in err and "Traceback" not in err
    assert _files(tmp_path) == ["out_text_document.bin", "out_text_document.idx", "small.jsonl"]
    assert _bytes(str(tmp_path / "out_text_document")) == before


def test_pool_workers_start_with_interrupts_blocked(tmp_path, monkeypatch):
    """Workers start with SIGINT/SIGTERM blocked until their initializer has replaced the CLI's raising handler (a
    terminate() in that window used to print a worker's traceback). Replacements for dead workers are forked by
    the pool's maintenance thread, so that thread must hold the signals blocked too."""
    real_init = pp._init_worker

    def recording_init(*args):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        (tmp_path / f"mask.{os.getpid()}").write_text(" ".join(sorted(signal.Signals(s).name for s in blocked)))
        real_init(*args)
        (tmp_path / f"after.{os.getpid()}").write_text(str(signal.SIGTERM in signal.pthread_sigmask(0, [])))

    def blocked_in_thread(thread) -> set[int]:
        status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
        mask = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
        return {s for s in (signal.SIGINT, signal.SIGTERM) if mask & (1 << (s - 1))}

    monkeypatch.setattr(pp, "_init_worker", recording_init)
    with pp._worker_pool(2, ("ByteTokenizer", None, ["text"], False, {})) as pool:
        assert sorted(pool.map(abs, [-1, -2])) == [1, 2]
        workers = [p.pid for p in pool._pool]
        threads = [pool._worker_handler, pool._task_handler, pool._result_handler]
        assert [blocked_in_thread(t) for t in threads] == [{signal.SIGINT, signal.SIGTERM}] * 3
    for pid in workers:
        assert (tmp_path / f"mask.{pid}").read_text().split() == ["SIGINT", "SIGTERM"], pid
        assert (tmp_path / f"after.{pid}").read_text() == "False", pid
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the caller's mask is restored
