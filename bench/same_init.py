"""Start-up cost of the layout-free initialisation (megatron_ext/models/init.py) at a real model's tensor shapes.

For each weight of one transformer layer of a preset (train_alcf.sh's MODEL_ARCH shapes: 7B by default) and for
the embedding and output layer, the time to draw the rows a tensor-parallel rank needs (`init.draw_rows`, blocks
of rows in torch's threads) against the baseline measured in the same run: megatron-core's own CPU initialisation
(`--use-cpu-initialization` in Megatron-LM: the whole fp32 tensor from the global generator on every rank). The
per-layer times are multiplied by the number of layers (every layer has the same shapes) for the whole model on a
rank at PP=1; at PP=k a rank draws 1/k of the layers.

    OMP_NUM_THREADS=1 python bench/same_init.py            # 7B, TP=1 and TP=8, one thread
    OMP_NUM_THREADS=8 python bench/same_init.py --arch 70B --tp 8

Times are wall clock: on a machine shared with other jobs they are inflated (the ratio much less so).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_ext.alcf_env import PRESETS  # noqa: E402
from megatron_ext.models.init import draw_rows  # noqa: E402


def shapes(arch: str, vocab: int) -> dict[str, tuple[tuple[int, int], int]]:
    """weight -> (full shape, the axis tensor parallelism splits), for one layer and the embedding/output."""
    p = PRESETS[arch]
    head = p.hidden_size // p.heads
    qkv = (p.heads + 2 * p.kv_heads) * head
    return {
        "linear_qkv": ((qkv, p.hidden_size), 0),
        "linear_proj": ((p.hidden_size, p.heads * head), 1),
        "linear_fc1 (SwiGLU)": ((2 * p.ffn_hidden_size, p.hidden_size), 0),
        "linear_fc2": ((p.hidden_size, p.ffn_hidden_size), 1),
        "word_embeddings": ((vocab, p.hidden_size), 0),
        "output_layer": ((vocab, p.hidden_size), 0),
    }


def timed(fn: Callable[..., object], repeats: int, *args: object) -> float:
    """The best of `repeats` wall-clock times of fn(*args)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def baseline_init(shape: tuple[int, int]) -> None:
    """megatron-core's CPU initialisation of one weight: the whole fp32 tensor from the global generator."""
    torch.nn.init.normal_(torch.empty(shape), std=0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="7B", choices=sorted(PRESETS))
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    init = torch.nn.init.normal_
    layers = PRESETS[args.arch].num_layers
    threads = torch.get_num_threads()
    print(f"{args.arch}: {layers} layers, vocabulary {args.vocab}, {threads} thread(s); best of {args.repeats}")
    totals = {tp: 0.0 for tp in args.tp}
    baseline_total = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for name, (shape, axis) in shapes(args.arch, args.vocab).items():
            count = 1 if name in ("word_embeddings", "output_layer") else layers
            baseline = timed(baseline_init, args.repeats, shape)
            line = f"  {name:<20} {str(shape):<14} x{count:<3} megatron-core CPU init {baseline:6.3f} s"
            baseline_total += count * baseline
            for tp in args.tp:
                rows = slice(0, shape[0] // tp) if axis == 0 else slice(0, shape[0])
                seconds = timed(draw_rows, args.repeats, init, 1234, name, (0,), shape, rows, pool)
                totals[tp] += count * seconds
                line += f" | TP={tp} rank 0 {seconds:6.3f} s ({seconds / baseline:.2f}x)"
            print(line)
    print(f"whole model on one rank at PP=1: megatron-core CPU init {baseline_total:.1f} s", end="")
    for tp, total in totals.items():
        print(f" | layout-free TP={tp} {total:.1f} s ({total / baseline_total:.2f}x)", end="")
    print()


if __name__ == "__main__":
    main()
