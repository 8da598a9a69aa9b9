"""tools/train_tokenizer.py: a model trained from jsonl loads through our tokenizer interface and round-trips."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

from megatron_ext.data.builtin_corpus import iter_documents, stdlib_files
from megatron_ext.data.tokenizers import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "train_tokenizer.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300)


def test_train_from_jsonl_gz_and_use_it(tmp_path: Path) -> None:
    docs = [text for _, text in iter_documents(stdlib_files()[:40])]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    proc = _run("--input", str(tmp_path), "--output-prefix", str(tmp_path / "tok" / "sp"), "--vocab-size", "1000")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    tok = build_tokenizer("SentencePieceTokenizer", report["model"])
    assert tok.vocab_size == 1000 and tok.eod == 0
    sample = "def main(argv):\n    return 0  # ünïcode\n"
    assert tok.detokenize(tok.tokenize(sample)) == sample  # byte fallback: nothing is unknown
    assert len(tok.tokenize(docs[0])) < 0.6 * len(docs[0].encode())  # merges learned beyond the 256 bytes
    assert not list((tmp_path / "tok").glob(".*tmp*"))


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    proc = _run("--input", str(tmp_path / "bad.jsonl"), "--output-prefix", str(tmp_path / "sp"), "--vocab-size", "50")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'bad.jsonl'}:2: no key 'text'"
    assert not list(tmp_path.glob("sp.*"))


def test_code_layout_tokenises_a_line_alike_anywhere(tmp_path: Path) -> None:
    """--code-layout: a document's tokens are its lines' tokens joined (newline and indentation are pieces, no
    leading space added), so a continuation decoded on its own keeps its indent; without it, a line at the start
    of a text gets SentencePiece's leading space and tokenises otherwise."""
    docs = [text for _, text in iter_documents(stdlib_files()[:20])]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    lines = ["class Stack:\n", "    def push(self, item):\n", "        self.items.append(item)  # ünïcode\n", "\n"]
    for flags, joined in ((["--code-layout"], True), ([], False)):
        prefix = tmp_path / ("code" if flags else "plain")
        proc = _run("--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(prefix), "--vocab-size", "500", *flags)
        assert proc.returncode == 0, proc.stderr
        tok = build_tokenizer("SentencePieceTokenizer", f"{prefix}.model")
        whole, per_line = tok.tokenize("".join(lines)), [tok.tokenize(line) for line in lines]
        assert (whole == sum(per_line, [])) is joined
        continuation = tok.detokenize(whole[len(per_line[0]) :])  # as generate.py decodes what follows a prompt
        assert (continuation == "".join(lines[1:])) is joined
        assert tok.detokenize(whole) == "".join(lines)
