"""Megatron-LM's logging and profiling flags (megatron_ext/training/telemetry.py, timers.py): each flag's scalars in
the tensorboard event files of one short run with all of them, checked against independent numbers (the saved
checkpoint's tensors, the same run on two data-parallel ranks), the timers against the step time, the profiler's
trace against the requested steps, wandb's offline run against tensorboard."""

from __future__ import annotations

import glob
import json
import logging
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from launchers import clean_env
from megatron.core.timers import DummyTimer, Timer

from megatron_ext.config import ConfigError, parse_args
from megatron_ext.training.curves import read_scalars
from megatron_ext.training.telemetry import wandb_mode
from megatron_ext.training.timers import StepTimers

ROOT = Path(__file__).resolve().parents[1]
HAVE_WANDB = subprocess.run([sys.executable, "-c", "import wandb"], capture_output=True).returncode == 0
SHAPE = (
    "--num-layers 2 --hidden-size 96 --num-attention-heads 4 --seq-length 128 --micro-batch-size 2 "
    "--global-batch-size 4 --hidden-dropout 0 --attention-dropout 0 --lr 1e-3 --train-iters 8 --log-interval 2 "
    "--eval-interval 4 --eval-iters 1 --split 90,10,0"
).split()
LOGGING = (
    "--timing-log-level 2 --log-timers-to-tensorboard --log-memory-to-tensorboard --log-params-norm "
    "--log-num-zeros-in-grad --log-throughput --log-validation-ppl-to-tensorboard "
    "--log-optimizer-states-to-tensorboard --log-world-size-to-tensorboard --logging-level 30"
).split()
PROFILED = (3, 5)  # --profile-step-start/-end: the steps starting at iterations 3 and 4 (logged as iter 4, 5)


# Runs pretrain_gpt.py's main with megatron-core's Timer.start recording the names it starts, written at the end
# to $STARTED_<rank>.json (two ranks' prints to one pipe can interleave).
DRIVER = """
import json, os, sys, megatron.core.timers as t
started, start = [], t.Timer.start
def record(self, barrier=False):
    started.append(self.name)
    start(self, barrier)
t.Timer.start = record
if __name__ == "__main__":  # not in the processes a checkpoint save spawns
    from megatron_ext.training.loop import main
    code = main(sys.argv[1:])
    with open(f"{os.environ['STARTED']}_{os.environ['RANK']}.json", "w") as f:
        json.dump(started, f)
    sys.exit(code)
"""


def _train(tmp: Path, name: str, *args: str, nproc: int = 1, port: int) -> str:
    """The output (stdout + stderr) of a training run writing tmp/name/{tb,ckpt}."""
    run = tmp / name
    env = {**clean_env(), "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env["STARTED"] = str(run / "started")
    if nproc == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}"]
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    argv = [*launcher, str(driver), *SHAPE, "--data-cache-path", str(tmp / "data"), "--tensorboard-dir",
            str(run / "tb"), "--save", str(run / "ckpt"), *args]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process with every flag at timing level 2 (saves at iterations 4 and 8, wandb when installed), the
    same training at timing level 0 on two data-parallel ranks with the distributed optimizer, and the norms of
    the same training at TP=2."""
    tmp = tmp_path_factory.mktemp("telemetry")
    wandb = ["--wandb-project", "telemetry-test", "--wandb-exp-name", "all-flags"] if HAVE_WANDB else []
    profile = ["--profile", "--profile-step-start", str(PROFILED[0]), "--profile-step-end", str(PROFILED[1])]
    one = _train(tmp, "one", *LOGGING, *profile, "--save-interval", "4", *wandb, port=29571)
    level_0 = [*LOGGING[2:], "--timing-log-level", "0"]
    two = _train(tmp, "two", *level_0, "--use-distributed-optimizer", nproc=2, port=29572)
    norms = [
        "--log-params-norm",
        "--log-optimizer-states-to-tensorboard",
        "--tensor-model-parallel-size",
        "2",
        "--make-vocab-size-divisible-by",
        "64",
    ]  # the vocabulary padded as at TP=1 (x TP)
    _train(tmp, "tp", *norms, nproc=2, port=29573)  # the same initial weights on any layout (models/init.py)
    return {"tmp": tmp, "one": one, "two": two, "scalars": read_scalars(tmp / "one" / "tb")}


def _at(scalars: dict, tag: str) -> dict[int, float]:
    steps, values = scalars[tag]
    return dict(zip(steps.tolist(), values.tolist()))


def test_every_flag_writes_its_scalars(runs: dict) -> None:
    tags = set(runs["scalars"])
    timers = {"forward-backward", "forward-compute", "backward-compute", "batch-generator", "all-grads-sync",
              "optimizer", "optimizer-inner-step", "optimizer-count-zeros", "save-checkpoint", "evaluate"}  # fmt: skip
    expected = {f"timers/{name}-time" for name in timers} | {
        "memory/rss_bytes", "memory/max_rss_bytes", "train/params_norm", "train/num_zeros", "train/tokens_per_s",
        "train/tflops_per_device", "valid/stdlib/ppl", "optimizer/momentum_l2", "optimizer/variance_l2",
        "optimizer/variance_sqrt_l2", "optimizer/momentum_abs_max", "optimizer/variance_abs_max",
    }  # fmt: skip
    assert expected <= tags, sorted(expected - tags)
    assert set(_at(runs["scalars"], "train/world_size").values()) == {1.0}
    for tag in ("train/params_norm", "train/num_zeros", "memory/rss_bytes", "optimizer/momentum_l2"):
        assert sorted(_at(runs["scalars"], tag)) == [2, 4, 6, 8], tag
    log = runs["one"]
    assert re.search(r"^iter 8/8 \| .*\| params_norm [0-9.]+ \| num_zeros \d+ \|", log, re.M)
    block = log.split("iter 8/8", 1)[1]
    assert re.search(r"\(min, max\) time across ranks \(ms\):\n    forward-backward \.+: \([0-9.]+, [0-9.]+\)", block)
    assert re.search(r"save-checkpoint \.+: \(", log) and re.search(r"evaluate \.+: \(", log)


def test_values_match_independent_computations(runs: dict) -> None:
    """params_norm and the Adam moments' norms at iteration 8 are those of the saved checkpoint's tensors (read by
    tools/inspect_checkpoint.py); memory is this process's; ppl is exp(loss)."""
    s = runs["scalars"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/inspect_checkpoint.py"), str(runs["tmp"] / "one" / "ckpt"), "--json",
         "--no-progress"], capture_output=True, text=True, env={**clean_env(), "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    tensors = json.loads(proc.stdout)["tensors"]

    def l2(state: str) -> float:
        return math.sqrt(sum(t["norm"] ** 2 for t in tensors if t["state"] == state))

    assert _at(s, "train/params_norm")[8] == pytest.approx(l2("model"), rel=1e-5)
    assert _at(s, "optimizer/momentum_l2")[8] == pytest.approx(l2("exp_avg"), rel=1e-5)
    assert _at(s, "optimizer/variance_l2")[8] == pytest.approx(l2("exp_avg_sq"), rel=1e-5)
    rss, peak = _at(s, "memory/rss_bytes")[8], _at(s, "memory/max_rss_bytes")[8]
    assert 100e6 < rss <= peak < 16e9
    for step, loss in _at(s, "valid/stdlib/lm_loss").items():
        assert _at(s, "valid/stdlib/ppl")[step] == pytest.approx(math.exp(loss), rel=1e-5)


def test_two_data_parallel_ranks_report_the_same_values(runs: dict) -> None:
    """The reductions count every parameter and every moment once: the distributed optimizer shards the moments
    and the gradients over the two ranks, the one-process run holds them whole."""
    one, two = runs["scalars"], read_scalars(runs["tmp"] / "two" / "tb")
    assert set(_at(two, "train/world_size").values()) == {2.0}
    for tag in ("train/params_norm", "train/num_zeros", "optimizer/momentum_l2", "optimizer/variance_l2",
                "optimizer/momentum_abs_max", "optimizer/variance_sqrt_l2"):  # fmt: skip
        a, b = _at(one, tag), _at(two, tag)
        assert sorted(a) == sorted(b) == [2, 4, 6, 8]
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-12), (tag, step)


def test_tensor_parallel_ranks_report_the_same_norms(runs: dict) -> None:
    """Each rank holds half of the split weights and all of the norms' weights (a replica, counted once)."""
    one, tp = runs["scalars"], read_scalars(runs["tmp"] / "tp" / "tb")
    for tag in ("train/params_norm", "optimizer/momentum_l2", "optimizer/variance_l2", "optimizer/variance_abs_max"):
        a, b = _at(one, tag), _at(tp, tag)
        assert sorted(a) == sorted(b) == [2, 4, 6, 8]
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-4), (tag, step)


def test_timers_add_up_to_the_step_time(runs: dict) -> None:
    """forward-backward + optimizer is the step, less what lies between them (loss sums, the LR schedule); the
    nested phases fit inside their parents."""
    s = runs["scalars"]
    step, fb, opt = (_at(s, t) for t in ("train/step_time_s", "timers/forward-backward-time", "timers/optimizer-time"))
    compute = {k: _at(s, "timers/forward-compute-time")[k] + _at(s, "timers/backward-compute-time")[k] for k in fb}
    ratios = [(fb[k] + opt[k]) / step[k] for k in (2, 4, 6, 8)]
    assert all(0.7 < r <= 1.05 for r in ratios), ratios
    assert all(compute[k] <= fb[k] for k in fb) and all(
        _at(s, "timers/optimizer-inner-step-time")[k] <= opt[k] for k in opt
    )


def test_profiler_traces_exactly_the_requested_steps(runs: dict) -> None:
    first, end = PROFILED
    trace = runs["tmp"] / "one" / "tb" / f"profile_rank0_iter{first + 1}-{end}.pt.trace.json"
    assert f"are in {trace}: open it at https://ui.perfetto.dev" in runs["one"]
    events = json.loads(trace.read_text())["traceEvents"]
    steps = sorted(e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#"))
    assert steps == [f"ProfilerStep#{i}" for i in range(first, end)]
    span = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name", "").startswith("ProfilerStep#")}
    ops = [e for e in events if e.get("cat") == "cpu_op" and str(e.get("name")).startswith("aten::")]
    assert ops and all(any(a <= e["ts"] <= b for a, b in span.values()) for e in ops), "an operator outside the steps"


def _wandb_history(run_file: str) -> dict[str, dict[int, float]]:
    """key -> {step: value} of a wandb run file (a LevelDB-style log of protobuf records, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, pending, history = Path(run_file).read_bytes(), 7, b"", {}  # 7: the ':W&B' file header
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # a block's padding
            pos += left
            continue
        pending, pos = pending + raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)  # a key with "/" comes in pieces
                    history.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
    return history


@pytest.mark.skipif(not HAVE_WANDB, reason="the wandb extra is not installed (pip install 'megatron_ext[wandb]')")
def test_wandb_offline_run_has_the_tensorboard_scalars(runs: dict) -> None:
    files = glob.glob(str(runs["tmp"] / "one" / "ckpt" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    assert "wandb: offline (WANDB_MODE): upload later with `wandb sync " in runs["one"]
    history = {k: v for k, v in _wandb_history(files[0]).items() if not k.startswith("_")}
    assert set(history) == set(runs["scalars"])
    for tag, values in history.items():
        tb = _at(runs["scalars"], tag)
        assert sorted(values) == sorted(tb), tag
        assert all(values[s] == pytest.approx(tb[s], rel=1e-6) for s in tb), tag  # tensorboard keeps float32


def test_level_0_times_nothing_inside_a_step(runs: dict) -> None:
    """At level 0 no timer starts (so nothing synchronises the device) but around the evaluations (at iterations
    4 and 8) and the save (8), on both ranks; those are reported as min/max over the two ranks."""
    for rank in (0, 1):
        started = json.loads((runs["tmp"] / "two" / f"started_{rank}.json").read_text())
        assert sorted(started) == ["evaluate", "evaluate", "save-checkpoint"], (rank, started)
    assert "forward-backward" not in runs["two"]
    timers = {tag for tag in read_scalars(runs["tmp"] / "two" / "tb") if tag.startswith("timers/")}
    assert timers == {"timers/evaluate-time", "timers/save-checkpoint-time"}
    pairs = re.findall(r"evaluate \.+: \(([0-9.]+), ([0-9.]+)\)", runs["two"])
    assert len(pairs) == 2 and all(float(low) <= float(high) for low, high in pairs)
    started = json.loads((runs["tmp"] / "one" / "started_0.json").read_text())
    assert {"batch-generator", "forward-compute", "forward-backward", "all-grads-sync", "optimizer"} <= set(started)


def test_timers_above_the_level_do_nothing() -> None:
    timers = StepTimers(1)
    assert isinstance(timers("batch-generator", log_level=2), DummyTimer)
    assert isinstance(timers("optimizer", log_level=1), Timer) and set(timers._timers) == {"optimizer"}


def test_logging_level(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_ext.training import telemetry

    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # restored afterwards
    telemetry.prepare(parse_args(["--logging-level", "10"]))
    assert root.level == logging.DEBUG
    monkeypatch.setenv("MEGATRON_LOGGING_LEVEL", "40")
    telemetry.prepare(parse_args([]))
    assert root.level == logging.ERROR
    monkeypatch.setenv("MEGATRON_LOGGING_LEVEL", "loud")
    with pytest.raises(ConfigError, match="MEGATRON_LOGGING_LEVEL=loud: expected a number"):
        telemetry.prepare(parse_args([]))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--profile"], "--profile writes its trace beside the tensorboard logs: give --tensorboard-dir"),
        (["--profile-step-start", "5", "--profile-step-end", "5"], "expected 0 <= start < end"),
        (["--timing-log-level", "3"], "invalid choice: 3"),
    ],
)
def test_mistakes_are_one_line(flags: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.config", *flags], capture_output=True, text=True,
                          env={**clean_env(), "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_wandb_needs_its_client_and_a_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_ext.training import telemetry

    monkeypatch.setattr(telemetry.importlib.util, "find_spec", lambda name: object())  # as if installed
    with pytest.raises(ConfigError, match="--wandb-project needs a folder for its run"):
        telemetry.prepare(parse_args(["--wandb-project", "p"]))
    monkeypatch.setattr(telemetry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="the wandb client is not installed"):
        telemetry.prepare(parse_args(["--wandb-project", "p", "--run-dir", "r"]))


def test_wandb_is_offline_without_the_service_or_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert wandb_mode("http://127.0.0.1:9", timeout=1)[0] == "offline"  # the discard port: nothing listens
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.netrc
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: type("C", (), {"close": lambda self: None})())
    assert wandb_mode("https://api.example.org")[0] == "offline"  # reachable, but no API key
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_mode("https://api.example.org")[0] == "online"


def test_train_alcf_wandb_project_is_the_flag(tmp_path: Path) -> None:
    """train_alcf.sh's WANDB_PROJECT starts the wandb client inside training (--wandb-project)."""
    env = {**clean_env(), "PYTHONPATH": str(ROOT), "WANDB_PROJECT": "p", "RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.alcf_env", "resolve"], capture_output=True, text=True,
                          env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert " --wandb-project p " in proc.stdout
