"""Launch-agnostic start of torch.distributed and Megatron model parallelism.

The same training script is started by torchrun on a laptop, by ``mpirun``/``mpiexec`` (Open MPI, MPICH/PALS
on ALCF machines) or by ``srun`` on Slurm clusters. Each launcher describes the job with its own environment
variables; :func:`discover` turns whichever set is present into one :class:`RankInfo` so that the rest of
the code never has to know how it was launched.

:func:`discover` is pure (it only reads the mapping it is given) so it can be tested with fake environments.
Anything that needs communication (agreeing on a free port through MPI) lives in :func:`resolve_rendezvous`,
which :func:`init_process_group` calls.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import sys
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta

from megatron_ext.cli import UserError

__all__ = [
    "DEFAULT_MASTER_ADDR",
    "DEFAULT_MASTER_PORT",
    "LaunchError",
    "RankInfo",
    "destroy",
    "discover",
    "expand_hostlist",
    "init_process_group",
    "initialize_model_parallel",
    "job_port",
    "read_nodefile",
    "resolve_rendezvous",
]

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# Job-id-derived ports fall in [JOB_PORT_BASE, JOB_PORT_BASE + JOB_PORT_SPAN): away from torchrun's 29500
# default only by chance, but well below the Linux ephemeral range (32768+) so the OS rarely hands them out.
JOB_PORT_BASE = 20000
JOB_PORT_SPAN = 10000
# Launchers whose ranks can talk through MPI (mpi4py) before torch.distributed exists.
MPI_LAUNCHERS = frozenset({"openmpi", "pals", "mpi4py"})


class LaunchError(UserError, ValueError):
    """A launcher variable is missing or malformed; the message names it and says what is expected."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job, independent of the launcher that started it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "openmpi" | "pals" | "slurm" | "mpi4py" | "single"


# --------------------------------------------------------------------------------------------------------
# Parsing helpers: every failure names the variable, shows its value and says what was expected.


def _int(env: Mapping[str, str], name: str, expected: str) -> int:
    raw = env[name]
    try:
        return int(raw.strip())
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer; expected {expected}") from None


def _first_int(env: Mapping[str, str], names: tuple[str, ...], expected: str) -> int | None:
    """The first of ``names`` that is set, parsed; None when none is set."""
    for name in names:
        if name in env:
            return _int(env, name, expected)
    return None


def _require(env: Mapping[str, str], name: str, because: str, expected: str) -> int:
    if name not in env:
        raise LaunchError(f"{name} is not set although {because}; expected {expected}")
    return _int(env, name, expected)


def _check(rank: int, world: int, local_rank: int, local_world: int, names: tuple[str, str, str, str]) -> None:
    """Range checks shared by all launchers; ``names`` are the variables the four numbers came from."""
    n_rank, n_world, n_local, n_local_world = names
    if world < 1:
        raise LaunchError(f"{n_world}={world} is out of range; expected a positive number of processes")
    if not 0 <= rank < world:
        raise LaunchError(f"{n_rank}={rank} is out of range; expected 0 <= {n_rank} < {n_world}={world}")
    if not 1 <= local_world <= world:
        raise LaunchError(
            f"{n_local_world}={local_world} is out of range; expected 1 <= {n_local_world} <= {n_world}={world}"
        )
    if not 0 <= local_rank < local_world:
        raise LaunchError(
            f"{n_local}={local_rank} is out of range; expected 0 <= {n_local} < {n_local_world}={local_world}"
        )


# --------------------------------------------------------------------------------------------------------
# Slurm notations.

_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist such as ``nid[001-003,007],login1`` or ``a[1-2]b[3-4]`` into host names.

    Zero padding is kept (``nid[08-10]`` gives ``nid08 nid09 nid10``), as Slurm does. Raises ValueError on
    unbalanced brackets or malformed ranges.
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist):
        hosts.extend(_expand_item(item, hostlist))
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(hostlist):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"hostlist {hostlist!r} has nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist {hostlist!r} has an unmatched ']'")
        elif ch == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"hostlist {hostlist!r} has an unmatched '['")
    items.append(hostlist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str, hostlist: str) -> list[str]:
    match = _BRACKET.search(item)
    if match is None:
        if "[" in item or "]" in item:
            raise ValueError(f"hostlist {hostlist!r} has an unmatched bracket in {item!r}")
        return [item]
    head, tail = item[: match.start()], item[match.end() :]
    tails = _expand_item(tail, hostlist) if tail else [""]
    return [head + middle + rest for middle in _expand_ranges(match.group(1), hostlist) for rest in tails]


def _expand_ranges(spec: str, hostlist: str) -> list[str]:
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"hostlist {hostlist!r} has a malformed range {part!r}; expected N or N-M")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"hostlist {hostlist!r} has a descending range {part!r}")
        width = len(lo)  # Slurm pads to the width of the lower bound
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def read_nodefile(path: str) -> list[str]:
    """The hosts of a PBS node file, once each and in order (some sites list a host once per core or rank);
    raises OSError when it cannot be read."""
    with open(path) as fh:
        return list(dict.fromkeys(fh.read().split()))


def _expand_tasks_per_node(name: str, value: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` such as ``4(x2),3`` -> ``[4, 4, 3]``."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise LaunchError(f"{name}={value!r} is malformed; expected a list like '4(x2),3'")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


# --------------------------------------------------------------------------------------------------------
# Per-launcher discovery: each returns (rank, world, local_rank, local_world) or None when not launched so.

_Counts = tuple[int, int, int, int]


def _torchrun(env: Mapping[str, str]) -> _Counts | None:
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    because = "RANK or WORLD_SIZE is set (torchrun-style launch)"
    rank = _require(env, "RANK", because, "the global rank, an integer >= 0")
    world = _require(env, "WORLD_SIZE", because, "the number of processes, an integer >= 1")
    # A hand-rolled launch may only set RANK/WORLD_SIZE: assume a single node then.
    local_rank = _first_int(env, ("LOCAL_RANK",), "the rank on this node, an integer >= 0")
    local_world = _first_int(env, ("LOCAL_WORLD_SIZE",), "the number of processes on this node")
    local_rank = rank if local_rank is None else local_rank
    local_world = world if local_world is None else local_world
    _check(rank, world, local_rank, local_world, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    return rank, world, local_rank, local_world


def _openmpi(env: Mapping[str, str]) -> _Counts | None:
    if "OMPI_COMM_WORLD_RANK" not in env:
        return None
    because = "OMPI_COMM_WORLD_RANK is set (Open MPI launch)"
    rank = _int(env, "OMPI_COMM_WORLD_RANK", "the MPI rank, an integer >= 0")
    world = _require(env, "OMPI_COMM_WORLD_SIZE", because, "the number of MPI processes, an integer >= 1")
    local_rank = _first_int(env, ("OMPI_COMM_WORLD_LOCAL_RANK",), "the rank on this node, an integer >= 0")
    local_world = _first_int(env, ("OMPI_COMM_WORLD_LOCAL_SIZE",), "the number of processes on this node")
    local_rank = rank if local_rank is None else local_rank
    local_world = world if local_world is None else local_world
    names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
    _check(
        rank,
        world,
        local_rank,
        local_world,
        (*names, "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    )
    return rank, world, local_rank, local_world


def _pals(env: Mapping[str, str]) -> _Counts | None:
    """MPICH launched by PALS (ALCF Aurora/Polaris ``mpiexec``) or by Hydra / Intel MPI (plain PMI_RANK)."""
    rank_name = next((n for n in ("PALS_RANKID", "PMI_RANK") if n in env), None)
    if rank_name is None:
        return None
    because = f"{rank_name} is set (MPICH/PALS launch)"
    rank = _int(env, rank_name, "the MPI rank, an integer >= 0")
    world = _require(env, "PMI_SIZE", because, "the number of MPI processes, an integer >= 1")
    local_rank_names = ("PALS_LOCAL_RANKID", "PMI_LOCAL_RANK", "MPI_LOCALRANKID")
    local_world_names = ("PALS_LOCAL_SIZE", "PMI_LOCAL_SIZE", "MPI_LOCALNRANKS")
    local_rank = _first_int(env, local_rank_names, "the rank on this node, an integer >= 0")
    local_world = _first_int(env, local_world_names, "the number of processes on this node")
    local_rank_name = next((n for n in local_rank_names if n in env), local_rank_names[0])
    local_world_name = next((n for n in local_world_names if n in env), local_world_names[0])
    local_rank = rank if local_rank is None else local_rank
    local_world = world if local_world is None else local_world
    _check(rank, world, local_rank, local_world, (rank_name, "PMI_SIZE", local_rank_name, local_world_name))
    return rank, world, local_rank, local_world


def _slurm(env: Mapping[str, str]) -> _Counts | None:
    if "SLURM_PROCID" not in env:
        return None
    because = "SLURM_PROCID is set (srun launch)"
    rank = _int(env, "SLURM_PROCID", "the task rank, an integer >= 0")
    world = _require(env, "SLURM_NTASKS", because, "the number of tasks, an integer >= 1 (launch with srun -n)")
    local_rank = _first_int(env, ("SLURM_LOCALID",), "the task rank on this node, an integer >= 0")
    local_world_name = "SLURM_NTASKS_PER_NODE"
    if "SLURM_NTASKS_PER_NODE" in env:
        local_world = _int(env, "SLURM_NTASKS_PER_NODE", "the number of tasks per node, an integer >= 1")
    elif "SLURM_TASKS_PER_NODE" in env:
        local_world_name = "SLURM_TASKS_PER_NODE"
        counts = _expand_tasks_per_node(local_world_name, env[local_world_name])
        node = _first_int(env, ("SLURM_NODEID",), "the index of this node in the job, an integer >= 0") or 0
        if node >= len(counts):
            raise LaunchError(
                f"SLURM_NODEID={node} is out of range; expected less than the {len(counts)} nodes "
                f"in SLURM_TASKS_PER_NODE={env[local_world_name]!r}"
            )
        local_world = counts[node]
    else:
        local_world = world
    local_rank = rank % local_world if local_rank is None else local_rank
    _check(
        rank,
        world,
        local_rank,
        local_world,
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", local_world_name),
    )
    return rank, world, local_rank, local_world


_LAUNCHERS: tuple[tuple[str, Callable[[Mapping[str, str]], _Counts | None]], ...] = (
    ("torchrun", _torchrun),
    ("openmpi", _openmpi),
    ("pals", _pals),
    ("slurm", _slurm),
)


# --------------------------------------------------------------------------------------------------------
# Rendezvous address and port.


def _master_addr(env: Mapping[str, str]) -> str:
    """Explicit MASTER_ADDR, else the first PBS node, else the first Slurm node, else loopback."""
    if env.get("MASTER_ADDR", "").strip():
        return env["MASTER_ADDR"].strip()
    if env.get("PBS_NODEFILE"):
        path = env["PBS_NODEFILE"]
        try:
            first = next(iter(read_nodefile(path)), "")
        except OSError as exc:
            raise LaunchError(
                f"PBS_NODEFILE={path!r} cannot be read ({exc.strerror}); expected a file listing the job's "
                "hosts, or set MASTER_ADDR"
            ) from None
        if not first:
            raise LaunchError(f"PBS_NODEFILE={path!r} is empty; expected one host name per line")
        return first
    # The step's node list first: srun's rank 0 runs on the first node of its step, not always of the job.
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(name, "").strip():
            try:
                hosts = expand_hostlist(env[name])
            except ValueError as exc:
                raise LaunchError(f"{name}={env[name]!r} is malformed ({exc}); expected e.g. 'nid[001-004]'") from None
            if hosts:
                return hosts[0]
    return DEFAULT_MASTER_ADDR


def job_port(job_id: str) -> int:
    """A port in [20000, 30000) derived from the job id, identical on every rank of the job.

    crc32 rather than hash(): Python salts str hashes per process, so ranks would disagree.
    """
    return JOB_PORT_BASE + zlib.crc32(job_id.encode()) % JOB_PORT_SPAN


def _master_port(env: Mapping[str, str]) -> int:
    """Explicit MASTER_PORT, else a job-id-derived port, else 29500."""
    if env.get("MASTER_PORT", "").strip():
        port = _int(env, "MASTER_PORT", "a TCP port number in 1..65535")
        if not 1 <= port <= 65535:
            raise LaunchError(f"MASTER_PORT={port} is out of range; expected a TCP port number in 1..65535")
        return port
    for name in ("PBS_JOBID", "SLURM_JOB_ID", "SLURM_JOBID"):
        if env.get(name, "").strip():
            return job_port(env[name].strip())
    return DEFAULT_MASTER_PORT


def discover(env: Mapping[str, str] | None = None) -> RankInfo:
    """Describe this process from the launcher's environment variables (``os.environ`` by default).

    Precedence: torchrun, Open MPI, MPICH/PALS (or plain PMI), Slurm, else a single process. Pure: reads
    ``env`` and possibly ``$PBS_NODEFILE``, never talks to other ranks. Raises LaunchError on bad values.
    """
    env = os.environ if env is None else env
    found = ((name, counts) for name, probe in _LAUNCHERS if (counts := probe(env)) is not None)
    launcher, (rank, world, local_rank, local_world) = next(found, ("single", (0, 1, 0, 1)))
    return RankInfo(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        master_addr=_master_addr(env),
        master_port=_master_port(env),
        launcher=launcher,
    )


# --------------------------------------------------------------------------------------------------------
# MPI-assisted rendezvous (needs communication, so kept out of discover()).


def _mpi4py_available() -> bool:
    return importlib.util.find_spec("mpi4py") is not None


def free_port() -> int:
    """A port free right now on this host (the OS picks it); it may be taken before TCPStore binds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _from_mpi4py(info: RankInfo) -> RankInfo:
    """Rank layout from an MPI library that the program has already initialised (unknown launcher)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return replace(
            info,
            rank=world.Get_rank(),
            world_size=world.Get_size(),
            local_rank=node.Get_rank(),
            local_world_size=node.Get_size(),
            launcher="mpi4py",
        )
    finally:
        node.Free()


def resolve_rendezvous(info: RankInfo, env: Mapping[str, str] | None = None) -> RankInfo:
    """Finish ``info`` with anything that needs the other ranks: in practice the master port (and address).

    Under an MPI launcher with mpi4py importable and no explicit MASTER_PORT, rank 0 picks a free port and
    broadcasts it: better than a job-id-derived port, which two runs in one allocation would share. When no
    launcher variable is set but the program already imported ``mpi4py.MPI``, the layout comes from MPI
    (launcher "mpi4py"); mpi4py is not imported otherwise, since initialising MPI has side effects.
    """
    env = os.environ if env is None else env
    if info.launcher == "single" and "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and MPI.COMM_WORLD.Get_size() > 1:
            info = _from_mpi4py(info)
    if info.world_size == 1 and not env.get("MASTER_PORT", "").strip():
        # A lone process rendezvouses with itself: any free port, so that concurrent runs never collide.
        return replace(info, master_port=free_port())
    if info.launcher not in MPI_LAUNCHERS or info.world_size == 1 or not _mpi4py_available():
        return info
    port_explicit = bool(env.get("MASTER_PORT", "").strip())
    addr_explicit = bool(env.get("MASTER_ADDR", "").strip())
    # Loopback only works on one node; ask rank 0 for its host name when the job spans several.
    want_addr = (
        not addr_explicit and info.master_addr == DEFAULT_MASTER_ADDR and info.local_world_size < info.world_size
    )
    if port_explicit and not want_addr:
        return info
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:  # e.g. a wheel of mpi4py that finds no MPI library at run time
        warnings.warn(f"mpi4py unusable ({exc}); using master port {info.master_port}", stacklevel=2)
        return info

    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size or comm.Get_rank() != info.rank:
        # MPI was not wired to this launcher (e.g. a singleton init); a broadcast would hang or lie.
        return info
    proposal = None
    if comm.Get_rank() == 0:
        proposal = (info.master_port if port_explicit else free_port(), socket.gethostname())
    port, host = comm.bcast(proposal, root=0)
    return replace(info, master_port=port, master_addr=host if want_addr else info.master_addr)


# --------------------------------------------------------------------------------------------------------
# torch.distributed and Megatron parallel state.


def init_process_group(backend: str, timeout_minutes: int = 10, env: Mapping[str, str] | None = None) -> RankInfo:
    """Discover the launch, agree on the rendezvous, export it to ``os.environ`` and start torch.distributed.

    The variables are exported because Megatron and torch read RANK/WORLD_SIZE/LOCAL_RANK from the
    environment in places. Does nothing but report when a process group already exists.
    """
    import torch
    import torch.distributed as dist

    info = discover(env)
    if dist.is_initialized():
        return replace(info, rank=dist.get_rank(), world_size=dist.get_world_size())
    info = resolve_rendezvous(info, env)
    os.environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        LOCAL_WORLD_SIZE=str(info.local_world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    if "nccl" in backend and torch.cuda.is_available():
        # One GPU per local rank, selected before NCCL creates its communicators on the current device.
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    try:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    except dist.DistNetworkError as e:
        if "EADDRINUSE" not in str(e):
            raise
        raise UserError(
            f"MASTER_PORT {info.master_port} on {info.master_addr} is in use (another run on this host?): "
            "set MASTER_PORT to a free port"
        ) from None
    return info


def initialize_model_parallel(
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    virtual_pipeline_model_parallel_size: int | None = None,
) -> None:
    """Create Megatron's tensor/pipeline/data-parallel groups once; a repeat call must ask for the same sizes.

    Idempotent so that library code and scripts can both call it, but a silent size change would leave
    tensors sharded one way and groups built another, so that raises ValueError instead.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel() needs torch.distributed; call init_process_group() first")
    from megatron.core import parallel_state as ps  # slow import (seconds): only once it is needed

    wanted = (tensor_model_parallel_size, pipeline_model_parallel_size, virtual_pipeline_model_parallel_size)
    if ps.model_parallel_is_initialized():
        have = (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size(),
        )
        if have != wanted:
            raise ValueError(
                f"model parallelism is already initialised with (tp, pp, vpp)={have}; requested {wanted}. "
                "Call destroy() first to change it"
            )
        return
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )


def destroy() -> None:
    """Tear down Megatron's groups and the process group; safe to call twice or when nothing was started."""
    import torch.distributed as dist

    if "megatron.core.parallel_state" in sys.modules:
        sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
