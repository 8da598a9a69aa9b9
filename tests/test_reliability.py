"""Bad inputs and faults that must end in one `error:` line naming the culprit and the fix, with nothing lost: the
--nan-policy advice, --load of what is not a checkpoint, full and read-only disks, and a failed run that leaves its
run folder as it was."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_ext.config import parse_args
from megatron_ext.training.checkpointing import CheckpointError, find_loadable
from megatron_ext.training.loop import TrainingStopped, TrainState, check_non_finite


@pytest.mark.parametrize(
    ("flags", "advice"),
    [
        (["--nan-policy", "stop"], "use --nan-policy skip."),
        (["--max-skipped-steps", "2"], "raise --max-skipped-steps (2)."),
    ],
)
def test_nan_stop_advises_a_change_not_the_policy_in_effect(flags: list[str], advice: str) -> None:
    """Under skip, a run stopped by --max-skipped-steps was told to 'use --nan-policy skip', which it did."""
    tr = SimpleNamespace(cfg=parse_args(flags), state=TrainState(iteration=7, skipped_in_a_row=3))
    with pytest.raises(TrainingStopped) as e:
        check_non_finite(tr, {"skipped": 1.0, "lm_loss": float("nan"), "grad_norm": float("nan")})  # type: ignore[arg-type]
    assert str(e.value).startswith("iteration 7: non-finite loss nan or grad norm nan (3 in a row)")
    assert str(e.value).endswith(f"Lower --lr, check the data, or {advice}") and "\n" not in str(e.value)


# ---- --load of what is not a checkpoint ---------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "--num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 32 --micro-batch-size 2 --lr 1e-3 "
    "--log-interval 1 --eval-iters 0 --train-iters 4"
).split()


def pretrain(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(ROOT / "pretrain_gpt.py"), *TINY, "--data-cache-path", str(cwd / "cache"), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with checkpoints at iterations 2 and 4."""
    tmp = tmp_path_factory.mktemp("load")
    proc = pretrain(tmp, "--save", str(tmp / "ckpt"), "--save-interval", "2")
    assert proc.returncode == 0 and (tmp / "ckpt" / "iter_0000002").is_dir(), proc.stderr[-3000:]
    return tmp


def test_load_of_an_iteration_folder_resumes_that_iteration(saved: Path) -> None:
    """It started from iteration 0 with 'no checkpoint yet'."""
    proc = pretrain(saved, "--load", str(saved / "ckpt" / "iter_0000002"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {saved / 'ckpt' / 'iter_0000002'} at iteration 2\n" in proc.stdout
    assert re.findall(r"^iter (\d+)/4 ", proc.stdout, re.M) == ["3", "4"]


def test_load_of_a_folder_without_a_checkpoint_is_one_error_line(saved: Path) -> None:
    """A folder of other files (a typo, another framework's checkpoint) started a fresh run silently."""
    foreign = saved / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"\0" * 8)
    before = checksums(saved / "ckpt")
    proc = pretrain(saved, "--load", str(foreign), "--save", str(saved / "ckpt"))
    expected = f"error: --load {foreign} holds weights.bin but no checkpoint; expected iter_NNNNNNN folders"
    assert (proc.returncode, proc.stdout, proc.stderr.count("\n")) == (2, "", 1), proc.stderr[-3000:]
    assert proc.stderr.startswith(expected) and "Traceback" not in proc.stderr
    assert checksums(saved / "ckpt") == before  # config.json too: it was rewritten before --load was read


def test_what_counts_as_a_checkpoint_an_empty_folder_or_neither(tmp_path: Path) -> None:
    run = tmp_path / "run"  # our own run files only: LOAD=SAVE restarts before the first checkpoint
    (run / "tensorboard").mkdir(parents=True)
    (run / "iter_0000003.tmp").mkdir()
    (run / "config.json").write_text("{}")
    (run / "train.log").write_text("iter 1\n")
    assert find_loadable(run) == (None, []) and find_loadable(tmp_path / "new") == (None, [])
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"^--load {hf} is a Hugging Face model; convert it first: "
                       f"tools/convert_checkpoint.py from-hf --load {hf} --save NEW, then --load NEW"):  # fmt: skip
        find_loadable(hf)
    step = tmp_path / "ckpt" / "iter_0000002"
    step.mkdir(parents=True)
    (step / "metadata.json").write_text("{}")
    (step / "common.pt").write_bytes(b"")
    assert find_loadable(step) == find_loadable(step.parent, 2) == (step, [])
    with pytest.raises(CheckpointError, match="is iteration 2, --ckpt-step 3: give one of them"):
        find_loadable(step, 3)
