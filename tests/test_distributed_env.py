"""Launcher discovery from faked environments, plus real 2-process runs under mpirun and torchrun."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launchers import clean_env, mpirun

from megatron_ext import distributed as d
from megatron_ext.distributed import LaunchError, RankInfo, discover, expand_hostlist, job_port

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "mpi_probe.py"


# --------------------------------------------------------------------------------------------------------
# One launcher at a time.


def test_single_process_defaults():
    assert discover({}) == RankInfo(0, 1, 0, 1, "127.0.0.1", 29500, "single")


def test_discover_reads_os_environ_by_default(monkeypatch):
    for key in list(os.environ):
        monkeypatch.delenv(key)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert discover() == RankInfo(1, 2, 1, 2, "127.0.0.1", 29500, "openmpi")


def test_torchrun():
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "1234",
    }
    assert discover(env) == RankInfo(5, 8, 1, 4, "node0", 1234, "torchrun")


def test_torchrun_style_without_local_vars_assumes_one_node():
    assert discover({"RANK": "2", "WORLD_SIZE": "3"}) == RankInfo(2, 3, 2, 3, "127.0.0.1", 29500, "torchrun")


def test_openmpi():
    env = {
        "OMPI_COMM_WORLD_RANK": "6",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    }
    assert discover(env) == RankInfo(6, 8, 2, 4, "127.0.0.1", 29500, "openmpi")


def test_pals_aurora_style(tmp_path):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("\nx4000c0s0b0n0.hostmgmt2000.cm.aurora.alcf.anl.gov\nx4000c0s1b0n0.hostmgmt\n")
    env = {
        "PALS_RANKID": "13",
        "PALS_LOCAL_RANKID": "1",
        "PALS_LOCAL_SIZE": "12",
        "PALS_NODEID": "1",
        "PMI_RANK": "13",
        "PMI_SIZE": "24",
        "PMI_LOCAL_RANK": "1",
        "PMI_LOCAL_SIZE": "12",
        "PBS_NODEFILE": str(nodefile),
        "PBS_JOBID": "1234567.aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov",
    }
    info = discover(env)
    assert info == RankInfo(
        13,
        24,
        1,
        12,
        "x4000c0s0b0n0.hostmgmt2000.cm.aurora.alcf.anl.gov",
        job_port(env["PBS_JOBID"]),
        "pals",
    )


def test_plain_pmi_hydra_style():
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    assert discover(env) == RankInfo(3, 4, 1, 2, "127.0.0.1", 29500, "pals")


def test_pmi_without_local_vars_assumes_one_node():
    assert discover({"PMI_RANK": "1", "PMI_SIZE": "2"}) == RankInfo(1, 2, 1, 2, "127.0.0.1", 29500, "pals")


def test_slurm_with_ntasks_per_node():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_JOB_NODELIST": "nid[001-002]",
        "SLURM_JOB_ID": "98765",
    }
    assert discover(env) == RankInfo(5, 8, 1, 4, "nid001", job_port("98765"), "slurm")


@pytest.mark.parametrize(
    ("tasks_per_node", "node_id", "local_world"),
    [("4(x2),3", "0", 4), ("4(x2),3", "1", 4), ("4(x2),3", "2", 3), ("2", None, 2), ("1,3(x2)", "1", 3)],
)
def test_slurm_tasks_per_node_forms(tasks_per_node, node_id, local_world):
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "11",
        "SLURM_LOCALID": "0",
        "SLURM_TASKS_PER_NODE": tasks_per_node,
    }
    if node_id is not None:
        env["SLURM_NODEID"] = node_id
    assert discover(env).local_world_size == local_world


def test_slurm_without_localid_derives_it():
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4"}
    assert discover(env).local_rank == 2


# --------------------------------------------------------------------------------------------------------
# Precedence between launchers and between address sources.

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "3"}
PALS = {"PALS_RANKID": "2", "PMI_RANK": "2", "PMI_SIZE": "4"}
SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "5"}


@pytest.mark.parametrize(
    ("layers", "launcher", "rank"),
    [
        ((TORCHRUN, OPENMPI, PALS, SLURM), "torchrun", 1),
        ((OPENMPI, PALS, SLURM), "openmpi", 0),
        ((PALS, SLURM), "pals", 2),
        ((SLURM,), "slurm", 3),
    ],
)
def test_launcher_precedence(layers, launcher, rank):
    env: dict[str, str] = {}
    for layer in layers:
        env.update(layer)
    info = discover(env)
    assert (info.launcher, info.rank) == (launcher, rank)


def test_pals_rankid_wins_over_pmi_rank():
    assert discover({"PALS_RANKID": "1", "PMI_RANK": "0", "PMI_SIZE": "2"}).rank == 1


def test_master_addr_precedence(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("pbs-head\npbs-other\n")
    env = {"PBS_NODEFILE": str(nodefile), "SLURM_JOB_NODELIST": "sl[07-09]", "MASTER_ADDR": "explicit"}
    assert discover(env).master_addr == "explicit"
    del env["MASTER_ADDR"]
    assert discover(env).master_addr == "pbs-head"
    del env["PBS_NODEFILE"]
    assert discover(env).master_addr == "sl07"
    env["SLURM_STEP_NODELIST"] = "sl[08-09]"  # srun's rank 0 is on the step's first node
    assert discover(env).master_addr == "sl08"
    assert discover({"SLURM_NODELIST": "old[3-4]"}).master_addr == "old3"


def test_master_port_precedence():
    env = {"PBS_JOBID": "42.pbs", "SLURM_JOB_ID": "77", "MASTER_PORT": "23456"}
    assert discover(env).master_port == 23456
    del env["MASTER_PORT"]
    assert discover(env).master_port == job_port("42.pbs")
    del env["PBS_JOBID"]
    assert discover(env).master_port == job_port("77")
    assert discover({}).master_port == 29500


def test_job_port_is_in_range_and_agreed_by_all_ranks():
    job = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2"}
    ports = {discover({**job, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 2)}).master_port for r in range(4)}
    assert len(ports) == 1
    ids = [str(n) for n in range(1000, 1200)] + ["5555.polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov"]
    assert all(20000 <= job_port(i) < 30000 for i in ids)
    assert len({job_port(i) for i in ids}) > 150  # spread out, so neighbouring jobs rarely collide
    # Stable across interpreters (crc32, not the per-process salted hash()).
    out = subprocess.run(
        [sys.executable, "-c", "from megatron_ext.distributed import job_port; print(job_port('123456'))"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "random"},
    )
    assert int(out.stdout) == job_port("123456")


# --------------------------------------------------------------------------------------------------------
# Slurm hostlists.


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node1", ["node1"]),
        ("nid[001-003,007],login1", ["nid001", "nid002", "nid003", "nid007", "login1"]),
        ("a[1-2]b", ["a1b", "a2b"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("nid[08-11]", ["nid08", "nid09", "nid10", "nid11"]),
        ("n[9-10]", ["n9", "n10"]),
        ("x[5],y,z[1,3]", ["x5", "y", "z1", "z3"]),
        ("gpu-a100-[0001-0002]", ["gpu-a100-0001", "gpu-a100-0002"]),
        ("", []),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["nid[001-", "nid]1[", "nid[a-b]", "nid[3-1]", "nid[[1]]", "nid[1-]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


# --------------------------------------------------------------------------------------------------------
# Bad values: one-line LaunchError naming the variable and what is expected.


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, ["RANK='x' is not an integer", "expected"]),
        ({"RANK": "2", "WORLD_SIZE": "2"}, ["RANK=2 is out of range", "RANK < WORLD_SIZE=2"]),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, ["RANK=-1 is out of range"]),
        ({"RANK": "0"}, ["WORLD_SIZE is not set", "expected the number of processes"]),
        ({"WORLD_SIZE": "2"}, ["RANK is not set", "expected the global rank"]),
        ({"RANK": "0", "WORLD_SIZE": "0"}, ["WORLD_SIZE=0 is out of range", "positive"]),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, ["LOCAL_RANK=2 is out of range", "LOCAL_WORLD_SIZE=2"]),
        ({**TORCHRUN, "LOCAL_WORLD_SIZE": "3"}, ["LOCAL_WORLD_SIZE=3 is out of range", "WORLD_SIZE=2"]),
        ({**TORCHRUN, "LOCAL_RANK": "one"}, ["LOCAL_RANK='one' is not an integer"]),
        ({"OMPI_COMM_WORLD_RANK": "0"}, ["OMPI_COMM_WORLD_SIZE is not set", "Open MPI"]),
        (
            {"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4"},
            ["OMPI_COMM_WORLD_RANK=4 is out of range"],
        ),
        ({"PALS_RANKID": "0"}, ["PMI_SIZE is not set", "PALS_RANKID is set"]),
        ({"PMI_RANK": "0", "PMI_SIZE": ""}, ["PMI_SIZE='' is not an integer"]),
        (
            {"PALS_RANKID": "0", "PMI_SIZE": "2", "PALS_LOCAL_RANKID": "3"},
            ["PALS_LOCAL_RANKID=3 is out of range"],
        ),
        ({"SLURM_PROCID": "0"}, ["SLURM_NTASKS is not set", "srun"]),
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2(x"},
            ["SLURM_TASKS_PER_NODE='2(x'"],
        ),
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "2"},
            ["SLURM_NODEID=2 is out of range", "2 nodes"],
        ),
        ({"MASTER_PORT": "abc"}, ["MASTER_PORT='abc' is not an integer", "TCP port"]),
        ({"MASTER_PORT": "70000"}, ["MASTER_PORT=70000 is out of range", "1..65535"]),
        ({"SLURM_JOB_NODELIST": "nid[001-"}, ["SLURM_JOB_NODELIST='nid[001-' is malformed"]),
        ({"PBS_NODEFILE": "/nonexistent/nodefile"}, ["PBS_NODEFILE='/nonexistent/nodefile' cannot be read"]),
    ],
)
def test_bad_values_raise_one_line_launch_error(env, fragments):
    with pytest.raises(LaunchError) as excinfo:
        discover(env)
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert isinstance(excinfo.value, ValueError)


def test_empty_pbs_nodefile(tmp_path):
    nodefile = tmp_path / "empty"
    nodefile.write_text("\n\n")
    with pytest.raises(LaunchError, match="PBS_NODEFILE=.* is empty"):
        discover({"PBS_NODEFILE": str(nodefile)})


# --------------------------------------------------------------------------------------------------------
# In-process lifecycle (world of one) and rendezvous without MPI.


def test_resolve_rendezvous_leaves_non_mpi_launches_alone():
    info = discover(TORCHRUN)
    assert d.resolve_rendezvous(info, TORCHRUN) is info
    explicit = {"MASTER_PORT": "29999"}
    single = discover(explicit)
    assert d.resolve_rendezvous(single, explicit) == single


def test_lone_process_without_port_takes_a_free_one():
    """Two single-process runs on one laptop must not both wait on 29500."""
    single = discover({})
    resolved = d.resolve_rendezvous(single, {})
    assert resolved.master_port != d.DEFAULT_MASTER_PORT and 1024 < resolved.master_port <= 65535
    assert d.replace(resolved, master_port=single.master_port) == single


def test_single_process_lifecycle(monkeypatch):
    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # restored afterwards: init_process_group exports them
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        d.initialize_model_parallel(1, 1)
    port = d.free_port()
    info = d.init_process_group("gloo", timeout_minutes=1, env={"MASTER_PORT": str(port)})
    try:
        assert info == RankInfo(0, 1, 0, 1, "127.0.0.1", port, "single")
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert os.environ["RANK"] == "0" and os.environ["MASTER_PORT"] == str(port)
        assert d.init_process_group("gloo", env={}).world_size == 1  # already initialised: no second group
    finally:
        d.destroy()
        d.destroy()
    assert not dist.is_initialized()


# --------------------------------------------------------------------------------------------------------
# Real multi-process runs of tests/mpi_probe.py.


def _run_probe(cmd: list[str], env: dict[str, str]) -> list[dict]:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    detail = f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, detail
    # Each record is one JSON object after "PROBE "; a launcher may join the ranks' lines.
    decoder = json.JSONDecoder()
    records = [decoder.raw_decode(part)[0] for part in proc.stdout.split("PROBE ")[1:]]
    assert len(records) == 2, detail
    return sorted(records, key=lambda r: r["rank"])


def _check_probe(records: list[dict]) -> None:
    assert [r["rank"] for r in records] == [0, 1]
    for r in records:
        assert r["world_size"] == r["dist_world_size"] == 2
        assert r["sum"] == 0 + 1
        assert r["tp_size"] == 2 and r["tp_sum"] == 1 + 2
        assert r["mismatch_raises"] is True
    assert records[0]["master_port"] == records[1]["master_port"]
    assert records[0]["master_addr"] == records[1]["master_addr"]
    assert sorted(r["tp_rank"] for r in records) == [0, 1]


def test_a_port_in_use_is_one_line_naming_master_port(monkeypatch):
    """Another run on this host holding MASTER_PORT: a UserError naming the port, not torch's traceback."""
    import socket

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(d.UserError, match=f"^MASTER_PORT {port} on 127.0.0.1 is in use .*set MASTER_PORT"):
            d.init_process_group("gloo", timeout_minutes=1, env={"MASTER_PORT": str(port)})


def test_mpirun_two_ranks():
    launch = mpirun(2)
    if launch is None:
        pytest.skip("mpirun is not on PATH (apt-get install -y openmpi-bin libopenmpi-dev)")
    cmd, env = launch
    records = _run_probe([*cmd, sys.executable, str(PROBE)], env)
    _check_probe(records)
    assert {r["launcher"] for r in records} <= {"openmpi", "pals"}
    assert [r["local_rank"] for r in records] == [0, 1]
    if "fallback" in records[0]:  # mpi4py is installed: the MPI-only rendezvous paths ran too
        assert [r["fallback"] for r in records] == [["mpi4py", 0, 2, 2], ["mpi4py", 1, 2, 2]]
        assert records[0]["fallback_port"] == records[1]["fallback_port"] != 29500  # rank 0's free port
        assert {r["multi_node_addr"] for r in records} == {records[0]["hostname"]}
    # A port picked by rank 0 and broadcast, not the 29500 fallback.
    assert importlib.util.find_spec("mpi4py") is None or records[0]["master_port"] != 29500


def test_torchrun_two_ranks():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(PROBE)]
    records = _run_probe(cmd, clean_env())
    _check_probe(records)
    assert {r["launcher"] for r in records} == {"torchrun"}
