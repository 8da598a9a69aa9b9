"""Checkpoint save/load throughput of our real save path against raw file I/O of the same bytes, measured in one run.

A GPT sized to --gb of model + optimizer state (fp32 weights + Adam moments, 12 bytes per parameter; a vocabulary
padded to a large power of two so that, as in LLMs, the embedding is the largest tensor) is built with our setup,
trained one step (so that the Adam moments exist) and then, --repeats times, alternately:

* saved by `megatron_ext.training.loop.save_checkpoint` (dist_checkpointing torch_dist in a one-process gloo
  group, fsync of every file, atomic rename, manifest) and loaded by `checkpointing.load` into the same model;
* written as one file of the same size, sequentially from a 64 MiB buffer, then fsync'd: the limit for the save;
* read back sequentially into a 64 MiB buffer: the limit for the load.

Memory: on a virtual machine whose free memory goes back to the host (virtio-balloon free page reporting, DAMON),
writing into page-cache memory that has been free for a few seconds costs a host fault per page, and freshly freed
memory does not. On the development VM a new 2 GiB file took 8.9-10.7 s after 10 s idle and 1.5-4.6 s right after
a file of the same size was deleted (`--probe-vm` repeats this). So each write, ours and raw, starts right after
its predecessor of the same size is deleted; the first round, with nothing freed before it, is slow for both.

Reads are measured warm (right after the write: the files are in the page cache, so this is memory-speed
deserialisation) and "cold" (after posix_fadvise(DONTNEED) on every file, which evicts clean pages without root;
a virtual disk may still be cached by its host, so cold reads can stay fast). The fixed cost of a save is measured
apart: dist_checkpointing.save of a one-tensor state, median of 5.

Then `megatron_ext.convert.universal.to_universal` converts the last checkpoint (cold) in a subprocess: its
throughput, and its peak RSS above the level right after its imports (psutil sampled every 2 ms, and ru_maxrss)
relative to the largest single tensor of the checkpoint (a stacked layer key counts one layer). The way back,
`from-universal` (to TP=1 PP=1, cold source), and `reshard` (our checkpoint to TP=1 PP=1 directly) are measured
the same way.

    python bench/checkpoint_io.py              # ~2 GB of state (about 2-3 minutes on 2 cores)
    python bench/checkpoint_io.py --gb 0.2     # smoke run
    python bench/checkpoint_io.py --flags "--bf16 --use-distributed-optimizer"   # another precision/optimizer

This is a benchmark, not a test: it prints what it measures (GB = 1e9 bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK = 64 << 20  # raw I/O buffer


def model_shape(gb: float, seq: int) -> tuple[int, int, int]:
    """(hidden, layers, vocabulary rows) of a GPT whose fp32 weights + Adam moments take about `gb` GB: the widest
    hidden size that still gives >= 4 layers, the embedding about a quarter of the parameters (a power of two)."""
    params = gb * 1e9 / 12
    for hidden in (2048, 1024, 512, 256, 128, 64):
        rows = max(512, 2 ** int(math.log2(max(1.0, 0.25 * params / hidden))))
        layers = round((params - (rows + seq + 2) * hidden) / (12 * hidden * hidden + 13 * hidden))
        if layers >= 4 or hidden == 64:
            return hidden, max(1, layers), rows
    raise AssertionError("unreachable")


def _files(folder: Path) -> list[Path]:
    return [f for f in folder.rglob("*") if f.is_file()]


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in _files(folder))


def drop_cache(paths: list[Path]) -> None:
    """Evicts the files' clean pages from the page cache (no root needed), so that the next read goes to disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_write(path: Path, nbytes: int, buf: memoryview) -> float:
    """Sequential write of nbytes from one buffer, then fsync: what any save must at least pay."""
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left:
            left -= f.write(buf[: min(len(buf), left)])
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def probe_vm(folder: Path, nbytes: int, buf: memoryview, idle_s: float = 10.0) -> tuple[float, float]:
    """(seconds to write a new file after `idle_s` with nothing freed, seconds for a new one right after deleting a
    file of the same size): far apart where the host reclaims the guest's free memory."""
    first, second = folder / "probe_a.bin", folder / "probe_b.bin"
    time.sleep(idle_s)
    idle = raw_write(first, nbytes, buf)
    first.unlink()
    recycled = raw_write(second, nbytes, buf)
    second.unlink()
    return idle, recycled


def raw_read(path: Path, buf: bytearray) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def largest_tensor(folder: Path) -> tuple[str, int]:
    """(key, bytes) of the largest single tensor of a checkpoint; a stacked layer key counts one layer."""
    from megatron.core import dist_checkpointing

    best = ("", 0)
    for key, sh in dist_checkpointing.load_tensors_metadata(str(folder)).items():
        numel = math.prod(sh.global_shape)
        if ".layers." in key and sh.global_shape:
            numel //= sh.global_shape[0]
        best = max(best, (key, numel * sh.dtype.itemsize), key=lambda kv: kv[1])
    return best


# ---- the conversion, in a subprocess of its own (clean RSS) ------------------------------------------------------


def phase_convert(direction: str, src: str, out: str) -> dict:
    """One conversion (`to-universal` from our checkpoint, or `from-universal` back) under a 2 ms RSS sampler; RSS
    is measured from the level right after the imports it needs (megatron-core, and for the way back the model
    code that describes the target checkpoint)."""
    import psutil

    from megatron_ext.platform import quiet_optional_dependency_warnings

    quiet_optional_dependency_warnings()
    try:
        from megatron_ext.convert.reshard import from_universal, reshard
        from megatron_ext.convert.universal import to_universal
    except ImportError as e:
        return {"missing": f"{type(e).__name__}: {e}"}
    import megatron.core.dist_checkpointing  # noqa: F401 - imported by the converters on first use
    import torch.distributed  # noqa: F401

    if direction in ("from-universal", "reshard"):
        import megatron_ext.models.gpt  # noqa: F401
        import megatron_ext.training.optim  # noqa: F401

        def convert() -> None:
            (from_universal if direction == "from-universal" else reshard)(src, out, progress=False)
    else:

        def convert() -> None:
            to_universal(src, out, progress=False)

    gc.collect()
    proc = psutil.Process()
    base = proc.memory_info().rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, stop = [base], threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        convert()
    except Exception as e:  # a converter in progress must not take the whole benchmark down
        return {"failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        stop.set()
        sampler.join()
    seconds = time.perf_counter() - t0
    peak[0] = max(peak[0], proc.memory_info().rss)
    return {
        "seconds": seconds,
        "rss_base": base,
        "rss_peak": peak[0],
        "maxrss_before": maxrss_before,
        "maxrss_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_conversion(direction: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--phase", direction, "--phase-ckpt", str(src), "--phase-out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"failed": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def growth(conv: dict) -> tuple[int, str]:
    """Peak RSS over the level after the imports, and how it was seen: ru_maxrss is the process's peak, so it tells
    more than the sampler only if it rose during the conversion."""
    rose = conv["maxrss_after"] > conv["maxrss_before"]
    grow = max(conv["rss_peak"], conv["maxrss_after"] if rose else 0) - conv["rss_base"]
    return grow, "ru_maxrss" if rose and conv["maxrss_after"] >= conv["rss_peak"] else "sampled every 2 ms"


def conversion_line(
    label: str, conv: dict, read: int, written: int, nbytes: int, results: dict[str, list[float]], largest: int
) -> str:
    """One conversion's time against the raw cold read and write+fsync of the same bytes, and its peak memory
    against the largest tensor (the streaming converters' target: under 3x)."""
    limit = read / nbytes * min(results["read"]) + written / nbytes * min(results["write"])  # seconds at raw speed
    grow, how = growth(conv)
    return (
        f"{label}: {conv['seconds']:.1f} s for {read / 1e9:.3f} GB read and {written / 1e9:.3f} GB written "
        f"({limit / conv['seconds']:.2f} of the raw cold read + write+fsync limit); peak RSS +{grow / 1e6:.0f} MB "
        f"over the level after its imports ({how}) = {grow / largest:.2f}x the largest tensor"
    )


# ---- main --------------------------------------------------------------------------------------------------------


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _row(name: str, times: list[float], nbytes: int, limit: list[float] | None = None) -> str:
    best = min(times)
    text = f"{name:34} {' '.join(f'{t:6.2f}' for t in times):>20} {_gbps(nbytes, best):9.2f}"
    if limit:
        text += f"   {min(limit) / best:5.2f} of raw"
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="model + optimizer state to save, in GB (1e9 bytes)")
    parser.add_argument("--repeats", type=int, default=2, help="save/load/raw rounds (best and all are printed)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/checkpoint_io_bench"))
    parser.add_argument("--flags", default="", help="extra training flags, e.g. '--bf16 --use-distributed-optimizer'")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-conversion", action="store_true", help="skip the universal conversion")
    parser.add_argument("--keep", action="store_true", help="keep the files under --workdir")
    parser.add_argument(
        "--probe-vm",
        action="store_true",
        help="also time a new file written after 10 s idle against one written right after deleting a file of "
        "the same size (see 'Memory')",
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--phase-ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.phase in ("to-universal", "from-universal", "reshard"):
        print(json.dumps(phase_convert(a.phase, a.phase_ckpt, a.phase_out)))
        return

    started = time.perf_counter()
    load0 = " ".join(f"{x:.1f}" for x in os.getloadavg())  # other jobs on the machine move every figure
    from megatron_ext.platform import quiet_optional_dependency_warnings

    quiet_optional_dependency_warnings()
    warnings.simplefilter("ignore", FutureWarning)  # torch's ShardedTensor / load_state_dict deprecation notes
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_ext import distributed
    from megatron_ext.config import parse_args
    from megatron_ext.training import checkpointing, loop
    from megatron_ext.training.loop import save_checkpoint, setup, train_step

    if a.threads:
        torch.set_num_threads(a.threads)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(distributed.free_port()))
    shutil.rmtree(a.workdir, ignore_errors=True)
    a.workdir.mkdir(parents=True)
    root, raw_file = a.workdir / "ckpt", a.workdir / "raw.bin"

    seq = 64
    hidden, layers, rows = model_shape(a.gb, seq)
    flags = [
        "--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(max(1, hidden // 64)),
        "--seq-length", str(seq), "--micro-batch-size", "1", "--global-batch-size", "1",
        "--make-vocab-size-divisible-by", str(rows), "--device", "cpu", "--train-iters", "1000", "--eval-iters", "0",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-4",
        "--data-cache-path", str(a.workdir / "data"), "--save", str(root), "--log-interval", "1000",
    ] + a.flags.split()  # fmt: skip
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        tr = setup(parse_args(flags))
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        train_step(tr)  # creates the Adam moments
    t_step = time.perf_counter() - t0
    params = sum(p.numel() for chunk in tr.model for p in chunk.parameters())
    probe = next(tr.model[0].parameters())
    saved_probe = probe.detach().clone()

    buf = memoryview(bytearray(os.urandom(1 << 20)) * (BLOCK >> 20))
    read_buf = bytearray(BLOCK)
    keys = ("save", "save_blocking", "write", "load_warm", "read_warm", "load", "read")
    results: dict[str, list[float]] = {k: [] for k in keys}
    background = getattr(tr, "async_saves", None) is not None  # --async-save (GPU): finished by finish_saves
    nbytes = nfiles = 0
    for r in range(a.repeats):
        tr.state.iteration = r + 1
        # Each write starts right after its predecessor of the same size is deleted (see "Memory" above).
        for old in root.glob("iter_*"):
            shutil.rmtree(old)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            save_checkpoint(tr)  # what training calls
            results["save_blocking"].append(time.perf_counter() - t0)
            if background:
                loop.finish_saves(tr)  # the save is complete (published) only then
        results["save"].append(time.perf_counter() - t0)
        folder = checkpointing.iteration_dir(root, r + 1)
        nbytes, nfiles = _size(folder), len(_files(folder))
        raw_file.unlink(missing_ok=True)
        results["write"].append(raw_write(raw_file, nbytes, buf))
        for kind, drop in (("warm", False), ("cold", True)):
            if drop:
                drop_cache(_files(folder) + [raw_file])
            with torch.no_grad():
                probe.zero_()
            t0 = time.perf_counter()
            checkpointing.load(root, tr.model, tr.optimizer, log=lambda _: None)
            results["load_warm" if kind == "warm" else "load"].append(time.perf_counter() - t0)
            assert torch.equal(probe.detach(), saved_probe), "the load did not restore the weights"
            results["read_warm" if kind == "warm" else "read"].append(raw_read(raw_file, read_buf))
        gc.collect()

    vm = probe_vm(a.workdir, nbytes, buf) if a.probe_vm else None
    # The fixed cost of a save: a one-tensor state through the same dist_checkpointing.save.
    tiny_times = []
    for i in range(5):
        tiny = a.workdir / f"tiny{i}"
        tiny.mkdir()
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(16)), "iteration": i}
        t0 = time.perf_counter()
        dist_checkpointing.save(state, str(tiny))
        tiny_times.append(time.perf_counter() - t0)
    overhead = statistics.median(tiny_times)
    biggest = largest_tensor(folder)
    t_main = time.perf_counter() - started

    cfg = tr.cfg
    precision = "bf16" if cfg.precision.bf16 else "fp16" if cfg.precision.fp16 else "fp32"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; files under {a.workdir}")
    print(
        f"model: {layers} layers, hidden {hidden}, {rows} vocabulary rows (tied), {params / 1e6:.1f}M parameters, "
        f"{precision}{', distributed optimizer' if cfg.parallel.use_distributed_optimizer else ''}; "
        f"setup {t_setup:.1f} s, one step {t_step:.1f} s"
    )
    print(f"checkpoint: {nbytes / 1e9:.3f} GB in {nfiles} files; largest tensor {biggest[0]} {biggest[1] / 1e6:.1f} MB")
    print(f"\n{'':34} {'seconds per run':>20} {'best GB/s':>9}")
    print(_row("save (save_checkpoint, fsync)", results["save"], nbytes, results["write"]))
    if background:
        print(_row("  of which training waits (async)", results["save_blocking"], nbytes))
    print(_row("raw write + fsync (the limit)", results["write"], nbytes))
    print(_row("load warm (page cache)", results["load_warm"], nbytes, results["read_warm"]))
    print(_row("raw read warm", results["read_warm"], nbytes))
    print(_row("load cold (after fadvise DONTNEED)", results["load"], nbytes, results["read"]))
    print(_row("raw read cold", results["read"], nbytes))
    save_ratio = min(results["write"]) / min(results["save"])
    load_ratio = min(results["read"]) / min(results["load"])
    # Each round measures ours and raw back to back: its ratio is less exposed to other jobs' load than best/best.
    rounds_save = ", ".join(f"{w / t:.2f}" for w, t in zip(results["write"], results["save"]))
    rounds_load = ", ".join(f"{w / t:.2f}" for w, t in zip(results["read"], results["load"]))
    print(
        f"\nsave: {save_ratio:.2f} of raw write+fsync (best/best; per round {rounds_save}); cold load: "
        f"{load_ratio:.2f} of raw cold read (per round {rounds_load}); target >= 0.5 each"
    )
    print(
        f"fixed per-save cost {overhead * 1e3:.0f} ms (dist_checkpointing.save of a one-tensor state, median of 5: "
        f"{overhead / min(results['save']):.0%} of this save); load average {load0} at start, "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} now on {os.cpu_count()} CPUs"
    )
    if vm is not None:
        print(
            f"--probe-vm: a new {nbytes / 1e9:.2f} GB file written after 10 s idle took {vm[0]:.2f} s, one written "
            f"right after deleting a file of that size {vm[1]:.2f} s"
        )
    if len(results["save"]) > 1 and results["save"][0] > 1.5 * min(results["save"][1:]):
        print(
            "note: the first round writes with nothing freed before it (see 'Memory' in --help: slow for raw too) "
            "and its save starts megatron-core's writer manager process; later rounds show the steady state"
        )
    if min(results["read"]) < 2 * min(results["read_warm"]):
        print(
            "note: cold reads are not much slower than warm ones: the disk (or its host) caches, so load figures "
            "are close to deserialisation speed, not disk speed"
        )
    if background:
        tr.async_saves.close()
    distributed.destroy()

    if a.no_conversion:
        print("conversion: skipped (--no-conversion)")
    else:
        univ = a.workdir / "universal"
        steps = (  # (label, direction, source, output)
            ("to-universal (cold source)", "to-universal", folder, univ),
            ("from-universal (to TP=1 PP=1, cold source)", "from-universal", univ, a.workdir / "from_universal"),
            ("reshard (our checkpoint to TP=1 PP=1 directly, cold source)", "reshard", folder, a.workdir / "resharded"),
        )
        for label, direction, src, out in steps:
            drop_cache(_files(src))
            conv = run_conversion(direction, src, out)
            if "missing" in conv:
                print(f"conversion: n/a (megatron_ext.convert not available: {conv['missing']})")
                break
            if "failed" in conv:
                print(f"{label}: failed ({conv['failed']})")
                if direction == "to-universal":
                    break
                continue
            print(conversion_line(label, conv, _size(src), _size(out), nbytes, results, biggest[1]))
    print(f"total {time.perf_counter() - started:.0f} s (save/load part {t_main:.0f} s)")
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
