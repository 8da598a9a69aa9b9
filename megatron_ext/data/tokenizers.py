"""Tokenizers behind one small interface that uses Megatron's attribute names.

megatron-core's ``GPTDatasetConfig(tokenizer=...)`` reads ``vocab_size``, ``eod``, ``pad`` and (to hash the
dataset cache key) ``unique_identifiers``, so any :class:`Tokenizer` here can be passed to it directly.
Nothing is ever downloaded: SentencePiece and Hugging Face tokenizers load from local files only.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from megatron_ext.cli import UserError
from megatron_ext.config import TOKENIZER_TYPES, DataConfig

# Files that define a Hugging Face tokenizer; their bytes go into the tokenizer's name so that two
# different tokenizers never share a cached dataset.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
# End-of-text spellings tried when a Hugging Face tokenizer does not declare an eos token.
_EOS_SPELLINGS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


def _slug(text: str) -> str:
    """File-name-safe form of ``text``, since tokenizer names end up in dataset prefixes."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-") or "tok"


def _digest(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(hashlib.sha256(chunk).digest())
    return h.hexdigest()[:8]


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be built from what the user gave (one line: the flag and what is expected)."""


class Tokenizer(ABC):
    """What training and data preparation need from a tokenizer (names as in Megatron)."""

    name: str
    """Short, file-name-safe identity (includes a content hash for model-file tokenizers)."""
    _vocab_size: int
    _eod: int
    _pad: int

    @property
    def vocab_size(self) -> int:
        """The real, unpadded vocabulary size: every id this tokenizer can emit is below it."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        """End-of-document id, appended after every document in the .bin files."""
        return self._eod

    @property
    def pad(self) -> int:
        """Padding id, or -1 when the tokenizer has none (megatron-core's convention; its datasets need an int)."""
        return self._pad

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Text to ids, without adding bos/eos/eod (the corpus builder appends ``eod`` itself)."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Ids to text; special and out-of-range ids (e.g. from a padded vocabulary) are dropped."""

    def tokenize_array(self, text: str) -> np.ndarray:
        """Like :meth:`tokenize` but as an integer array; overridden where that is much faster."""
        return np.asarray(self.tokenize(text), dtype=np.int64)

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        """megatron-core json-dumps ``config.tokenizer`` through this to key its dataset index cache."""
        return {
            "class": type(self).__name__,
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "pad": self.pad,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus eod=256 and pad=257: needs no model file, so it always works."""

    name = "byte"
    EOD = 256
    PAD = 257
    _vocab_size, _eod, _pad = 258, EOD, PAD

    def tokenize(self, text: str) -> list[int]:
        return self.tokenize_array(text).tolist()

    def tokenize_array(self, text: str) -> np.ndarray:
        # surrogateescape gives back the original bytes of text decoded with errors="surrogateescape".
        return np.frombuffer(text.encode("utf-8", errors="surrogateescape"), dtype=np.uint8)

    def detokenize(self, ids: Sequence[int]) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        data = arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``; eod is its eos id, or one id appended after its pieces if it has none."""

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise TokenizerError(f"--tokenizer-model {str(path)!r}: no such file; expected a SentencePiece .model file")
        import sentencepiece as spm

        data = path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError with C++ messages
            raise TokenizerError(f"--tokenizer-model {str(path)!r}: not a SentencePiece model ({err})") from err
        self.model_path = path
        self._pieces = self._sp.get_piece_size()
        eos = self._sp.eos_id()
        self._eod = eos if eos >= 0 else self._pieces
        self._vocab_size = self._pieces if eos >= 0 else self._pieces + 1
        pad = self._sp.pad_id()
        self._pad = pad if pad >= 0 else -1
        self.name = f"sp-{_slug(path.stem)}-{_digest(data)}"

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self._pieces])


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face tokenizer from a local folder or ``tokenizer.json``; never touches the network."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if not p.exists():
            raise TokenizerError(
                f"--tokenizer-model {str(p)!r}: no such file or folder; expected a local tokenizer.json "
                "or a folder holding one (nothing is downloaded)"
            )
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if p.is_dir():
            files = [p / f for f in HF_TOKENIZER_FILES if (p / f).is_file()]
            if (p / "tokenizer_config.json").is_file():
                tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            elif (p / "tokenizer.json").is_file():
                tok = PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json"))
            else:
                raise TokenizerError(
                    f"--tokenizer-model {str(p)!r}: expected a folder holding tokenizer.json or tokenizer_config.json"
                )
            stem = p.resolve().name
        else:
            files = [p]
            tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
            stem = p.resolve().parent.name if p.name == "tokenizer.json" else p.stem
        self.path = p
        self._tok = tok
        self._backend = getattr(tok, "backend_tokenizer", None)
        self._size = len(tok)  # includes added tokens, unlike tok.vocab_size
        eos = tok.eos_token_id
        if eos is None:
            vocab = tok.get_vocab()
            eos = next((vocab[s] for s in _EOS_SPELLINGS if s in vocab), None)
        self._eod = eos if eos is not None else self._size
        self._vocab_size = self._size if eos is not None else self._size + 1
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else -1
        self.name = f"hf-{_slug(stem)}-{_digest(*(f.name.encode() + f.read_bytes() for f in files))}"

    def tokenize(self, text: str) -> list[int]:
        # The backend (Rust) tokenizer is what the fast tokenizer calls anyway, minus the warning about
        # sequences longer than model_max_length, which whole documents always trigger.
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._tok.encode(text, add_special_tokens=False)

    def detokenize(self, ids: Sequence[int]) -> str:
        # One flat list of ids decodes to one string (a list of strings is for a batch of lists).
        return cast(str, self._tok.decode([int(i) for i in ids if 0 <= int(i) < self._size], skip_special_tokens=True))


class GPT2BPETokenizer(Tokenizer):
    """GPT-2's byte-level BPE from a local vocab.json and merges.txt (Megatron-LM's --vocab-file/--merge-file);
    eod is <|endoftext|>, or one id appended after the vocabulary if it has none."""

    def __init__(self, vocab_file: str | Path, merge_file: str | Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not Path(path).is_file():
                raise TokenizerError(f"{flag} {str(path)!r}: no such file; expected GPT-2's vocab.json / merges.txt")
        try:
            bpe = models.BPE.from_file(str(vocab_file), str(merge_file))
        except Exception as err:  # the Rust library raises its own Exception type with the parse error
            raise TokenizerError(
                f"--vocab-file {vocab_file}, --merge-file {merge_file}: not GPT-2 BPE ({err})"
            ) from None
        self._tok = RustTokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self._size = self._tok.get_vocab_size()
        eos = self._tok.token_to_id("<|endoftext|>")
        self._eod = eos if eos is not None else self._size
        self._vocab_size = self._size if eos is not None else self._size + 1
        self._pad = -1
        data = [Path(vocab_file).read_bytes(), Path(merge_file).read_bytes()]
        self.name = f"gpt2bpe-{_slug(Path(vocab_file).stem)}-{_digest(*data)}"

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self._size and int(i) != self._eod])


class NullTokenizer(Tokenizer):
    """Megatron-LM's NullTokenizer: text is ids written as numbers separated by spaces; --vocab-size ids plus
    eod (= --vocab-size). For data that is already token ids, and for --mock-data at a chosen vocabulary."""

    def __init__(self, vocab_size: int) -> None:
        self._vocab_size, self._eod, self._pad = vocab_size + 1, vocab_size, -1
        self.name = f"null-{vocab_size}"

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError as err:
            raise TokenizerError(f"NullTokenizer reads ids written as numbers: {err}") from err
        bad = [i for i in ids if not 0 <= i < self._eod]
        if bad:
            raise TokenizerError(f"NullTokenizer: id {bad[0]} is outside --vocab-size {self._eod}")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids if 0 <= int(i) < self._eod)


# Other names of the tokenizers above, as Megatron-LM and ALCF's scripts spell them.
_SAME_AS = {
    "GPTSentencePieceTokenizer": "SentencePieceTokenizer",
    "Llama2Tokenizer": "SentencePieceTokenizer",
    "HFTokenizer": "HuggingFaceTokenizer",
}


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | Path | None,
    *,
    vocab_file: str | Path | None = None,
    merge_file: str | Path | None = None,
    vocab_size: int | None = None,
) -> Tokenizer:
    """The tokenizer named by ``--tokenizer-type``, from the files (or vocabulary size) it needs
    (config.TOKENIZER_TYPES)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerError(
            f"--tokenizer-type {tokenizer_type!r} is unknown; expected one of {', '.join(TOKENIZER_TYPES)}"
        )
    given: dict[str, object] = {"tokenizer_model": tokenizer_model, "vocab_file": vocab_file, "merge_file": merge_file}
    given["vocab_size"] = vocab_size
    missing = [f"--{n.replace('_', '-')}" for n in TOKENIZER_TYPES[tokenizer_type] if not given[n]]
    if missing:
        what = {"tokenizer_model": "a SentencePiece .model file or a Hugging Face tokenizer.json or its folder"}
        raise TokenizerError(
            f"{' and '.join(missing)} is required with --tokenizer-type {tokenizer_type}"
            + (f": expected {what['tokenizer_model']}" if missing == ["--tokenizer-model"] else "")
        )
    kind = _SAME_AS.get(tokenizer_type, tokenizer_type)
    if kind == "ByteTokenizer":
        return ByteTokenizer()
    if kind == "GPT2BPETokenizer":
        assert vocab_file is not None and merge_file is not None
        return GPT2BPETokenizer(vocab_file, merge_file)
    if kind == "NullTokenizer":
        assert vocab_size is not None
        return NullTokenizer(vocab_size)
    if kind == "TikTokenizer":
        raise TokenizerError(
            "--tokenizer-type TikTokenizer is not built here (tiktoken's vocabulary format): save the vocabulary as "
            "a Hugging Face tokenizer.json and use --tokenizer-type HuggingFaceTokenizer"
        )
    assert tokenizer_model is not None
    if kind == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    return SentencePieceTokenizer(tokenizer_model)


def tokenizer_of(data: DataConfig) -> Tokenizer:
    """The run's tokenizer, from its --tokenizer-type and the files or size that type needs."""
    return build_tokenizer(
        data.tokenizer_type,
        data.tokenizer_model,
        vocab_file=data.vocab_file,
        merge_file=data.merge_file,
        vocab_size=data.vocab_size,
    )


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Embedding rows as Megatron-LM pads them: a multiple of divisible_by * TP, so each TP shard is even."""
    if vocab_size < 1 or make_vocab_size_divisible_by < 1 or tensor_model_parallel_size < 1:
        raise ValueError(
            f"padded_vocab_size needs positive values, got vocab_size={vocab_size}, "
            f"make_vocab_size_divisible_by={make_vocab_size_divisible_by}, "
            f"tensor_model_parallel_size={tensor_model_parallel_size}"
        )
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple
