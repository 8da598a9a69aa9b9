"""Resume rules: the checkpoint's schedule is followed, a different one needs an explicit flag and then really
takes effect (also in the optimizer's param groups), and a schedule can restart (rewarm, cooldown-from)."""

from __future__ import annotations

import pytest

from megatron_ext.config import ConfigError, parse_args, schedule_config
from megatron_ext.training.loop import resume_schedule
from megatron_ext.training.schedules import ParamScheduler

GBS, SEQ = 8, 64


class FakeOptimizer:
    """Param groups as megatron-core builds them: max_lr/min_lr copied from the optimizer config."""

    def __init__(self, lr: float, min_lr: float) -> None:
        self.param_groups = [{"lr": lr, "max_lr": lr, "min_lr": min_lr, "weight_decay": 0.0} for _ in range(2)]


def _scheduler(flags: str) -> tuple:
    cfg = parse_args(f"--global-batch-size {GBS} --micro-batch-size {GBS} --seq-length {SEQ} {flags}".split())
    cfg.resolve_batch(1)
    opt = FakeOptimizer(cfg.optimizer.lr, cfg.optimizer.min_lr)
    return cfg, opt, ParamScheduler(opt, schedule_config(cfg))


def _checkpoint(flags: str, iters: int) -> tuple[dict, FakeOptimizer]:
    """The scheduler state and optimizer groups of a run that trained `iters` steps with `flags`."""
    _, opt, sched = _scheduler(flags)
    for _ in range(iters):
        sched.step(GBS)
    return sched.state_dict(), opt


OLD = "--train-iters 100 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 10"


def test_same_schedule_continues_at_the_saved_position() -> None:
    state, _ = _checkpoint(OLD, 40)
    cfg, opt, sched = _scheduler(OLD)
    note = resume_schedule(cfg, sched, opt, state)  # type: ignore[arg-type]
    assert "checkpoint's schedule" in note and sched.num_steps == 40 * GBS
    ref = _checkpoint(OLD, 40)[1]
    assert opt.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-12)


def test_a_different_schedule_needs_an_explicit_choice() -> None:
    state, _ = _checkpoint(OLD, 40)
    cfg, opt, sched = _scheduler(OLD.replace("--lr 1e-3", "--lr 5e-4"))
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in lr: pass --override-opt_param-scheduler"):
        resume_schedule(cfg, sched, opt, state)  # type: ignore[arg-type]


def test_override_really_changes_the_lr_in_the_optimizer() -> None:
    state, saved_opt = _checkpoint(OLD, 40)
    new = OLD.replace("--lr 1e-3", "--lr 5e-4") + " --override-opt_param-scheduler"
    cfg, opt, sched = _scheduler(new)
    opt.param_groups = saved_opt.param_groups  # as after optimizer.load_state_dict: the old peak in every group
    resume_schedule(cfg, sched, opt, state)  # type: ignore[arg-type]
    expected = _checkpoint(new.replace(" --override-opt_param-scheduler", ""), 40)[1].param_groups[0]["lr"]
    assert all(g["lr"] == pytest.approx(expected, rel=1e-12) for g in opt.param_groups)
    assert expected < saved_opt.param_groups[0]["max_lr"] == 5e-4  # max_lr rewritten to the new peak


def test_use_checkpoint_keeps_the_saved_schedule() -> None:
    state, saved_opt = _checkpoint(OLD, 40)
    cfg, opt, sched = _scheduler(OLD.replace("--lr 1e-3", "--lr 5e-4") + " --use-checkpoint-opt_param-scheduler")
    opt.param_groups = saved_opt.param_groups
    lr_before = saved_opt.param_groups[0]["lr"]
    resume_schedule(cfg, sched, opt, state)  # type: ignore[arg-type]
    assert sched.config.lr == 1e-3 and opt.param_groups[0]["lr"] == pytest.approx(lr_before, rel=1e-12)


def test_rewarm_restarts_warmup_to_a_new_peak() -> None:
    state, _ = _checkpoint(OLD, 100)  # a finished stage, LR at its minimum
    stage2 = (
        "--train-iters 50 --lr 6e-4 --min-lr 6e-5 --lr-decay-style cosine --lr-warmup-iters 5 --restart-lr-schedule"
    )
    cfg, opt, sched = _scheduler(stage2)
    resume_schedule(cfg, sched, opt, state)  # type: ignore[arg-type]
    assert opt.param_groups[0]["lr"] == 0.0  # warmup starts again from --lr-warmup-init
    for _ in range(5):
        sched.step(GBS)
    assert opt.param_groups[0]["lr"] == pytest.approx(6e-4)


def test_cooldown_from_a_constant_lr_checkpoint() -> None:
    """A constant-LR run, then T tokens of cooldown from any of its checkpoints."""
    state, _ = _checkpoint("--train-iters 1000 --lr 1e-3 --lr-decay-style constant", 300)
    tokens = 20 * GBS * SEQ
    cool = (
        f"--train-iters 20 --lr 1e-3 --min-lr 0 --lr-decay-style WSD --lr-wsd-decay-style linear "
        f"--lr-wsd-decay-tokens {tokens} --lr-decay-tokens {tokens} --restart-lr-schedule"
    )
    cfg, opt, sched = _scheduler(cool)
    resume_schedule(cfg, sched, opt, state)  # type: ignore[arg-type]
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(20):
        sched.step(GBS)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-3) and lrs[10] == pytest.approx(5e-4) and lrs[-1] == 0.0
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_restart_without_a_decay_length_decays_over_the_rest_of_the_run() -> None:
    state, _ = _checkpoint(OLD, 100)
    cfg, opt, sched = _scheduler("--train-iters 150 --lr 6e-4 --min-lr 0 --lr-decay-style linear --restart-lr-schedule")
    resume_schedule(cfg, sched, opt, state, consumed_samples=100 * GBS)  # type: ignore[arg-type]
    for _ in range(50):
        sched.step(GBS)
    assert opt.param_groups[0]["lr"] == 0.0  # reached at the run's end, 50 iterations after the restart


@pytest.mark.parametrize(
    "flags,start,expected",
    [
        (
            "--train-iters 5 --lr-warmup-iters 10",
            0,
            "lr_decay 40 must be beyond lr_warmup 80 (counted in samples, an iteration being --global-batch-size 8; "
            "--lr-warmup-iters 10, lr_decay 40: the end of the run)",
        ),
        (
            "--train-iters 5 --lr-warmup-iters 4 --restart-lr-schedule",
            16,
            "lr_decay 24 must be beyond lr_warmup 32 (counted in samples, an iteration being --global-batch-size 8; "
            "--lr-warmup-iters 4, lr_decay 24: the rest of the run (40 samples) after the restart at sample 16)",
        ),
        (
            "--train-iters 5 --lr-decay-style WSD --lr-wsd-decay-tokens 100000",
            0,
            "WSD needs 0 < lr_wsd_decay <= lr_decay, got 100000 (counted in tokens, a sample being --seq-length 64 "
            "and an iteration 8 samples; --lr-wsd-decay-tokens 100000, lr_decay 2560: the end of the run)",
        ),
        (
            "--train-iters 5 --lr-decay-style WSD",
            0,
            "WSD needs 0 < lr_wsd_decay <= lr_decay, got 0 (counted in samples, an iteration being "
            "--global-batch-size 8; lr_decay 40: the end of the run, no --lr-wsd-decay-iters/-samples/-tokens)",
        ),
        ("--train-iters 5 --lr-warmup-init 1", 0, "--lr-warmup-init 1.0 must be in [0, --lr]"),
    ],
)
def test_schedule_mistakes_name_the_flags_and_the_unit(flags: str, start: int, expected: str) -> None:
    with pytest.raises(ConfigError) as error:  # when parsed (config.check_schedule), or where a restart starts it
        cfg = parse_args(f"--global-batch-size {GBS} --micro-batch-size {GBS} --seq-length {SEQ} {flags}".split())
        cfg.resolve_batch(1)
        schedule_config(cfg, start_samples=start)
    assert str(error.value) == f"the LR schedule: {expected}"
