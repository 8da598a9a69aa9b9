"""Megatron-LM and ALCF command lines parse unchanged and mean what they say (megatron_ext/compat.py's tables and
the schema's fields for Megatron-LM's flags)."""

from __future__ import annotations

import pytest

from megatron_ext.compat import NO_EFFECT, NOT_BUILT, REFUSED
from megatron_ext.config import ConfigError, build_parser, check_built, parse_args, startup_note

RUN = ["--train-iters", "2"]


def _value_for(flag: str) -> list[str]:
    """A command-line value that NO_EFFECT/NOT_BUILT's `flag` accepts and that is not one of its `fine` values."""
    accepted = {**NO_EFFECT, **NOT_BUILT}[flag]
    if accepted.takes is None:
        return [flag]
    if accepted.choices:
        return [flag, next(c for c in accepted.choices if c not in accepted.fine)]
    return [flag, "2"]


@pytest.mark.parametrize(
    "argv,feature",
    [
        (["--num-experts", "8"], "--num-experts is not supported (mixture of experts)"),
        (["--moe-router-topk=2"], "--moe-router-topk is not supported (mixture of experts)"),
        (["--expert-model-parallel-size", "2"], "--expert-model-parallel-size is not supported (mixture of experts)"),
        (["--experimental-attention-variant", "gated_delta_net"], "(gated delta net"),
        (["--linear-num-key-heads", "4"], "(gated delta net"),
        (["--enable-gpt-oss"], "--enable-gpt-oss is not supported (gpt-oss)"),
        (["--window-size", "128"], "(gpt-oss"),
        (["--export-kd-teacher-load", "x"], "--export-kd-teacher-load is not supported (ModelOpt"),
    ],
)
def test_out_of_scope_flags_are_refused_in_one_line_before_any_other_check(argv, feature, capsys) -> None:
    # A bad value and an unknown flag earlier on the line: the refusal still comes first.
    with pytest.raises(SystemExit) as e:
        parse_args(["--num-layers", "x", "--unknown-flag", *argv, *RUN])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and feature in err and err.count("\n") == 1, err


def test_no_schema_flag_is_taken_for_an_out_of_scope_one() -> None:
    flags = [s for a in build_parser()._actions for s in a.option_strings]
    from megatron_ext.compat import refused_feature

    assert [f for f in flags if refused_feature(f)] == []
    assert set(REFUSED).isdisjoint(flags)


def test_prefix_abbreviations_are_off(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--num-lay", "3", *RUN])  # argparse's default would bind it to --num-layers
    assert "unrecognized arguments: --num-lay 3" in capsys.readouterr().err


def test_every_no_effect_flag_parses_and_appears_in_the_note_with_its_reason() -> None:
    argv = [w for flag in NO_EFFECT for w in _value_for(flag)]
    cfg = parse_args([*argv, *RUN])
    note = startup_note(cfg)
    assert note is not None
    for flag, accepted in NO_EFFECT.items():
        assert f"  {flag}" in note and accepted.reason in note, flag
    check_built(cfg)  # no-effect flags never stop the run
    assert startup_note(parse_args(RUN)) is None
    # A value that asks for what happens here anyway is no news.
    assert startup_note(parse_args(["--ckpt-format", "torch_dist", "--rerun-mode", "disabled", *RUN])) is None


@pytest.mark.parametrize("flag", list(NOT_BUILT))
def test_a_flag_not_built_here_parses_and_stops_the_run_naming_it(flag) -> None:
    cfg = parse_args([*_value_for(flag), *RUN])
    with pytest.raises(ConfigError, match=f"^{flag}( \\S+)? is not built here"):
        check_built(cfg)


def test_readings_as_megatron_lm_reads_them() -> None:
    cfg = parse_args(["--sequence-parallel", "--data-path", "a", "--data-file-list", "l.txt", *RUN])
    assert not cfg.parallel.sequence_parallel and cfg.data.data_path is None and cfg.data.data_file_list == ["l.txt"]
    note = startup_note(cfg) or ""
    assert "--sequence-parallel is off" in note and "--data-path is ignored" in note
    assert parse_args(["--sequence-parallel", "--tensor-model-parallel-size", "2", *RUN]).parallel.sequence_parallel


def test_legacy_spellings() -> None:
    cfg = parse_args(["--checkpoint-activations", "--rotary-position-embeddings-theta", "500000", *RUN])
    assert cfg.training.recompute_activations and cfg.model.rotary_base == 500000
