"""Continual pre-training end to end, as in ALCF/notes/cpt.md at toy scale: two domains of the built-in corpus
(D0 = top-level stdlib modules, D1 = email + asyncio, each with a held-out part), stage 0 on D0 saved at peak
LR, then cpt_plan's weak-shift mix for stage 1, trained from stage 0's checkpoint with a rewarmed schedule and
one validation loss per domain (D0's is the forgetting monitor)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.data.builtin_corpus import iter_documents, stdlib_files

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2 "
    "--hidden-dropout 0 --attention-dropout 0 --log-interval 1 --eval-iters 2"
).split()
LR, WARMUP, EVAL_INTERVAL = 1e-3, 4, 4
STAGE0_ITERS, STAGE1_ITERS = 8, 8
SCHEDULE = ["--lr", str(LR), "--lr-decay-style", "constant", "--lr-warmup-iters", str(WARMUP)]
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_", "OMPI_COMM_WORLD_", "PMI_", "PALS_")


def _env() -> dict[str, str]:
    """No launcher variables: each child trains as one process on a free port, whoever runs pytest."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_VARS) and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(cwd: Path, script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=_env(), timeout=300, cwd=cwd
    )
    assert proc.returncode == 0, f"{script} {' '.join(args)}\n{proc.stdout[-3000:]}{proc.stderr[-4000:]}"
    return proc.stdout


def _make_domains(tmp: Path) -> None:
    """D0.txt, D1.txt and their *_valid.txt lists; the last 10% of each domain's modules are held out."""
    docs = list(iter_documents(stdlib_files()))
    domains = {
        "d0": [text for rel, text in docs if "/" not in rel],
        "d1": [text for rel, text in docs if rel.startswith(("email/", "asyncio/"))],
    }
    (tmp / "raw").mkdir()
    for name, texts in domains.items():
        cut = len(texts) * 9 // 10
        for part, chunk, folder in (("", texts[:cut], "data"), ("_valid", texts[cut:], "valid")):
            jsonl = tmp / "raw" / f"{name}{part}.jsonl"
            jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
            prefix = tmp / folder / name / name
            _run(tmp, "tools/preprocess_data.py", "--input", str(jsonl), "--output-prefix", str(prefix),
                 "--tokenizer-type", "ByteTokenizer", "--append-eod", "--quiet")  # fmt: skip
            out = tmp / f"{name.upper()}{part}.txt"
            _run(tmp, "tools/gen_file_list.py", "--root", str(prefix.parent), "--output", str(out))


def _lrs(log: str) -> dict[int, float]:
    return {int(i): float(x) for i, x in re.findall(r"^iter (\d+)/\d+ \| loss [0-9.]+ \| lr ([0-9.e+-]+)", log, re.M)}


def _validation(log: str) -> dict[str, dict[int, float]]:
    """corpus -> {iteration: validation loss}."""
    out: dict[str, dict[int, float]] = {}
    for it, corpus, loss in re.findall(r"^validation at iter (\d+) \| (\S+) \| loss ([0-9.]+)", log, re.M):
        out.setdefault(corpus, {})[int(it)] = float(loss)
    return out


@pytest.fixture(scope="module")
def cpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("cpt")
    _make_domains(tmp)
    common = [*TINY, "--data-cache-path", str(tmp / "cache"), "--eval-interval", str(EVAL_INTERVAL), *SCHEDULE]
    stage0 = _run(tmp, "pretrain_gpt.py", *common, "--data-file-list", "D0.txt", "--valid-data-file-list",
                  "D0_valid.txt", "--train-iters", str(STAGE0_ITERS), "--save", "ckpt/d0")  # fmt: skip
    plan = _run(tmp, "tools/cpt_plan.py", "--d0", "D0.txt", "--stage", "D1.txt", "--buffer", "buffer.txt",
                "--output", "stage1.txt", "--preset", "weak", "--train-tokens", str(STAGE1_ITERS * 2 * 64),
                "--update-buffer")  # fmt: skip
    stage1 = _run(tmp, "pretrain_gpt.py", *common, "--data-file-list", "stage1.txt", "--valid-data-file-list",
                  "D0_valid.txt", "D1_valid.txt", "--load", "ckpt/d0", "--restart-lr-schedule",
                  "--train-iters", str(STAGE0_ITERS + STAGE1_ITERS), "--tensorboard-dir", "tb")  # fmt: skip
    return {"tmp": str(tmp), "stage0": stage0, "plan": plan, "stage1": stage1}


def test_plan_is_the_weak_shift_mix(cpt: dict[str, str]) -> None:
    assert "alpha_0=0.05 alpha_D=0.95 alpha_B=0.0" in cpt["plan"]
    rows = [line.split() for line in (Path(cpt["tmp"]) / "stage1.txt").read_text().splitlines() if line[:1].isdigit()]
    assert {row[2]: float(row[0]) for row in rows} == {"d0": 0.05, "d1": 0.95}
    assert "d1_text_document" in (Path(cpt["tmp"]) / "buffer.txt").read_text()  # B holds D1 for stage 2


def test_stage1_resumes_from_stage0(cpt: dict[str, str]) -> None:
    log = cpt["stage1"]
    assert re.search(rf"^resumed from \S+ at iteration {STAGE0_ITERS}$", log, re.M), log[:3000]
    assert sorted(_lrs(log)) == list(range(STAGE0_ITERS + 1, STAGE0_ITERS + STAGE1_ITERS + 1))
    # D0's replay continues after the samples stage 0 drew (2 per iteration), rather than repeating them.
    assert f"continues after the samples it already gave (d0 {2 * STAGE0_ITERS})" in log


def test_lr_is_rewarmed(cpt: dict[str, str]) -> None:
    """Stage 0 ends at peak LR; stage 1 starts its warmup again from 0 (the log shows the LR after each step)."""
    before, after = _lrs(cpt["stage0"]), _lrs(cpt["stage1"])
    assert before[STAGE0_ITERS] == pytest.approx(LR)
    assert "restarting the LR schedule at this checkpoint" in cpt["stage1"]
    for k in range(1, WARMUP + 1):
        assert after[STAGE0_ITERS + k] == pytest.approx(LR * k / WARMUP, rel=1e-3), (k, after)
    assert after[STAGE0_ITERS + STAGE1_ITERS] == pytest.approx(LR)


def test_every_evaluation_reports_both_domains(cpt: dict[str, str]) -> None:
    """The forgetting monitor: a D0 loss at every evaluation of stage 1, beside D1's, in the log and tensorboard."""
    valid = _validation(cpt["stage1"])
    evals = list(range(STAGE0_ITERS + EVAL_INTERVAL, STAGE0_ITERS + STAGE1_ITERS + 1, EVAL_INTERVAL))
    assert sorted(valid) == ["d0", "d1"] and len(evals) >= 2
    assert sorted(valid["d0"]) == evals and sorted(valid["d1"]) == evals
    assert all(math.isfinite(x) and 0 < x < 6 for v in valid.values() for x in v.values()), valid
    assert sorted(_validation(cpt["stage0"])) == ["d0"]  # stage 0 was watched on D0 alone

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(cpt["tmp"]) / "tb")).Reload()
    for corpus in ("d0", "d1"):
        steps = [e.step for e in events.Scalars(f"valid/{corpus}/lm_loss")]
        assert steps == evals, (corpus, steps)
