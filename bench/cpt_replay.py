"""How much replay of D0 does continual pre-training need? Naive CPT (0% replay) against 5% and 25% replay.

Two domains of the built-in corpus (the Python standard library): D0 = the top-level modules, D1 = some
packages (email and asyncio by default), each with its last 10% of modules held out for validation. Stage 0
trains on D0 at a constant LR and saves (shared by all runs); then one stage-1 run per replay fraction r, each
from that checkpoint with ``--restart-lr-schedule`` (rewarm) and the same token budget, on cpt_plan's mix
``r x D0 + (1 - r) x D1``, evaluated on D0 and D1 validation along the way. The commands are the ones of
ALCF/notes/cpt.md (pretrain_gpt.py, tools/preprocess_data.py, gen_file_list.py, cpt_plan.py) run as
subprocesses.

    python bench/cpt_replay.py          # defaults: about 5 minutes on 2 idle CPU cores, 9 when they are shared
    python bench/cpt_replay.py --replay 0 0.05 0.25 1 --stage1-iters 400 --plot /tmp/replay.png
    python bench/cpt_replay.py --replot     # table and plot again from RUN_DIR/results.json, no training

Prints, per replay fraction: D1's validation loss at the end, D0's before and after stage 1 and its rise (the
forgetting), and the spread of each loss over the run's last three evaluations as a rough noise scale; draws
both validation curves per run. Replay 1 is a control (stage 1 on D0 alone): while the model is still learning,
D0's loss falls in every run, and forgetting shows as the gap to the control (a "D0 - control" column) rather
than as a rise. Single runs with one seed: read differences smaller than the spread as noise. This is an
experiment, not a test.
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ext.data.builtin_corpus import iter_documents, stdlib_files  # noqa: E402

MARKER = ".cpt_replay"  # a run dir holding this file was made here and may be emptied by a new run
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_", "OMPI_COMM_WORLD_", "PMI_", "PALS_")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("/tmp/cpt_replay"), help="data, checkpoints and logs")
    p.add_argument("--plot", type=Path, default=None, help="PNG to write (default RUN_DIR/cpt_replay.png)")
    p.add_argument("--replay", type=float, nargs="+", default=[0.0, 0.05, 0.25], help="D0 shares of stage 1")
    p.add_argument("--d1", nargs="+", default=["email", "asyncio"], help="stdlib packages that make D1")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="micro = global batch size (one process)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak LR of both stages")
    p.add_argument("--warmup-iters", type=int, default=20, help="warmup of stage 0 and the rewarm of stage 1")
    p.add_argument("--stage0-iters", type=int, default=500)
    p.add_argument("--stage1-iters", type=int, default=250, help="each stage-1 run; same token budget for all")
    p.add_argument(
        "--stage1-style",
        choices=("constant", "cosine"),
        default="constant",
        help="stage 1 after the rewarm: hold the peak (the notes' recipe) or decay to lr/10 by the end",
    )
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--eval-iters", type=int, default=8, help="validation batches per corpus (the same each time)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training processes")
    p.add_argument("--replot", action="store_true", help="only the table and plot, from RUN_DIR/results.json")
    args = p.parse_args(argv)
    if not all(0 <= r <= 1 for r in args.replay):
        p.error("--replay fractions must be in [0, 1] (1 = the control: stage 1 on D0 alone)")
    if args.stage0_iters % args.eval_interval or args.stage1_iters % args.eval_interval:
        p.error("--stage0-iters and --stage1-iters must be multiples of --eval-interval (evaluations at the ends)")
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
        sys.exit(f"error: {script} failed (exit {proc.returncode}); see {log}\n{proc.stderr[-2000:]}")
    return proc.stdout


def prepare_run_dir(run_dir: Path) -> None:
    """An empty run dir; refuses to empty a folder this script did not make."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / MARKER).exists():
            sys.exit(f"error: --run-dir {run_dir} is not empty and was not made by this script; pick another")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("made by bench/cpt_replay.py; emptied by its next run\n")


def make_domains(run_dir: Path, d1_packages: list[str], threads: int) -> dict[str, int]:
    """D0.txt, D1.txt, D0_valid.txt, D1_valid.txt (jsonl -> preprocess_data -> gen_file_list); documents each."""
    docs = list(iter_documents(stdlib_files()))
    domains = {
        "d0": [text for rel, text in docs if "/" not in rel],
        "d1": [text for rel, text in docs if rel.split("/")[0] in d1_packages and "/" in rel],
    }
    if not domains["d1"]:
        sys.exit(f"error: --d1 {' '.join(d1_packages)}: no such stdlib packages")
    for name, texts in domains.items():
        cut = len(texts) * 9 // 10  # the last 10% of the modules are held out
        for part, chunk, folder in (("", texts[:cut], "data"), ("_valid", texts[cut:], "valid")):
            jsonl = run_dir / "raw" / f"{name}{part}.jsonl"
            jsonl.parent.mkdir(exist_ok=True)
            jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
            prefix = run_dir / folder / name / name
            log = run_dir / "logs" / f"preprocess_{name}{part}.log"
            run_tool(run_dir, log, "tools/preprocess_data.py", ["--input", str(jsonl), "--output-prefix", str(prefix),
                     "--tokenizer-type", "ByteTokenizer", "--append-eod"], threads)  # fmt: skip
            out = run_dir / f"{name.upper()}{part}.txt"
            run_tool(run_dir, log.with_suffix(".list.log"), "tools/gen_file_list.py",
                     ["--root", str(prefix.parent), "--output", str(out)], threads)  # fmt: skip
    return {name: len(texts) for name, texts in domains.items()}


# ---- the experiment ---------------------------------------------------------------------------------------------


@dataclass
class Curves:
    """Validation losses of one run: corpus -> {iteration: loss}; wall time of the run."""

    valid: dict[str, dict[int, float]]
    seconds: float


def parse_validation(log: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for it, corpus, loss in re.findall(r"^validation at iter (\d+) \| (\S+) \| loss ([0-9.]+)", log, re.M):
        out.setdefault(corpus, {})[int(it)] = float(loss)
    return out


def train(args: argparse.Namespace, name: str, flags: list[str]) -> Curves:
    """One pretrain_gpt.py run with the model, batch and validation flags shared by every run of the experiment."""
    common = [
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.batch_size), "--global-batch-size", str(args.batch_size),
        "--hidden-dropout", "0", "--attention-dropout", "0", "--data-cache-path", "cache",
        "--log-interval", str(args.eval_interval), "--eval-interval", str(args.eval_interval),
        "--eval-iters", str(args.eval_iters), "--valid-data-file-list", "D0_valid.txt", "D1_valid.txt",
        "--lr", str(args.lr), "--lr-warmup-iters", str(args.warmup_iters),
    ]  # fmt: skip
    start = time.perf_counter()
    log = run_tool(args.run_dir, args.run_dir / "logs" / f"{name}.log", "pretrain_gpt.py", common + flags, args.threads)
    curves = Curves(parse_validation(log), time.perf_counter() - start)
    print(f"  {name}: {curves.seconds:.0f}s", flush=True)
    return curves


def stage1(args: argparse.Namespace, replay: float) -> Curves:
    """Plan the mix with cpt_plan (alphas r, 1-r, 0; no buffer yet), then train it from stage 0's checkpoint."""
    name = f"stage1_replay{replay:g}"
    tokens = args.stage1_iters * args.batch_size * args.seq_length
    plan = [
        "--d0", "D0.txt", "--stage", "D1.txt", "--buffer", "no_buffer.txt", "--output", f"{name}.txt",
        "--alphas", repr(replay), repr(1 - replay), "0", "--train-tokens", str(tokens),
    ]  # fmt: skip
    run_tool(args.run_dir, args.run_dir / "logs" / f"{name}_plan.log", "tools/cpt_plan.py", plan, args.threads)
    schedule = ["--lr-decay-style", args.stage1_style]
    if args.stage1_style == "cosine":
        schedule += ["--min-lr", str(args.lr / 10)]  # decays over the stage (the restarted schedule's default)
    total = args.stage0_iters + args.stage1_iters
    return train(args, name, ["--data-file-list", f"{name}.txt", "--load", "ckpt/d0", "--restart-lr-schedule",
                              "--train-iters", str(total), *schedule])  # fmt: skip


def table(args: argparse.Namespace, base: Curves, runs: dict[float, Curves]) -> list[str]:
    """One row per replay fraction: D1 at the end, D0 before/after stage 1 and its rise, the recent spreads; with
    the control (replay 1), D0's gap to it too (the forgetting while D0's loss is still falling)."""
    end0, end1 = args.stage0_iters, args.stage0_iters + args.stage1_iters
    d0_before, d1_before = base.valid["d0"][end0], base.valid["d1"][end0]
    control = runs[1.0].valid["d0"][end1] if 1.0 in runs else None
    cols = ["replay", "D1 end", "D0 before", "D0 after", "D0 rise", *(["D0 - control"] if control else [])]
    cols += ["D0 spread", "D1 spread"]
    header = "  ".join(f"{c:>9}" for c in cols)
    lines = [f"stage 0 ({end0} iterations): D0 {d0_before:.4f}, D1 {d1_before:.4f}", header, "-" * len(header)]

    def spread(losses: dict[int, float]) -> float:
        last3 = [losses[i] for i in sorted(losses)[-3:]]
        return max(last3) - min(last3)

    for replay, run in runs.items():
        after = run.valid["d0"][end1]
        cells = [f"{replay:.0%}", f"{run.valid['d1'][end1]:.4f}", f"{d0_before:.4f}", f"{after:.4f}"]
        cells += [f"{after - d0_before:+.4f}", *([f"{after - control:+.4f}"] if control else [])]
        cells += [f"{spread(run.valid['d0']):.4f}", f"{spread(run.valid['d1']):.4f}"]
        lines.append("  ".join(f"{c:>{max(9, len(h))}}" for c, h in zip(cells, cols)))
    lines.append("spread: max - min of the last three evaluations of the run (a rough noise scale)")
    return lines


def plot(args: argparse.Namespace, base: Curves, runs: dict[float, Curves], out: Path) -> None:
    """D0 and D1 validation loss against iteration: stage 0 in grey, one colour per replay fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    end0 = args.stage0_iters
    for ax, corpus, what in zip(axes, ("d0", "d1"), ("D0 (forgetting)", "D1 (new domain)")):
        its = sorted(base.valid[corpus])
        ax.plot(its, [base.valid[corpus][i] for i in its], color="0.5", lw=1.5, label="stage 0 (D0 only)")
        for k, (replay, run) in enumerate(runs.items()):
            v = {end0: base.valid[corpus][end0], **run.valid[corpus]}
            its = sorted(v)
            label = f"stage 1, {replay:.0%} replay" + (" (control: D0 only)" if replay == 1 else "")
            ax.plot(its, [v[i] for i in its], color=f"C{k}", lw=1.6, marker=".", label=label)
        ax.axvline(end0, color="black", ls=":", lw=1)
        ax.axhline(base.valid[corpus][end0], color="0.5", ls="--", lw=0.8)
        later = [x for run in runs.values() for x in run.valid[corpus].values()] + [base.valid[corpus][end0]]
        pad = 0.25 * (max(later) - min(later)) + 0.02
        ax.set_ylim(min(later) - pad, max(later) + pad)  # the stage-1 range; stage 0's early losses are far above
        ax.set_xlim(max(0, end0 - args.stage1_iters // 2), end0 + args.stage1_iters * 1.02)
        ax.set_title(f"{what} validation loss")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    tokens = args.stage1_iters * args.batch_size * args.seq_length
    fig.suptitle(
        f"CPT replay: {args.num_layers}L h{args.hidden_size} seq {args.seq_length}, stage 1 = {args.stage1_iters} "
        f"iterations ({tokens:,} tokens) from the stage-0 checkpoint, rewarm to {args.lr:g}, {args.stage1_style}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


_RUN_SHAPE = ("num_layers", "hidden_size", "seq_length", "batch_size", "lr", "stage0_iters", "stage1_iters")


def load_results(path: Path, args: argparse.Namespace) -> tuple[Curves, dict[float, Curves]]:
    """The curves a previous run saved (JSON keys are strings); its sizes and lengths replace ``args``'s."""
    if not path.is_file():
        sys.exit(f"error: --replot: {path} is missing (run the experiment first)")
    saved = json.loads(path.read_text())
    for key in _RUN_SHAPE:
        setattr(args, key, type(getattr(args, key))(saved["args"][key]))
    args.stage1_style = saved["args"]["stage1_style"]

    def curves(valid: dict[str, dict[str, float]]) -> Curves:
        return Curves({c: {int(i): x for i, x in v.items()} for c, v in valid.items()}, 0.0)

    return curves(saved["stage0"]), {float(r): curves(v) for r, v in saved["stage1"].items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.run_dir = args.run_dir.resolve()
    out = args.plot or args.run_dir / "cpt_replay.png"
    if args.replot:
        base, runs = load_results(args.run_dir / "results.json", args)
        print("\n".join(table(args, base, runs)))
        plot(args, base, runs, out)
        print(f"wrote {out}")
        return 0
    prepare_run_dir(args.run_dir)
    start = time.perf_counter()
    docs = make_domains(args.run_dir, args.d1, args.threads)
    print(f"domains: D0 {docs['d0']} modules, D1 ({' + '.join(args.d1)}) {docs['d1']} modules; runs in {args.run_dir}")
    base = train(args, "stage0", ["--data-file-list", "D0.txt", "--lr-decay-style", "constant",
                                  "--train-iters", str(args.stage0_iters), "--save", "ckpt/d0"])  # fmt: skip
    runs = {r: stage1(args, r) for r in args.replay}
    print("\n".join(table(args, base, runs)))
    plot(args, base, runs, out)
    print(f"wrote {out} ({time.perf_counter() - start:.0f}s in all)")
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "stage0": base.valid}
    summary["stage1"] = {str(r): c.valid for r, c in runs.items()}
    (args.run_dir / "results.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
