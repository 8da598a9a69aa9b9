"""Shared by the tests that start real multi-process runs: a clean environment and the mpirun command line."""

from __future__ import annotations

import os
import shutil
import subprocess


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
