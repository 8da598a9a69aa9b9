"""How Python-like a checkpoint's greedy samples are: the share of generated lines that tokenise as Python.

    python bench/demo_quality.py --load runs/demo/checkpoints            # the demo's model (target >= 0.8)
    python bench/demo_quality.py --load CKPT --prompts 3 --max-new-tokens 48 --show 0

Each fixed prompt (PROMPTS) is continued greedily for --max-new-tokens tokens (tools/generate.py's decoding).
A generated line counts when it is not blank and complete (ends in a newline, or the model ended the document),
or unfinished but already longer than MAX_LINE characters; it is valid when Python's ``tokenize`` module reads it,
in the context of the prompt and the lines before it, without an error token, an indentation error or a closing
bracket that closes nothing or the wrong kind, and it is at most MAX_LINE characters long (longer lines are
greedy decoding's runaway repetitions: the standard library keeps to 79). After an invalid line, reading starts
afresh on the next one. A bracket or string still open where the sample ends is not an error (the sample was
cut). This is cheap and lenient: it says nothing about names being defined or code running, and a repeated line
counts each time (the number of distinct lines is printed beside it).

Baselines measured in the same run, on the run's validation text with the same measure: the real text (first
--max-new-tokens tokens of validation documents; the measure's ceiling) and the same number of tokens drawn
independently from the validation text's token frequencies (a model with no notion of order; the floor). The
ratio is model / real text. This is a benchmark, not a test: it prints what it measures.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import time
import tokenize
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = (  # the first is the demo's shown sample
    "def read_config(path):\n",
    "def main(",
    "import os\nimport sys\n\n\n",
    "class Stack:\n    def __init__(self",
    "    for i in range(",
    'if __name__ == "__main__":\n',
    "    def __repr__(self):\n",
    "    try:\n",
)
_CLOSING = {")": "(", "]": "[", "}": "{"}
MAX_LINE = 120


def _first_error(lines: list[str]) -> int | None:
    """Index of the first line that does not tokenise as Python in the context of the lines before it."""
    stack: list[str] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
            row = tok.start[0] - 1
            if tok.type == tokenize.ERRORTOKEN and not tok.string.isspace():
                return row
            if tok.type == tokenize.OP and tok.string in "([{":
                stack.append(tok.string)
            elif tok.type == tokenize.OP and tok.string in _CLOSING:
                if not stack or stack.pop() != _CLOSING[tok.string]:
                    return row
    except IndentationError as e:
        return (e.lineno or 1) - 1
    except tokenize.TokenError:
        return None  # a bracket or string still open at the end: the sample was cut there
    return None


def invalid_lines(lines: list[str]) -> set[int]:
    """Indices of lines that do not tokenise; after each, reading starts afresh on the next line."""
    bad: set[int] = set()
    start = 0
    while start < len(lines):
        err = _first_error(lines[start:])
        if err is None:
            break
        bad.add(start + err)
        start += err + 1
    return bad


def line_counts(prompt: str, completion: str, ended: bool) -> tuple[int, int, list[str]]:
    """(valid, counted, counted lines) for the generated lines of prompt + completion.

    Lines holding generated text count (the prompt's last line too when the completion continues it), except
    blank ones and an unfinished last line that is not yet too long (unless the model ended the document there)."""
    if not completion:
        return 0, 0, []
    lines = (prompt + completion).splitlines(keepends=True)
    if not ended and not lines[-1].endswith("\n") and len(lines[-1]) <= MAX_LINE:
        lines = lines[:-1]
    first = prompt.count("\n")  # the line the completion starts on
    bad = invalid_lines(lines) | {i for i, line in enumerate(lines) if len(line.rstrip("\n")) > MAX_LINE}
    counted = [i for i in range(first, len(lines)) if lines[i].strip()]
    return sum(i not in bad for i in counted), len(counted), [lines[i] for i in counted]


def _load_generate_tool() -> object:
    spec = importlib.util.spec_from_file_location("generate_tool", ROOT / "tools" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _share(valid: int, counted: int) -> str:
    return f"{valid / counted:.3f} ({valid}/{counted} lines)" if counted else "n/a (no complete line)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", default=str(ROOT / "runs" / "demo" / "checkpoints"), help="Checkpoint folder.")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="Use the first N fixed prompts.")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--show", type=int, default=1, help="Print the samples of the first N prompts.")
    args = p.parse_args(argv)
    from megatron_ext.cli import UserError, report
    from megatron_ext.platform import quiet_optional_dependency_warnings
    from megatron_ext.training.inference import find_checkpoint, load_model

    quiet_optional_dependency_warnings()  # before megatron-core is imported

    try:
        ckpt = find_checkpoint(args.load)
    except UserError as e:
        return report(e)
    gen = _load_generate_tool()

    from megatron_ext import distributed
    from megatron_ext.training import curves

    start = time.perf_counter()
    try:
        model, tokenizer, device, cfg, common = load_model(ckpt)
        valid = counted = 0
        distinct: set[str] = set()
        for k, prompt in enumerate(PROMPTS[: args.prompts]):
            new = gen.generate(
                model,
                tokenizer.tokenize(prompt),
                args.max_new_tokens,
                context_length=cfg.model.seq_length,
                vocab_size=tokenizer.vocab_size,
                eod=tokenizer.eod,
                temperature=0.0,
                device=device,
            )
            completion = tokenizer.detokenize(new)
            v, c, lines = line_counts(prompt, completion, ended=len(new) < args.max_new_tokens)
            valid, counted = valid + v, counted + c
            distinct.update(line.strip() for line in lines)
            if k < args.show:
                print(f"--- greedy sample, prompt {prompt!r} ({len(new)} tokens) ---\n{prompt}{completion}\n---")
    finally:
        distributed.destroy()
    seconds = time.perf_counter() - start

    # Baselines on the validation text the run evaluates on.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.data.blend import split_range

    prefixes, split, index = next(iter(curves.validation_prefixes(cfg, tokenizer).values()))
    dataset = IndexedDataset(prefixes[0])
    lo, hi = split_range(split, index, len(dataset.sequence_lengths))
    docs = [np.asarray(dataset[i]) for i in range(lo, hi)]
    real_valid = real_counted = 0
    for k in range(args.prompts):
        ids = docs[k % len(docs)][: args.max_new_tokens]
        v, c, _ = line_counts("", tokenizer.detokenize(ids[ids != tokenizer.eod]), ended=False)
        real_valid, real_counted = real_valid + v, real_counted + c
    all_ids = np.concatenate(docs)
    frequencies = np.bincount(all_ids[all_ids != tokenizer.eod], minlength=tokenizer.vocab_size) / all_ids.size
    rng = np.random.default_rng(0)
    floor_valid = floor_counted = 0
    for _ in range(args.prompts):
        ids = rng.choice(tokenizer.vocab_size, size=args.max_new_tokens, p=frequencies / frequencies.sum())
        v, c, _ = line_counts("", tokenizer.detokenize(ids), ended=False)
        floor_valid, floor_counted = floor_valid + v, floor_counted + c

    iteration = common.get("iteration", "?")
    print(
        f"{ckpt} (iteration {iteration}, {tokenizer.name}), {args.prompts} prompts x {args.max_new_tokens} "
        f"greedy tokens in {seconds:.1f}s"
    )
    print(f"  model:                        valid Python lines {_share(valid, counted)}; distinct {len(distinct)}")
    print(f"  validation text (ceiling):    valid Python lines {_share(real_valid, real_counted)}")
    print(f"  unigram token draws (floor):  valid Python lines {_share(floor_valid, floor_counted)}")
    if counted and real_counted and real_valid:
        ratio = (valid / counted) / (real_valid / real_counted)
        verdict = "meets" if valid / counted >= 0.8 else "misses"
        print(f"  model / validation text: {ratio:.3f}; share {valid / counted:.3f} {verdict} the 0.8 target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
