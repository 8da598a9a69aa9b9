"""pretrain_gpt.py end to end: logs, config.json, tensorboard, checkpoints, resume, batch-size ramp-up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launchers import mpirun

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2 "
    "--lr 1e-3 --log-interval 1 --eval-interval 4 --eval-iters 1 --split 90,10,0"
).split()


def _train(tmp: Path, *args: str, port: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_PORT": str(port)}
    argv = [sys.executable, str(ROOT / "pretrain_gpt.py"), *TINY, "--data-cache-path", str(tmp / "data"), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _losses(log: str) -> dict[int, float]:
    return {int(i): float(x) for i, x in re.findall(r"^iter (\d+)/\d+ \| loss ([0-9.]+)", log, re.M)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | Path]:
    tmp = tmp_path_factory.mktemp("cli")
    ckpt = tmp / "ckpt"
    whole = _train(tmp, "--train-iters", "8", port=29541)
    first = _train(tmp, "--train-iters", "8", "--exit-interval", "4", "--save", str(ckpt), "--tensorboard-dir",
                   str(tmp / "tb"), port=29542)  # fmt: skip
    second = _train(tmp, "--train-iters", "8", "--load", str(ckpt), "--save", str(ckpt), port=29543)
    return {"tmp": tmp, "ckpt": ckpt, "whole": whole, "first": first, "second": second}


def test_loss_falls_and_validation_is_logged(runs: dict) -> None:
    losses = _losses(runs["whole"])
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]
    assert re.search(r"^validation at iter 4 \| [a-z0-9_-]+ \| loss [0-9.]+ \| ppl", runs["whole"], re.M)
    assert "MFU n/a" in runs["whole"] and "tokens/s" in runs["whole"]


def test_exit_interval_saves_and_resume_continues_exactly(runs: dict) -> None:
    ckpt: Path = runs["ckpt"]
    assert "exiting at iteration 4" in runs["first"] and (ckpt / "iter_0000004").is_dir()
    assert "resumed from" in runs["second"] and (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    whole, second = _losses(runs["whole"]), _losses(runs["second"])
    assert sorted(second) == [5, 6, 7, 8]
    for i in second:  # fp32 on CPU: the resumed run is the uninterrupted run
        assert second[i] == pytest.approx(whole[i], rel=1e-6), (i, second[i], whole[i])


def test_run_metadata_and_tensorboard(runs: dict) -> None:
    ckpt: Path = runs["ckpt"]
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["model"]["hidden_size"] == 64 and saved["training"]["global_batch_size"] == 2
    assert "iter 4/8" in (ckpt / "train.log").read_text()
    assert list((runs["tmp"] / "tb").glob("events.out.tfevents.*"))
    assert not list(ckpt.glob("*.tmp")), "a temporary checkpoint folder was left behind"


def test_batch_size_rampup(tmp_path: Path) -> None:
    out = _train(tmp_path, "--rampup-batch-size", "2", "2", "8", "--global-batch-size", "6", "--train-samples", "30",
                 "--eval-iters", "0", port=29544)  # fmt: skip
    batches = [int(b) for b in re.findall(r"\| batch (\d+) \|", out)]
    assert batches[0] == 2 and 4 in batches and batches[-1] == 6 and batches == sorted(batches), batches
    assert sum(batches) >= 30


def test_mpirun_two_ranks_tensor_parallel(tmp_path: Path) -> None:
    """The real MPI launch path: ranks from Open MPI's environment, rendezvous port broadcast over mpi4py."""
    launch = mpirun(2)
    if launch is None:
        pytest.skip("mpirun is not on PATH (apt-get install -y openmpi-bin libopenmpi-dev)")
    cmd, env = launch
    env["PYTHONPATH"] = str(ROOT)
    argv = [*cmd, sys.executable, str(ROOT / "pretrain_gpt.py"), *TINY, "--data-cache-path", str(tmp_path / "data"),
            "--tensor-model-parallel-size", "2", "--train-iters", "3", "--eval-iters", "0"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sorted(_losses(proc.stdout)) == [1, 2, 3], proc.stdout
