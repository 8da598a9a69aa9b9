"""`bash train_alcf.sh` and the job templates, driven from pytest: faked PBS and Slurm jobs give the exact launch
command (DRY_RUN=1, nothing runs), bad variables stop before anything launches, and three real runs: the defaults
on this CPU, the continual-pre-training example command, and the same under `mpirun -np 2` stopped by the
pre-walltime signal."""

from __future__ import annotations

import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launchers import clean_env, mpirun

from megatron_ext import alcf_env, distributed

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train_alcf.sh"
SCRIPT = str(ROOT / "pretrain_gpt.py")
PY = sys.executable
LLAMA = ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
         "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--hidden-dropout", "0",
         "--attention-dropout", "0"]  # fmt: skip


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no launcher, job or train_alcf.sh variables of the caller's shell; CPU only."""
    env = {k: v for k, v in clean_env().items() if k not in alcf_env.VAR_BY_NAME and k != "LD_LIBRARY_PATH"}
    env.update(PYTHON=PY, CUDA_VISIBLE_DEVICES="", **extra)
    return env


def _fake(tmp: Path, name: str, body: str) -> Path:
    """An executable `name` in tmp/bin (put first on PATH) running `body`."""
    path = tmp / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)
    return path.parent


def _bash(
    tmp: Path, env: dict[str, str], *args: str, script: Path = TRAIN, timeout: int = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, cwd=tmp,
                          timeout=timeout)  # fmt: skip


def _command(out: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith("launch with "))
    return shlex.split(line.split(": ", 1)[1])


def _nodefile(tmp: Path, hosts: list[str]) -> str:
    path = tmp / "nodefile"
    path.write_text("".join(f"{h}\n" for h in hosts))
    return str(path)


def _losses(log: str) -> dict[int, float]:
    return {int(i): float(x) for i, x in re.findall(r"^iter (\d+)/\d+ \| loss ([0-9.]+)", log, re.M)}


# ---- exact launch commands (DRY_RUN=1) --------------------------------------------------------------------------


def test_pbs_mpich_command_is_exact_and_nothing_runs(tmp_path: Path) -> None:
    """Inside PBS with MPICH/PALS: mpiexec --np --ppn --hostfile --cpu-bind depth -d, and the derived sizes."""
    fake = _fake(tmp_path, "mpiexec", 'echo "mpiexec $*" >> "$FAKE_LOG"; echo "HYDRA build details:"')
    nodefile = _nodefile(tmp_path, ["x4102c1s0b0n0", "x4102c1s0b0n0", "x4102c1s1b0n0"])
    env = _env(tmp_path, PATH=f"{fake}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "calls"),
               PBS_JOBID="8231.aurora-pbs-0001", PBS_NODEFILE=nodefile, PBS_O_WORKDIR=str(tmp_path), DRY_RUN="1",
               MODEL_ARCH="7B", TP="2", PP="2", SP="2", NGPU_PER_HOST="12", CPUS_PER_RANK="16", GRAD_ACC_STEPS="16",
               TRAIN_TOKENS=str(22 * 10**9), LR="0.0002", LR_WARMUP_FRACTION="0.01", DTYPE="bf16", ZERO_STAGE="1",
               SAVE="ckpt/7b", LOAD="univ/7b", RUN_DIR="runs/r1")  # fmt: skip
    (tmp_path / "univ" / "7b").mkdir(parents=True)
    proc = _bash(tmp_path, env, "--universal-checkpoint", "--finetune")
    assert proc.returncode == 0, proc.stderr
    iters = math.ceil(22e9 / (4096 * 96))  # GLOBAL_BATCH 96 = MICRO_BATCH 1 x GRAD_ACC_STEPS 16 x DP 6
    argv = [*LLAMA, "--rotary-base", "10000", "--num-layers", "32", "--hidden-size", "4096",
            "--num-attention-heads", "32", "--num-query-groups", "8", "--ffn-hidden-size", "11008", "--seq-length",
            "4096", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--micro-batch-size",
            "1", "--seed", "1234", "--lr", "0.0002", "--min-lr", "0", "--weight-decay", "0.1", "--adam-beta1", "0.9",
            "--adam-beta2", "0.95", "--adam-eps", "1e-05", "--clip-grad", "1.0", "--lr-decay-style", "cosine",
            "--tokenizer-type", "ByteTokenizer", "--data-cache-path", "data_cache", "--save-interval", "50",
            "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "20", "--lr-warmup-fraction", "0.01",
            "--sequence-parallel", "--use-distributed-optimizer", "--bf16", "--optimizer", "adam",
            "--global-batch-size", "96", "--train-iters", str(iters), "--save", "ckpt/7b", "--load", "univ/7b",
            "--run-dir", "runs/r1", "--exit-signal-handler", "--tensorboard-dir", "runs/r1/tensorboard",
            "--universal-checkpoint", "--finetune"]  # fmt: skip
    launcher = ["mpiexec", "--np", "24", "--ppn", "12", "--hostfile", nodefile, "--cpu-bind", "depth", "-d", "16"]
    assert _command(proc.stdout) == [*launcher, PY, SCRIPT, *argv]
    out = proc.stdout
    assert "WORLD_SIZE=24 = 2 host(s) from PBS_NODEFILE" in out and "DP=6 = WORLD_SIZE 24 / (TP 2 x PP 2)" in out
    assert "GLOBAL_BATCH=96 = MICRO_BATCH 1 x GRAD_ACC_STEPS 16 x DP 6" in out
    assert f"TRAIN_ITERS={iters} = ceil(TRAIN_TOKENS 22,000,000,000 / (SEQ 4096 x GLOBAL_BATCH 96))" in out
    assert f"warmup 0.01 x {iters:,} decay iterations" in out
    assert "note: ZERO_STAGE=1: mapped to --use-distributed-optimizer" in out
    assert re.search(r"^  LR_WARMUP_FRACTION=0\.01 +env$", out, re.M)  # every variable printed with its source
    assert '"universal_checkpoint": true' in out and "DRY_RUN=1: nothing launched" in out
    assert (tmp_path / "calls").read_text() == "mpiexec --version\n"  # probed, never launched
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ckpt").exists()


def test_pbs_open_mpi_command(tmp_path: Path) -> None:
    fake = _fake(tmp_path, "mpiexec", 'echo "mpiexec (Open MPI) 4.1.4"')
    nodefile = _nodefile(tmp_path, ["nodeA", "nodeB"])
    env = _env(tmp_path, PATH=f"{fake}:{os.environ['PATH']}", PBS_JOBID="77.pbs", PBS_NODEFILE=nodefile,
               PBS_O_WORKDIR=str(tmp_path), DRY_RUN="1", NGPU_PER_HOST="4", RUN_DIR="r")  # fmt: skip
    proc = _bash(tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    extra = ["--oversubscribe"] if 4 > len(os.sched_getaffinity(0)) else []
    extra += ["--allow-run-as-root"] if os.geteuid() == 0 else []
    launcher = ["mpiexec", "-np", "8", "--map-by", "ppr:4:node", "--hostfile", nodefile, "--bind-to", "none", "-x",
                "PATH", "-x", "OMP_NUM_THREADS", *extra]  # fmt: skip
    command = _command(proc.stdout)
    assert command[: len(launcher) + 2] == [*launcher, PY, SCRIPT]
    assert "--global-batch-size 16 --train-iters 50" in shlex.join(command)  # 2 x DP 8, the tiny preset's length


def test_slurm_srun_command(tmp_path: Path) -> None:
    env = _env(tmp_path, SLURM_JOB_ID="991", SLURM_JOB_NODELIST="nid[001008-001011]", SLURM_JOB_NUM_NODES="4",
               SLURM_NTASKS_PER_NODE="4", SLURM_CPUS_PER_TASK="32", DRY_RUN="1", MODEL_ARCH="1B", TP="4",
               GLOBAL_BATCH="64", TRAIN_ITERS="1000", RUN_DIR="r")  # fmt: skip
    proc = _bash(tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    launcher = ["srun", "--nodes", "4", "--ntasks", "16", "--ntasks-per-node", "4", "--cpus-per-task", "32",
                "--kill-on-bad-exit=1"]  # fmt: skip
    command = _command(proc.stdout)
    assert command[: len(launcher) + 2] == [*launcher, PY, SCRIPT]
    assert "GLOBAL_BATCH=64 given: GRAD_ACC_STEPS 16 = GLOBAL_BATCH 64 / (MICRO_BATCH 1 x DP 4)" in proc.stdout


def test_laptop_default_is_torchrun_over_all_cores(tmp_path: Path) -> None:
    proc = _bash(tmp_path, _env(tmp_path, DRY_RUN="1", RUN_DIR="r"))
    assert proc.returncode == 0, proc.stderr
    cores = alcf_env.cpu_counts()[1]
    command = _command(proc.stdout)
    if cores == 1:
        assert command[:2] == [PY, SCRIPT]
    else:
        torchrun = str(Path(PY).parent / "torchrun")
        assert command[:5] == [torchrun, "--standalone", "--nproc-per-node", str(cores), SCRIPT]
    assert f"NGPU_PER_HOST={cores}" in proc.stdout and "DTYPE=fp32" in proc.stdout
    single = _bash(tmp_path, _env(tmp_path, DRY_RUN="1", RUN_DIR="r", NGPU_PER_HOST="1"))
    assert _command(single.stdout)[:2] == [PY, SCRIPT]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GLOBAL_BATCH": "6", "GRAD_ACC_STEPS": "2", "NGPU_PER_HOST": "2"},
         "error: GLOBAL_BATCH=6 does not equal MICRO_BATCH 2 x GRAD_ACC_STEPS 2 x DP 2 = 8"),
        ({"TP": "3"}, "error: HEADS (--num-attention-heads) 4 is not divisible by TP (--tensor-model-parallel-size) 3"),
        ({"MODEL_ARCH": "7B"}, "error: MODEL_ARCH=7B needs a run length"),
        ({"LAUNCH_WITH": "deepspeed"}, "error: LAUNCH_WITH=deepspeed is not a launcher"),
        ({"PBS_JOBID": "5.pbs", "LAUNCH_WITH": "torchrun"}, "error: PBS_NODEFILE is not set although PBS_JOBID is"),
    ],
)  # fmt: skip
def test_bad_variables_stop_before_launch(tmp_path: Path, env: dict, message: str) -> None:
    proc = _bash(tmp_path, _env(tmp_path, **env))
    assert proc.returncode == 2
    assert proc.stderr.strip() == message or (proc.stderr.count("\n") == 1 and proc.stderr.startswith(message)), (
        proc.stderr
    )
    assert "launch with" not in proc.stdout and not list(tmp_path.glob("*/"))  # no run folder, no checkpoints


def test_extra_arguments_reach_pretrain_and_are_checked(tmp_path: Path) -> None:
    proc = _bash(tmp_path, _env(tmp_path, DRY_RUN="1", RUN_DIR="r", NGPU_PER_HOST="1"), "--no-such-flag")
    assert proc.returncode == 2 and "error: unrecognized arguments: --no-such-flag" in proc.stderr
    usage = _bash(tmp_path, _env(tmp_path), "--help")
    assert usage.returncode == 0 and alcf_env.variables_markdown() in usage.stdout and not list(tmp_path.glob("*/"))


# ---- real runs ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """`bash train_alcf.sh` with no variables at all, on this CPU (torchrun over the cores, gloo)."""
    tmp = tmp_path_factory.mktemp("alcf_default")
    proc = _bash(tmp, _env(tmp), timeout=300)
    return tmp, proc


def test_default_run_end_to_end(default_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    tmp, proc = default_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(_losses(proc.stdout)) == list(range(1, 51)), proc.stdout[-3000:] + proc.stderr[-2000:]
    runs = list((tmp / "runs" / "alcf").iterdir())
    assert len(runs) == 1
    run = runs[0]
    for name in (".env", "config.json", "launch.sh", "output.log", "train.log"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    env = alcf_env.read_dotenv(run / ".env")
    assert env["MODEL_ARCH"] == "tiny" and env["TRAIN_ITERS"] == "50" and env["WORLD_SIZE"] == env["NGPU_PER_HOST"]
    assert "iter 50/50" in (run / "output.log").read_text() and "iter 50/50" in (run / "train.log").read_text()
    assert shlex.join(_command(proc.stdout)) in (run / "launch.sh").read_text()
    ckpt = tmp / "checkpoints" / "tiny_nl2_hs64_seq128_builtin"  # no world size in the name
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "50"


def _cpt_list(tmp: Path, default: Path) -> Path:
    """A data list over the built-in corpus the default run built (the byte-level Python standard library)."""
    prefix = default / "data_cache" / "builtin" / "stdlib_byte_text_document"
    assert prefix.with_suffix(".idx").is_file()
    data_list = tmp / "mix.txt"
    data_list.write_text(f"1.0 {prefix} stdlib\n")
    return data_list


def test_cpt_command_universal_checkpoint_finetune(
    default_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    """The issue's example: DATA_FILE_LIST LOAD TRAIN_TOKENS GRAD_ACC_STEPS LR LR_WARMUP_FRACTION ... --finetune."""
    default, first = default_run
    assert first.returncode == 0
    load = default / "checkpoints" / "tiny_nl2_hs64_seq128_builtin"
    env = _env(tmp_path, DATA_FILE_LIST=str(_cpt_list(tmp_path, default)), LOAD=str(load), TRAIN_TOKENS=str(10 * 1024),
               GRAD_ACC_STEPS="2", LR="0.0002", LR_WARMUP_FRACTION="0.01", TOKENIZER_TYPE="ByteTokenizer",
               NGPU_PER_HOST="2", RUN_DIR="run")  # fmt: skip
    proc = _bash(tmp_path, env, "--universal-checkpoint", "--finetune", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out, tail = proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "TRAIN_ITERS=10 = ceil(TRAIN_TOKENS 10,240 / (SEQ 128 x GLOBAL_BATCH 8))" in out, tail  # 2 x 2 x DP 2
    assert "fine-tuning from the weights of" in out and sorted(_losses(out)) == list(range(1, 11)), tail
    fresh, tuned = _losses(first.stdout)[1], _losses(out)[1]
    assert tuned < fresh - 0.3, (tuned, fresh)  # starts from the trained weights, not from scratch
    saved = tmp_path / "checkpoints" / "tiny_nl2_hs64_seq128_mix"
    assert (saved / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    cfg = (tmp_path / "run" / "config.json").read_text()
    assert '"universal_checkpoint": true' in cfg and '"lr_warmup_fraction": 0.01' in cfg and '"finetune": true' in cfg


def _wait_for_iteration(proc: subprocess.Popen, log: Path, iteration: int) -> None:
    """Returns once train_alcf.sh's run log shows `iteration` (or the launch ended, or 240 s passed), so a signal
    sent next reaches a run that is training."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and re.search(rf"^iter {iteration}/", log.read_text(), re.M):
            return
        time.sleep(0.2)


def test_cpt_under_mpirun_stops_cleanly_on_the_walltime_signal(
    default_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    """The same command inside a (faked, one-node) PBS job with Open MPI: `mpirun -np 2` with the job's host file;
    SIGUSR1 to train_alcf.sh (what the job templates send before the walltime) saves a checkpoint and exits 0."""
    launch = mpirun(2)
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout if launch else ""
    if "Open MPI" not in version:
        pytest.skip("Open MPI's mpirun is not installed (apt-get install -y openmpi-bin libopenmpi-dev)")
    default, first = default_run
    assert first.returncode == 0
    load = default / "checkpoints" / "tiny_nl2_hs64_seq128_builtin"
    env = _env(tmp_path, DATA_FILE_LIST=str(_cpt_list(tmp_path, default)), LOAD=str(load), TRAIN_TOKENS="1B",
               GRAD_ACC_STEPS="2", LR="0.0002", LR_WARMUP_FRACTION="0.01", TOKENIZER_TYPE="ByteTokenizer",
               NGPU_PER_HOST="2", RUN_DIR="run", SAVE="ckpt", PBS_JOBID="31337.fake-pbs",
               PBS_NODEFILE=_nodefile(tmp_path, [os.uname().nodename]), PBS_O_WORKDIR=str(tmp_path))  # fmt: skip
    env.update({k: v for k, v in launch[1].items() if k.startswith("OMPI_MCA")})
    args = ["bash", str(TRAIN), "--universal-checkpoint", "--finetune"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    _wait_for_iteration(proc, tmp_path / "run" / "output.log", 3)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    command = _command(out)
    assert command[:7] == ["mpiexec", "-np", "2", "--map-by", "ppr:2:node", "--hostfile", env["PBS_NODEFILE"]]
    assert "caught SIGUSR1; sending SIGUSR1 to the launcher" in out, out[-3000:] + err[-2000:]
    assert "fine-tuning from the weights of" in out and "exiting at iteration" in out, out[-3000:] + err[-2000:]
    stopped = int(re.search(r"exiting at iteration (\d+)", out).group(1))  # type: ignore[union-attr]
    assert stopped >= 3
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)
    assert alcf_env.progress(tmp_path / "run") == (0, stopped, math.ceil(1e9 / (128 * 8)))


# ---- job templates -------------------------------------------------------------------------------------------------

STUB = """
set -u
mkdir -p "$RUN_DIR" "$STUB_SAVE"
printf 'SAVE=%s\\nTRAIN_ITERS=%s\\nSTART_ITERATION=%s\\n' "$STUB_SAVE" 10 "${STUB_START:-0}" > "$RUN_DIR/.env"
echo "${STUB_LATEST:-4}" > "$STUB_SAVE/latest_checkpointed_iteration.txt"
if [[ -n "${STUB_WAIT:-}" ]]; then
  trap 'kill ${sp:-} 2>/dev/null; echo got-USR1 >> "$STUB_LOG"; exit 0' USR1
fi
echo "started $*" >> "$STUB_LOG"
if [[ -n "${STUB_WAIT:-}" ]]; then
  sleep "$STUB_WAIT" & sp=$!
  wait $sp
  echo no-signal >> "$STUB_LOG"
fi
exit "${STUB_RC:-0}"
"""
SUBMIT = (
    'echo "$(basename "$0") $* CONTINUE=${CONTINUE:-} CHAIN_INDEX=${CHAIN_INDEX:-} RUN_DIR=${RUN_DIR:-}" '
    '>> "$SUBMIT_LOG"'
)


def _template_env(tmp: Path, **extra: str) -> dict[str, str]:
    """train_alcf.sh replaced by a stub that writes a run folder with iteration STUB_LATEST of 10."""
    bin_dir = _fake(tmp, "qsub", SUBMIT)
    _fake(tmp, "sbatch", SUBMIT)
    stub = tmp / "stub.sh"
    stub.write_text(STUB)
    paths = {"STUB_LOG": "stub.log", "STUB_SAVE": "ckpt", "SUBMIT_LOG": "submitted", "RUN_DIR": "run"}
    env = _env(tmp, PATH=f"{bin_dir}:{os.environ['PATH']}", TRAIN_SCRIPT=str(stub), **extra)
    return {**env, **{k: str(tmp / v) for k, v in paths.items()}}


def _pbs_env(tmp: Path, **extra: str) -> dict[str, str]:
    return _template_env(tmp, PBS_JOBID="100.pbs", PBS_O_WORKDIR=str(ROOT), PBS_NODEFILE=_nodefile(tmp, ["n0", "n1"]),
                         **extra)  # fmt: skip


def test_pbs_template_signals_before_the_walltime(tmp_path: Path) -> None:
    env = _pbs_env(tmp_path, WALLTIME="00:01:02", SIGNAL_MARGIN_MINS="1", STUB_WAIT="60", STUB_LATEST="10")
    start = time.monotonic()
    proc = _bash(tmp_path, env, "--finetune", script=ROOT / "ALCF" / "submit" / "pbs.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 1.5 < time.monotonic() - start < 30  # 62 s walltime - 60 s margin
    assert (tmp_path / "stub.log").read_text() == "started --finetune\ngot-USR1\n"
    assert "asking the run to save and exit" in proc.stdout and not (tmp_path / "submitted").exists()


@pytest.mark.parametrize(
    ("stub", "submitted", "says"),
    [
        ({"STUB_LATEST": "4"}, True, "chain: iteration 4 of 10; submitting job 2"),
        ({"STUB_LATEST": "10"}, False, "chain: done, iteration 10 of 10"),
        ({"STUB_LATEST": "4", "STUB_RC": "1"}, False, "chain: the run failed (status 1) at iteration 4 of 10"),
        ({"STUB_LATEST": "4", "STUB_START": "4"}, False, "chain: no progress in this job (iteration 4)"),
        ({"STUB_LATEST": "4", "CHAIN_INDEX": "20"}, False, "chain: CHAIN_MAX=20 jobs reached"),
    ],
)
def test_pbs_chain_resubmits_until_the_run_length(tmp_path: Path, stub: dict, submitted: bool, says: str) -> None:
    env = _pbs_env(tmp_path, CHAIN="1", QSUB_ARGS="-A proj -q prod", **stub)
    proc = _bash(tmp_path, env, script=ROOT / "ALCF" / "submit" / "pbs.sh")
    assert proc.returncode == int(stub.get("STUB_RC", "0")) and says in proc.stdout, proc.stdout + proc.stderr
    if submitted:
        line = f"qsub -V -A proj -q prod {ROOT}/ALCF/submit/pbs.sh CONTINUE=1 CHAIN_INDEX=2 RUN_DIR=\n"
        assert (tmp_path / "submitted").read_text() == line
    else:
        assert not (tmp_path / "submitted").exists()


def test_slurm_template_forwards_the_signal_and_chains(tmp_path: Path) -> None:
    env = _template_env(tmp_path, SLURM_JOB_ID="55", SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(ROOT), CHAIN="1",
                        STUB_WAIT="60")  # fmt: skip
    script = ROOT / "ALCF" / "submit" / "slurm.sh"
    proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)  # fmt: skip
    deadline = time.monotonic() + 30
    while not (tmp_path / "stub.log").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@600` sends
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert (tmp_path / "stub.log").read_text() == "started \ngot-USR1\n"
    assert "caught SIGUSR1" in out
    submitted = (tmp_path / "submitted").read_text()
    assert submitted == f"sbatch {ROOT}/ALCF/submit/slurm.sh CONTINUE=1 CHAIN_INDEX=2 RUN_DIR=\n"


@pytest.mark.slow
def test_resume_through_a_universal_checkpoint_at_another_layout(
    default_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    """ALCF/notes/universal_checkpoints.md: to-universal, then LOAD=UNIV at TP=2 with the same global batch."""
    default, first = default_run
    assert first.returncode == 0
    ckpt = default / "checkpoints" / "tiny_nl2_hs64_seq128_builtin"
    convert = [PY, str(ROOT / "tools" / "convert_checkpoint.py"), "to-universal", "--load", str(ckpt), "--save",
               str(tmp_path / "univ")]  # fmt: skip
    assert subprocess.run(convert, capture_output=True, text=True, env=_env(tmp_path)).returncode == 0
    env = _env(tmp_path, LOAD=str(tmp_path / "univ"), SAVE="ckpt", TP="2", NGPU_PER_HOST="2", TRAIN_ITERS="53",
               GLOBAL_BATCH=alcf_env.read_dotenv(next((default / "runs" / "alcf").iterdir()) / ".env")["GLOBAL_BATCH"],
               OVERRIDE_CKPT_OPT_PARAM="1", RUN_DIR="run", DATA_CACHE_PATH=str(default / "data_cache"))  # fmt: skip
    proc = _bash(tmp_path, env, "--universal-checkpoint", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loaded universal checkpoint" in proc.stdout and sorted(_losses(proc.stdout)) == [51, 52, 53]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "53"


# A stand-in for srun where Slurm is not installed: starts --ntasks tasks of the command on this machine with
# Slurm's task variables (megatron_ext/distributed.py reads them) and forwards SIGUSR1 to them, as srun does; exits
# with the worst task status. It tests our side (train_alcf.sh's forwarding, the ranks under Slurm's variables),
# not srun itself.
FAKE_SRUN = """
n=1
while [[ "$1" == --* ]]; do
  case "$1" in --ntasks) n="$2"; shift 2 ;; --*=*) shift ;; *) shift 2 ;; esac
done
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$n SLURM_NTASKS_PER_NODE=$n "$@" &
  pids+=($!)
done
trap 'echo "srun: forwarding SIGUSR1"; kill -USR1 "${pids[@]}"' USR1
rc=0
for pid in "${pids[@]}"; do
  while :; do
    if wait "$pid"; then s=0; else s=$?; fi
    if ((s > 128)) && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  ((s > rc)) && rc=$s
done
exit $rc
"""


@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec", "srun"])
def test_sigterm_to_train_alcf_sh_alone_saves_and_exits_0(
    default_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, launcher: str
) -> None:
    """A SIGTERM to the script's process alone (not its group), as a batch system may send: torchrun got it and
    ended in its SignalException traceback with status 1 (after the ranks had saved); mpiexec (Open MPI here) and
    srun (a stand-in, FAKE_SRUN) get SIGUSR1, which they forward to the ranks."""
    default, first = default_run
    assert first.returncode == 0
    env = _env(tmp_path, SAVE="ckpt", NGPU_PER_HOST="2", TRAIN_ITERS="1000", RUN_DIR="run", LAUNCH_WITH=launcher,
               DATA_CACHE_PATH=str(default / "data_cache"))  # fmt: skip
    if launcher == "mpiexec":
        launch = mpirun(2)
        if launch is None:
            pytest.skip("no mpirun/mpiexec installed")
        env.update({k: v for k, v in launch[1].items() if k.startswith("OMPI_MCA")})
    if launcher == "srun":
        env["PATH"] = f"{_fake(tmp_path, 'srun', FAKE_SRUN)}:{env['PATH']}"
        env["MASTER_PORT"] = str(distributed.free_port())
    proc = subprocess.Popen(["bash", str(TRAIN)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)  # fmt: skip
    _wait_for_iteration(proc, tmp_path / "run" / "output.log", 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    tail = out[-3000:] + err[-3000:]
    assert proc.returncode == 0 and out.splitlines()[-1] == "train_alcf.sh: launcher exited with status 0", tail
    assert "Traceback" not in out + err and "SignalException" not in out + err, tail
    forwarded = "SIGTERM to the ranks (pids " if launcher == "torchrun" else "SIGUSR1 to the launcher (pid "
    assert f"caught SIGTERM; sending {forwarded}" in out, tail
    stopped = int(re.search(r"exiting at iteration (\d+)", out).group(1))  # type: ignore[union-attr]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)
    assert (tmp_path / "ckpt" / f"iter_{stopped:07d}" / "metadata.json").is_file()
