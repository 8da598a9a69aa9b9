"""What `train_alcf.sh` starts, and how: the job (PBS, Slurm or this machine), the node's devices and cores, and
the launcher's command line (mpiexec in MPICH/PALS or Open MPI syntax, srun, torchrun or python).

This is the outside of a run; the inside, each rank finding its place in the job from the launcher's variables,
is `megatron_ext/distributed.py` (`discover`), which also expands Slurm host lists. The variables that shape the
job (`NGPU_PER_HOST`, `CPUS_PER_RANK`, `LAUNCH_WITH`) are read in `megatron_ext/alcf_env.py`. No torch import
unless a non-NVIDIA GPU must be counted.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.cli import UserError
from megatron_ext.distributed import expand_hostlist, read_nodefile

LAUNCHERS = ("python", "torchrun", "mpiexec", "srun")
MPI_FLAVORS = ("mpich", "openmpi")


class EnvError(UserError, ValueError):
    """A variable is missing, malformed or inconsistent; the message is one line naming it and what is expected."""


@dataclass(frozen=True)
class Job:
    """Where the run happens: a PBS or Slurm job (its hosts), or this machine."""

    kind: str  # "pbs" | "slurm" | "local"
    hosts: tuple[str, ...]
    nodefile: str | None = None
    job_id: str | None = None


@dataclass(frozen=True)
class JobShape:
    """The job and how many ranks (and CPUs each) run on every one of its hosts."""

    job: Job
    ranks_per_node: int
    cpus_per_rank: int
    devices: int = 0  # GPUs per node; 0 on a CPU-only node

    @property
    def world_size(self) -> int:
        return len(self.job.hosts) * self.ranks_per_node


def detect_job(env: Mapping[str, str]) -> Job:
    """Hosts from $PBS_NODEFILE (unique, in order) inside PBS, from the Slurm node list inside Slurm."""
    if env.get("PBS_JOBID"):
        path = env.get("PBS_NODEFILE", "")
        if not path:
            raise EnvError("PBS_NODEFILE is not set although PBS_JOBID is; expected the job's host file")
        try:
            hosts = tuple(read_nodefile(path))
        except OSError as e:
            raise EnvError(f"PBS_NODEFILE={path} cannot be read ({e.strerror}); expected the job's host file") from None
        if not hosts:
            raise EnvError(f"PBS_NODEFILE={path} is empty; expected one host name per line")
        return Job("pbs", hosts, path, env["PBS_JOBID"])
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if job_id:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        try:
            hosts = tuple(expand_hostlist(nodelist)) if nodelist else ()
        except ValueError as e:
            raise EnvError(f"SLURM_JOB_NODELIST={nodelist!r} is malformed ({e})") from None
        count = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or ""
        if not hosts and count.isdigit() and int(count) > 0:
            hosts = tuple(f"node{i}" for i in range(int(count)))
        if not hosts:
            raise EnvError(
                "SLURM_JOB_NODELIST and SLURM_JOB_NUM_NODES are not set although SLURM_JOB_ID is; "
                "expected to run inside an allocation (sbatch or salloc)"
            )
        return Job("slurm", hosts, None, job_id)
    return Job("local", (socket.gethostname(),))


def detect_accelerators(env: Mapping[str, str]) -> tuple[str, int]:
    """(kind, count) of this node's GPUs without importing torch where possible: ("cpu", 0) when none."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return "cuda", len([d for d in visible.split(",") if d.strip()])
    if visible is None and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
        if count:
            return "cuda", count
    if env.get("ZE_AFFINITY_MASK"):
        return "xpu", len(env["ZE_AFFINITY_MASK"].split(","))
    if list(Path("/dev/dri").glob("renderD*")) or Path("/dev/kfd").exists():  # Intel or AMD GPUs: ask torch
        try:
            import torch

            if hasattr(torch, "xpu") and torch.xpu.is_available():
                return "xpu", torch.xpu.device_count()
            if torch.cuda.is_available():
                return "cuda", torch.cuda.device_count()
        except Exception:  # noqa: BLE001 - any failure means: no usable accelerator
            pass
    return "cpu", 0


def cpu_counts() -> tuple[int, int]:
    """(logical CPUs this process may use, physical cores among them)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:
        physical = logical
    return logical, max(1, min(logical, physical))


def choose_launcher(requested: str, shape: JobShape) -> str:
    """The launcher for `requested` (auto: mpiexec in PBS, srun in Slurm, else torchrun, or python for one rank),
    checked against the job: torchrun and python start processes on this node only."""
    job, world = shape.job, shape.world_size
    launcher = requested
    if launcher == "auto":
        launcher = {"pbs": "mpiexec", "slurm": "srun"}.get(job.kind, "torchrun" if world > 1 else "python")
    if launcher not in LAUNCHERS:
        raise EnvError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if launcher in ("python", "torchrun") and len(job.hosts) > 1:
        raise EnvError(
            f"LAUNCH_WITH={launcher} runs on one node but the job has {len(job.hosts)} hosts; "
            "expected mpiexec (PBS) or srun (Slurm)"
        )
    if launcher == "python" and world > 1:
        raise EnvError(
            f"LAUNCH_WITH=python starts one process but NGPU_PER_HOST is {shape.ranks_per_node}; "
            "expected NGPU_PER_HOST=1"
        )
    return launcher


def launch_command(
    launcher: str,
    program: Sequence[str],
    shape: JobShape,
    *,
    mpi_flavor: str = "mpich",
    mpi_exe: str = "mpiexec",
    env: Mapping[str, str],
) -> tuple[list[str], str]:
    """(the command that starts `program` = [python, script, flags...] on every rank, the signal that asks the
    ranks to save and exit through this launcher: mpiexec and srun forward SIGUSR1, torchrun/python take SIGTERM)."""
    python, ppn, world = program[0], shape.ranks_per_node, shape.world_size
    job, cpus = shape.job, str(shape.cpus_per_rank)
    if launcher == "python":
        return list(program), "TERM"
    if launcher == "torchrun":
        torchrun = Path(python).parent / "torchrun"
        head = [str(torchrun)] if torchrun.is_file() else [python, "-m", "torch.distributed.run"]
        return [*head, "--standalone", "--nproc-per-node", str(ppn), *program[1:]], "TERM"
    if launcher == "srun":
        head = ["srun", "--nodes", str(len(job.hosts)), "--ntasks", str(world), "--ntasks-per-node", str(ppn),
                "--cpus-per-task", cpus, "--kill-on-bad-exit=1"]  # fmt: skip
        return [*head, *program], "USR1"
    hostfile = ["--hostfile", job.nodefile] if job.nodefile else []
    if mpi_flavor == "openmpi":
        cmd = [mpi_exe, "-np", str(world), "--map-by", f"ppr:{ppn}:node", *hostfile]
        cmd += ["--bind-to", "none", "-x", "PATH", "-x", "OMP_NUM_THREADS"]
        cmd += ["-x", "LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else []
        cmd += ["--oversubscribe"] if ppn > cpu_counts()[0] else []
        cmd += ["--allow-run-as-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        return [*cmd, *program], "USR1"
    cmd = [mpi_exe, "--np", str(world), "--ppn", str(ppn), *hostfile, "--cpu-bind", "depth", "-d", cpus]
    return [*cmd, *program], "USR1"
