"""Final-layer hidden states of a frozen LM (one of our checkpoints, any TP), extracted once into a memory-mapped
store that the dimension compressor's training and PCA read (megatron_ext/dimension_compressor.py,
tools/extract_hidden.py).

Text: our indexed data (--data-path, --data-file-list; default the built-in corpus), samples of --max-seq-length
tokens as training packs them, or JSONL files (--input) of `{"text": ...}`, `{"messages": [{"role", "content"}]}`
or `{"conversations": [{"from", "value"}]}` records (chat turns as `role: content` lines), one sequence per record
cut to --max-seq-length. Sequences are right-padded into batches; causal attention leaves the real positions as
they are, and only those are stored.

A store folder: `hidden.npy` (float32 [tokens, H], memory-mapped, real tokens only, sequence after sequence),
`offsets.npy` (sequence i is rows offsets[i]:offsets[i+1]), `meta.json` (what it was made from) and
`progress.json` (sequences written so far). It is created whole under a temporary name and renamed; an interrupted
extraction continues after the last sequences written, provided the inputs are the same (`key`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_ext.config import Config, ConfigError, folder_problem, opt

STORE_FORMAT = "megatron_ext.hidden_states"


class StoreError(ConfigError):
    """A hidden-state store that cannot be used as asked; the message names the folder and the fix."""


@dataclass
class HiddenSourceConfig:
    """The frozen LM and the text whose final-layer hidden states are extracted."""

    load: str | None = opt(
        None,
        "The frozen LM: one of our checkpoint folders (any TP/PP layout; Hugging Face "
        "models after tools/convert_checkpoint.py from-hf).",
    )
    ckpt_step: int | None = opt(None, "Load this iteration from --load instead of the latest.")
    tensor_model_parallel_size: int = opt(
        1, "Tensor-parallel size of the LM while extracting (launch that many processes, e.g. with torchrun)."
    )
    data_path: list[str] | None = opt(None, "Indexed data: PREFIX or W1 PREFIX1 W2 PREFIX2 ...", nargs="+")
    data_file_list: list[str] | None = opt(None, "Indexed data lists (`weight prefix [corpus]` lines).", nargs="+")
    input: list[str] | None = opt(
        None, "JSONL files of text or chat records (text; messages/conversations turns).", nargs="+"
    )
    num_samples: int = opt(
        50000, "Sequences to extract (a seeded --valid-fraction of them validates).", aliases=["--num_samples"]
    )
    max_seq_length: int = opt(512, "Tokens per sequence at most.", aliases=["--max_seq_length"])
    extract_batch_size: int = opt(8, "Sequences per LM forward while extracting.")
    data_cache_path: str = opt("data_cache", "Folder for index caches and the built-in corpus.")
    tokenizer_model: str | None = opt(None, "Override the checkpoint's tokenizer model path (if moved).")
    device: str = opt("auto", "Where the LM (and the compressor) run.", choices=["auto", "cuda", "xpu", "cpu"])

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "num_samples", "max_seq_length", "extract_batch_size"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, not {value}")
        given = [f for f in ("data_path", "data_file_list", "input") if getattr(self, f)]
        if len(given) > 1:
            raise ConfigError(f"give one of {', '.join('--' + f.replace('_', '-') for f in given)}, not several")
        if self.ckpt_step is not None and self.ckpt_step < 0:
            raise ConfigError("--ckpt-step must be >= 0")


# ---- text -> token sequences ----------------------------------------------------------------------------------


def record_text(record: Any) -> str:
    """The text of one JSONL record: `text`, or chat turns (`messages` role/content, `conversations` from/value)
    as `role: content` lines."""
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        turns = record.get("messages", record.get("conversations"))
        if isinstance(turns, list) and all(isinstance(t, dict) for t in turns):
            lines = []
            for t in turns:
                role, content = t.get("role", t.get("from")), t.get("content", t.get("value"))
                if not isinstance(content, str):
                    raise ValueError("a turn without a string content/value")
                lines.append(f"{role}: {content}" if role else content)
            return "\n".join(lines)
    raise ValueError('expected {"text": ...}, {"messages": [...]} or {"conversations": [...]}')


def jsonl_sequences(paths: list[str], tokenize: Callable[[str], list[int]], limit: int, length: int) -> list:
    """Token sequences (cut to `length`) of the first `limit` non-empty records; `file:line` errors."""
    out: list[np.ndarray] = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--input {path}: {'is a folder' if path.is_dir() else 'no such file'}; expected JSONL")
        with path.open("rb") as f:  # decoded line by line, so that a byte that is not UTF-8 is named by its line
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    text = record_text(json.loads(raw.decode("utf-8")))
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError included
                    raise ConfigError(f"{path}:{lineno}: {str(e).splitlines()[0]}") from None
                ids = tokenize(text)[:length]
                if ids:
                    out.append(np.asarray(ids, dtype=np.int64))
                if len(out) == limit:
                    return out
    return out


def indexed_sequences(cfg: Config, source: HiddenSourceConfig, tokenizer: Any) -> tuple[list, list]:
    """(samples of --max-seq-length tokens packed as training packs them, the data entries) from the data lists,
    --data-path or the built-in corpus."""
    from megatron_ext.data.blend import BlendSpec, CorpusBlend
    from megatron_ext.data.gpt_data import training_entries

    cfg.data.data_path, cfg.data.data_file_list = source.data_path, source.data_file_list
    cfg.data.data_cache_path = source.data_cache_path
    entries = training_entries(cfg, tokenizer)
    files = tuple((e.weight, e.prefix, e.corpus) for e in entries)
    spec = BlendSpec(files, source.max_seq_length, cfg.training.seed, "1,0,0", 0)
    blend = CorpusBlend(spec, source.num_samples, Path(source.data_cache_path) / "blend", eod=tokenizer.eod)
    samples = [blend.sample_tokens(i)[: source.max_seq_length] for i in range(source.num_samples)]
    return samples, [list(f) for f in files]


def _file_identity(path: str) -> list:
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


# ---- the store ---------------------------------------------------------------------------------------------------


class HiddenStore:
    """A store folder opened for reading (and, while extracting, writing); see the module's docstring."""

    def __init__(self, folder: str | Path, writable: bool = False) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise StoreError(
                f"{self.folder}: not a hidden-state store (no meta.json; make one with tools/extract_hidden.py)"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise StoreError(f"{meta_path}: damaged ({str(e).splitlines()[0]}); extract the store again") from None
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            raise StoreError(f"{self.folder}: meta.json is not a {STORE_FORMAT} store's")
        self.meta: dict[str, Any] = meta
        self.offsets = np.load(self.folder / "offsets.npy")
        self.hidden = np.load(self.folder / "hidden.npy", mmap_mode="r+" if writable else "r")

    @classmethod
    def create(cls, folder: str | Path, lengths: list[int], hidden_size: int, meta: dict[str, Any]) -> HiddenStore:
        """Allocates a store (sparse file) under a temporary name and renames it into place."""
        folder = Path(folder)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        np.save(tmp / "offsets.npy", offsets)
        hidden = np.lib.format.open_memmap(
            tmp / "hidden.npy", mode="w+", dtype=np.float32, shape=(int(offsets[-1]), hidden_size)
        )
        del hidden
        (tmp / "progress.json").write_text(json.dumps({"done": 0}))
        full = {
            "format": STORE_FORMAT,
            "hidden_size": hidden_size,
            "num_sequences": len(lengths),
            "num_tokens": int(offsets[-1]),
            **meta,
        }
        (tmp / "meta.json").write_text(json.dumps(full, indent=1) + "\n")
        os.rename(tmp, folder)
        return cls(folder, writable=True)

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def done(self) -> int:
        """Sequences written so far (all of them in a complete store)."""
        return int(json.loads((self.folder / "progress.json").read_text())["done"])

    @property
    def complete(self) -> bool:
        return self.done == self.num_sequences

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def write(self, first: int, hidden: torch.Tensor, lengths: list[int]) -> None:
        """Stores sequences first.. (hidden [b, s, H], real lengths) and records them as done, in that order."""
        start = int(self.offsets[first])
        rows = np.concatenate([hidden[i, :n].numpy() for i, n in enumerate(lengths)])
        self.hidden[start : start + len(rows)] = rows
        self.hidden.flush()
        tmp = self.folder / "progress.json.tmp"
        tmp.write_text(json.dumps({"done": first + len(lengths)}))
        os.replace(tmp, self.folder / "progress.json")

    def batch(self, ids: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [b, s, H] float32 right-padded with zeros, mask [b, s] True on real tokens) of sequences `ids`."""
        lengths = [int(self.offsets[i + 1] - self.offsets[i]) for i in ids]
        x = torch.zeros(len(ids), max(lengths), self.hidden_size)
        mask = torch.zeros(len(ids), max(lengths), dtype=torch.bool)
        for row, (i, n) in enumerate(zip(ids, lengths)):
            x[row, :n] = torch.from_numpy(np.array(self.hidden[self.offsets[i] : self.offsets[i + 1]]))
            mask[row, :n] = True
        return x, mask

    def batches(self, ids: np.ndarray, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(ids), size):
            yield self.batch(ids[start : start + size])


def open_complete(folder: str | Path, flag: str = "--hidden-store") -> HiddenStore:
    """A finished store, or a StoreError naming `flag`."""
    if not (Path(folder) / "meta.json").is_file():
        raise StoreError(
            f"{flag} {folder}: not a hidden-state store (no meta.json); make one with tools/extract_hidden.py"
        )
    store = HiddenStore(folder)
    if not store.complete:
        raise StoreError(
            f"{flag} {folder}: incomplete ({store.done} of {store.num_sequences} sequences); run "
            "tools/extract_hidden.py again with the same flags to finish it"
        )
    return store


# ---- extraction --------------------------------------------------------------------------------------------------


@dataclass
class FrozenLM:
    """A checkpoint and its run's config, read without building the model."""

    ckpt: Path
    config: Config
    iteration: Any

    @property
    def hidden_size(self) -> int:
        return self.config.model.hidden_size


def frozen_lm(source: HiddenSourceConfig) -> FrozenLM:
    """The checkpoint of --load and its config; checks --max-seq-length against the LM's positions."""
    from megatron_ext.training.inference import find_checkpoint, inference_config, read_config

    if source.load is None:
        raise ConfigError("give the frozen LM: --load CHECKPOINT_FOLDER")
    ckpt = find_checkpoint(source.load, source.ckpt_step)
    saved, common = read_config(ckpt)
    cfg, _ = inference_config(saved, source.tensor_model_parallel_size)
    m = cfg.model
    if m.position_embedding_type == "learned_absolute" and source.max_seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"--max-seq-length {source.max_seq_length} exceeds the LM's learned positions ({m.max_position_embeddings})"
        )
    return FrozenLM(ckpt, cfg, common.get("iteration", "?"))


def read_sequences(lm: FrozenLM, source: HiddenSourceConfig, tokenizer: Any) -> tuple[list, dict[str, Any]]:
    """(token sequences, a description of the inputs that identifies them)."""
    if source.input:
        sequences = jsonl_sequences(source.input, tokenizer.tokenize, source.num_samples, source.max_seq_length)
        data: Any = {"input": [_file_identity(p) for p in source.input]}
        if not sequences:
            raise ConfigError(f"--input {' '.join(source.input)}: no non-empty record")
    else:
        sequences, files = indexed_sequences(lm.config, source, tokenizer)
        data = {"indexed": files}
    inputs = {
        "checkpoint": str(lm.ckpt.resolve()),
        "iteration": lm.iteration,
        "data": data,
        "num_samples": source.num_samples,
        "max_seq_length": source.max_seq_length,
    }
    return sequences, inputs


@dataclass
class Prepared:
    """What an extraction reads, known before the model is built: the LM, its tokenizer, the token sequences and
    the key of these inputs (a store made from other inputs is refused)."""

    lm: FrozenLM
    tokenizer: Any
    sequences: list
    inputs: dict[str, Any]

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.inputs, sort_keys=True).encode()).hexdigest()[:16]


def prepare(source: HiddenSourceConfig, lm: FrozenLM | None = None) -> Prepared:
    """Finds the checkpoint (unless given), reads its config and tokenizer and tokenizes the text (no model yet)."""
    from megatron_ext.data.tokenizers import build_tokenizer

    lm = lm or frozen_lm(source)
    tokenizer = build_tokenizer(lm.config.data.tokenizer_type, source.tokenizer_model or lm.config.data.tokenizer_model)
    sequences, inputs = read_sequences(lm, source, tokenizer)
    return Prepared(lm, tokenizer, sequences, inputs)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="hidden states", unit="seq", file=sys.stderr, disable=not enabled)


def _existing(folder: Path, key: str) -> HiddenStore | None:
    """The store already at `folder` if it was made from the same inputs; None if there is none."""
    problem = folder_problem(folder)
    if problem is not None:
        raise StoreError(f"{folder}: {problem}")
    if not (folder / "meta.json").is_file():
        if folder.exists() and any(folder.iterdir()):
            raise StoreError(f"{folder}: a folder that is not a hidden-state store; choose another")
        return None
    store = HiddenStore(folder)
    if store.meta.get("key") != key:
        raise StoreError(
            f"{folder}: a store made from other inputs ({store.meta.get('inputs')}); choose another folder or delete it"
        )
    return store


def extract(
    source: HiddenSourceConfig, prepared: Prepared, folder: str | Path, log: Callable[[str], None] = print
) -> bool:
    """Fills the store `folder` with the LM's final-layer post-norm hidden states (fp32) of the prepared text,
    continuing an interrupted extraction of the same inputs. Runs on --tensor-model-parallel-size processes (rank 0
    writes). Returns whether this process is rank 0 (the one to go on with the store)."""
    from megatron_ext import distributed
    from megatron_ext.training.inference import final_hidden_states, load_model

    folder = Path(folder)
    sequences, lm = prepared.sequences, prepared.lm
    existing = _existing(folder, prepared.key)
    rank0 = distributed.discover().rank == 0
    if existing is not None and existing.complete:
        log(f"hidden states: {folder} is complete ({existing.num_sequences} sequences)")
        return rank0
    if rank0 and existing is None:  # before the LM loads, so that a folder that cannot be made fails at once
        meta = {"key": prepared.key, "inputs": prepared.inputs}
        HiddenStore.create(folder, [len(s) for s in sequences], lm.hidden_size, meta)
    model, _, device, _, _ = load_model(
        lm.ckpt,
        source.device,
        source.tokenizer_model,
        tensor_parallel_size=source.tensor_model_parallel_size,
        hidden_states_only=True,
    )
    try:
        store = HiddenStore(folder, writable=True) if rank0 else None
        start = [store.done if store is not None else 0]
        torch.distributed.broadcast_object_list(start, src=0)
        if start[0]:
            log(f"hidden states: continuing {folder} after {start[0]} of {len(sequences)} sequences")
        with _progress(len(sequences), start[0], rank0) as bar:
            for first in range(start[0], len(sequences), source.extract_batch_size):
                chunk = sequences[first : first + source.extract_batch_size]
                lengths = [len(s) for s in chunk]
                tokens = torch.full((len(chunk), max(lengths)), prepared.tokenizer.eod, dtype=torch.long)
                for i, s in enumerate(chunk):
                    tokens[i, : len(s)] = torch.from_numpy(s)
                hidden = final_hidden_states(model, tokens.to(device)).cpu()
                if store is not None:
                    store.write(first, hidden, lengths)
                bar.update(len(chunk))
        torch.distributed.barrier()
    finally:
        distributed.destroy()
    if rank0:
        log(
            f"hidden states: {folder} ({len(sequences)} sequences, {sum(len(s) for s in sequences)} tokens, "
            f"H={lm.hidden_size}) from {lm.ckpt}"
        )
    return rank0


def split_sequences(n: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids): a seeded shuffle, the validation share rounded up (at least one of each)."""
    if n < 2:
        raise ConfigError(f"{n} sequence(s): need at least 2 (training and validation); raise --num-samples")
    order = np.random.default_rng(seed).permutation(n)
    n_valid = min(max(1, math.ceil(valid_fraction * n)), n - 1)
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])
