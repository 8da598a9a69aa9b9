"""Draw the learning-rate schedule a set of Megatron-style flags gives, against iterations and tokens, to a PNG.

    python tools/plot_lr.py --lr 3e-4 --min-lr 3e-5 --lr-decay-style WSD --lr-wsd-decay-style minus_sqrt \\
        --lr-warmup-iters 200 --lr-wsd-decay-iters 1000 --train-iters 10000 --global-batch-size 512 \\
        --seq-length 4096 --out wsd.png
    python tools/plot_lr.py --global-batch-size 256 --train-tokens 20B --seq-length 2048 --lr-warmup-iters 100 \\
        --compare "--lr-decay-style cosine" "--lr-decay-style WSD --lr-wsd-decay-tokens 4B" \\
                  "--lr-decay-style infinite-cosine --constant-lr 1e-4 --lr-infinite-decay-tokens 5B \\
                   --lr-cooldown-tokens 4B" --out compare.png

Top panel: LR per iteration (the LR an iteration trains with, i.e. after that many scheduler steps) with the
phases shaded and named, tokens on the upper axis. Bottom panel: LR against tokens, which is what stays
comparable when runs differ in batch size. ``--compare`` strings are appended to the flags given outside them,
so shared flags are written once. Lengths take iters, samples or tokens (counts such as 300B, 2T, 5e9). The
schedule text (phases, spans, LR values) is printed too. Mistakes end in one ``error:`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from megatron_ext.training.schedules import (
    LR_DECAY_STYLES,
    STYLE_ALIASES,
    WD_INCR_STYLES,
    WSD_DECAY_STYLES,
    ScheduleConfig,
    ScheduleError,
    lr_at,
    resolve_lengths,
    to_samples,
)

LENGTHS = {
    "lr_warmup": "warmup length",
    "lr_decay": "position where LR reaches --min-lr (default: the train length)",
    "lr_wsd_decay": "WSD: final anneal length",
    "lr_infinite_decay": "infinite-*: decay length from --lr to --constant-lr",
    "lr_cooldown": "infinite-*: final cooldown length to --min-lr",
    "train": "run length",
}
PHASE_COLORS = {"warmup": "tab:orange", "decay": "tab:blue", "stable": "tab:green", "cooldown": "tab:red"}
PHASE_COLORS["final"] = "tab:gray"
MAX_POINTS = 2000


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every mistake is one ``error:`` line."""

    def error(self, message: str) -> NoReturn:
        raise ScheduleError(f"{message} (see --help)")


def parse_count(text: str) -> float:
    """300B, 2T, 5e9, 1_000 -> a count (K/M/B/T suffixes are powers of 1000)."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*\.?[0-9]*(?:e[+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count such as 2000, 5e9, 300B or 2T")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    return float(m.group(1).replace("_", "")) * scale


def build_parser() -> argparse.ArgumentParser:
    """The schedule's own Megatron-style flags, plus the tool's output options."""
    p = _Parser(prog="plot_lr.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    styles = sorted(set(LR_DECAY_STYLES) | set(STYLE_ALIASES))
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end")
    p.add_argument("--lr-warmup-init", type=float, default=0.0, help="learning rate at the start of warmup")
    p.add_argument("--lr-decay-style", default="cosine", choices=styles, metavar="STYLE", help=", ".join(styles))
    p.add_argument("--lr-wsd-decay-style", default="exponential", choices=WSD_DECAY_STYLES)
    p.add_argument("--constant-lr", type=float, default=None, help="infinite-*: the LR held after the decay")
    p.add_argument("--lr-timescale", type=float, default=10.0, help="infinite-inv-sqrt: steepness alpha")
    for stem, what in LENGTHS.items():
        g = p.add_mutually_exclusive_group()
        for unit in ("iters", "samples", "tokens"):
            flag = f"--{stem.replace('_', '-')}-{unit}"
            g.add_argument(flag, type=parse_count, default=None, metavar="N", help=f"{what}, in {unit}")
    p.add_argument("--lr-warmup-fraction", type=float, default=None, help="warmup as a fraction of the decay end")
    p.add_argument("--global-batch-size", type=int, required=True, help="samples per iteration")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per sample")
    p.add_argument("--weight-decay", type=float, default=0.01, help="constant weight decay")
    p.add_argument("--start-weight-decay", type=float, default=None)
    p.add_argument("--end-weight-decay", type=float, default=None)
    p.add_argument("--weight-decay-incr-style", default="constant", choices=WD_INCR_STYLES)
    p.add_argument("--out", default="lr_schedule.png", help="PNG to write")
    p.add_argument("--title", default=None)
    p.add_argument("--compare", nargs="+", default=None, metavar='"FLAGS"', help="overlay these flag sets")
    return p


@dataclass(frozen=True)
class Run:
    """One schedule to draw: its config and how iterations map to its positions."""

    label: str
    config: ScheduleConfig
    global_batch_size: int
    seq_length: int
    train_iters: int

    def position(self, iteration: float) -> float:
        """Schedule position after ``iteration`` scheduler steps."""
        samples = iteration * self.global_batch_size
        return samples * self.seq_length if self.config.unit == "tokens" else samples

    def iteration(self, position: float) -> float:
        """Inverse of :meth:`position`."""
        return to_samples(self.config, position) / self.global_batch_size


def config_from_args(ns: argparse.Namespace, label: str = "") -> Run:
    """Megatron-style flags -> one-unit ScheduleConfig (tokens if any length is in tokens) and the run length."""
    lengths: dict[str, tuple[float, str] | None] = {}
    for stem in LENGTHS:
        given = [(getattr(ns, f"{stem}_{u}"), u) for u in ("iters", "samples", "tokens")]
        lengths[stem] = next(((v, u) for v, u in given if v is not None), None)
    gbs, seq = ns.global_batch_size, ns.seq_length
    if gbs <= 0 or seq <= 0:
        raise ScheduleError("--global-batch-size and --seq-length must be positive")
    unit, conv = resolve_lengths(lengths, global_batch_size=gbs, seq_length=seq)
    train = conv.pop("train", None)
    decay = conv.pop("lr_decay", train)
    if train is None:
        if decay is None:
            raise ScheduleError("give the run length: --train-iters, --train-samples or --train-tokens")
        train = decay
    if ns.lr_warmup_fraction is not None:
        if lengths["lr_warmup"] is not None:
            raise ScheduleError("give --lr-warmup-fraction or --lr-warmup-iters/-samples/-tokens, not both")
        conv["lr_warmup"] = ns.lr_warmup_fraction * decay
    wd_style = ns.weight_decay_incr_style
    start_wd = ns.weight_decay if ns.start_weight_decay is None or wd_style == "constant" else ns.start_weight_decay
    end_wd = ns.weight_decay if ns.end_weight_decay is None or wd_style == "constant" else ns.end_weight_decay
    cfg = ScheduleConfig(
        lr=ns.lr,
        min_lr=ns.min_lr,
        lr_warmup_init=ns.lr_warmup_init,
        lr_decay_style=ns.lr_decay_style,
        unit=unit,
        seq_length=seq,
        lr_decay=decay,
        lr_wsd_decay_style=ns.lr_wsd_decay_style,
        constant_lr=ns.constant_lr,
        lr_timescale=ns.lr_timescale,
        start_weight_decay=start_wd,
        end_weight_decay=end_wd,
        weight_decay_incr_style=wd_style,
        wd_incr=train,
        **conv,
    )
    iters = math.ceil(to_samples(cfg, train) / gbs - 1e-9)
    return Run(label or cfg.lr_decay_style, cfg, gbs, seq, max(iters, 1))


def split_compare(argv: list[str]) -> tuple[list[str], list[str]]:
    """Base flags and the ``--compare`` strings (each a quoted flag set, so it contains a space)."""
    if "--compare" not in argv:
        return argv, []
    i = argv.index("--compare")
    j = i + 1
    while j < len(argv) and (" " in argv[j] or not argv[j].startswith("-")):
        j += 1
    return argv[:i] + argv[j:], argv[i + 1 : j]


def _iterations(run: Run) -> list[float]:
    """At most MAX_POINTS iterations, plus every phase boundary so corners are drawn sharp."""
    n = run.train_iters
    step = max(1, n // MAX_POINTS)
    its = set(range(0, n + 1, step)) | {n}
    for p in run.config.phases():
        for pos in (p.start, p.end):
            if pos is not None and 0 <= run.iteration(pos) <= n:
                its.add(run.iteration(pos))
    return sorted(its)


def _fmt_count(x: float, _pos: object = None) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.4g}{suffix}"
    return f"{x:.4g}"


def plot(runs: list[Run], out: Path, title: str | None = None) -> None:
    """Two panels (LR vs iterations with shaded phases of the first run, LR vs tokens) written to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (ax_it, ax_tok) = plt.subplots(2, 1, figsize=(11, 7.5 + 0.2 * len(runs)), constrained_layout=True)
    first = runs[0]
    for k, run in enumerate(runs):
        its = _iterations(run)
        lrs = [lr_at(run.config, run.position(i)) for i in its]
        tokens = [i * run.global_batch_size * run.seq_length for i in its]
        color = f"C{k}"
        ax_it.plot(its, lrs, color=color, lw=1.8, label=run.label)
        ax_tok.plot(tokens, lrs, color=color, lw=1.8, label=run.label)
        if k > 0:  # only the first run is shaded; others mark their phase changes
            for p in run.config.phases()[1:]:
                if run.iteration(p.start) <= run.train_iters:
                    ax_it.axvline(run.iteration(p.start), color=color, ls=":", lw=1)
    for p in first.config.phases():
        a = first.iteration(p.start)
        b = first.train_iters if p.end is None else min(first.iteration(p.end), first.train_iters)
        if a >= first.train_iters or b <= a:
            continue
        color = PHASE_COLORS.get(p.name, "tab:purple")
        ax_it.axvspan(a, b, color=color, alpha=0.12, lw=0)
        if b - a >= 0.01 * first.train_iters:  # name only spans wide enough to read
            ax_it.text((a + b) / 2, 0.97, p.name, transform=ax_it.get_xaxis_transform(), ha="center", va="top")
        tok = first.global_batch_size * first.seq_length
        ax_tok.axvspan(a * tok, b * tok, color=color, alpha=0.08 if len(runs) > 1 else 0.12, lw=0)
    scale = first.global_batch_size * first.seq_length
    top = ax_it.secondary_xaxis("top", functions=(lambda x: x * scale, lambda x: x / scale))
    top.set_xlabel("tokens" + (f" ({first.label})" if len(runs) > 1 else ""))
    top.xaxis.set_major_formatter(FuncFormatter(_fmt_count))
    ax_it.set_xlabel("iteration")
    ax_tok.set_xlabel("tokens")
    ax_tok.xaxis.set_major_formatter(FuncFormatter(_fmt_count))
    for ax in (ax_it, ax_tok):
        ax.set_ylabel("learning rate")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        fig.legend(*ax_it.get_legend_handles_labels(), loc="outside lower center", fontsize=8)
    fig.suptitle(title or ("LR schedule" if len(runs) > 1 else f"LR schedule: {first.label}"))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Parse, print each schedule's description, draw the PNG; 2 on a user mistake."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        base, compares = split_compare(argv)
        ns = parser.parse_args(base)
        if compares:
            runs = [config_from_args(parser.parse_args(base + shlex.split(c)), label=c.strip()) for c in compares]
        else:
            runs = [config_from_args(ns)]
    except (ScheduleError, argparse.ArgumentTypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for run in runs:
        print(f"[{run.label}] {run.train_iters} iterations of {run.global_batch_size} x {run.seq_length} tokens")
        print(run.config.describe())
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, out, ns.title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
