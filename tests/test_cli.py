"""The command-line home (megatron_ext/cli.py): one `error:` line and exit status 2 for a bad flag, a user mistake
or an unreadable file, and one base class that every user-facing error derives from."""

from __future__ import annotations

import pytest

from megatron_ext.cli import OneLineParser, UserError, run_tool


def test_a_bad_flag_is_one_line_naming_the_help(capsys) -> None:
    for prog, hint in (("tool.py", "(see tool.py --help)"), (None, "(see --help)")):
        parser = OneLineParser(prog=prog) if prog else OneLineParser()
        parser.add_argument("--n", type=int, required=True)
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--n", "x"])
        assert e.value.code == 2
        assert capsys.readouterr().err == f"error: argument --n: invalid int value: 'x' {hint}\n"


def test_a_negative_value_after_a_space_names_the_equals_form(capsys) -> None:
    """argparse takes `--lr -1e-3` for two flags and said only 'expected one argument'."""
    parser = OneLineParser(prog="t.py")
    parser.add_argument("--lr", "--learning-rate", type=float)
    parser.add_argument("--n", type=int)
    for argv, hint in [
        (["--lr", "-1e-3"], "argument --lr/--learning-rate: expected one argument; a negative value is written "
         "--lr=-1e-3"),
        (["--learning-rate", "-.5e-2"], "argument --lr/--learning-rate: expected one argument; a negative value is "
         "written --learning-rate=-.5e-2"),
        (["--n", "--lr", "1"], "argument --n: expected one argument"),  # a flag after a flag: no number to name
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert (e.value.code, capsys.readouterr().err) == (2, f"error: {hint} (see t.py --help)\n")
    assert parser.parse_args(["--lr=-1e-3", "--n", "-1"]).lr == -1e-3  # the = form, and numbers argparse knows


def test_run_tool_reports_mistakes_in_one_line(tmp_path, capsys) -> None:
    def run(argv: list[str] | None) -> int:
        parser = OneLineParser(prog="t.py")
        parser.add_argument("what")
        args = parser.parse_args(argv)
        if args.what == "mistake":
            raise UserError("--what mistake: expected something else")
        if args.what == "file":
            open(tmp_path / "missing.txt").close()
        return 0

    cases = [
        (["mistake"], 2, "error: --what mistake: expected something else\n"),
        (["file"], 2, f"error: {tmp_path / 'missing.txt'}: No such file or directory\n"),
        ([], 2, "error: the following arguments are required: what (see t.py --help)\n"),
        (["fine"], 0, ""),
    ]
    for argv, code, err in cases:
        assert run_tool(run, argv) == code
        assert capsys.readouterr().err == err


def test_every_user_facing_error_derives_from_user_error() -> None:
    """So each main() catches one type; each keeps its builtin base for callers that catch that."""
    from megatron_ext.config import ConfigError
    from megatron_ext.convert import ConvertError
    from megatron_ext.data.data_list import DataListError
    from megatron_ext.data.preprocess import PreprocessError
    from megatron_ext.data.tokenizers import TokenizerError
    from megatron_ext.distributed import LaunchError
    from megatron_ext.lr_schedule import ScheduleError
    from megatron_ext.platform import PlatformError
    from megatron_ext.training.checkpointing import CheckpointError
    from megatron_ext.training.layout import CheckpointNotFound

    value_errors = [ConfigError, ConvertError, DataListError, PreprocessError, TokenizerError, LaunchError]
    value_errors += [CheckpointNotFound, ScheduleError]
    for cls in value_errors:
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    for cls in (PlatformError, CheckpointError):
        assert issubclass(cls, UserError) and issubclass(cls, RuntimeError), cls
