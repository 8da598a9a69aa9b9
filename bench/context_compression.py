"""How much of the context's worth a frozen LM keeps when it reads the context compressor's soft tokens instead.

    OMP_NUM_THREADS=1 python bench/context_compression.py

The task makes the continuation depend on the context: PAIRS key-value lines (`K7`: one upper-case letter, one
digit) planted between short slices of the built-in corpus (the Python standard library's lower-case letters),
then a query (`?K`) whose answer is the value. The format is one a two-layer LM learns in minutes: a one-token key
right before a one-token value is what an induction head (a previous-token head, then a head matching it) copies,
and each training document asks every key ROUNDS times, so most answer tokens are induction examples. In this
process, with byte tokens:

1. a small Llama-style LM is trained on documents of that task mixed with plain corpus text (LM_SHARE of the
   documents), and its own answers on the held-out records are checked (share right, loss with and without the
   context): the compressor can only close a gap the LM has;
2. the context compressor (--model-variant context-compressor, an encoder of the LM's first ENCODER_LAYERS layers)
   is trained in stage pt (window mode) on the same documents, then
3. in stage ft on prompt/context/answer records of the task (one query each), from stage pt's encoder;
4. on held-out records, the LM's loss on the answer with no context, the full context and the context compressed
   at r = 2, 4, 8 (the baselines measured in the same run), before and after stage ft.

Prints `gap closed at rK: X` (the share of the no-context -> full-context loss gap that the compressed context
closes; target >= 0.70 at r = 4) with the share of LM input tokens saved, and the wall time of each part. The LM
never sees a query without its context, so its no-context loss is above guessing the digits; the same share
measured from guessing (uniform digits) is printed next to it, as the stricter reading.
Toy scale: the reference compresses RAG passages for Llama-2-7B.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ext.platform import quiet_optional_dependency_warnings  # noqa: E402

quiet_optional_dependency_warnings()

from megatron.core import parallel_state  # noqa: E402

from megatron_ext.config import parse_args  # noqa: E402
from megatron_ext.data import context_compressor as cc_data  # noqa: E402
from megatron_ext.data.builtin_corpus import iter_documents, stdlib_files  # noqa: E402
from megatron_ext.data.indexed import IndexedDatasetWriter  # noqa: E402
from megatron_ext.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_ext.training import loop  # noqa: E402

RUN = ROOT / "runs" / "bench_context_compression"
PAIRS, FILLER, LM_SHARE, ROUNDS = 5, (0, 5), 0.05, 4
LM_DOCS, RECORDS, HELD_OUT = 12000, 6000, 128
SEQ, HIDDEN, LAYERS, HEADS = 128, 128, 2, 8
ENCODER_LAYERS = 2
LM_ITERS, PT_ITERS, FT_ITERS = 4000, 200, 1000
RATIOS = (2, 4, 8)
TARGET = 0.70
CHANCE = math.log(10)  # nats per answer token when the digits are guessed
RETRIEVES = 0.5  # the LM must do this much better than CHANCE with the full context for the gap to measure
MODEL = (
    f"--num-layers {LAYERS} --hidden-size {HIDDEN} --num-attention-heads {HEADS} --seq-length {SEQ} "
    "--normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear "
    "--untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0"
).split()
TRAINING = "--micro-batch-size 16 --lr 3e-3 --min-lr 3e-4 --lr-warmup-fraction 0.05 --log-interval 100".split()


def filler(texts: list[str], rng: np.random.Generator) -> str:
    text = texts[int(rng.integers(len(texts)))]
    n = int(rng.integers(*FILLER))
    start = int(rng.integers(max(len(text) - n, 1)))
    return "".join(c if c.islower() and c.isascii() else " " for c in text[start : start + n])  # no capitals


def task(texts: list[str], rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    """(context with PAIRS planted key-value lines between corpus slices, the pairs): one upper-case letter (a
    different one per pair) right before its one-digit value, so a two-layer induction circuit retrieves it."""
    keys = rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), PAIRS, replace=False)
    pairs = {str(k): str(rng.integers(10)) for k in keys}
    context = "".join(f"{filler(texts, rng)}\n{k}{v}\n" for k, v in pairs.items()) + filler(texts, rng)
    return context, pairs


def lm_document(texts: list[str], rng: np.random.Generator) -> str:
    if rng.random() < LM_SHARE:
        return "".join(filler(texts, rng) for _ in range(6))
    context, pairs = task(texts, rng)
    keys = [str(k) for _ in range(ROUNDS) for k in rng.permutation(list(pairs))]  # more answers to learn from
    return context + "".join(f"\n?{k}{pairs[k]}" for k in keys) + "\n"


def record(texts: list[str], rng: np.random.Generator) -> dict[str, str]:
    context, pairs = task(texts, rng)
    key = str(rng.choice(list(pairs)))
    return {"prompt": f"{{context}}\n?{key}", "context": context, "answer": pairs[key]}


def write_data(texts: list[str]) -> None:
    tokenizer = build_tokenizer("ByteTokenizer", None)
    rng = np.random.default_rng(0)
    docs = [lm_document(texts, rng) for _ in range(LM_DOCS)]
    with IndexedDatasetWriter(RUN / "lm_docs", vocab_size=tokenizer.vocab_size) as w:
        for d in docs:
            w.add_document([*tokenizer.tokenize(d), tokenizer.eod])
        w.finalize()
    (RUN / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for name, count in (("records.jsonl", RECORDS), ("held_out.jsonl", HELD_OUT)):
        (RUN / name).write_text("".join(json.dumps(record(texts, rng)) + "\n" for _ in range(count)))


def run(argv: list[str], evaluate_first: bool = False, probe: bool = False) -> dict[str, Any]:
    """Trains one run in this process; returns its held-out evaluations (before training too if asked) and, with
    `probe`, the trained LM's answers on the held-out records."""
    tr = loop.setup(parse_args(argv))
    found: dict[str, Any] = {}
    if evaluate_first:
        found["before"] = loop.evaluate(tr)
    loop.train(tr)
    if tr.recipe.validation_sets():
        found["after"] = loop.evaluate(tr)
    if probe:
        found["probe"] = lm_answers(tr.model[0])
    tr.metrics.close()
    parallel_state.destroy_model_parallel()
    return found


@torch.no_grad()
def lm_answers(lm: torch.nn.Module) -> dict[str, float]:
    """The LM's own answers on the held-out records, reading the full context or none: the share answered right
    (greedy, every answer token) and the loss per answer token. A compressor can only close a gap the LM has."""
    tokenizer = build_tokenizer("ByteTokenizer", None)
    lm.eval()
    found: dict[str, float] = {}
    for name, with_context in (("full", True), ("none", False)):
        right = loss = count = 0.0
        for line in (RUN / "held_out.jsonl").read_text().splitlines():
            r = cc_data.read_record(json.loads(line), tokenizer.tokenize)
            prefix = [r.head, r.context, r.tail] if with_context else [r.head, r.tail]
            tokens = torch.from_numpy(np.concatenate([*prefix, r.answer]))[None]
            n = len(r.answer)
            logits = lm(tokens[:, :-1], torch.arange(tokens.shape[1] - 1)[None], None)[0, -n:].float()
            right += bool((logits.argmax(-1) == tokens[0, -n:]).all())
            loss += torch.nn.functional.cross_entropy(logits, tokens[0, -n:], reduction="sum").item()
            count += n
        found[f"{name}_right"], found[f"{name}_loss"] = right / HELD_OUT, loss / count
    lm.train()
    return found


def tokens_saved(ratio: int) -> float:
    """Share of the LM's input positions saved on the held-out records at `ratio` (against the full context)."""
    tokenizer = build_tokenizer("ByteTokenizer", None)
    full = compressed = 0
    for line in (RUN / "held_out.jsonl").read_text().splitlines():
        r = cc_data.read_record(json.loads(line), tokenizer.tokenize)
        full += len(r.head) + len(r.context) + len(r.tail) + len(r.answer)
        compressed += len(r.head) + -(-len(r.context) // ratio) + len(r.tail) + len(r.answer)
    return 1 - compressed / full


def compressor_flags(stage: str) -> list[str]:
    ratios = [str(r) for r in RATIOS]
    flags = [*MODEL, *TRAINING, "--model-variant", "context-compressor", "--encoder-num-layers", str(ENCODER_LAYERS),
             "--comp_candidates", *ratios, "--encoder_max_length", str(SEQ), "--stage", stage]  # fmt: skip
    if stage == "pt":
        return [*flags, "--train_data", str(RUN / "docs.jsonl"), "--window", "32", "--max_length", "1024"]
    held = ["--eval_data", str(RUN / "held_out.jsonl"), "--eval-iters", str(HELD_OUT // 16)]
    return [*flags, "--train_data", str(RUN / "records.jsonl"), *held, "--window", "32", "--lm_max_length", str(SEQ)]


def main() -> None:
    print(f"bench/context_compression.py: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    RUN.mkdir(parents=True, exist_ok=True)
    texts = [text for _, text in iter_documents(stdlib_files()[:400])]
    times = {}
    start = time.perf_counter()
    lm = RUN / "lm"
    common = ["--data-cache-path", str(RUN / "cache"), "--eval-interval", "100000"]
    if (lm / f"iter_{LM_ITERS:07d}").is_dir() and (RUN / "lm_answers.json").is_file():
        print(f"reusing the LM and the data of an earlier run in {RUN} (delete the folder to start afresh)")
    else:
        write_data(texts)
        whole = ["--reset-attention-mask", "--packing", "best-fit"]  # a document's queries with its context
        argv = [*MODEL, *TRAINING, *whole, "--micro-batch-size", "32", "--data-path", str(RUN / "lm_docs"),
                "--train-iters", str(LM_ITERS), "--save", str(lm), "--eval-iters", "0", *common]  # fmt: skip
        found = run(argv, probe=True)
        (RUN / "lm_answers.json").write_text(json.dumps(found["probe"]))
        times["LM"] = time.perf_counter() - start
    own = json.loads((RUN / "lm_answers.json").read_text())
    print(f"the LM alone on the held-out records: {100 * own['full_right']:.1f}% answered right with the full "
          f"context (loss {own['full_loss']:.3f}), {100 * own['none_right']:.1f}% with none (loss "
          f"{own['none_loss']:.3f}) nats per answer token", flush=True)  # fmt: skip
    start = time.perf_counter()
    pt = RUN / "stage_pt"
    run([*compressor_flags("pt"), "--compressor-lm", str(lm), "--train-iters", str(PT_ITERS), "--save", str(pt),
         "--eval-iters", "0", *common])  # fmt: skip
    times["stage pt"] = time.perf_counter() - start
    start = time.perf_counter()
    argv = [*compressor_flags("ft"), "--compressor-lm", str(lm), "--load", str(pt), "--finetune"]
    ft = run([*argv, "--train-iters", str(FT_ITERS), "--save", str(RUN / "stage_ft"), *common], evaluate_first=True)
    times["stage ft"] = time.perf_counter() - start
    before, after = ft["before"]["held-out"], ft["after"]["held-out"]
    print(f"held-out answers ({HELD_OUT} records, {PAIRS} planted pairs each): loss with no context "
          f"{after['nocontext_loss']:.3f}, full context {after['full_loss']:.3f}, uniform digits {CHANCE:.3f} "
          "nats per answer token")  # fmt: skip
    gaps = {}
    for r in RATIOS:
        gap = after["nocontext_loss"] - after["full_loss"]
        closed = (after["nocontext_loss"] - after[f"r{r}_loss"]) / gap
        closed_pt = (before["nocontext_loss"] - before[f"r{r}_loss"]) / gap
        gaps[r] = closed
        from_guessing = (CHANCE - after[f"r{r}_loss"]) / (CHANCE - after["full_loss"])
        print(f"gap closed at r{r}: {closed:.3f} (loss {after[f'r{r}_loss']:.3f}; after stage pt alone "
              f"{closed_pt:.3f}; from guessing {from_guessing:.3f}); "
              f"LM tokens saved {100 * tokens_saved(r):.1f}%")  # fmt: skip
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    verdict = "met" if gaps[4] >= TARGET else "missed"
    print(f"target gap closed >= {TARGET} at r4: {verdict} ({gaps[4]:.3f})")
    if after["full_loss"] > CHANCE - RETRIEVES:
        print(
            f"but not a measure of compression: with the full context the LM is within {RETRIEVES} nats of "
            "guessing the digits, so the gap is mostly its calibration, which soft tokens can fix without the values"
        )


if __name__ == "__main__":
    main()
