"""Train a SentencePiece tokenizer from jsonl (plain, .gz or .zst; files or folders), for --tokenizer-model.

    python tools/train_tokenizer.py --input corpus/ --output-prefix tok/sp32k --vocab-size 32000

Documents are fed line by line (SentencePiece drops "sentences" longer than --max-sentence-length bytes, and a
whole document usually is). The model gets an end-of-document piece (eos) that preprocessing appends with
--append-eod, and byte fallback so no text is ever unknown. Output appears atomically: PREFIX.model and
PREFIX.vocab are written under temporary names and renamed when training succeeded.

--code-layout is for source code: the newline and runs of 4, 8, 12 and 16 spaces are pieces of their own, and no
space is put before the text (SentencePiece's dummy prefix), so a line starts with the same pieces whether it is
a training line or follows a newline inside a document, and a continuation decoded on its own keeps its indent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

from megatron_ext.cli import OneLineParser, UserError, report
from megatron_ext.data.preprocess import PreprocessError, check_output_prefix, find_inputs, open_input


def iter_lines(files: Sequence[Path], key: str, max_documents: int | None) -> Iterator[str]:
    """Non-empty lines of each document's `key` text; a malformed json line is an error naming file:line."""
    documents = 0
    for path in files:
        with open_input(path) as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    text = json.loads(raw)[key]
                except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
                    raise PreprocessError(f"{path}:{number}: not a json object with a string {key!r}: {e}") from e
                except KeyError:
                    raise PreprocessError(f"{path}:{number}: no key {key!r}") from None
                if not isinstance(text, str):
                    raise PreprocessError(f"{path}:{number}: key {key!r} is {type(text).__name__}, not a string")
                yield from (line for line in text.splitlines() if line.strip())
                documents += 1
                if max_documents is not None and documents >= max_documents:
                    return


def train(args: argparse.Namespace) -> dict[str, object]:
    import sentencepiece as spm

    if args.vocab_size <= 0:
        raise PreprocessError(f"--vocab-size {args.vocab_size}: expected a positive number")
    if not 0 < args.character_coverage <= 1:
        raise PreprocessError(f"--character-coverage {args.character_coverage}: expected a fraction in (0, 1]")
    check_output_prefix(args.output_prefix)
    files = find_inputs(args.input)
    out = Path(args.output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    failure: list[PreprocessError] = []

    def lines() -> Iterator[str]:
        # sentencepiece turns an exception inside its iterator into its own RuntimeError: keep ours instead.
        try:
            yield from iter_lines(files, args.json_key, args.max_documents)
        except PreprocessError as e:
            failure.append(e)

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        tmp_prefix = str(Path(tmp) / out.name)
        try:
            _train_sentencepiece(spm, lines(), tmp_prefix, args)
        finally:
            if failure:
                raise failure[0]
        for ext in (".vocab", ".model"):  # the model last: its presence means the pair is complete
            os.replace(tmp_prefix + ext, str(out) + ext)
    return {"model": f"{out}.model", "vocab_size": args.vocab_size, "seconds": round(time.perf_counter() - start, 2)}


CODE_LAYOUT_PIECES = ["\n", *(" " * n for n in (16, 12, 8, 4))]  # the newline, indentation's levels


def _train_sentencepiece(spm: ModuleType, lines: Iterator[str], prefix: str, args: argparse.Namespace) -> None:
    """Lossless settings: no normalisation or whitespace folding (code keeps its indentation), byte fallback."""
    layout: dict[str, object] = {}
    if args.code_layout:
        layout = {"add_dummy_prefix": False, "user_defined_symbols": CODE_LAYOUT_PIECES}
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        bos_id=-1,
        eos_id=0,
        unk_id=1,
        pad_id=2,
        max_sentence_length=args.max_sentence_length,
        input_sentence_size=args.input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=args.threads,
        minloglevel=2,
        **layout,
    )


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="train_tokenizer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", nargs="+", required=True, help="jsonl files or folders of them")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--json-key", default="text", help="the json field holding the text")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-documents", type=int, default=None, help="stop after this many documents")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000, help="lines sampled for training")
    p.add_argument("--max-sentence-length", type=int, default=16384, help="longer lines are skipped (bytes)")
    p.add_argument(
        "--code-layout",
        action="store_true",
        help="newline and indentation (4-16 spaces) as pieces, no leading space added to the text (for code)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = train(args)
    except UserError as e:
        return report(e)
    except RuntimeError as e:  # sentencepiece's own complaints, e.g. a vocabulary larger than the text allows
        print(f"error: sentencepiece: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
