"""Shared by the tests that start real multi-process runs: a clean environment, the mpirun command line, a
small learnable corpus and the launch of a scenario script (one process, or two under torchrun)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from megatron_ext.data.indexed import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]


def clean_env() -> dict[str, str]:
    """This environment without any launcher variables, so the child launcher alone decides."""
    drop_prefixes = ("OMPI_COMM_WORLD", "PMI_", "PMIX_", "PALS_", "SLURM_", "PBS_", "TORCHELASTIC_", "MPI_LOCAL")
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(drop_prefixes)}
    env["PYTHONWARNINGS"] = "ignore"  # megatron-core warns about missing Apex/TE once per process
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def mpirun(nproc: int) -> tuple[list[str], dict[str, str]] | None:
    """(`mpirun -np N` with the flags this MPI needs here, its environment), or None without mpirun."""
    exe = shutil.which("mpirun")
    if exe is None:
        return None
    env = clean_env()
    cmd = [exe, "-np", str(nproc)]
    if "Open MPI" in subprocess.run([exe, "--version"], capture_output=True, text=True).stdout:
        # Root is refused without the flag; --oversubscribe for machines with fewer cores than ranks.
        cmd += ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
        # Docker often forbids the cross-memory-attach syscalls of the shared-memory transport.
        env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    return cmd, env


def ngram_corpus(prefix: str) -> str:
    """200 documents of repeated random 8-grams (learnable within a few steps), as an indexed dataset."""
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, vocab_size=256) as w:
        for _ in range(200):
            base = rng.integers(0, 16, size=8)
            w.add_document(np.concatenate([np.tile(base, rng.integers(5, 30)), [256 - 1]]))
        w.finalize()
    return prefix


def launch_scenarios(script: Path, nproc: int, port: int, args: list[str], out: Path, names: list[str]) -> Any:
    """Runs `script ARGS OUT NAMES` in one process (a world of one) or under torchrun; returns the JSON written."""
    env = {**clean_env(), "PYTHONPATH": str(ROOT)}
    if nproc == 1:
        cmd = [sys.executable, str(script)]
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}",
               str(script)]  # fmt: skip
    proc = subprocess.run([*cmd, *args, str(out), *names], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())
