"""bench/cpt_replay.py --quick: every arm trains the same budget from the same stage-0 checkpoint (read from the
runs' own logs), and the printed arm lines and recovery figures are the ones the logged validation losses give."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)  # about 40 s on 2 idle cores; runs queue behind other work on a shared machine
ARMS = ("naive", "replay-5%", "replay-25%", "buffer-mix", "constant-lr", "rewarm-cooled", "cooldown-mix")
STAGE0, BUDGET, COOLDOWN = 8, 8, 4  # the bench's --quick lengths
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_", "OMPI_COMM_WORLD_", "PMI_", "PALS_")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("cpt_replay") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_VARS) and not k.startswith("SLURM_")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cpt_replay.py"), "--quick", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc.stdout


def _log(run_dir: Path, run: str) -> str:
    return (run_dir / "logs" / "s1" / f"{run}.log").read_text()


def _flag(log: str, flag: str) -> str:
    return re.search(rf"^\$ .* {flag} (\S+)", log, re.M).group(1)


def _resumed(log: str) -> tuple[str, int] | None:
    """The checkpoint folder a run loaded and its iteration, as the run printed them."""
    m = re.search(r"^resumed from (\S+)/iter_\d+ at iteration (\d+)$", log, re.M)
    return (m.group(1), int(m.group(2))) if m else None


def _valid(log: str, corpus: str) -> dict[int, float]:
    return {
        int(i): float(x) for i, x in re.findall(rf"^validation at iter (\d+) \| {corpus} \| loss ([0-9.]+)", log, re.M)
    }


def _last_iteration(log: str) -> int:
    return max(int(i) for i in re.findall(r"^iter (\d+)/\d+ \|", log, re.M))


def test_every_arm_trains_the_same_budget_from_stage0(bench: tuple[Path, str]) -> None:
    run_dir, _ = bench
    stage0 = _log(run_dir, "stage0")
    assert _resumed(stage0) is None and _last_iteration(stage0) == STAGE0
    assert _resumed(_log(run_dir, "cooled")) == ("ckpt/s1/stage0", STAGE0)
    assert _resumed(_log(run_dir, "buffer-stage1")) == ("ckpt/s1/stage0", STAGE0)
    starts = {
        "rewarm-cooled": ("ckpt/s1/cooled", STAGE0 + COOLDOWN),
        "buffer-mix": ("ckpt/s1/buffer-stage1", STAGE0 + BUDGET),
    }
    shapes = set()
    for arm in ARMS:
        log = _log(run_dir, arm)
        folder, iteration = _resumed(log)
        assert (folder, iteration) == starts.get(arm, ("ckpt/s1/stage0", STAGE0)), arm
        assert _last_iteration(log) - iteration == BUDGET, arm  # the same number of steps ...
        shapes.add((_flag(log, "--global-batch-size"), _flag(log, "--seq-length")))  # ... of the same size
    assert len(shapes) == 1
    # The schedules are the arms': rewarm from 0, the constant LR kept, the cooldown ending at 0.
    assert "restarting the LR schedule" in _log(run_dir, "naive")
    assert "following the checkpoint's schedule" in _log(run_dir, "constant-lr")
    assert re.search(rf"^iter {STAGE0 + BUDGET}/\d+ \| loss \S+ \| lr 0\.000e\+00", _log(run_dir, "cooldown-mix"), re.M)
    mixes = {arm: _flag(_log(run_dir, arm), "--data-file-list") for arm in ARMS}
    assert mixes["naive"] == "naive.txt" and mixes["replay-5%"] == mixes["constant-lr"] == "replay5.txt"
    assert "alpha_0=0.33 alpha_D=0.33 alpha_B=0.34" in (run_dir / "logs" / "plan_stage2_buffer.log").read_text()


def test_printed_numbers_come_from_the_logged_losses(bench: tuple[Path, str]) -> None:
    run_dir, out = bench
    d0_start = _valid(_log(run_dir, "stage0"), "d0")[STAGE0]
    rise = {}
    for arm in ARMS:
        log = _log(run_dir, arm)
        end = _last_iteration(log)
        rise[arm] = _valid(log, "d0")[end] - d0_start
        d1 = _valid(log, "d1")[end]
        line = re.search(rf"^arm {re.escape(arm)}: D1 loss ([0-9.]+), D0 rise ([-+0-9.]+)$", out, re.M)
        assert line, out
        assert float(line.group(1)) == pytest.approx(d1, abs=1e-4) and float(line.group(2)) == pytest.approx(
            rise[arm], abs=1e-4
        )
    for arm, label in (("replay-5%", "5%"), ("replay-25%", "25%")):
        printed = re.search(rf"^replay {label} recovers ([-0-9.]+) of naive forgetting", out, re.M)
        assert printed, out
        assert float(printed.group(1)) == pytest.approx(1 - rise[arm] / rise["naive"], abs=0.006)
    assert (run_dir / "cpt_replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replot_gives_the_same_report(bench: tuple[Path, str]) -> None:
    run_dir, out = bench
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cpt_replay.py"), "--replot", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = [line for line in out.splitlines() if line.startswith(("arm ", "replay "))]
    assert report and report == [line for line in proc.stdout.splitlines() if line.startswith(("arm ", "replay "))]
