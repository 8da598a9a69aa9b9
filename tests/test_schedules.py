"""megatron_ext.training.schedules: every style against closed forms computed here, the styles megatron-core also
has step by step against its OptimizerParamScheduler (LR and weight decay, per-group keys), token lengths that
survive batch-size and seq-length changes, state round trips (ours and megatron-core's), and tools/plot_lr.py."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ext.config import ConfigError, parse_args, schedule_config
from megatron_ext.lr_schedule import (
    LR_DECAY_STYLES,
    STYLE_ALIASES,
    ScheduleConfig,
    ScheduleError,
    convert_length,
    iters_to_samples,
    lr_at,
    resolve_lengths,
    wd_at,
)
from megatron_ext.training.schedules import ParamScheduler

ROOT = Path(__file__).resolve().parents[1]
LR, MIN, INIT = 3e-4, 3e-5, 1e-5
W, D = 100, 1100  # warmup end and decay end, in samples


class Opt:
    """Just what both schedulers touch: a list of param-group dicts."""

    def __init__(self, *groups: dict) -> None:
        self.param_groups = [dict(g) for g in groups] or [{}]


def close(a: float, b: float, rel: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def cfg(style: str = "linear", **kw) -> ScheduleConfig:
    base = {"lr": LR, "min_lr": MIN, "lr_warmup_init": INIT, "lr_warmup": W, "lr_decay": D, "lr_decay_style": style}
    return ScheduleConfig(**(base | kw))


# --- closed forms ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root", "WSD"])
def test_warmup_is_linear_from_init_to_peak(style):
    c = cfg(style, lr_wsd_decay=200)
    assert lr_at(c, 0) == INIT
    assert close(lr_at(c, W / 2), INIT + (LR - INIT) / 2)
    assert close(lr_at(c, W), LR)


def test_linear_and_cosine_decay():
    lin, cos = cfg("linear"), cfg("cosine")
    mid, quarter = (W + D) / 2, W + (D - W) / 4
    assert close(lr_at(lin, mid), MIN + 0.5 * (LR - MIN))
    assert close(lr_at(lin, quarter), MIN + 0.75 * (LR - MIN))
    assert close(lr_at(cos, mid), MIN + 0.5 * (LR - MIN))
    assert close(lr_at(cos, quarter), MIN + (LR - MIN) * 0.5 * (1 + math.cos(math.pi / 4)))
    for c in (lin, cos):
        assert close(lr_at(c, D), MIN) and lr_at(c, D + 1) == MIN and lr_at(c, 10 * D) == MIN


def test_constant_and_inverse_square_root():
    assert lr_at(cfg("constant"), 1e12) == LR
    isr = cfg("inverse-square-root")
    assert close(lr_at(isr, 4 * W), LR / 2)  # LR * sqrt(W / t), t counted from 0, not from the warmup end
    assert close(lr_at(isr, 9 * W), LR / 3)
    assert lr_at(isr, D + 1) == MIN  # megatron-core: min_lr past the decay end (a step down from LR*sqrt(W/D))
    floored = cfg("inverse-square-root", min_lr=2e-4)
    assert lr_at(floored, 9 * W) == 2e-4


@pytest.mark.parametrize(
    "wsd_style,coeff_mid",
    [("linear", 0.5), ("cosine", 0.5), ("exponential", 2 * 0.5**0.5 - 1), ("minus_sqrt", 1 - 0.5**0.5)],
)
def test_wsd_boundaries(wsd_style, coeff_mid):
    s = 400
    c = cfg("WSD", lr_wsd_decay=s, lr_wsd_decay_style=wsd_style)
    assert close(lr_at(c, W + 1), LR) and close(lr_at(c, D - s), LR)
    assert close(lr_at(c, D - s / 2), MIN + coeff_mid * (LR - MIN))
    assert close(lr_at(c, D), MIN) and lr_at(c, D + 1) == MIN


def test_constant_plus_cooldown_is_wsd():
    alias = cfg("constant-cooldown", lr_wsd_decay=400)
    assert alias.lr_decay_style == "WSD" and alias == cfg("WSD", lr_wsd_decay=400)


def _inv_h(x: float, alpha: float = 10.0) -> float:
    return 1 / math.sqrt(1 + alpha * x) - 1


@pytest.mark.parametrize("style", ["infinite-cosine", "infinite-inv-sqrt"])
@pytest.mark.parametrize("min_lr", [MIN, 0.0])
def test_infinite_phases(style, min_lr):
    const, dec, cool, end = 1e-4, 400, 200, 2000
    c = cfg(style, min_lr=min_lr, constant_lr=const, lr_infinite_decay=dec, lr_cooldown=cool, lr_decay=end)
    c = ScheduleConfig.from_dict(c.to_dict() | {"lr_wsd_decay_style": "linear"})
    assert close(lr_at(c, W), LR)
    mid = W + dec / 2
    if style == "infinite-cosine":
        assert close(lr_at(c, mid), const + (LR - const) / 2)
    else:
        assert close(lr_at(c, mid), LR + (const - LR) * _inv_h(0.5) / _inv_h(1.0))
        assert lr_at(c, W + dec / 10) < lr_at(cfg("infinite-cosine", constant_lr=const, lr_infinite_decay=dec), 110)
    assert close(lr_at(c, W + dec), const)
    assert lr_at(c, (W + dec + end - cool) / 2) == const
    assert lr_at(c, end - cool) == const
    assert close(lr_at(c, end - cool / 2), min_lr + 0.5 * (const - min_lr))
    assert close(lr_at(c, end), min_lr) if min_lr else lr_at(c, end) == 0.0
    assert lr_at(c, end + 1) == min_lr
    forever = cfg(style, min_lr=min_lr, constant_lr=const, lr_infinite_decay=dec, lr_decay=None)
    assert lr_at(forever, 1e15) == const  # no cooldown: hold constant_lr for ever


@pytest.mark.parametrize("style", LR_DECAY_STYLES)
def test_min_lr_zero_everywhere(style):
    extra = {"lr_wsd_decay": 300, "constant_lr": 1e-4, "lr_infinite_decay": 300, "lr_cooldown": 300}
    c = cfg(style, min_lr=0.0, lr_warmup_init=0.0, **extra)
    for wsd_style in ("linear", "cosine", "exponential", "minus_sqrt"):
        c2 = ScheduleConfig.from_dict(c.to_dict() | {"lr_wsd_decay_style": wsd_style})
        values = [lr_at(c2, t) for t in range(0, 2 * D, 7)] + [lr_at(c2, D), lr_at(c2, 1e12)]
        assert all(math.isfinite(v) and 0.0 <= v <= LR for v in values)
        assert values[0] == 0.0
        if style != "constant":
            assert values[-1] == 0.0
        if style not in ("constant", "inverse-square-root"):  # inverse-sqrt only drops to min_lr past the end
            assert abs(values[-2]) < 1e-18


def test_validation_messages():
    with pytest.raises(ScheduleError, match="min_lr"):
        cfg(min_lr=1.0)
    with pytest.raises(ScheduleError, match="lr_wsd_decay"):
        cfg("WSD")
    with pytest.raises(ScheduleError, match="constant_lr"):
        cfg("infinite-cosine")
    with pytest.raises(ScheduleError, match="cooldown start"):
        cfg("infinite-cosine", constant_lr=1e-4, lr_infinite_decay=900, lr_cooldown=300)
    with pytest.raises(ScheduleError, match="not one of"):
        cfg("step")
    with pytest.raises(ScheduleError, match="seq_length"):
        cfg(unit="tokens")


# --- megatron-core equivalence ------------------------------------------------------------------------------------

MCORE_CASES = [
    ("constant", None),
    ("linear", None),
    ("cosine", None),
    ("inverse-square-root", None),
    ("WSD", "linear"),
    ("WSD", "cosine"),
    ("WSD", "exponential"),
    ("WSD", "minus_sqrt"),
]
BATCHES = [8] * 5 + [16] * 10 + [32] * 40  # a batch-size ramp; 1352 samples, past the decay end


@pytest.mark.parametrize("style,wsd_style", MCORE_CASES)
@pytest.mark.parametrize("min_lr", [MIN, 0.0])
def test_matches_megatron_core_step_by_step(style, wsd_style, min_lr):
    wsd = 300
    groups = (
        {"max_lr": LR, "min_lr": min_lr, "wd_mult": 1.0, "lr_mult": 1.0},  # as megatron-core's _get_param_groups
        {"max_lr": 1e-3, "min_lr": 1e-5, "wd_mult": 0.0},  # decoupled LR, no weight decay
        {"start_wd": 0.0, "end_wd": 0.2},
    )
    ref_opt, our_opt = Opt(*groups), Opt(*groups)
    ref = OptimizerParamScheduler(
        ref_opt,
        init_lr=INIT,
        max_lr=LR,
        min_lr=min_lr,
        lr_warmup_steps=W,
        lr_decay_steps=D,
        lr_decay_style=style,
        start_wd=0.01,
        end_wd=0.1,
        wd_incr_steps=D,
        wd_incr_style="cosine",
        wsd_decay_steps=wsd if style == "WSD" else None,
        lr_wsd_decay_style=wsd_style,
    )
    c = cfg(style, min_lr=min_lr, lr_wsd_decay_style=wsd_style or "exponential", lr_wsd_decay=wsd if wsd_style else 0)
    c = ScheduleConfig.from_dict(
        c.to_dict() | {"start_weight_decay": 0.01, "end_weight_decay": 0.1, "weight_decay_incr_style": "cosine"}
    )
    ours = ParamScheduler(our_opt, c)
    for inc in [0, *BATCHES]:
        ref.step(inc)
        ours.step(inc)
        for r, o in zip(ref_opt.param_groups, our_opt.param_groups):
            assert close(o["lr"], r["lr"]) and close(o["weight_decay"], r["weight_decay"]), (ours.position, r, o)
        assert close(ours.get_lr(ref_opt.param_groups[0]), ref.get_lr(ref_opt.param_groups[0]))
    assert ours.num_steps == ref.num_steps == sum(BATCHES)


@pytest.mark.parametrize("wd_style", ["constant", "linear", "cosine"])
def test_weight_decay_matches_megatron_core(wd_style):
    start, end = (0.05, 0.05) if wd_style == "constant" else (0.01, 0.1)
    ref = OptimizerParamScheduler(Opt(), INIT, LR, MIN, W, D, "linear", start, end, 700, wd_style)
    c = cfg(start_weight_decay=start, end_weight_decay=end, weight_decay_incr_style=wd_style, wd_incr=700)
    for t in [0, 1, 100, 350, 699, 700, 701, 5000]:
        ref.num_steps = t
        assert close(wd_at(c, t), ref.get_wd())
    assert close(wd_at(c, 350), start + 0.5 * (end - start))  # both ramps are half-way at half the length
    if wd_style == "cosine":
        assert close(wd_at(c, 175), start + (end - start) * 0.5 * (math.cos(math.pi * 0.75) + 1))


# --- units ----------------------------------------------------------------------------------------------------------


def test_length_conversions():
    assert iters_to_samples(10, 32) == 320
    assert convert_length(10, "iters", "tokens", global_batch_size=32, seq_length=128) == 320 * 128
    assert convert_length(2048, "tokens", "samples", seq_length=128) == 16
    unit, got = resolve_lengths(
        {"lr_warmup": (10, "iters"), "lr_decay": (1e6, "tokens"), "lr_wsd_decay": None},
        global_batch_size=8,
        seq_length=128,
    )
    assert unit == "tokens" and got == {"lr_warmup": 10 * 8 * 128, "lr_decay": 1e6}
    assert resolve_lengths({"lr_warmup": (10, "iters")}, global_batch_size=8)[0] == "samples"
    with pytest.raises(ScheduleError, match="seq_length"):
        convert_length(1, "tokens", "samples")


def test_token_lengths_survive_batch_size_and_seq_length_changes():
    seq = 64
    c = cfg("cosine", unit="tokens", seq_length=seq, lr_warmup=W * seq, lr_decay=D * seq)
    a, b = ParamScheduler(Opt(), c), ParamScheduler(Opt(), c)
    seen_a, seen_b = {}, {}
    for inc in [16] * 80:
        a.step(inc)
        seen_a[a.position] = a.optimizer.param_groups[0]["lr"]
    for inc in [4] * 20 + [32] * 10 + [8] * 100:
        b.step(inc)
        seen_b[b.position] = b.optimizer.param_groups[0]["lr"]
    common = sorted(set(seen_a) & set(seen_b))
    assert len(common) > 20 and common[-1] > D * seq
    assert all(seen_a[t] == seen_b[t] == lr_at(c, t) for t in common)
    # Same token position as the sample-based schedule with the old seq_length.
    assert close(lr_at(c, 500 * seq), lr_at(cfg("cosine"), 500))
    # Resume with a longer context: the token position carries over, each sample now advances 128 tokens.
    longer = ScheduleConfig.from_dict(c.to_dict() | {"seq_length": 128})
    resumed = ParamScheduler(Opt(), longer)
    resumed.load_state_dict(json.loads(json.dumps(a.state_dict())), keep_config=True)
    assert resumed.position == a.position and resumed.config == longer
    resumed.step(4)
    assert resumed.position == a.position + 4 * 128


# --- state ----------------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_and_diff():
    c = cfg("WSD", lr_wsd_decay=300, lr_wsd_decay_style="minus_sqrt", seq_length=256)
    s = ParamScheduler(Opt({}, {"max_lr": 1e-3, "min_lr": 1e-6}), c)
    for inc in [32] * 30:
        s.step(inc)
    sd = json.loads(json.dumps(s.state_dict()))  # plain data, survives any checkpoint format
    other = cfg("cosine", lr=1e-4, min_lr=0.0)
    assert set(other.diff(c)) == {"lr", "min_lr", "lr_decay_style", "lr_wsd_decay", "lr_wsd_decay_style", "seq_length"}
    assert c.diff(ScheduleConfig.from_dict(c.to_dict())) == []

    restored = ParamScheduler(Opt({}, {"max_lr": 1e-3, "min_lr": 1e-6}), other)
    assert restored.saved_config(sd) == c
    restored.load_state_dict(sd)
    assert restored.config == c and restored.position == s.position and restored.num_steps == s.num_steps
    assert restored.optimizer.param_groups == s.optimizer.param_groups

    kept = ParamScheduler(Opt(), other)
    kept.load_state_dict(sd, keep_config=True)
    assert kept.config == other and kept.position == s.position
    assert kept.optimizer.param_groups[0]["lr"] == lr_at(other, s.position)


def test_restored_schedule_overrides_default_groups_only():
    """megatron-core copies the optimizer's lr into every group's max_lr; those groups follow the restored
    schedule, a group with its own max_lr (decoupled embedding LR) keeps it, lr_mult is applied."""
    groups = ({"max_lr": LR, "min_lr": MIN}, {"max_lr": 1e-3, "min_lr": MIN}, {"max_lr": LR, "lr_mult": 0.5})
    s = ParamScheduler(Opt(*groups), cfg("constant"), position=W + 1)
    ckpt = ParamScheduler(Opt(), cfg("constant", lr=6e-4), position=W + 1)
    s.load_state_dict(ckpt.state_dict())
    lrs = [g["lr"] for g in s.optimizer.param_groups]
    assert lrs == [6e-4, 1e-3, 3e-4]


def test_loads_megatron_core_state():
    ref_opt = Opt()
    ref = OptimizerParamScheduler(ref_opt, 0.0, LR, MIN, W, D, "cosine", 0.01, 0.01, D, "constant")
    for _ in range(20):
        ref.step(32)
    ours = ParamScheduler(Opt(), cfg("linear", lr=1.0e-4, lr_warmup_init=0.0))
    ours.load_state_dict(ref.state_dict())
    assert ours.config.lr_decay_style == "cosine" and ours.config.lr == LR and ours.position == 640
    assert close(ours.optimizer.param_groups[0]["lr"], ref_opt.param_groups[0]["lr"])


def test_describe_names_phases_and_values():
    c = cfg("infinite-cosine", min_lr=0.0, constant_lr=1e-4, lr_infinite_decay=400, lr_cooldown=200, lr_decay=2000)
    c = ScheduleConfig.from_dict(c.to_dict() | {"seq_length": 1000})
    text = c.describe()
    for word in ("warmup", "decay", "stable", "cooldown", "final", "0.0003 -> 0.0001", "1.8M", "samples 1,800"):
        assert word in text, text
    s = ParamScheduler(Opt(), c)
    s.step(700)
    assert "stable" in s.describe().splitlines()[-1]


# --- tools/plot_lr.py -------------------------------------------------------------------------------------------


def plot_tool():
    key = "_tools_plot_lr"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "tools" / "plot_lr.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def test_plot_lr_writes_png(tmp_path, capsys):
    out = tmp_path / "lr.png"
    code = plot_tool().main(
        [
            "--global-batch-size",
            "64",
            "--seq-length",
            "1024",
            "--train-tokens",
            "1B",
            "--lr-warmup-iters",
            "100",
            "--compare",
            "--lr-decay-style cosine --min-lr 3e-5",
            "--lr-decay-style WSD --lr-wsd-decay-tokens 200M --global-batch-size 128",
            "--lr-decay-style infinite-inv-sqrt --constant-lr 1e-4 --lr-infinite-decay-tokens 300M "
            "--lr-cooldown-tokens 200M",
            "--out",
            str(out),
        ]  # fmt: skip
    )
    text = capsys.readouterr().out
    assert code == 0 and out.stat().st_size > 20_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "15259 iterations of 64 x 1024" in text and "cooldown" in text


def test_plot_lr_mistakes_are_one_line(tmp_path, capsys):
    """The messages pretrain_gpt.py gives for the same flags, naming them, in one line."""
    code = plot_tool().main(["--global-batch-size", "8", "--lr-decay-style", "WSD", "--train-iters", "10"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: the LR schedule: WSD needs") and err.count("\n") == 1, err
    assert "no --lr-wsd-decay-iters/-samples/-tokens" in err
    code = plot_tool().main(["--global-batch-size", "8", "--train-iters", "1", "--lr-warmup-iters", "x"])
    err = capsys.readouterr().err
    assert code == 2 and err == (
        "error: argument --lr-warmup-iters: 'x': expected a whole count such as 2000, 5e9, 300B or 2T "
        "(see plot_lr.py --help)\n"
    )
    for flags, message in (
        (["--train-tokens", "1M"], "error: give --global-batch-size"),  # a length in tokens needs the batch
        (["--train-iters", "10", "--lr-warmup-samples", "8"], "error: give --global-batch-size"),
        (["--global-batch-size", "8"], "error: give the run length"),
        (["--global-batch-size", "8", "--train-iters", "9", "--train-tokens", "1M"], "error: give one of --train-tok"),
        (["--global-batch-size", "8", "--train-tokens", "0"], "error: --train-tokens must be positive, not 0"),
        (["--global-batch-size", "8", "--train-iters", "9", "--min-lr", "1"], "error: --min-lr 1.0 must be in"),
        (["--global-batch-size", "8", "--train-iters", "9", "--lr-decay-stlye", "WSD"], "error: unrecognized arg"),
    ):
        assert plot_tool().main([*flags, "--out", str(tmp_path / "bad.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "bad.png").exists()


def test_plot_lr_output_and_iteration_schedules_without_a_batch_size(tmp_path, capsys):
    """--output names the PNG (--out is its earlier name); a schedule counted in iterations needs no batch size
    and is the same per iteration as with any batch size."""
    flags = ["--lr-decay-style", "cosine", "--lr-warmup-iters", "10", "--train-iters", "100"]
    for name in ("--output", "--out"):
        out = tmp_path / f"{name.strip('-')}.png"
        assert plot_tool().main([*flags, name, str(out)]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "100 iterations (no batch size given)" in capsys.readouterr().out
    free = plot_tool().run_from_flags(flags)
    batched = plot_tool().run_from_flags([*flags, "--global-batch-size", "32"])
    assert not free.tokens_known and batched.tokens_known and free.train_iters == batched.train_iters == 100
    for it in (0, 5, 10, 37, 99, 100):
        assert lr_at(free.config, free.position(it)) == pytest.approx(lr_at(batched.config, batched.position(it)))


def test_plot_lr_draws_what_training_builds(capsys):
    """A pasted pretrain_gpt.py command line gives the schedule `schedule_config` builds for that run."""
    flags = "--num-layers 2 --global-batch-size 16 --seq-length 512 --train-iters 1K --lr 1e-3 --min-lr 1e-5 "
    flags += "--lr-decay-style WSD --lr-warmup-fraction 0.05 --lr-wsd-decay-tokens 2M"
    run = plot_tool().run_from_flags(flags.split())
    expected = schedule_config(parse_args(flags.replace("1K", "1000").split()))
    assert run.config == expected and run.train_iters == 1000 and expected.unit == "tokens"
    assert expected.lr_decay == 1000 * 16 * 512 and expected.lr_wsd_decay == 2e6
    assert plot_tool().main([*flags.split(), "--help"]) == 0
    text = capsys.readouterr().out
    assert "--lr-wsd-decay-tokens" in text and "WSD: length of the final decay" in text and "--out" in text


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_", "OMPI_COMM_WORLD_", "PMI_", "PALS_")


def _single_process_env() -> dict[str, str]:
    """This environment without launcher variables, so the child trains as one process on a free port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_VARS) and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_plot_lr_from_checkpoint(tmp_path, capsys):
    """A 10-iteration WSD run stopped and saved at iteration 3: plot its schedule with the checkpoint marked,
    with a planned restart overlaid; a folder with no checkpoint is one error line."""
    ckpt = tmp_path / "ckpt"
    argv = [
        sys.executable, str(ROOT / "pretrain_gpt.py"), "--num-layers", "2", "--hidden-size", "64",
        "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "2", "--eval-iters", "0",
        "--data-cache-path", str(tmp_path / "data"), "--lr", "1e-3", "--lr-decay-style", "WSD",
        "--lr-warmup-iters", "2", "--lr-wsd-decay-iters", "4", "--train-iters", "10", "--exit-interval", "3",
        "--save", str(ckpt),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=_single_process_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (ckpt / "iter_0000003").is_dir()

    out = tmp_path / "ckpt_lr.png"
    planned = "--lr-decay-style constant --lr-warmup-iters 2 --train-iters 5"
    assert plot_tool().main(["--load", str(ckpt), "--compare", planned, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[checkpoint ckpt] 10 iterations of 2 x 64 tokens" in text  # the saved run's batch, length and schedule
    assert "iter_0000003: iteration 3, stable, lr 0.001" in text
    assert f"[{planned}] 5 iterations of 2 x 64 tokens (iterations 3 -> 8)" in text  # drawn from the checkpoint

    assert plot_tool().main(["--load", str(ckpt), "--iteration", "3", "--out", str(tmp_path / "it3.png")]) == 0
    capsys.readouterr()
    for bad in (["--load", str(tmp_path / "data")], ["--load", str(ckpt), "--iteration", "7"]):
        assert plot_tool().main([*bad, "--out", str(tmp_path / "bad.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --load ") and err.count("\n") == 1, err
    assert plot_tool().main(["--load", str(ckpt), "--lr-decay-stlye", "WSD", "--out", str(tmp_path / "bad.png")]) == 2
    assert capsys.readouterr().err.startswith("error: unrecognized arguments: --lr-decay-stlye WSD")
    assert not (tmp_path / "bad.png").exists()


# --- one vocabulary, checked when the command line is parsed -----------------------------------------------------

# Lengths that make every style's schedule valid (WSD needs its decay length, the infinite styles a held LR).
ANY_STYLE = ["--train-iters", "100", "--lr-wsd-decay-iters", "10", "--constant-lr", "1e-4", "--global-batch-size", "4"]


@pytest.mark.parametrize("alias", sorted(STYLE_ALIASES))
def test_every_alias_is_accepted_by_the_command_line_and_plot_lr(alias):
    style = STYLE_ALIASES[alias]
    assert style in LR_DECAY_STYLES
    assert parse_args(["--lr-decay-style", alias, *ANY_STYLE]).schedule.lr_decay_style == style
    assert plot_tool().run_from_flags(["--lr-decay-style", alias, *ANY_STYLE]).config.lr_decay_style == style


def test_the_style_help_and_choices_come_from_the_vocabulary():
    from megatron_ext.config import build_parser

    flag = next(a for a in build_parser()._actions if "--lr-decay-style" in a.option_strings)
    assert flag.help.endswith(f"Other spellings accepted: {', '.join(STYLE_ALIASES)}.")
    with pytest.raises(ConfigError, match=r"--lr-decay-style 'cosin' must be one of constant, linear, cosine, .*wsd"):
        parse_args(["--lr-decay-style", "cosin", "--train-iters", "10"])


@pytest.mark.parametrize(
    "flags,message",
    [
        ("--lr-decay-style WSD --train-iters 100", "WSD needs 0 < lr_wsd_decay <= lr_decay, got 0 (counted in "
         "iterations; lr_decay 100: the end of the run, no --lr-wsd-decay-iters/-samples/-tokens)"),
        ("--lr-warmup-iters 20 --train-iters 10", "lr_decay 10 must be beyond lr_warmup 20 (counted in iterations; "
         "--lr-warmup-iters 20, lr_decay 10: the end of the run)"),
        ("--lr-decay-style infinite-cosine --train-samples 100", "infinite-cosine needs --constant-lr in [--min-lr, "
         "--lr], got None"),
        ("--lr-decay-style WSD --lr-wsd-decay-tokens 1M --train-samples 10 --seq-length 64", "WSD needs 0 < "
         "lr_wsd_decay <= lr_decay, got 1000000 (counted in tokens, a sample being --seq-length 64; "
         "--lr-wsd-decay-tokens 1000000, lr_decay 640: the end of the run)"),
    ],
)  # fmt: skip
def test_the_schedule_is_checked_when_parsed(flags, message):
    """Before any process group or model: lengths in iterations need no batch size (it scales them alike)."""
    with pytest.raises(ConfigError) as error:
        parse_args(flags.split())
    assert str(error.value) == f"the LR schedule: {message}"


def test_schedules_that_need_the_batch_size_wait_for_it():
    """Iterations beside samples or tokens: known once the data-parallel size gives the default batch."""
    cfg = parse_args("--train-iters 10 --lr-warmup-tokens 1M --seq-length 64".split())
    cfg.resolve_batch(1)
    with pytest.raises(ConfigError, match="lr_decay 2560 must be beyond lr_warmup 1000000"):
        schedule_config(cfg)


def test_the_config_command_line_stops_on_a_schedule_mistake():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_ext.config", "--lr-decay-style", "WSD", "--train-iters", "100"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.startswith("error: the LR schedule: WSD needs") and proc.stderr.count("\n") == 1, proc.stderr
