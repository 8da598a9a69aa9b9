"""Draw the learning-rate schedule a set of Megatron-style flags gives, against iterations and tokens, to a PNG.

    python tools/plot_lr.py --lr 3e-4 --min-lr 3e-5 --lr-decay-style WSD --lr-wsd-decay-style minus_sqrt \\
        --lr-warmup-iters 200 --lr-wsd-decay-iters 1000 --train-iters 10000 --global-batch-size 512 \\
        --seq-length 4096 --output wsd.png
    python tools/plot_lr.py --global-batch-size 256 --train-tokens 20B --seq-length 2048 --lr-warmup-iters 100 \\
        --compare "--lr-decay-style cosine" "--lr-decay-style WSD --lr-wsd-decay-tokens 4B" \\
                  "--lr-decay-style infinite-cosine --constant-lr 1e-4 --lr-infinite-decay-tokens 5B \\
                   --lr-cooldown-tokens 4B" --output compare.png
    python tools/plot_lr.py --load ckpt/d0 [--iteration 40] --output d0_lr.png
    python tools/plot_lr.py --load ckpt/d0 --compare "--lr-decay-style constant --lr-warmup-iters 5 --train-iters 30" \\
        --output stage1_lr.png   # the checkpoint's schedule and a planned stage that restarts the schedule there

Top panel: LR per iteration (the LR an iteration trains with, i.e. after that many scheduler steps) with the
phases shaded and named, tokens on the upper axis. Bottom panel: LR against tokens, which is what stays
comparable when runs differ in batch size. ``--compare`` strings are appended to the flags given outside them,
so shared flags are written once. The flags are pretrain_gpt.py's (a run's command line can be pasted: flags that
do not shape the schedule have no effect) plus ``--train-tokens``, and the schedule is built as training builds it
(``config.schedule_config``), with training's messages for mistakes. Lengths take iters, samples or tokens
(counts such as 300B, 2T, 5e9). The schedule text (phases, spans, LR values) is printed too. Mistakes end in one
``error:`` line, exit status 2.

``--load`` draws the schedule stored in a checkpoint (the one ``pretrain_gpt.py --load`` would resume, or
``--iteration``'s) against the run's iterations, solid up to the checkpoint and dashed after it, with the
checkpoint marked. Its global batch size, sequence length, peak and min LR become the defaults of the
``--compare`` schedules, which are drawn from the checkpoint on (``--compare-as restart``: a new stage with
``--restart-lr-schedule``; their lengths count from there) or from the checkpoint schedule's own origin
(``--compare-as override``: ``--override-opt_param-scheduler``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from megatron_ext.cli import OneLineParser, UserError, check_image_path, report
from megatron_ext.config import (
    LR_LENGTHS,
    SECTIONS,
    Config,
    ConfigError,
    flag_of,
    iterations_for_tokens,
    parse_args,
    parse_count,
    run_length_samples,
    schedule_config,
)
from megatron_ext.lr_schedule import INFINITE_STYLES, ScheduleConfig, ScheduleError, convert_length, lr_at, to_samples
from megatron_ext.training import layout

# The flags of pretrain_gpt.py the schedule reads (None: the whole section). Any other flag of it is accepted and
# has no effect, so a run's command line can be pasted as it is.
SCHEDULE_FLAGS: dict[str, tuple[str, ...] | None] = {
    "training": ("global_batch_size", "train_iters", "train_samples"),
    "model": ("seq_length",),
    "optimizer": ("lr", "min_lr", "weight_decay"),
    "schedule": None,
}
RESUME_ONLY = ("override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler", "restart_lr_schedule")
PHASE_COLORS = {"warmup": "tab:orange", "decay": "tab:blue", "stable": "tab:green", "cooldown": "tab:red"}
PHASE_COLORS["final"] = "tab:gray"
MAX_POINTS = 2000


def _schedule_flags_help() -> str:
    """The schedule flags with their help, from the configuration schema (``--help``'s epilog)."""
    rows = [
        (flag_of(f), f.metadata["help"] + ("" if f.default is None else f" Default: {f.default}."))
        for f in _schedule_fields()
    ]
    rows.append(
        (
            "--train-tokens N",
            "Run length in tokens, as TRAIN_TOKENS in train_alcf.sh: --train-iters "
            "ceil(N / (--seq-length x --global-batch-size)).",
        )
    )
    lines = [
        "schedule flags (pretrain_gpt.py's own; lengths also take counts such as 5e9, 300B or 2T;",
        "--global-batch-size is needed unless --load gives it or every length is in iterations (then the tokens",
        "panel is left out), and --load's batch, sequence length and LRs become the defaults of --compare):",
    ]
    for flag, text in rows:
        lines.append(
            textwrap.fill(text, 118, initial_indent=f"  {flag:<30}", subsequent_indent=" " * 32, break_on_hyphens=False)
        )
    return "\n".join(lines)


def _schedule_fields() -> list[dataclasses.Field]:
    """The schema fields in SCHEDULE_FLAGS, in schema order."""
    return [
        f
        for section, names in SCHEDULE_FLAGS.items()
        for f in dataclasses.fields(SECTIONS[section])
        if (f.name not in RESUME_ONLY if names is None else f.name in names)
    ]


def build_parser() -> argparse.ArgumentParser:
    """The tool's own options; the schedule's flags are pretrain_gpt.py's (see `run_from_flags`)."""
    p = OneLineParser(
        prog="plot_lr.py",
        description=__doc__,
        epilog=_schedule_flags_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # an abbreviation must not take a schedule flag of pretrain_gpt.py for the tool's
    )
    p.add_argument(
        "--output", "--out", dest="output", default="lr_schedule.png", help="PNG to write (--out: its earlier name)"
    )
    p.add_argument("--title", default=None)
    p.add_argument("--compare", nargs="+", default=None, metavar='"FLAGS"', help="overlay these flag sets")
    p.add_argument("--load", metavar="CKPT_DIR", help="draw the schedule stored in this checkpoint folder")
    p.add_argument("--iteration", type=int, default=None, help="with --load: this iteration, not the latest")
    p.add_argument(
        "--compare-as",
        choices=("restart", "override"),
        default="restart",
        help="with --load: --compare schedules start at the checkpoint (restart) or at its schedule's origin",
    )
    return p


@dataclass(frozen=True)
class Run:
    """One schedule to draw: its config and how iterations map to its positions.

    ``start`` is the run iteration where the schedule's position 0 lies (not 0 for a schedule restarted at a
    checkpoint), ``start_tokens`` the run's tokens there, so schedules of one run line up on both axes.
    """

    label: str
    config: ScheduleConfig
    global_batch_size: int
    seq_length: int
    train_iters: int
    start: float = 0.0
    start_tokens: float = 0.0
    tokens_known: bool = True  # False: no batch size given, the schedule counts iterations (no tokens panel)

    @property
    def end(self) -> float:
        """The last run iteration drawn."""
        return self.start + self.train_iters

    def position(self, iteration: float) -> float:
        """Schedule position after run iteration ``iteration`` (``iteration - start`` scheduler steps)."""
        samples = (iteration - self.start) * self.global_batch_size
        return samples * self.seq_length if self.config.unit == "tokens" else samples

    def iteration(self, position: float) -> float:
        """Inverse of :meth:`position`."""
        return self.start + to_samples(self.config, position) / self.global_batch_size

    def tokens(self, iteration: float) -> float:
        """The run's tokens at ``iteration`` (constant batch size from ``start``)."""
        return self.start_tokens + (iteration - self.start) * self.global_batch_size * self.seq_length


@dataclass(frozen=True)
class CheckpointMark:
    """Where a checkpoint stands in its schedule, to mark and print it."""

    path: Path
    iteration: int
    lr: float
    tokens: float
    phase: str


def _train_tokens(flags: list[str]) -> tuple[int | None, list[str]]:
    """``--train-tokens N`` (the tool's own length flag, as TRAIN_TOKENS) and the other flags."""
    p = OneLineParser(prog="plot_lr.py", add_help=False, allow_abbrev=False)
    p.add_argument("--train-tokens", type=parse_count, default=None)
    ns, rest = p.parse_known_args(flags)
    return ns.train_tokens, rest


def run_from_flags(flags: list[str], label: str = "") -> Run:
    """pretrain_gpt.py's flags -> the schedule that run would follow (built as training builds it) and its
    length; raises ConfigError naming the flag for a mistake."""
    train_tokens, flags = _train_tokens(flags)
    cfg = parse_args(flags, prog="plot_lr.py")
    t, seq = cfg.training, cfg.model.seq_length
    tokens_known = t.global_batch_size is not None
    if not tokens_known:
        if not _counts_iterations(cfg, train_tokens):
            raise ConfigError("give --global-batch-size (or --load a checkpoint, whose batch size is the default)")
        t.global_batch_size = 1  # the shape per iteration does not depend on the batch size
    gbs = t.global_batch_size
    if train_tokens is not None:
        if train_tokens <= 0:
            raise ConfigError(f"--train-tokens must be positive, not {train_tokens}")
        if t.train_iters is not None or t.train_samples is not None:
            raise ConfigError("give one of --train-tokens, --train-iters and --train-samples")
        t.train_iters = iterations_for_tokens(train_tokens, seq, gbs)
    if t.train_iters is None and t.train_samples is None:
        decay = cfg.schedule.length("lr_decay")
        if decay is None:
            raise ConfigError("give the run length: --train-iters, --train-samples or --train-tokens")
        t.train_samples = math.ceil(convert_length(*decay, "samples", global_batch_size=gbs, seq_length=seq))
    sched = schedule_config(cfg)
    iters = math.ceil(run_length_samples(cfg) / gbs)
    return Run(label or sched.lr_decay_style, sched, gbs, seq, max(iters, 1), tokens_known=tokens_known)


def _counts_iterations(cfg: Config, train_tokens: int | None) -> bool:
    """Whether the run length and every schedule length are in iterations (or not given): then the schedule
    has the same shape per iteration at any batch size."""
    lengths = [cfg.schedule.length(name) for name in LR_LENGTHS]
    iterations = all(length is None or length[1] == "iters" for length in lengths)
    return iterations and train_tokens is None and cfg.training.train_samples is None


def split_compare(argv: list[str]) -> tuple[list[str], list[str]]:
    """Base flags and the ``--compare`` strings (each a quoted flag set, so it contains a space)."""
    if "--compare" not in argv:
        return argv, []
    i = argv.index("--compare")
    j = i + 1
    while j < len(argv) and (" " in argv[j] or not argv[j].startswith("-")):
        j += 1
    return argv[:i] + argv[j:], argv[i + 1 : j]


def checkpoint_dir(root: Path, iteration: int | None) -> Path:
    """The iteration folder to read: ``--iteration``'s, else the one the tracker names (as training's --load)."""
    try:
        return layout.find_checkpoint(root, iteration)
    except layout.CheckpointNotFound as e:
        raise ScheduleError(str(e)) from None


def _phase_at(cfg: ScheduleConfig, position: float) -> str:
    phases = cfg.phases()
    return next((p for p in phases if p.end is None or position <= p.end), phases[-1]).name


def load_checkpoint_run(root: Path, iteration: int | None) -> tuple[Run, CheckpointMark]:
    """The schedule a checkpoint holds, placed on its run's iterations, and where the checkpoint is in it.

    The run iteration of the schedule's origin is the checkpoint's iteration minus its position in steps (a
    schedule restarted at an earlier checkpoint starts there); exact for a constant global batch size.
    """
    path = checkpoint_dir(root, iteration)
    from megatron_ext import platform  # megatron-core (slow to import) only once there is a checkpoint to read

    platform.quiet_optional_dependency_warnings()
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as e:  # whatever the reader raises for a damaged folder: one line for the user
        raise ScheduleError(f"{path}: cannot read the checkpoint's common state ({type(e).__name__}: {e})") from e
    state, run_cfg = common.get("scheduler"), common.get("config") or {}
    if not isinstance(state, dict) or "config" not in state:
        raise ScheduleError(f"{path}: no schedule in the checkpoint (expected pretrain_gpt.py's 'scheduler' state)")
    cfg = ScheduleConfig.from_dict(state["config"])
    training = run_cfg.get("training", {})
    gbs = training.get("global_batch_size")
    seq = cfg.seq_length or run_cfg.get("model", {}).get("seq_length")
    if not gbs or not seq:
        raise ScheduleError(f"{path}: the checkpoint's config lacks the global batch size or sequence length")
    it = int(common.get("iteration", common.get("train_state", {}).get("iteration", 0)))
    position = float(state["position"])
    start = max(0.0, it - to_samples(cfg, position) / gbs)
    total = training.get("train_iters") or math.ceil((training.get("train_samples") or 0) / gbs)
    end = max(total, it, start + 1)
    decays = cfg.lr_decay_style != "constant" and (cfg.lr_decay_style not in INFINITE_STYLES or cfg.lr_cooldown > 0)
    if decays and cfg.lr_decay is not None:
        end = max(end, math.ceil(start + to_samples(cfg, cfg.lr_decay) / gbs))  # show the whole decay
    label = f"checkpoint {root.name}" + (f" (schedule restarted at iteration {start:g})" if start else "")
    run = Run(label, cfg, gbs, seq, max(1, math.ceil(end - start)), start, start * gbs * seq)
    mark = CheckpointMark(path, it, lr_at(cfg, position), run.tokens(it), _phase_at(cfg, position))
    return run, mark


def _iterations(run: Run) -> list[float]:
    """At most MAX_POINTS iterations, plus every phase boundary so corners are drawn sharp."""
    n = run.train_iters
    step = max(1, n // MAX_POINTS)
    its = {run.start + i for i in range(0, n + 1, step)} | {run.end}
    for p in run.config.phases():
        for pos in (p.start, p.end):
            if pos is not None and run.start <= run.iteration(pos) <= run.end:
                its.add(run.iteration(pos))
    return sorted(its)


def _fmt_count(x: float, _pos: object = None) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.4g}{suffix}"
    return f"{x:.4g}"


def _mark_checkpoint(ax_it: Any, ax_tok: Any, mark: CheckpointMark) -> None:
    """A dashed line and a dot where the checkpoint is, on both panels."""
    text = f"checkpoint\niter {mark.iteration}\nlr {mark.lr:.3g}"
    for ax, x in ((ax_it, mark.iteration), (ax_tok, mark.tokens)):
        ax.axvline(x, color="black", ls="--", lw=1)
        ax.plot([x], [mark.lr], "o", color="black", ms=6, zorder=5)
        ax.annotate(text, (x, mark.lr), xytext=(6, -6), textcoords="offset points", va="top", fontsize=8)


def plot(runs: list[Run], out: Path, title: str | None = None, mark: CheckpointMark | None = None) -> None:
    """Two panels (LR vs iterations with shaded phases of the first run, LR vs tokens) written to ``out``.

    With ``mark`` the first run is the checkpoint's schedule: solid up to the checkpoint, dashed after it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = runs[0]
    tokens = all(run.tokens_known for run in runs)
    size = (11, (7.5 if tokens else 4.5) + 0.2 * len(runs))
    fig, axes = plt.subplots(2 if tokens else 1, 1, figsize=size, constrained_layout=True, squeeze=False)
    ax_it, ax_tok = axes[0][0], (axes[1][0] if tokens else None)
    for k, run in enumerate(runs):
        its = _iterations(run)
        color = f"C{k}"
        pieces: list[tuple[list[float], str, str | None]] = [(its, "-", run.label)]
        if mark is not None and k == 0:  # the schedule's past solid, what a resume would follow dashed
            its = sorted(set(its) | {mark.iteration})
            after = [i for i in its if i >= mark.iteration]
            pieces = [([i for i in its if i <= mark.iteration], "-", run.label), (after, "--", None)]
        for xs, ls, label in pieces:
            lrs = [lr_at(run.config, run.position(i)) for i in xs]
            ax_it.plot(xs, lrs, color=color, lw=1.8, ls=ls, label=label)
            if ax_tok is not None:
                ax_tok.plot([run.tokens(i) for i in xs], lrs, color=color, lw=1.8, ls=ls, label=label)
        if k > 0:  # only the first run is shaded; others mark their phase changes
            for p in run.config.phases()[1:]:
                if run.iteration(p.start) <= run.end:
                    ax_it.axvline(run.iteration(p.start), color=color, ls=":", lw=1)
    for p in first.config.phases():
        a = first.iteration(p.start)
        b = first.end if p.end is None else min(first.iteration(p.end), first.end)
        if a >= first.end or b <= a:
            continue
        color = PHASE_COLORS.get(p.name, "tab:purple")
        ax_it.axvspan(a, b, color=color, alpha=0.12, lw=0)
        if b - a >= 0.01 * first.train_iters:  # name only spans wide enough to read
            ax_it.text((a + b) / 2, 0.97, p.name, transform=ax_it.get_xaxis_transform(), ha="center", va="top")
        if ax_tok is not None:
            ax_tok.axvspan(first.tokens(a), first.tokens(b), color=color, alpha=0.08 if len(runs) > 1 else 0.12, lw=0)
    if mark is not None and ax_tok is not None:  # a checkpoint's run always knows its batch size
        _mark_checkpoint(ax_it, ax_tok, mark)
    ax_it.set_xlabel("iteration")
    if ax_tok is not None:
        _token_axes(ax_it, ax_tok, first, len(runs) > 1)
    for ax in (ax_it,) if ax_tok is None else (ax_it, ax_tok):
        ax.set_ylabel("learning rate")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        fig.legend(*ax_it.get_legend_handles_labels(), loc="outside lower center", fontsize=8)
    fig.suptitle(title or ("LR schedule" if len(runs) > 1 else f"LR schedule: {first.label}"))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _token_axes(ax_it: Any, ax_tok: Any, first: Run, several: bool) -> None:
    """Tokens on the upper axis of the iteration panel (the first run's) and on the tokens panel."""
    from matplotlib.ticker import FuncFormatter

    scale = first.global_batch_size * first.seq_length

    def to_iteration(tokens: Any) -> Any:
        return first.start + (tokens - first.start_tokens) / scale

    top = ax_it.secondary_xaxis("top", functions=(first.tokens, to_iteration))
    top.set_xlabel("tokens" + (f" ({first.label})" if several else ""))
    top.xaxis.set_major_formatter(FuncFormatter(_fmt_count))
    ax_tok.set_xlabel("tokens")
    ax_tok.xaxis.set_major_formatter(FuncFormatter(_fmt_count))


def _build_runs(argv: list[str]) -> tuple[argparse.Namespace, list[Run], CheckpointMark | None]:
    """The tool's options, the runs to draw (the checkpoint's first with --load) and the checkpoint mark or None."""
    base, compares = split_compare(argv)
    ns, flags = build_parser().parse_known_args(base)
    if ns.load is None:
        if ns.iteration is not None:
            raise ScheduleError("--iteration needs --load")
        runs = [run_from_flags(flags + shlex.split(c), label=c.strip()) for c in compares]
        return ns, runs or [run_from_flags(flags)], None
    ckpt, mark = load_checkpoint_run(Path(ns.load), ns.iteration)
    # The checkpoint's run is what a planned schedule continues: its sizes and LRs are the defaults.
    saved = ckpt.config
    defaults = ["--global-batch-size", str(ckpt.global_batch_size), "--seq-length", str(ckpt.seq_length)]
    defaults += ["--lr", repr(saved.lr), "--min-lr", repr(saved.min_lr)]
    runs = [ckpt]
    if not compares:  # flags outside --compare only shape --compare schedules, but a typo is still an error
        parse_args(_train_tokens(flags)[1], prog="plot_lr.py")
    for c in compares:
        run = run_from_flags(defaults + flags + shlex.split(c), label=c.strip())
        if ns.compare_as == "restart":
            run = replace(run, start=mark.iteration, start_tokens=mark.tokens)
        else:
            run = replace(run, start=ckpt.start, start_tokens=ckpt.start_tokens)
        runs.append(run)
    return ns, runs, mark


def main(argv: list[str] | None = None) -> int:
    """Parse, print each schedule's description, draw the PNG; 2 on a user mistake."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns, runs, mark = _build_runs(argv)
        check_image_path("--output", ns.output)
    except UserError as e:  # ScheduleError, ConfigError, a bad --output
        return report(e)
    except SystemExit as e:  # a bad flag (its one error line is printed) or --help
        return e.code if isinstance(e.code, int) else 2
    for run in runs:
        span = f" (iterations {run.start:g} -> {run.end:g})" if run.start else ""
        shape = f"of {run.global_batch_size} x {run.seq_length} tokens" if run.tokens_known else "(no batch size given)"
        print(f"[{run.label}] {run.train_iters} iterations {shape}{span}")
        print(run.config.describe())
    if mark is not None:
        print(f"{mark.path}: iteration {mark.iteration}, {mark.phase}, lr {mark.lr:.4g}")
    out = Path(ns.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, out, ns.title, mark)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
