"""Multi-process probe for tests/test_distributed_env.py: run under mpirun or torchrun with 2 processes.

Starts gloo through megatron_ext.distributed, checks a collective on the world and on Megatron's
tensor-parallel group, and prints one JSON line per rank for the test to compare.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys

import torch
import torch.distributed as dist

from megatron_ext import distributed


def _mpi_checks(info: distributed.RankInfo) -> dict:
    """Rendezvous paths that need a live MPI: collective, so every rank runs them in the same order."""
    # No launcher variables at all, but MPI is initialised: the layout comes from mpi4py.
    fallback = distributed.resolve_rendezvous(distributed.discover({}), {})
    # A job spanning nodes (faked: one rank per node) must not rendezvous on loopback: rank 0's host name.
    spread = dataclasses.replace(info, local_rank=0, local_world_size=1, master_addr="127.0.0.1")
    multi = distributed.resolve_rendezvous(spread, {})
    return {
        "fallback": [fallback.launcher, fallback.rank, fallback.world_size, fallback.local_world_size],
        "fallback_port": fallback.master_port,
        "multi_node_addr": multi.master_addr,
        "hostname": socket.gethostname(),
    }


def main() -> None:
    info = distributed.init_process_group("gloo", timeout_minutes=1)
    total = torch.tensor([info.rank], dtype=torch.int64)
    dist.all_reduce(total)

    distributed.initialize_model_parallel(2, 1)
    distributed.initialize_model_parallel(2, 1)  # same sizes again: a no-op
    try:
        distributed.initialize_model_parallel(1, 2)
        mismatch_raises = False
    except ValueError:
        mismatch_raises = True

    from megatron.core import parallel_state as ps

    tp_total = torch.tensor([info.rank + 1], dtype=torch.int64)
    dist.all_reduce(tp_total, group=ps.get_tensor_model_parallel_group())
    record = {
        "launcher": info.launcher,
        "rank": info.rank,
        "world_size": info.world_size,
        "dist_world_size": dist.get_world_size(),
        "local_rank": info.local_rank,
        "master_addr": info.master_addr,
        "master_port": info.master_port,
        "sum": int(total.item()),
        "tp_size": ps.get_tensor_model_parallel_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "tp_sum": int(tp_total.item()),
        "mismatch_raises": mismatch_raises,
    }
    if info.launcher in distributed.MPI_LAUNCHERS and "mpi4py.MPI" in sys.modules:
        record.update(_mpi_checks(info))
    distributed.destroy()
    distributed.destroy()  # safe twice
    # One write of one whole line: mpirun forwards both ranks' output through one stream.
    sys.stdout.write("PROBE " + json.dumps(record) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
