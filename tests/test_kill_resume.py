"""kill -9 at random points of a run with frequent saves, resumed until done, ends exactly like an uninterrupted run.

CI runs two kills; `pytest -m slow tests/test_kill_resume.py` runs a longer series.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launchers import clean_env

ROOT = Path(__file__).resolve().parents[1]
ITERS = 8
TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2 --lr 1e-3 "
    f"--log-interval 1 --eval-iters 0 --train-iters {ITERS}"
).split()  # dropout on: the RNG state must survive the kills too


def _env() -> dict[str, str]:
    return {**clean_env(), "PYTHONPATH": str(ROOT)}


def _argv(tmp: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "pretrain_gpt.py"), *TINY, "--data-cache-path", str(tmp / "data"), *args]


def _final_loss(log: str) -> float:
    return float(re.findall(rf"^iter {ITERS}/{ITERS} \| loss ([0-9.]+)", log, re.M)[-1])


def _kill_and_resume(tmp: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    whole = subprocess.run(_argv(tmp, "--save", str(tmp / "whole")), capture_output=True, text=True, env=_env(),
                           timeout=600, cwd=tmp)  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-3000:]
    ckpt = tmp / "killed"
    args = _argv(tmp, "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2", "--keep-last-checkpoints", "2")
    done_kills, log = 0, ""
    while True:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(), cwd=tmp)
        assert proc.stdout is not None
        if done_kills < kills:
            wanted = rng.randint(1, 4)  # iterations to let pass (a save may be in flight when the kill lands)
            seen = 0
            for line in proc.stdout:
                seen += line.startswith("iter ")
                if seen >= wanted:
                    time.sleep(rng.uniform(0, 1.5))
                    break
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                done_kills += 1
            proc.wait(timeout=60)
            continue
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0
        break
    assert _final_loss(log) == pytest.approx(_final_loss(whole.stdout), rel=1e-6)
    assert not list(ckpt.glob("*.tmp")), "a save cleans up the temporary folders of saves that were killed"


def test_two_kills(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, kills=2, seed=1)


@pytest.mark.slow
def test_many_kills(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, kills=8, seed=2)
