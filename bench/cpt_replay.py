"""What continual pre-training (CPT) forgets on a strong shift, and how much replay and the LR plan give back.

The guide's strategies (ALCF/notes/cpt.md) on a shift that forgets, built on the machine from the built-in corpus
(the Python standard library, one document per module, byte tokens; 10% of each domain's modules held out):

- D0: the top-level modules (the pre-training data);
- D1: the modules of the packages other than email and asyncio under a fixed byte permutation
  (megatron_ext/data/shift.py): the same kind of text written in another script, a strong shift (a new
  language, code or math after web text);
- W: the email and asyncio packages as they are, a weak shift (new data of the same kind as D0).

Per seed, stage 0 trains on D0 at a constant LR (the stable phase of the infinite schedule) and saves the
checkpoint every arm starts from, before any cooldown. Each arm then trains the same budget (--stage1-iters
iterations) with a data list written by tools/cpt_plan.py, evaluated on D0, D1 and W validation:

    naive          100% D1, rewarm (--restart-lr-schedule: warmup, then constant)
    replay-5%      5% D0 + 95% D1, rewarm
    replay-25%     25% D0 + 75% D1, rewarm
    buffer-mix     a three-stage run: stage 1 = 5% D0 + 95% W, then stage 2 (the arm) = 0.33 D0 + 0.33 D1 + 0.34 B
                   with B = W (cpt_plan's strong-equal preset and --update-buffer), each stage rewarmed
    constant-lr    5% replay, continuing stage 0's constant LR (no rewarm: the infinite schedule)
    rewarm-cooled  5% replay, rewarm from a checkpoint cooled down on D0 first (--cooldown-iters, linear to 0)
    cooldown-mix   5% replay at the constant LR, cooled down to 0 over the last --cooldown-fraction of the budget

    python bench/cpt_replay.py              # 3 seeds, 2 runs at a time: about 12 minutes on 2 idle CPU cores
    python bench/cpt_replay.py --quick      # tiny model and lengths, 1 seed: the CI check of the mechanics
    python bench/cpt_replay.py --replot     # table and plot again from RUN_DIR/results.json, no training

Prints, per arm, ``arm NAME: D1 loss X, D0 rise Y`` (means over the seeds, D0 rise = D0's validation loss at the
arm's end minus at the stage-0 checkpoint, same seed and so the same validation samples), the spread over the
seeds (max - min), and ``replay 5% recovers R of naive forgetting`` with R = 1 - rise(5%) / rise(naive) from the
validation losses the runs logged (logs/s<seed>/<run>.log), and the same for 25%. Draws D0 and D1 validation loss
against the tokens of the arm (RUN_DIR/cpt_replay.png). The commands are the ones of ALCF/notes/cpt.md
(pretrain_gpt.py, tools/cpt_plan.py) run as subprocesses. An experiment at toy scale, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ext.cli import OneLineParser  # noqa: E402
from megatron_ext.data.builtin_corpus import iter_documents, stdlib_files  # noqa: E402
from megatron_ext.data.indexed import IndexedDatasetWriter  # noqa: E402
from megatron_ext.data.shift import permute_corpus, token_permutation  # noqa: E402
from megatron_ext.data.tokenizers import ByteTokenizer  # noqa: E402

MARKER = ".cpt_replay"  # a run dir holding this file was made here and may be emptied by a new run
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_", "OMPI_COMM_WORLD_", "PMI_", "PALS_")
WEAK_PACKAGES = ("email", "asyncio")
CORPORA = ("d0", "d1", "w")  # corpus labels; their lists are D0.txt, D1.txt, W.txt and *_valid.txt
QUICK = {  # --quick: the mechanics in well under a minute
    "num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "seq_length": 32, "batch_size": 2,
    "warmup_iters": 2, "stage0_iters": 8, "stage1_iters": 8, "cooldown_iters": 4, "eval_interval": 4,
    "eval_iters": 1, "seeds": [1], "max_documents": 40,
}  # fmt: skip


@dataclass(frozen=True)
class Arm:
    """One strategy: the stage's data list, the checkpoint it starts from and its LR schedule."""

    name: str
    mix: str  # data list written by cpt_plan (see plan_mixes)
    start: str  # the run whose checkpoint it loads: stage0, cooled or buffer-stage1
    schedule: str  # rewarm, continue, cooldown or cool-d0 (see schedule_flags)


ARMS = (
    Arm("naive", "naive.txt", "stage0", "rewarm"),
    Arm("replay-5%", "replay5.txt", "stage0", "rewarm"),
    Arm("replay-25%", "replay25.txt", "stage0", "rewarm"),
    Arm("buffer-mix", "stage2_buffer.txt", "buffer-stage1", "rewarm"),
    Arm("constant-lr", "replay5.txt", "stage0", "continue"),
    Arm("rewarm-cooled", "replay5.txt", "cooled", "rewarm"),
    Arm("cooldown-mix", "replay5.txt", "stage0", "cooldown"),
)
# The runs that make the arms' starting points, besides stage 0: (name, mix, start, schedule)
LEGS = (Arm("cooled", "D0.txt", "stage0", "cool-d0"), Arm("buffer-stage1", "stage1_buffer.txt", "stage0", "rewarm"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("/tmp/cpt_replay"), help="data, checkpoints and logs")
    p.add_argument("--plot", type=Path, default=None, help="PNG to write (default RUN_DIR/cpt_replay.png)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one stage 0 and all arms per seed")
    p.add_argument("--shift-seed", type=int, default=1, help="the byte permutation that makes D1")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="micro = global batch size (one process)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak LR of every stage")
    p.add_argument("--warmup-iters", type=int, default=20, help="warmup of stage 0 and of each rewarm")
    p.add_argument("--stage0-iters", type=int, default=500)
    p.add_argument("--stage1-iters", type=int, default=250, help="each arm's budget (the same for all)")
    p.add_argument("--cooldown-iters", type=int, default=50, help="the D0 cooldown before rewarm-cooled")
    p.add_argument("--cooldown-fraction", type=float, default=0.2, help="cooldown-mix's decay, share of the budget")
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--eval-iters", type=int, default=8, help="validation batches per corpus (the same each time)")
    p.add_argument("--max-documents", type=int, default=None, help="modules per domain (default: all)")
    p.add_argument("--workers", type=int, default=2, help="training runs at a time")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each training run")
    p.add_argument("--quick", action="store_true", help="tiny model and lengths, one seed (overrides those flags)")
    p.add_argument("--replot", action="store_true", help="only the table and plot, from RUN_DIR/results.json")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for flag in ("stage0_iters", "stage1_iters", "cooldown_iters"):
        if getattr(args, flag) % args.eval_interval:
            p.error(f"--{flag.replace('_', '-')} must be a multiple of --eval-interval (evaluations at the ends)")
    if not 0 < args.cooldown_fraction <= 1 or args.workers < 1 or len(set(args.seeds)) != len(args.seeds):
        p.error("--cooldown-fraction must be in (0, 1], --workers >= 1, --seeds distinct")
    if args.max_documents is not None and args.max_documents < 10:
        p.error(f"--max-documents {args.max_documents}: expected >= 10 (a tenth of them is held out)")
    return args


# ---- running the tools ------------------------------------------------------------------------------------------


def _env(threads: int) -> dict[str, str]:
    """No launcher variables (each run is one process on a free port), a fixed thread count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_VARS) and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}


def run_tool(run_dir: Path, log: Path, script: str, args: list[str], threads: int) -> str:
    """Runs ``script`` from the repo with ``args`` in ``run_dir``; its output goes to ``log`` and is returned."""
    cmd = [sys.executable, str(ROOT / script), *args]
    proc = subprocess.run(cmd, cwd=run_dir, env=_env(threads), capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"error: {script} failed (exit {proc.returncode}); see {log}\n{proc.stderr[-2000:]}")
    return proc.stdout


def usage_error(message: str) -> NoReturn:
    """A mistake in the command line: one ``error:`` line, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def prepare_run_dir(run_dir: Path) -> None:
    """An empty run dir; refuses to empty a folder this script did not make."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / MARKER).exists():
            usage_error(f"--run-dir {run_dir} is not empty and was not made by this script; pick another")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("made by bench/cpt_replay.py; emptied by its next run\n")


def write_corpus(prefix: Path, texts: list[str]) -> int:
    """Byte tokens of each text plus eod (what tools/preprocess_data.py --append-eod writes); returns tokens."""
    tok = ByteTokenizer()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(prefix, tok.vocab_size) as writer:
        for text in texts:
            writer.add_document(np.append(tok.tokenize_array(text), tok.eod))
    return writer.num_tokens


def make_domains(run_dir: Path, shift_seed: int, max_documents: int | None) -> dict[str, int]:
    """data/<corpus>/ and valid/<corpus>/ datasets and their lists (``tokens prefix corpus`` lines), from the first
    ``max_documents`` modules of each domain; D1 is written unshifted to raw/ and permuted from there. Returns the
    tokens of each dataset."""
    docs = list(iter_documents(stdlib_files()))
    domains = {
        "d0": [text for rel, text in docs if "/" not in rel],
        "d1": [text for rel, text in docs if "/" in rel and rel.split("/")[0] not in WEAK_PACKAGES],
        "w": [text for rel, text in docs if "/" in rel and rel.split("/")[0] in WEAK_PACKAGES],
    }
    tok = ByteTokenizer()
    perm = token_permutation(tok.vocab_size, (tok.eod, tok.pad), shift_seed)
    sizes = {}
    for name, texts in domains.items():
        texts = texts[:max_documents]
        cut = len(texts) * 9 // 10  # the last 10% of the modules are held out
        for part, chunk, folder in (("", texts[:cut], "data"), ("_valid", texts[cut:], "valid")):
            prefix = run_dir / folder / name / name
            if name == "d1":
                raw = run_dir / "raw" / f"d1{part}"
                write_corpus(raw, chunk)
                tokens = permute_corpus(raw, prefix, perm)
            else:
                tokens = write_corpus(prefix, chunk)
            (run_dir / f"{name.upper()}{part}.txt").write_text(f"{tokens} {prefix} {name}\n")
            sizes[f"{name}{part}"] = tokens
    return sizes


def plan_mixes(args: argparse.Namespace) -> None:
    """The arms' data lists with tools/cpt_plan.py: naive/replay5/replay25 (D0 + D1, no buffer yet), the buffer
    run's stage 1 (weak preset on W, then W goes into the buffer) and stage 2 (strong-equal on D1 with B)."""
    tokens = str(args.stage1_iters * args.batch_size * args.seq_length)
    plans = {
        "naive": ["--stage", "D1.txt", "--buffer", "no_buffer.txt", "--alphas", "0", "1", "0"],
        "replay5": ["--stage", "D1.txt", "--buffer", "no_buffer.txt", "--alphas", "0.05", "0.95", "0"],
        "replay25": ["--stage", "D1.txt", "--buffer", "no_buffer.txt", "--alphas", "0.25", "0.75", "0"],
        "stage1_buffer": ["--stage", "W.txt", "--buffer", "buffer.txt", "--preset", "weak", "--update-buffer"],
        "stage2_buffer": ["--stage", "D1.txt", "--buffer", "buffer.txt", "--preset", "strong-equal"],
    }
    for name, plan in plans.items():
        cmd = ["--d0", "D0.txt", *plan, "--output", f"{name}.txt", "--train-tokens", tokens]
        run_tool(args.run_dir, args.run_dir / "logs" / f"plan_{name}.log", "tools/cpt_plan.py", cmd, args.threads)


# ---- the experiment ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run of one seed: where it started (iteration) and its validation losses corpus -> {it: loss}."""

    start_iteration: int
    end_iteration: int
    valid: dict[str, dict[int, float]]


def parse_validation(log: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for it, corpus, loss in re.findall(r"^validation at iter (\d+) \| (\S+) \| loss ([0-9.]+)", log, re.M):
        out.setdefault(corpus, {})[int(it)] = float(loss)
    return out


def start_iteration(args: argparse.Namespace, run: str) -> int:
    """The iteration a run starts at: its start run's end (stage 0 starts at 0)."""
    ends = {
        "stage0": args.stage0_iters,
        "cooled": args.stage0_iters + args.cooldown_iters,
        "buffer-stage1": args.stage0_iters + args.stage1_iters,
    }
    if run == "stage0":
        return 0
    return ends[next(a.start for a in (*ARMS, *LEGS) if a.name == run)]


def schedule_flags(args: argparse.Namespace, schedule: str) -> list[str]:
    """The LR flags of a run: rewarm and the D0 cooldown restart the schedule at the loaded checkpoint; continue
    keeps the checkpoint's constant LR; cooldown holds it and decays to 0 over the budget's last fraction."""
    lr = ["--lr", str(args.lr), "--lr-decay-style"]
    warmup = ["--lr-warmup-iters", str(args.warmup_iters)]
    if schedule in ("stage0", "rewarm"):
        return [*lr, "constant", *warmup, *(["--restart-lr-schedule"] if schedule == "rewarm" else [])]
    if schedule == "continue":
        return [*lr, "constant", *warmup, "--use-checkpoint-opt_param-scheduler"]
    decay = args.cooldown_iters if schedule == "cool-d0" else round(args.stage1_iters * args.cooldown_fraction)
    total = args.cooldown_iters if schedule == "cool-d0" else args.stage1_iters
    return [*lr, "WSD", "--lr-wsd-decay-style", "linear", "--min-lr", "0", "--lr-warmup-iters", "0",
            "--lr-wsd-decay-iters", str(decay), "--lr-decay-iters", str(total), "--restart-lr-schedule"]  # fmt: skip


def train(args: argparse.Namespace, seed: int, arm: Arm | None) -> Run:
    """One pretrain_gpt.py run (stage 0 when ``arm`` is None) with the flags every run of the experiment shares."""
    name = "stage0" if arm is None else arm.name
    begin = start_iteration(args, name)
    length = {"stage0": args.stage0_iters, "cooled": args.cooldown_iters}.get(name, args.stage1_iters)
    ckpt = f"ckpt/s{seed}"
    flags = [
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.batch_size), "--global-batch-size", str(args.batch_size),
        "--hidden-dropout", "0", "--attention-dropout", "0", "--data-cache-path", "cache", "--seed", str(seed),
        "--log-interval", str(args.eval_interval), "--eval-interval", str(args.eval_interval),
        "--eval-iters", str(args.eval_iters), "--valid-data-file-list", *(f"{c.upper()}_valid.txt" for c in CORPORA),
        "--train-iters", str(begin + length), "--data-file-list", "D0.txt" if arm is None else arm.mix,
        *schedule_flags(args, "stage0" if arm is None else arm.schedule),
    ]  # fmt: skip
    if arm is not None:
        flags += ["--load", f"{ckpt}/{arm.start}"]
    if name in ("stage0", *(leg.name for leg in LEGS)):
        flags += ["--save", f"{ckpt}/{name}", "--save-interval", str(begin + length)]
    start = time.perf_counter()
    log = run_tool(args.run_dir, args.run_dir / "logs" / f"s{seed}" / f"{name}.log", "pretrain_gpt.py", flags,
                   args.threads)  # fmt: skip
    print(f"  seed {seed} {name}: {time.perf_counter() - start:.0f}s", flush=True)
    return Run(begin, begin + length, parse_validation(log))


def run_all(args: argparse.Namespace) -> dict[int, dict[str, Run]]:
    """Every seed's stage 0, legs and arms, ``--workers`` at a time; a run waits for the one it loads."""
    order = [None, *LEGS, *(a for a in ARMS if a.start == "stage0"), *(a for a in ARMS if a.start != "stage0")]
    futures: dict[tuple[int, str], Future[Run]] = {}

    def job(seed: int, arm: Arm | None) -> Run:
        if arm is not None:
            futures[seed, arm.start].result()  # submitted earlier, so already running or done
        return train(args, seed, arm)

    with ThreadPoolExecutor(args.workers) as pool:
        for arm in order:  # by kind, then seed: the start runs of every seed come first
            for seed in args.seeds:
                futures[seed, "stage0" if arm is None else arm.name] = pool.submit(job, seed, arm)
        try:
            return {
                seed: {name: futures[seed, name].result() for s, name in futures if s == seed} for seed in args.seeds
            }
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failed run: start nothing more
            raise


# ---- the numbers ------------------------------------------------------------------------------------------------


@dataclass
class ArmResult:
    """An arm's numbers per seed: D1 loss at its end and D0's rise from the stage-0 checkpoint (same seed)."""

    d1: list[float]
    d0_rise: list[float]
    w_rise: list[float]  # W's loss at the end minus at the arm's start (the buffer arm: stage 1's knowledge)


def arm_results(runs: dict[int, dict[str, Run]]) -> dict[str, ArmResult]:
    out = {}
    for arm in ARMS:
        per_seed = [(seed_runs[arm.name], seed_runs["stage0"], seed_runs[arm.start]) for seed_runs in runs.values()]
        out[arm.name] = ArmResult(
            [r.valid["d1"][r.end_iteration] for r, _, _ in per_seed],
            [r.valid["d0"][r.end_iteration] - s0.valid["d0"][s0.end_iteration] for r, s0, _ in per_seed],
            [r.valid["w"][r.end_iteration] - st.valid["w"][st.end_iteration] for r, _, st in per_seed],
        )
    return out


def recovery(results: dict[str, ArmResult], arm: str) -> tuple[float, list[float]]:
    """R = 1 - rise(arm) / rise(naive), from the mean rises, and per seed."""
    naive, other = results["naive"].d0_rise, results[arm].d0_rise
    per_seed = [1 - o / n for o, n in zip(other, naive)]
    return 1 - float(np.mean(other)) / float(np.mean(naive)), per_seed


def report(args: argparse.Namespace, runs: dict[int, dict[str, Run]]) -> list[str]:
    """The per-arm lines, a table with the spreads over seeds, and the recovery lines."""
    results = arm_results(runs)
    s0 = [r["stage0"] for r in runs.values()]
    d0_start = np.mean([r.valid["d0"][r.end_iteration] for r in s0])
    d1_start = np.mean([r.valid["d1"][r.end_iteration] for r in s0])
    tokens = args.stage1_iters * args.batch_size * args.seq_length
    lines = [
        f"stage 0: {args.stage0_iters} iterations on D0; at its checkpoint D0 {d0_start:.4f}, D1 {d1_start:.4f} "
        f"(mean of {len(runs)} seeds); every arm: {args.stage1_iters} iterations = {tokens:,} tokens",
    ]
    for name, res in results.items():
        lines.append(f"arm {name}: D1 loss {np.mean(res.d1):.4f}, D0 rise {np.mean(res.d0_rise):+.4f}")
    header = f"{'arm':<14} {'D1 loss':>8} {'spread':>7} {'D0 rise':>8} {'spread':>7} {'W rise':>8}  per-seed D0 rise"
    lines += ["", header, "-" * len(header)]
    for name, res in results.items():
        spread = [max(x) - min(x) for x in (res.d1, res.d0_rise)]
        seeds = " ".join(f"{x:+.3f}" for x in res.d0_rise)
        lines.append(
            f"{name:<14} {np.mean(res.d1):>8.4f} {spread[0]:>7.4f} {np.mean(res.d0_rise):>+8.4f} {spread[1]:>7.4f} "
            f"{np.mean(res.w_rise):>+8.4f}  {seeds}"
        )
    lines.append("spread: max - min over the seeds; W rise: W's validation loss at the end minus at the arm's start")
    lines.append("")
    for arm, label in (("replay-5%", "5%"), ("replay-25%", "25%")):
        mean, per_seed = recovery(results, arm)
        seeds = ", ".join(f"{x:.2f}" for x in per_seed)
        lines.append(f"replay {label} recovers {mean:.2f} of naive forgetting (per seed: {seeds})")
    return lines


def curve(run: Run, start: Run, corpus: str, tokens_per_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """A run's validation losses of ``corpus`` against its tokens, from its start checkpoint's last evaluation."""
    v = {start.end_iteration: start.valid[corpus][start.end_iteration], **run.valid[corpus]}
    its = np.array(sorted(v))
    return (its - start.end_iteration) * tokens_per_iter, np.array([v[i] for i in its])


def plot(args: argparse.Namespace, runs: dict[int, dict[str, Run]], out: Path) -> None:
    """D0 and D1 validation loss against the arm's tokens, mean over seeds with the min-max band; stage 0's end
    in grey at negative tokens; a middle panel zooms on D0 without the naive arm (whose rise dwarfs the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_iter = args.batch_size * args.seq_length
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), constrained_layout=True)
    panels = (
        ("d0", "D0 (forgetting)", ARMS),
        ("d0", "D0 without naive", ARMS[1:]),
        ("d1", "D1 (the strong shift)", ARMS),
    )
    for ax, (corpus, what, arms) in zip(axes, panels):
        s0_its = [sorted(r["stage0"].valid[corpus]) for r in runs.values()]
        y0 = np.mean([[r["stage0"].valid[corpus][i] for i in its] for r, its in zip(runs.values(), s0_its)], axis=0)
        x0 = (np.array(s0_its[0]) - args.stage0_iters) * tokens_per_iter
        keep = x0 >= -args.stage1_iters * tokens_per_iter // 2
        ax.plot(x0[keep] / 1e3, y0[keep], color="0.5", lw=1.5, label="stage 0 (D0 only)")
        for arm in arms:
            xs, ys = zip(*(curve(r[arm.name], r[arm.start], corpus, tokens_per_iter) for r in runs.values()))
            y, color = np.array(ys), f"C{ARMS.index(arm)}"
            ax.plot(xs[0] / 1e3, y.mean(0), color=color, lw=1.6, marker=".", label=arm.name)
            if len(ys) > 1:
                ax.fill_between(xs[0] / 1e3, y.min(0), y.max(0), color=color, alpha=0.15, lw=0)
        ax.axvline(0, color="black", ls=":", lw=1)
        ax.set_title(f"{what} validation loss")
        ax.set_xlabel("thousands of tokens of the arm (from its start checkpoint)")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"CPT on a strong shift: {args.num_layers}L h{args.hidden_size} seq {args.seq_length}, stage 0 "
        f"{args.stage0_iters} iterations, each arm {args.stage1_iters} ({args.stage1_iters * tokens_per_iter:,} "
        f"tokens); mean of {len(runs)} seeds, band = min..max"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


_RUN_SHAPE = ("num_layers", "hidden_size", "seq_length", "batch_size", "stage0_iters", "stage1_iters")


def save_results(path: Path, args: argparse.Namespace, runs: dict[int, dict[str, Run]]) -> None:
    saved = {"args": {k: getattr(args, k) for k in _RUN_SHAPE}}
    saved["runs"] = {str(s): {n: vars(r) for n, r in seed_runs.items()} for s, seed_runs in runs.items()}
    path.write_text(json.dumps(saved, indent=1))


def load_results(path: Path, args: argparse.Namespace) -> dict[int, dict[str, Run]]:
    """The runs a previous invocation saved (JSON keys are strings); its sizes and lengths replace ``args``'s."""
    if not path.is_file():
        usage_error(f"--replot: {path} is missing (run the experiment first)")
    saved = json.loads(path.read_text())
    for key in _RUN_SHAPE:
        setattr(args, key, saved["args"][key])

    def run(r: dict) -> Run:
        valid = {c: {int(i): x for i, x in v.items()} for c, v in r["valid"].items()}
        return Run(r["start_iteration"], r["end_iteration"], valid)

    return {int(s): {n: run(r) for n, r in seed_runs.items()} for s, seed_runs in saved["runs"].items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.run_dir = args.run_dir.resolve()
    out = args.plot or args.run_dir / "cpt_replay.png"
    if args.replot:
        runs = load_results(args.run_dir / "results.json", args)
    else:
        prepare_run_dir(args.run_dir)
        start = time.perf_counter()
        sizes = make_domains(args.run_dir, args.shift_seed, args.max_documents)
        domains = ", ".join(f"{c.upper()} {sizes[c]:,} / {sizes[c + '_valid']:,}" for c in CORPORA)
        print(f"domains (training / validation tokens): {domains}; runs in {args.run_dir}")
        plan_mixes(args)
        try:
            runs = run_all(args)
        except RuntimeError as err:
            sys.exit(str(err))
        save_results(args.run_dir / "results.json", args, runs)
        print(f"trained in {time.perf_counter() - start:.0f}s ({args.workers} runs at a time)")
    print("\n".join(report(args, runs)))
    plot(args, runs, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
