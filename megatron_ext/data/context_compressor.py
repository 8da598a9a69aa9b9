"""The context compressor's samples (megatron_ext/context_compressor.py): what the encoder reads, which of its
positions become soft tokens, and the frozen LM's input rows with their targets and loss weights.

A row of LM input is an int array in which a value v >= 0 is a token id and v < 0 the sample's soft token -v-1
(an encoder hidden state kept by down-scaling). Stage pt (window mode): a document is cut into windows; window j
(all but the last) is compressed at its own ratio, and window i >= 1 is predicted from the soft tokens of windows
0..i-1 followed by its own tokens: one row per predicted window, loss on that window's tokens (window 0 has no
compressed context, so it trains nothing and is not scored). Stage ft: head + soft(context) + tail + answer, loss
on the answer tokens only. Validation rows score the same target
tokens with no context, the full context and the context compressed at each ratio.

Everything about a sample depends only on its index and the seed: the order of samples, drawn ratios and random
down-scaling are the same whatever the data-parallel size, and a resumed run continues exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_ext.config import ConfigError, ContextCompressorOptions


def keep_positions(n: int, ratio: int, method: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """The ceil(n / ratio) positions of n encoder positions that become soft tokens, in increasing order.

    stride: the last position of each group of `ratio` (r-1, 2r-1, ..., and n-1 for a last, shorter group), each of
    which a causal encoder has seen its whole group at; random: uniform without replacement; terminal: the last."""
    k = -(-n // ratio)
    if method == "stride":
        return np.minimum(np.arange(k) * ratio + ratio - 1, n - 1)
    if method == "random":
        assert rng is not None, "random down-scaling needs the sample's generator"
        return np.sort(rng.choice(n, size=k, replace=False))
    if method == "terminal":
        return np.arange(n - k, n)
    raise ValueError(f"unknown down-scaling method {method!r}")


@dataclass
class Row:
    """One LM input row: `inputs` (tokens, or soft tokens as -index-1), the target at each position, its weight,
    and the loss it counts in (lm_loss in training; a reported loss in validation)."""

    inputs: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    loss: str = "lm_loss"


@dataclass
class Sample:
    """The encoder chunks of one sample, the soft tokens as (chunk, position) pairs, and the LM rows."""

    chunks: list[np.ndarray] = field(default_factory=list)
    soft: list[tuple[int, int]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    def compress(self, tokens: np.ndarray, ratios: Sequence[int] | np.ndarray, segment: int, chunk: int, method: str,
                 rng: np.random.Generator) -> np.ndarray:  # fmt: skip
        """Adds `tokens` as encoder chunks of `chunk` tokens, cut into segments of `segment` tokens (a chunk holds
        whole segments) each kept at its ratio; returns the soft-token references (-index-1) in order."""
        refs = []
        first_chunk = len(self.chunks)
        self.chunks += [tokens[i : i + chunk] for i in range(0, len(tokens), chunk)]
        for j, start in enumerate(range(0, len(tokens), segment)):
            n = min(segment, len(tokens) - start)
            for p in keep_positions(n, ratios[j], method, rng) + start:
                refs.append(-len(self.soft) - 1)
                self.soft.append((first_chunk + int(p) // chunk, int(p) % chunk))
        return np.asarray(refs, dtype=np.int64)


def scored_row(context: np.ndarray, prompt: np.ndarray, target: np.ndarray, loss: str) -> Row:
    """context + prompt + target as one row whose weights count exactly the `target` tokens, each predicted from
    the position before it (the last context or prompt item for the first)."""
    first = len(context) + len(prompt) - 1
    if first < 0:  # nothing before the first target token: it cannot be predicted
        return scored_row(context, target[:1], target[1:], loss)
    inputs = np.concatenate([context, prompt, target]).astype(np.int64)
    labels = np.zeros_like(inputs)
    weights = np.zeros(len(inputs), dtype=np.float32)
    labels[first : first + len(target)] = target
    weights[first : first + len(target)] = 1.0
    return Row(inputs, labels, weights, loss)


def ratio_loss(ratio: int) -> str:
    """The reported loss of contexts compressed at `ratio`."""
    return f"r{ratio}_loss"


def eval_losses(options: ContextCompressorOptions) -> tuple[str, ...]:
    """The losses validation reports beside lm_loss: no context, full context, each ratio."""
    return ("nocontext_loss", "full_loss", *(ratio_loss(r) for r in sorted(set(options.comp_candidates))))


# ---- stage pt: documents in window mode ----------------------------------------------------------------------


def window_sample(doc: np.ndarray, o: ContextCompressorOptions, rng: np.random.Generator) -> Sample:
    """One document's training rows in window mode (module docstring)."""
    w = o.window
    m = -(-len(doc) // w)
    ratios = rng.choice(o.comp_candidates, size=m - 1)
    sample = Sample()
    soft = sample.compress(doc[: (m - 1) * w], ratios, w, o.encoder_max_length, o.pretraining_down_scaling_method, rng)
    ends = np.cumsum([-(-w // int(r)) for r in ratios])  # soft tokens of windows 0..i-1
    for i in range(1, m):
        window = doc[i * w : (i + 1) * w]
        sample.rows.append(scored_row(soft[: ends[i - 1]], window[:0], window, "lm_loss"))
    return sample


def window_eval_sample(doc: np.ndarray, o: ContextCompressorOptions, rng: np.random.Generator) -> Sample:
    """The last window predicted (from its second token) after no context, the windows before it, and those
    windows compressed at each ratio."""
    w = o.window
    m = -(-len(doc) // w)
    context, last = doc[: (m - 1) * w], doc[(m - 1) * w :]
    return _eval_rows(context, last[:1], last[1:], o, o.pretraining_down_scaling_method, rng, w)


def _eval_rows(context: np.ndarray, prompt: np.ndarray, target: np.ndarray, o: ContextCompressorOptions,
               method: str, rng: np.random.Generator, segment: int) -> Sample:  # fmt: skip
    sample = Sample()
    sample.rows.append(scored_row(context[:0], prompt, target, "nocontext_loss"))
    sample.rows.append(scored_row(context, prompt, target, "full_loss"))
    for r in sorted(set(o.comp_candidates)):
        soft = sample.compress(context, [r] * -(-len(context) // segment), segment, o.encoder_max_length, method, rng)
        sample.rows.append(scored_row(soft, prompt, target, ratio_loss(r)))
    return sample


# ---- stage ft: prompt/context/answer records -----------------------------------------------------------------


@dataclass
class Record:
    """A fine-tuning record as tokens: the prompt's part before and after the context, the context, the answer.
    No end-of-document token follows the answer: an LM that never saw one there would make it most of the loss."""

    head: np.ndarray
    context: np.ndarray
    tail: np.ndarray
    answer: np.ndarray


def read_record(record: Any, tokenize: Callable[[str], list[int]]) -> Record:
    """{"prompt", "context", "answer"} -> Record. A prompt with `{context}` has the context there (head and tail
    around it); otherwise the context comes first and the whole prompt follows it."""
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "context", "answer")):
        raise ValueError('expected {"prompt": str, "context": str, "answer": str}')
    head, _, tail = record["prompt"].rpartition("{context}")
    ids = [np.asarray(tokenize(text), dtype=np.int64) for text in (head, record["context"], tail)]
    answer = np.asarray(tokenize(record["answer"]), dtype=np.int64)
    return Record(head=ids[0], context=ids[1], tail=ids[2], answer=answer)


def fit_context(r: Record, ratio: int, lm_max_length: int) -> np.ndarray:
    """The context cut to what `lm_max_length` allows at `ratio` ((length - the rest) x ratio tokens), keeping its
    first and last halves."""
    keep = max(lm_max_length - len(r.head) - len(r.tail) - len(r.answer), 0) * ratio
    if len(r.context) <= keep:
        return r.context
    return np.concatenate([r.context[: keep // 2], r.context[len(r.context) - (keep - keep // 2) :]])


def record_sample(r: Record, o: ContextCompressorOptions, rng: np.random.Generator) -> Sample:
    ratio = int(rng.choice(o.comp_candidates))
    context = fit_context(r, ratio, o.lm_max_length)
    sample = Sample()
    e = o.encoder_max_length
    soft = sample.compress(context, [ratio] * -(-len(context) // e), e, e, o.down_scaling_method, rng)
    sample.rows.append(scored_row(np.concatenate([r.head, soft]), r.tail, r.answer, "lm_loss"))
    return sample


def record_eval_sample(r: Record, o: ContextCompressorOptions, rng: np.random.Generator) -> Sample:
    """The answer after no context, the full context (cut to fit at ratio 1) and each ratio's compression."""
    sample = Sample()
    e = o.encoder_max_length
    sample.rows.append(scored_row(r.head, r.tail, r.answer, "nocontext_loss"))
    sample.rows.append(scored_row(np.concatenate([r.head, fit_context(r, 1, o.lm_max_length)]), r.tail, r.answer,
                                  "full_loss"))  # fmt: skip
    for ratio in sorted(set(o.comp_candidates)):
        context = fit_context(r, ratio, o.lm_max_length)
        soft = sample.compress(context, [ratio] * -(-len(context) // e), e, e, o.down_scaling_method, rng)
        sample.rows.append(scored_row(np.concatenate([r.head, soft]), r.tail, r.answer, ratio_loss(ratio)))
    return sample


# ---- sources and batches -------------------------------------------------------------------------------------


def read_jsonl(paths: Sequence[str], flag: str, parse: Callable[[Any], Any]) -> list[Any]:
    """parse(record) of every non-empty line; a bad file or record is one `file:line` ConfigError."""
    out = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"{flag} {path}: {'is a folder' if path.is_dir() else 'no such file'}; expected JSONL")
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    out.append(parse(json.loads(raw.decode("utf-8"))))
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError included
                    raise ConfigError(f"{path}:{lineno}: {str(e).splitlines()[0]}") from None
    return out


def text_of(record: Any) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError('expected {"text": ...}')
    return record["text"]


@dataclass
class SampleSet:
    """Samples by index over items (documents or records) in a seeded order, epoch after epoch: sample i of the
    run is `make(items[order[i]], generator(seed, i))`."""

    items: list[Any]
    make: Callable[[Any, ContextCompressorOptions, np.random.Generator], Sample]
    options: ContextCompressorOptions
    seed: int
    shuffle: bool = True

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        epoch, k = divmod(i, len(self.items))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items)) if self.shuffle else None
        item = self.items[int(order[k]) if order is not None else k]
        return self.make(item, self.options, np.random.default_rng([self.seed, 1, i]))


def collate(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """A micro-batch: encoder chunks [c, e] (right-padded: causal attention leaves real positions unchanged),
    soft-token sources (flat into [c x e]) and places (flat into [b x s]), LM rows [b, s] right-padded (RoPE
    positions are 0..s-1 whatever position ids say, so padding goes at the end, with weight 0) and one weight
    tensor per loss name (`mask/<name>`)."""
    chunks = [c for s in samples for c in s.chunks]
    rows = [r for s in samples for r in s.rows]
    e = max((len(c) for c in chunks), default=1)
    length = max(len(r.inputs) for r in rows)
    enc = np.zeros((max(len(chunks), 1), e), dtype=np.int64)
    for i, c in enumerate(chunks):
        enc[i, : len(c)] = c
    tokens = np.zeros((len(rows), length), dtype=np.int64)
    labels = np.zeros_like(tokens)
    masks: dict[str, np.ndarray] = {}
    src, dst = [], []
    chunk_base, row = 0, 0
    for s in samples:
        for r in s.rows:
            n = len(r.inputs)
            is_soft = r.inputs < 0
            tokens[row, :n] = np.where(is_soft, 0, r.inputs)
            labels[row, :n] = r.labels
            masks.setdefault(r.loss, np.zeros(tokens.shape, dtype=np.float32))[row, :n] = r.weights
            for p in np.flatnonzero(is_soft):
                chunk, pos = s.soft[-int(r.inputs[p]) - 1]
                src.append((chunk_base + chunk) * e + pos)
                dst.append(row * length + int(p))
            row += 1
        chunk_base += len(s.chunks)
    batch = {
        "enc_tokens": torch.from_numpy(enc),
        "soft_src": torch.tensor(src, dtype=torch.long),
        "soft_dst": torch.tensor(dst, dtype=torch.long),
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
    }
    for name, mask in masks.items():
        batch[f"mask/{name}"] = torch.from_numpy(mask)
    return batch


@dataclass
class MicroBatches:
    """This data-parallel rank's micro-batches from a position in the global sample order (as
    megatron_ext.data.gpt_data.MicroBatches: rank r reads [r x mbs, (r + 1) x mbs) of each mbs x dp samples)."""

    samples: SampleSet
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    consumed_samples: int = 0
    wrap: bool = True  # training runs on past the end (next epoch); validation restarts at 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        n = len(self.samples)
        indices = [start + i if self.wrap else (start + i) % n for i in range(self.micro_batch_size)]
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return collate([self.samples[i] for i in indices])
