"""Progressive depth growth (Apollo) against training from scratch: the FLOPs each needs to reach scratch's final
validation loss.

Two `pretrain_gpt.py` runs of the same 12-layer GPT (hidden 128, byte tokens) on the built-in corpus (the Python
standard library), with the same data order, batch, LR schedule, validation samples and length:

    scratch       --model-variant gpt
    progressive   --model-variant progressive --progressive-layers 1,3,6,12 (LVPS depths, interpolation growth)
                  stages starting at 10%, 25% and 40% of the run (--stage-fractions)

    python bench/progressive.py            # about 20 minutes with OMP_NUM_THREADS=1 on an idle core (one run at
                                           # a time, so that the wall-clock ratio compares like with like)
    python bench/progressive.py --iters 40 --eval-interval 10   # the mechanics in a couple of minutes

Prints each run's final validation loss and FLOPs, the FLOPs each needs to reach scratch's final validation loss
(linear between evaluations; `not reached` if progressive never does), the line `FLOPs ratio progressive/scratch:
X` (the target of issue 20 is <= 0.70; the paper reports 0.42 on GPT-2 base), the wall-clock ratio of the whole
runs (start-up and evaluations included, same for both), and saves validation loss against training FLOPs as a
PNG (RUN_DIR/progressive.png) beside results.json. An experiment at toy scale, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ext.cli import OneLineParser  # noqa: E402

LAYERS = "1,3,6,12"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("/tmp/progressive_bench"), help="data cache, logs, PNG")
    p.add_argument("--iters", type=int, default=400, help="training steps of each run")
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-interval", type=int, default=20)
    p.add_argument("--eval-iters", type=int, default=4, help="validation batches per evaluation (the same each time)")
    p.add_argument(
        "--stage-fractions", type=float, nargs=3, default=[0.10, 0.25, 0.40],
        help=f"where the stages after the first of --progressive-layers {LAYERS} start, as shares of --iters",
    )  # fmt: skip
    p.add_argument(
        "--progressive-options", default="",
        help="More flags of the progressive run, e.g. '--growth stack --growth-moments reset' (ablations).",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = p.parse_args(argv)
    if args.iters % args.eval_interval:
        p.error("--iters must be a multiple of --eval-interval (an evaluation at the end)")
    return args


def common_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--num-layers", "12", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length",
        str(args.seq_length), "--max-position-embeddings", str(args.seq_length), "--micro-batch-size",
        str(args.global_batch_size), "--global-batch-size", str(args.global_batch_size), "--train-iters",
        str(args.iters), "--lr", str(args.lr), "--min-lr", str(args.lr / 10), "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, args.iters // 20)), "--hidden-dropout", "0", "--attention-dropout", "0",
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
        "--eval-interval", str(args.eval_interval), "--eval-iters", str(args.eval_iters), "--log-interval",
        str(args.eval_interval), "--data-cache-path", str(args.run_dir / "cache"), "--seed", "1234",
    ]  # fmt: skip


def progressive_flags(args: argparse.Namespace) -> list[str]:
    starts = ",".join(str(max(1, round(f * args.iters))) for f in args.stage_fractions)
    return ["--model-variant", "progressive", "--progressive-layers", LAYERS, "--progressive-stages", starts,
            "--progressive-stage-unit", "iters", *args.progressive_options.split()]  # fmt: skip


def train(args: argparse.Namespace, name: str, extra: list[str]) -> dict:
    """Runs one training; returns its validation curve against consumed FLOPs and its wall-clock seconds."""
    run_dir = args.run_dir / name
    cmd = [sys.executable, str(ROOT / "pretrain_gpt.py"), *common_flags(args), *extra, "--run-dir", str(run_dir),
           "--tensorboard-dir", str(run_dir / "tensorboard")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    print(f"{name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: the {name} run failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    log = proc.stdout + proc.stderr
    flops = {int(i): float(f) for i, f in re.findall(r"^iter (\d+)/\d+ \|.*\| FLOPs ([0-9.e+]+)", log, re.M)}
    valid = {
        int(i): float(x) for i, x in re.findall(r"^validation at iter (\d+) \| [^|]+ \| loss ([0-9.]+)", log, re.M)
    }
    points = [(flops[i], valid[i]) for i in sorted(valid) if i in flops]
    print(f"{name}: final validation loss {points[-1][1]:.4f} after {points[-1][0]:.3e} FLOPs, {seconds:.0f} s",
          flush=True)  # fmt: skip
    return {"points": points, "seconds": seconds}


def flops_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """Training FLOPs at which the validation loss first reaches `target`, linear between evaluations."""
    previous = None
    for flops, loss in points:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return flops
            f0, l0 = previous
            return f0 + (flops - f0) * (l0 - target) / (l0 - loss)
        previous = (flops, loss)
    return None


def plot(results: dict, target: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        f, loss = zip(*r["points"])
        ax.plot(f, loss, marker=".", label=name)
    ax.axhline(target, color="gray", linestyle="--", linewidth=0.8, label="scratch's final loss")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"12-layer GPT, hidden 128: scratch vs progressive {LAYERS}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "scratch": train(args, "scratch", []),
        "progressive": train(args, "progressive", progressive_flags(args)),
    }
    target = results["scratch"]["points"][-1][1]
    need = {name: flops_to_reach(r["points"], target) for name, r in results.items()}
    for name, f in need.items():
        print(f"{name}: FLOPs to reach scratch's final validation loss {target:.4f}: "
              + (f"{f:.3e}" if f is not None else "not reached"))  # fmt: skip
    scratch, progressive = need["scratch"], need["progressive"]
    ratio = progressive / scratch if progressive is not None and scratch else None
    print("FLOPs ratio progressive/scratch: " + (f"{ratio:.3f}" if ratio is not None else "n/a (not reached)"))
    total = results["progressive"]["points"][-1][0] / results["scratch"]["points"][-1][0]
    print(f"total FLOPs ratio progressive/scratch (whole runs): {total:.3f}")
    wall = results["progressive"]["seconds"] / results["scratch"]["seconds"]
    print(f"wall-clock ratio progressive/scratch (whole runs): {wall:.3f}")
    png = args.run_dir / "progressive.png"
    plot(results, target, png)
    summary = {"settings": vars(args) | {"run_dir": str(args.run_dir)}, "results": results, "need": need,
               "ratio": ratio, "total_flops_ratio": total, "wall_clock_ratio": wall}  # fmt: skip
    (args.run_dir / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"loss against FLOPs: {png}")


if __name__ == "__main__":
    main()
