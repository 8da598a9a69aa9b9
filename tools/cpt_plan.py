"""Plan the data list of one continual-pre-training (CPT) stage: new data plus replay of what came before.

    python tools/cpt_plan.py --d0 D0.txt [...] --stage D1.txt [...] --buffer buffer.txt --output stage1.txt \\
        (--preset weak|strong-equal|strong-low-d0 | --alphas A0 AD AB) [--train-tokens 10B] [--update-buffer] \\
        [--plot stage1.png]

Stage i trains on ``alpha_0 x D0 + alpha_D x Di + alpha_B x B``: D0 is the original pre-training mixture
(replayed so the model keeps what it learnt there), Di the stage's new data, and B a buffer of the earlier
stages' data (replayed so stage i does not erase stage i-1). Each part keeps its own proportions (see
``mix_lists``). Presets: ``weak`` = 0.05/0.95/0 (5% replay is enough for a weak distribution shift),
``strong-equal`` = 0.33/0.33/0.34 and ``strong-low-d0`` = 0.05/0.48/0.47 for a strong shift.

The buffer is a data list; a missing file is an empty buffer, and then alpha_B goes to D0 and Di in proportion
to their alphas. ``--update-buffer`` adds Di to B once the stage list is written, for the next stage. The
summary shows, per source and corpus, the tokens on disk and the share of samples, and with --train-tokens the
sampled tokens and epochs (inspect_data's numbers), warning for a corpus repeated more than --max-epochs times.
Mistakes end in one ``error: ...`` line on stderr and exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from megatron_ext.cli import OneLineParser, format_table, run_tool
from megatron_ext.data.data_list import (
    DataEntry,
    DataListError,
    format_data_list,
    mix_lists,
    parse_data_list,
    parse_data_lists,
    prefix_key,
    token_counts,
    validate,
    write_data_list,
)
from megatron_ext.data.mixture import CorpusUsage, MixInput, parse_token_count, plot_mixture, usage, warnings_for

PRESETS: dict[str, tuple[float, float, float]] = {
    "weak": (0.05, 0.95, 0.0),
    "strong-equal": (0.33, 0.33, 0.34),
    "strong-low-d0": (0.05, 0.48, 0.47),
}
SOURCES = ("D0", "Di", "B")
_BUFFER_HEADER = "CPT replay buffer B: the earlier stages' datasets, weight = tokens (replayed in proportion to size)"
_SUM_TOLERANCE = 1e-9  # 0.33 + 0.33 + 0.34 is not exactly 1.0 in floating point


@dataclass(frozen=True)
class StagePlan:
    """One stage's mix: the alphas used, the three sources and the resulting list, and notes for the user."""

    used: tuple[float, float, float]  # after moving an empty buffer's share to D0 and Di
    sources: tuple[list[DataEntry], list[DataEntry], list[DataEntry]]  # D0, Di, B (without Di's own datasets)
    entries: list[DataEntry]
    notes: list[str]


def check_alphas(alphas: Sequence[float]) -> tuple[float, float, float]:
    """The three alphas, each a finite number >= 0, summing to 1 (a mix that is not a whole is a typo)."""
    a0, ad, ab = (float(a) for a in alphas)
    text = f"{a0:g} {ad:g} {ab:g}"
    if not all(math.isfinite(a) and a >= 0 for a in (a0, ad, ab)):
        raise DataListError(f"--alphas {text}: expected three finite numbers >= 0")
    total = math.fsum((a0, ad, ab))
    if abs(total - 1) > _SUM_TOLERANCE:
        raise DataListError(f"--alphas {text} sum to {total:.12g}; expected alpha_0 + alpha_D + alpha_B = 1")
    return a0, ad, ab


def redistribute(alphas: tuple[float, float, float], buffer_empty: bool) -> tuple[tuple[float, float, float], str]:
    """With an empty buffer, alpha_B goes to D0 and Di in proportion to their alphas (stage 1 has no B yet);
    returns the alphas to use and a note (empty when nothing moved)."""
    a0, ad, ab = alphas
    if not buffer_empty or ab == 0:
        return alphas, ""
    if a0 + ad == 0:
        raise DataListError("the buffer is empty and alpha_0 = alpha_D = 0: the stage would have no data")
    used = (a0 / (a0 + ad), ad / (a0 + ad), 0.0)
    note = (
        f"note: the buffer is empty; its share {ab:g} goes to D0 and Di in proportion to their alphas: "
        f"alpha_0 {used[0]:.6g}, alpha_D {used[1]:.6g}"
    )
    return used, note


def plan_stage(
    d0: list[DataEntry], di: list[DataEntry], buffer: list[DataEntry], alphas: tuple[float, float, float]
) -> StagePlan:
    """The stage mix. Buffer datasets that are Di's own (a stage planned again after --update-buffer) count in
    Di only, so planning a stage twice gives the same list."""
    stage_keys = {prefix_key(e.prefix) for e in di}
    replay = [e for e in buffer if prefix_key(e.prefix) not in stage_keys]
    notes = []
    if len(replay) < len(buffer):
        notes.append(
            f"note: {len(buffer) - len(replay)} datasets of the stage are already in the buffer (an earlier "
            "--update-buffer for this stage?); they count in Di only"
        )
    used, note = redistribute(alphas, buffer_empty=not replay)
    if note:
        notes.append(note)
    entries = mix_lists(list(zip(used, (d0, di, replay))))
    return StagePlan(used, (d0, di, replay), entries, notes)


def updated_buffer(buffer: list[DataEntry], di: list[DataEntry], di_tokens: np.ndarray) -> list[DataEntry]:
    """B := B u Di, with Di's datasets weighted by their token counts.

    Token weights make B's share of a later stage spread over the earlier stages in proportion to their size:
    every buffered token is equally likely to be replayed, so a small stage is not repeated more than a large
    one, and adding a stage needs no new weights. (Di's own weights, e.g. an upsampled corpus, are not kept.)
    """
    known = {prefix_key(e.prefix) for e in buffer}
    added = [
        DataEntry(float(n), e.prefix, e.corpus, e.source)
        for e, n in zip(di, di_tokens)
        if prefix_key(e.prefix) not in known
    ]
    return [*buffer, *added]


def _usage_by(
    parts: list[tuple[str, DataEntry]], tokens: dict[str, int], train_tokens: int, by_corpus: bool
) -> dict[str, CorpusUsage]:
    """inspect_data's per-corpus usage, with each dataset labelled by its source (and corpus)."""
    labelled = [replace(e, corpus=f"{name} {e.corpus}" if by_corpus else name) for name, e in parts]
    counts = np.array([tokens[prefix_key(e.prefix)] for e in labelled], dtype=np.int64)
    return {r.corpus: r for r in usage(labelled, counts, train_tokens)}


def summary(plan: StagePlan, tokens: dict[str, int], train_tokens: int, max_epochs: float) -> list[str]:
    """Table lines per source and corpus (tokens on disk, share, sampled tokens, epochs), then WARNING lines.

    Sources with a zero share are left out, so the table is the written list. The warnings judge the mix
    itself, so a corpus fed by several sources is judged as a whole.
    """
    parts = [
        (name, replace(e, weight=alpha * e.weight))
        for name, alpha, entries in zip(SOURCES, plan.used, plan.sources)
        if alpha > 0 and entries
        for e in mix_lists([(1.0, entries)])  # the source's own proportions, summing to 1
    ]
    by_source = _usage_by(parts, tokens, train_tokens, by_corpus=False)
    by_corpus = _usage_by(parts, tokens, train_tokens, by_corpus=True)
    run = train_tokens > 0

    def cells(label: str, r: CorpusUsage) -> list[str]:
        numbers = [str(r.files), f"{r.tokens:,}", f"{r.share:.4%}"]
        return [label, *numbers, *([f"{r.sampled_tokens:,.0f}", f"{r.epochs:.3f}"] if run else [])]

    body = []
    for name in SOURCES:
        if name in by_source:
            body.append(cells(name, by_source[name]))
            body += [cells("  " + k.split(" ", 1)[1], r) for k, r in by_corpus.items() if k.split(" ")[0] == name]
    counts = np.array([tokens[prefix_key(e.prefix)] for e in plan.entries], dtype=np.int64)
    total = ["TOTAL", str(len(plan.entries)), f"{int(counts.sum()):,}", "100.0000%"]
    total += [f"{train_tokens:,}", f"{train_tokens / counts.sum():.3f}"] if run else []
    header = ["source / corpus", "files", "tokens", "share", *(["sampled", "epochs"] if run else [])]
    lines = format_table(header, [*body, total]).splitlines()
    if run:
        lines += warnings_for(list(usage(plan.entries, counts, train_tokens)), max_epochs)
    return lines


# ---- command line -------------------------------------------------------------------------------------------


def read_buffer(path: str) -> list[DataEntry]:
    """The buffer's datasets, validated; a missing file is an empty buffer (before stage 1 there is none)."""
    if not os.path.exists(path):
        return []
    entries = parse_data_list(path)
    validate(entries)
    return entries


def read_mixture(paths: Sequence[str]) -> list[DataEntry]:
    entries = parse_data_lists(paths)
    validate(entries)
    return entries


def build_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d0", nargs="+", required=True, metavar="LIST", help="the original pre-training mixture")
    parser.add_argument("--stage", nargs="+", required=True, metavar="LIST", help="this stage's new data (Di)")
    parser.add_argument("--buffer", required=True, metavar="LIST", help="data list of earlier stages (may not exist)")
    parser.add_argument("--output", required=True, metavar="LIST", help="the stage's data list to write")
    alphas = parser.add_mutually_exclusive_group(required=True)
    alphas.add_argument("--preset", choices=sorted(PRESETS), help="alphas for a weak or strong distribution shift")
    alphas.add_argument("--alphas", nargs=3, type=float, metavar=("A0", "AD", "AB"), help="shares of D0, Di, B")
    parser.add_argument("--train-tokens", help="tokens the stage trains on (10B, 2e11): adds sampled and epochs")
    parser.add_argument("--max-epochs", type=float, default=4.0, help="warn above this many repeats (default 4)")
    parser.add_argument("--update-buffer", action="store_true", help="then add Di to the buffer for the next stage")
    parser.add_argument("--plot", metavar="PNG", help="draw the share per corpus (bar chart)")
    return parser


def _command(args: argparse.Namespace, alphas: tuple[float, float, float]) -> str:
    """The planning command with absolute paths, for the list's header: the list says how to make it again."""

    def paths(items: Sequence[str]) -> str:
        return " ".join(os.path.abspath(p) for p in items)

    choice = f"--preset {args.preset}" if args.preset else "--alphas " + " ".join(repr(a) for a in alphas)
    return f"cpt_plan.py --d0 {paths(args.d0)} --stage {paths(args.stage)} --buffer {paths([args.buffer])} {choice}"


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    alphas = check_alphas(PRESETS[args.preset] if args.preset else args.alphas)
    train_tokens = parse_token_count(args.train_tokens) if args.train_tokens else 0
    if not math.isfinite(args.max_epochs) or args.max_epochs <= 0:
        raise DataListError(f"--max-epochs {args.max_epochs}: expected a positive number")
    if os.path.abspath(args.output) in {os.path.abspath(p) for p in [args.buffer, *args.d0, *args.stage]}:
        raise DataListError(f"--output {args.output} is also an input list or the buffer; expected a new file")
    d0, di, buffer = read_mixture(args.d0), read_mixture(args.stage), read_buffer(args.buffer)
    plan = plan_stage(d0, di, buffer, alphas)
    tokens: dict[str, int] = {}
    for entries in (d0, di, buffer):
        tokens.update(zip((prefix_key(e.prefix) for e in entries), token_counts(entries).tolist()))
    new_buffer = updated_buffer(buffer, di, np.array([tokens[prefix_key(e.prefix)] for e in di]))
    format_data_list(new_buffer, _BUFFER_HEADER)  # a buffer that cannot be written fails before anything is
    used = " ".join(f"alpha_{s}={a!r}" for s, a in zip(("0", "D", "B"), plan.used))
    counts = f"datasets: D0 {len(d0)}, Di {len(di)}, B {len(plan.sources[2])}"
    for line in plan.notes:
        print(line)
    if args.plot:  # before the list: a failed plot must leave no list behind
        plot_mixture([MixInput(a, n, e) for n, a, e in zip(SOURCES, plan.used, plan.sources) if a > 0 and e], args.plot)
    write_data_list(plan.entries, args.output, header=f"{_command(args, alphas)}\nstage mix: {used} ({counts})")
    print(f"stage mix: {used} ({counts})")
    print("\n".join(summary(plan, tokens, train_tokens, args.max_epochs)))
    print(f"wrote {len(plan.entries)} datasets to {args.output}")
    if args.update_buffer:
        write_data_list(new_buffer, args.buffer, header=_BUFFER_HEADER)
        added = len(new_buffer) - len(buffer)
        print(f"added {added} datasets of Di to the buffer {args.buffer} (now {len(new_buffer)} datasets)")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
