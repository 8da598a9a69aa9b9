"""Long sequences on one device: document-masked attention and chunked cross-entropy, each case in its own process.

- attention: forward + backward of a 1-layer GPT (our GPT recipe and megatron-core GPTModel, fp32, RoPE, hidden
  128, 2 heads, byte vocabulary) on one packed sequence of --tokens tokens holding --documents documents of random
  lengths, through `--attention-backend sdpa` with --reset-attention-mask (causal SDPA per document), `sdpa-dense`
  (one SDPA call under a dense document mask) and plain causal SDPA over the whole sequence (the baseline; it lets
  documents see each other); the per-document case again with --recompute-activations. Tokens/s is the median of
  --steps timed steps after one warm-up; peak memory is the process's ru_maxrss, also shown above the memory the
  process held before the model ran.
- cross-entropy: loss and backward of --tokens tokens through an output layer of vocabulary --vocab (hidden 256),
  megatron-core's way (all logits, then vocab_parallel_cross_entropy) against `--cross-entropy-chunk`
  (models/long_context.chunked_cross_entropy, --ce-chunk tokens at a time).

On a GPU (where torch sees one) the same cases run there and memory is torch's peak allocation instead (SDPA's
GPU kernels; Transformer Engine's packed attention is not among the cases).

Prints `per-document/causal speed ratio: X` (target >= 1.5 at 16K tokens) and `chunked/plain cross-entropy peak
memory: X` (target <= 0.25 at vocabulary 32K, above the start). On a loaded machine the times are inflated
(every case alike: the ratios hold better than the rates).

    OMP_NUM_THREADS=1 python bench/long_context.py                  # 16K tokens, 16 documents, vocabulary 32K
    python bench/long_context.py --tokens 4096 --documents 8 --steps 5

This is a benchmark, not a test: it prints what it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ATTENTION = {
    "per-document": ["--attention-backend", "sdpa", "--reset-attention-mask"],
    "dense-mask": ["--attention-backend", "sdpa-dense", "--reset-attention-mask"],
    "causal": ["--attention-backend", "sdpa"],
    "per-document+recompute": ["--attention-backend", "sdpa", "--reset-attention-mask", "--recompute-activations"],
}
CROSS_ENTROPY = ("plain", "chunked")


def _now_mb() -> float:
    """Memory held now (MiB): the GPU's allocated memory, else the resident memory from /proc."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _peak_mb() -> float:
    """Peak memory (MiB): the GPU's peak allocation, else ru_maxrss (KiB on Linux)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _start_megatron(tmp: str) -> None:
    """A world of one on this machine's device (the GPU where there is one)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_ext import platform

    plat = platform.select("auto", "auto")
    platform.setup_device(plat, 0)
    torch.distributed.init_process_group(plat.backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1)


def _attention_worker(case: str, args: argparse.Namespace) -> dict[str, float]:
    import numpy as np
    import torch

    from megatron_ext import platform
    from megatron_ext.config import parse_args
    from megatron_ext.data.blend import gpt_sample
    from megatron_ext.data.gpt_data import collate
    from megatron_ext.data.tokenizers import build_tokenizer
    from megatron_ext.models.gpt import GPTRecipe

    flags = (
        f"--num-layers 1 --hidden-size 128 --num-attention-heads 2 --seq-length {args.tokens} --micro-batch-size 1 "
        "--position-embedding-type rope --hidden-dropout 0 --attention-dropout 0 --train-iters 1"
    ).split()
    cfg = parse_args([*flags, *ATTENTION[case]])
    cfg.resolve_batch(1)
    recipe = GPTRecipe(cfg, platform.select("auto", "auto"), build_tokenizer("ByteTokenizer", None))
    model = recipe.build_model(recipe.transformer_config(), None)
    rng = np.random.default_rng(0)
    starts = sorted(rng.choice(np.arange(1, args.tokens), size=args.documents - 1, replace=False).tolist())
    text = torch.from_numpy(rng.integers(0, 256, args.tokens + 1))
    batch = collate([gpt_sample(text, starts if cfg.data.reset_attention_mask else None, 0, False, False)])
    before = _now_mb()
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        losses, masks = recipe.forward_step(batch, model)
        (losses * masks["lm_loss"]).sum().backward()
        _now_mb()  # waits for the GPU
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[1:])
    return {"tokens_per_s": args.tokens / step, "step_s": step, "peak_mb": _peak_mb(), "start_mb": before}


def _cross_entropy_worker(case: str, args: argparse.Namespace) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from megatron.core import tensor_parallel

    from megatron_ext.models.long_context import chunked_cross_entropy

    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden = torch.randn(args.tokens, 1, 256, generator=g).to(device).requires_grad_()
    weight = (torch.randn(args.vocab, 256, generator=g) * 0.02).to(device).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.tokens), generator=g).to(device)
    before = _now_mb()
    t0 = time.perf_counter()
    if case == "plain":  # GPTModel's way: the output layer's logits [s, b, V], then the vocab-parallel loss
        losses = tensor_parallel.vocab_parallel_cross_entropy(F.linear(hidden, weight), labels.t().contiguous()).t()
    else:
        losses = chunked_cross_entropy(hidden, weight, labels, args.ce_chunk)
    losses.sum().backward()
    _now_mb()  # waits for the GPU
    return {
        "step_s": time.perf_counter() - t0,
        "peak_mb": _peak_mb(),
        "start_mb": before,
        "loss": float(losses.detach().mean()),
        "grad_norm": float(weight.grad.norm()),  # type: ignore[union-attr]
    }


def _run_case(kind: str, case: str, args: argparse.Namespace) -> dict[str, float]:
    """One case in a fresh process (its own ru_maxrss)."""
    argv = [sys.executable, __file__, "--worker", kind, case, "--tokens", str(args.tokens), "--documents",
            str(args.documents), "--steps", str(args.steps), "--vocab", str(args.vocab), "--ce-chunk",
            str(args.ce_chunk)]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: {kind} {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="Tokens of the packed sequence.")
    parser.add_argument("--documents", type=int, default=16, help="Documents in it (random lengths).")
    parser.add_argument("--steps", type=int, default=2, help="Timed steps per attention case (after one warm-up).")
    parser.add_argument("--vocab", type=int, default=32768, help="Vocabulary of the cross-entropy cases.")
    parser.add_argument("--ce-chunk", type=int, default=1024, help="Tokens per chunk of the chunked cross-entropy.")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from megatron_ext.platform import quiet_optional_dependency_warnings

        quiet_optional_dependency_warnings()
        with tempfile.TemporaryDirectory() as tmp:
            _start_megatron(tmp)
            kind, case = args.worker
            worker = _attention_worker if kind == "attention" else _cross_entropy_worker
            print(json.dumps(worker(case, args)))
        return

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (peak: ru_maxrss)"
    print(f"{args.tokens} tokens, {args.documents} documents on {device}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}")  # fmt: skip
    attention = {}
    for case in ATTENTION:
        r = attention[case] = _run_case("attention", case, args)
        print(f"attention {case:24s} {r['tokens_per_s']:9.0f} tokens/s  step {r['step_s']:.3f} s  peak "
              f"{r['peak_mb']:7.0f} MiB ({r['peak_mb'] - r['start_mb']:7.0f} above the start)")  # fmt: skip
    ce = {}
    for case in CROSS_ENTROPY:
        r = ce[case] = _run_case("cross_entropy", case, args)
        print(f"cross-entropy {case:8s} vocabulary {args.vocab}: step {r['step_s']:.3f} s  loss {r['loss']:.6f}  "
              f"grad norm {r['grad_norm']:.6f}  peak {r['peak_mb']:7.0f} MiB "
              f"({r['peak_mb'] - r['start_mb']:7.0f} above the start)")  # fmt: skip
    speed = attention["per-document"]["tokens_per_s"] / attention["causal"]["tokens_per_s"]
    dense = attention["per-document"]["tokens_per_s"] / attention["dense-mask"]["tokens_per_s"]
    above = {c: ce[c]["peak_mb"] - ce[c]["start_mb"] for c in CROSS_ENTROPY}
    print(f"per-document/causal speed ratio: {speed:.2f} (target >= 1.5)")
    print(f"per-document/dense-mask speed ratio: {dense:.2f}")
    print(f"chunked/plain cross-entropy peak memory: {above['chunked'] / above['plain']:.3f} above the start, "
          f"{ce['chunked']['peak_mb'] / ce['plain']['peak_mb']:.3f} of the whole process (target <= 0.25)")  # fmt: skip


if __name__ == "__main__":
    main()
