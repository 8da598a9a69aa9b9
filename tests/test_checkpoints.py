"""Checkpoints that never lose work: damaged checkpoints are detected and skipped, retention never deletes the
newest, --no-load-optim / --finetune do exactly what they say, and SIGTERM saves at the next step boundary."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launchers import clean_env

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2 --lr 1e-3 "
    "--log-interval 1 --eval-iters 0 --hidden-dropout 0 --attention-dropout 0 --lr-decay-style constant"
).split()


def _env() -> dict[str, str]:
    return {**clean_env(), "PYTHONPATH": str(ROOT)}


def _argv(tmp: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "pretrain_gpt.py"), *TINY, "--data-cache-path", str(tmp / "data"), *args]


def _train(tmp: Path, *args: str) -> str:
    proc = subprocess.run(_argv(tmp, *args), capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _losses(log: str) -> dict[int, float]:
    return {int(i): float(x) for i, x in re.findall(r"^iter (\d+)/\d+ \| loss ([0-9.]+)", log, re.M)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[int, float]]:
    tmp = tmp_path_factory.mktemp("ckpt")
    ckpt = tmp / "ckpt"
    log = _train(tmp, "--train-iters", "6", "--save", str(ckpt), "--save-interval", "2", "--keep-last-checkpoints", "2")
    return tmp, ckpt, _losses(log)


def test_retention_keeps_the_newest(trained: tuple) -> None:
    _, ckpt, _ = trained
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000004", "iter_0000006"]
    assert (ckpt / "iter_0000006" / "manifest.json").is_file()


def test_damaged_latest_falls_back_and_no_load_optim_loads_only_the_rest(trained: tuple) -> None:
    tmp, ckpt, whole = trained
    biggest = max((f for f in (ckpt / "iter_0000006").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    with open(biggest, "r+b") as f:  # a truncated write, as after a full disk or a killed copy
        f.truncate(biggest.stat().st_size // 2)
    log = _train(tmp, "--train-iters", "6", "--load", str(ckpt))
    assert "iter_0000006 is unusable" in log and "resumed from" in log and "at iteration 4" in log
    resumed = _losses(log)
    assert resumed[5] == pytest.approx(whole[5], rel=1e-6) and resumed[6] == pytest.approx(whole[6], rel=1e-6)

    fresh = _losses(_train(tmp, "--train-iters", "6", "--load", str(ckpt), "--no-load-optim"))
    assert fresh[5] == pytest.approx(whole[5], rel=1e-6)  # weights and data position were loaded
    assert fresh[6] != pytest.approx(whole[6], rel=1e-6)  # the Adam moments were not


def test_another_model_or_a_file_as_folder_is_one_line_error(trained: tuple) -> None:
    tmp, ckpt, _ = trained
    afile = tmp / "notes.txt"
    afile.write_text("keep me\n")
    cases = [
        (("--load", str(ckpt), "--hidden-size", "128"), "Global shape mismatch"),
        (("--save", str(afile)), f"--save {afile}: is a file; expected a folder"),
        (("--load", str(afile)), f"--load {afile}: is a file; expected a folder"),
    ]
    for args, message in cases:
        proc = subprocess.run(
            _argv(tmp, "--train-iters", "6", *args), capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp
        )
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    assert afile.read_text() == "keep me\n"


def test_finetune_takes_weights_only(trained: tuple) -> None:
    tmp, ckpt, whole = trained
    log = _train(tmp, "--train-iters", "2", "--load", str(ckpt), "--finetune")
    assert "fine-tuning from the weights of" in log
    losses = _losses(log)
    assert sorted(losses) == [1, 2] and losses[1] < whole[1]  # iteration restarts; the weights are trained ones


def test_sigterm_saves_at_the_step_boundary_and_exits(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    args = _argv(tmp_path, "--train-iters", "100000", "--save", str(ckpt), "--exit-signal-handler")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    deadline = time.monotonic() + 240
    assert proc.stdout is not None
    for line in proc.stdout:  # wait for training to be under way
        if line.startswith("iter 2/") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    stopped = int(re.search(r"exiting at iteration (\d+)", out).group(1))  # type: ignore[union-attr]
    assert stopped >= 2 and (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)
    assert (ckpt / f"iter_{stopped:07d}" / "manifest.json").is_file()


def test_exit_duration_saves_and_exits(tmp_path: Path) -> None:
    """--exit-duration-in-mins: the job's own clock, for batch systems that send no warning signal."""
    ckpt = tmp_path / "ckpt"
    out = _train(tmp_path, "--train-iters", "100000", "--save", str(ckpt), "--exit-duration-in-mins", "0.0001")
    assert "exiting at iteration 1 " in out
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (ckpt / "iter_0000001" / "manifest.json").is_file()


def test_record_crc_is_off_only_while_saving(tmp_path: Path) -> None:
    """Checkpoint writes (ours and universal files) skip torch.save's record CRC (nothing reads it); every other
    torch.save keeps it, and the files load."""
    import zipfile

    import torch

    from megatron_ext.convert import universal
    from megatron_ext.training.layout import without_record_crc

    assert torch.serialization.get_crc32_options()
    with without_record_crc():
        assert not torch.serialization.get_crc32_options()
    assert torch.serialization.get_crc32_options()
    with pytest.raises(RuntimeError), without_record_crc():
        raise RuntimeError("a failed save")
    assert torch.serialization.get_crc32_options()

    tensor = torch.arange(1000, dtype=torch.float32)
    universal._save_tensor(tmp_path / "u.pt", tensor)
    torch.save(tensor, tmp_path / "plain.pt")
    assert torch.serialization.get_crc32_options()
    assert torch.equal(torch.load(tmp_path / "u.pt")["param"], tensor)
    with zipfile.ZipFile(tmp_path / "u.pt") as z:  # testzip names the first member whose CRC does not match
        assert z.testzip() is not None
    with zipfile.ZipFile(tmp_path / "plain.pt") as z:
        assert z.testzip() is None
