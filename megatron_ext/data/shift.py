"""A strong distribution shift made on the machine: a tokenized corpus under a fixed permutation of its token ids.

    python -m megatron_ext.data.shift --input data/d0/d0 --output-prefix data/d1/d1 --seed 1
    python -m megatron_ext.data.shift --input data/d1/d1 --output-prefix back/d0 --seed 1 --inverse   # D0 again

The permuted copy has the same documents, lengths and structure (indentation, nesting, repetition, document
boundaries) but every token id stands for another symbol: to the model it is a new language written in another
script, part of whose alphabet is the old one's letters with other meanings. That makes it a proxy for the strong
shifts of continual pre-training (a new language, code or math after web text): the statistics the model learnt
for each token are wrong on the new data, while what a model of this size can learn (the structure) is as easy as
before, so a loss on the new data is comparable to one on the old. The permutation is a pure function of
(vocabulary size, kept ids, seed), and the special ids (eod, pad) keep their place so documents stay documents;
the shift is lossless (``--inverse`` with the same seed gives back the source's bytes).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from megatron_ext.cli import OneLineParser, UserError, run_tool
from megatron_ext.data.indexed import read_index, token_dtype
from megatron_ext.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

_CHUNK = 1 << 22  # tokens per read/write: a large corpus is streamed, never held in memory


class ShiftError(UserError, ValueError):
    """A mistake in the shift's input (a missing or unreadable corpus, a vocabulary that does not fit it)."""


def token_permutation(vocab_size: int, keep: Iterable[int], seed: int) -> np.ndarray:
    """``perm[i]`` is the id that token ``i`` becomes: a seeded shuffle of every id except ``keep`` (fixed points)."""
    kept = sorted({int(k) for k in keep if 0 <= int(k) < vocab_size})
    perm = np.arange(vocab_size, dtype=np.int64)
    moving = np.setdiff1d(perm, np.asarray(kept, dtype=np.int64))
    perm[moving] = np.random.Generator(np.random.PCG64(seed)).permutation(moving)
    return perm


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(perm.size, dtype=perm.dtype)
    return inverse


def permute_corpus(src: str | Path, dst: str | Path, perm: np.ndarray) -> int:
    """Writes ``dst.{bin,idx}``: ``src``'s tokens mapped through ``perm``, its index unchanged (the same documents
    and sequence lengths). Published like IndexedDatasetWriter's output (temporaries, .bin renamed before .idx);
    returns the token count."""
    src, dst = str(src), str(dst)
    try:
        info = read_index(src + ".idx")
    except (OSError, ValueError) as err:
        raise ShiftError(f"--input {src}: {err}") from err
    dtype = token_dtype(perm.size)
    if info.token_size != dtype.itemsize:
        raise ShiftError(
            f"--input {src}: {info.token_size}-byte tokens, but a vocabulary of {perm.size} ids is stored in "
            f"{dtype.itemsize}-byte tokens; expected the tokenizer the corpus was made with"
        )
    if os.path.getsize(src + ".bin") != info.bin_size:
        raise ShiftError(
            f"--input {src}.bin has {os.path.getsize(src + '.bin')} bytes; its .idx implies {info.bin_size}"
        )
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = f"{dst}.bin.tmp-{os.getpid()}", f"{dst}.idx.tmp-{os.getpid()}"
    try:
        tokens = np.memmap(src + ".bin", dtype=dtype, mode="r") if info.tokens else np.zeros(0, dtype)
        with open(tmp_bin, "wb") as out:
            for start in range(0, info.tokens, _CHUNK):
                chunk = np.asarray(tokens[start : start + _CHUNK], dtype=np.int64)
                if chunk.size and int(chunk.max()) >= perm.size:
                    raise ShiftError(
                        f"--input {src}.bin holds id {int(chunk.max())}, outside the vocabulary of {perm.size}"
                    )
                out.write(perm[chunk].astype(dtype).tobytes())
        with open(src + ".idx", "rb") as f_in, open(tmp_idx, "wb") as f_out:
            f_out.write(f_in.read())
        with contextlib.suppress(FileNotFoundError):
            os.remove(dst + ".idx")  # never a new .bin beside an old .idx
        os.replace(tmp_bin, dst + ".bin")
        os.replace(tmp_idx, dst + ".idx")
    finally:
        for path in (tmp_bin, tmp_idx):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    return info.tokens


def run(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m megatron_ext.data.shift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="prefix of the source corpus (.bin/.idx)")
    parser.add_argument("--output-prefix", required=True, help="prefix of the shifted corpus to write")
    parser.add_argument("--seed", type=int, default=1, help="the permutation (the same seed gives the same shift)")
    parser.add_argument("--inverse", action="store_true", help="apply the inverse permutation (maps a shift back)")
    parser.add_argument("--tokenizer-type", default="ByteTokenizer", choices=TOKENIZER_TYPES)
    parser.add_argument("--tokenizer-model", default=None, help="model file/folder for non-byte tokenizers")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed {args.seed} must be >= 0")
    if os.path.abspath(args.input) == os.path.abspath(args.output_prefix):
        parser.error("--output-prefix is --input; expected a new prefix (the source is kept)")
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    keep = (tokenizer.eod, tokenizer.pad)
    perm = token_permutation(tokenizer.vocab_size, keep, args.seed)
    tokens = permute_corpus(args.input, args.output_prefix, inverse_permutation(perm) if args.inverse else perm)
    manifest = {"source": os.path.abspath(args.input), "shift": "permute", "seed": args.seed, "inverse": args.inverse}
    manifest |= {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "kept_ids": sorted(set(keep))}
    Path(f"{args.output_prefix}.shift.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {args.output_prefix}.bin/.idx: {tokens:,} tokens of {args.input} under permutation seed {args.seed}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
