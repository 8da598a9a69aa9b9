"""The schema: Megatron flag names, aliases, validation with one-line messages, JSON round trip."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.config import Config, ConfigError, build_parser, parse_args, parse_count

ROOT = Path(__file__).resolve().parents[1]

MEGATRON_FLAGS = """--num-layers --hidden-size --num-attention-heads --num-query-groups --ffn-hidden-size --seq-length
--micro-batch-size --global-batch-size --tensor-model-parallel-size --pipeline-model-parallel-size
--num-layers-per-virtual-pipeline-stage --sequence-parallel --lr --min-lr --train-iters --save --load
--save-interval --eval-interval --eval-iters --log-interval --seed --bf16 --fp16 --use-distributed-optimizer
--recompute-activations --swiglu --normalization --position-embedding-type --rotary-base --group-query-attention
--untie-embeddings-and-output-weights --disable-bias-linear --data-path --split --tokenizer-type
--tokenizer-model --make-vocab-size-divisible-by --tensorboard-dir --exit-interval --exit-signal-handler
--check-for-nan-in-loss-and-grad --rampup-batch-size --lr-decay-style --lr-warmup-iters --clip-grad
--weight-decay --adam-beta1 --adam-beta2 --data-cache-path""".split()


def test_every_megatron_flag_is_accepted() -> None:
    known = {s for a in build_parser()._actions for s in a.option_strings}
    assert not [f for f in MEGATRON_FLAGS if f not in known]


def test_help_lists_every_field_with_its_docstring() -> None:
    text = build_parser().format_help()
    assert "Number of transformer layers." in text and "--tensor-model-parallel-size" in text


def test_llama_options_and_deepspeed_aliases() -> None:
    cfg = parse_args(
        "--train-iters 1 --use-rotary-position-embeddings --normalization rmsnorm --swiglu --num-key-value-heads 2 "
        "--rope-theta 500000 --no-bias --use-flash-attn".split()
    )
    m = cfg.model
    assert m.position_embedding_type == "rope" and m.normalization == "RMSNorm" and m.rotary_base == 500000
    assert m.group_query_attention and m.num_query_groups == 2 and m.disable_bias_linear
    assert m.attention_backend == "sdpa"
    assert m.ffn_hidden_size == 384  # 8/3 x 128 rounded up to a multiple of 64, as Megatron-LM


def test_json_round_trip(tmp_path: Path) -> None:
    cfg = parse_args("--train-iters 7 --swiglu --rampup-batch-size 4 4 100 --train-samples 1000".split()[2:])
    cfg.to_json(tmp_path / "c.json")
    again = Config.from_json(tmp_path / "c.json")
    assert again == cfg and json.loads((tmp_path / "c.json").read_text())["training"]["rampup_batch_size"] == [
        4,
        4,
        100,
    ]


@pytest.mark.parametrize(
    "argv,world,message",
    [
        ("--num-attention-heads 6 --hidden-size 96 --tensor-model-parallel-size 4", None, "not divisible by --tensor"),
        ("--num-layers 3 --pipeline-model-parallel-size 2", None, "--num-layers 3 is not divisible"),
        ("--num-query-groups 3 --num-attention-heads 4", None, "not divisible by --num-query-groups"),
        ("--bf16 --fp16", None, "not both"),
        ("--min-lr 1 --lr 0.1", None, "--min-lr"),
        ("--split 90,x", None, "--split"),
        ("--split 0,0,0", None, "not all 0"),
        ("--lr inf", None, "--lr must be a positive number, not inf"),
        ("--adam-beta1 1.5", None, "--adam-beta1 1.5 must be in [0, 1)"),
        ("--adam-eps 0", None, "--adam-eps must be positive"),
        ("--weight-decay -1", None, "--weight-decay must be >= 0"),
        ("--eval-iters -1", None, "--eval-iters must be >= 0"),
        ("--rotary-percent 2", None, "--rotary-percent 2.0 must be in (0, 1]"),
        ("--kv-channels 0", None, "--kv-channels must be positive"),
        ("--norm-epsilon -1", None, "--norm-epsilon must be positive"),
        ("--lr-warmup-iters -5", None, "--lr-warmup-iters -5 must be >= 0"),
        ("--global-batch-size 0", None, "--global-batch-size must be positive, not 0"),
        ("--train-samples -8", None, "--train-samples must be positive, not -8"),
        ("--seed -1", None, "--seed -1 must be >= 0"),
        ("--exit-duration-in-mins -1", None, "--exit-duration-in-mins must be positive, not -1.0"),
        ("--distributed-timeout-minutes 0", None, "--distributed-timeout-minutes must be positive"),
        ("--data-path 0.5 a 0.5", None, "weight/prefix pairs"),
        ("--data-path x a 1 b", None, "weight 'x'"),
        ("--tokenizer-type SentencePieceTokenizer", None, "needs --tokenizer-model"),
        ("--num-layers 4 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 3", None, "virtual"),
        ("--global-batch-size 6 --micro-batch-size 4", 1, "--global-batch-size 6 is not divisible"),
        ("--global-batch-size 8 --micro-batch-size 2", 3, "--global-batch-size 8 is not divisible"),
        ("--tensor-model-parallel-size 2", 3, "world size 3 is not divisible"),
        (
            "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 --micro-batch-size 2",
            2,
            "needs at least --pipeline-model-parallel-size 2 micro-batches",
        ),
    ],
)
def test_invalid_configuration_one_line(argv: str, world: int | None, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg = parse_args([*argv.split(), "--train-iters", "1"])
        cfg.resolve_batch(world or 1)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_mistakes_exit_2_with_one_line() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv in (
        ["--bogus-flag"],
        ["--num-layers", "3", "--pipeline-model-parallel-size", "2", "--train-iters", "1"],
        ["--train-iters", "1.5"],
    ):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "pretrain_gpt.py"), *argv], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 2, proc.stderr
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


TOOLS = [
    *(f"tools/{t.name}" for t in sorted((ROOT / "tools").glob("*.py"))),
    "megatron_ext.data.builtin_corpus",
    "megatron_ext.alcf_env",
]


def test_every_command_line_answers_a_bad_flag_in_one_line() -> None:
    """Each tool (and the ALCF front end), given an unknown flag: exit status 2 and one `error:` line."""
    script = """
import contextlib, io, runpy, sys, warnings
# One process runs every tool: runpy warns when a module it runs was already imported by an earlier tool.
warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
for tool in sys.argv[1:]:
    sys.argv = [tool, "--no-such-flag"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if tool.endswith(".py"):
                sys.path.insert(0, tool.rsplit("/", 1)[0])  # as `python tools/x.py` does
                runpy.run_path(tool, run_name="__main__")
            else:
                runpy.run_module(tool, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
    print(f"{tool}\t{code}\t{err.getvalue()!r}")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script, *TOOLS], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    rows = [line.split("\t") for line in proc.stdout.splitlines() if line.count("\t") == 2]
    assert [r[0] for r in rows] == TOOLS, proc.stdout + proc.stderr[-3000:]
    for tool, code, err in rows:
        text = eval(err)  # the repr printed above
        assert code == "2" and text.startswith("error: ") and text.count("\n") == 1, (tool, code, text)


def test_lengths_take_counts() -> None:
    cfg = parse_args("--train-iters 2K --lr-warmup-tokens 1.5M --lr-decay-samples 3e4 --lr-wsd-decay-tokens 2B".split())
    s = cfg.schedule
    assert (cfg.training.train_iters, s.lr_warmup_tokens, s.lr_decay_samples, s.lr_wsd_decay_tokens) == (
        2000,
        1_500_000,
        30_000,
        2 * 10**9,
    )
    assert parse_count("1_000") == 1000 and parse_count(" 22e9 ") == 22 * 10**9 and parse_count("1.5T") == 15 * 10**11
    assert parse_count("9007199254740993") == 9007199254740993 and parse_count("1e18") == 10**18  # exact
    assert (
        parse_count("1" * 18 + "0" * 12 + "e-12") == int("1" * 18) and parse_count("2." + "0" * 40 + "T") == 2 * 10**12
    )
    more_than_28_digits = ("1." + "0" * 28 + "1e3", "100000000000000000." + "0" * 12 + "1", "9" * 5000)  # were rounded
    usual = ("1.5", "B", "2X", "1e-3", "", "1e400", "1e3k", "1.0000000000000001", "nan", "0x10")
    for bad in (*usual, *more_than_28_digits):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a whole count"):
            parse_count(bad)
    assert parse_args(["--eval-iters", "10"]).logging.eval_iters == 10  # not a length: a plain integer


def test_folder_flags_naming_a_file_or_below_one(tmp_path: Path) -> None:
    afile = tmp_path / "log.txt"
    afile.write_text("keep me\n")
    cases = [
        ("--save", afile, f"--save {afile}: is a file; expected a folder"),
        ("--run-dir", afile / "run", f"--run-dir {afile / 'run'}: {afile} is a file; expected a folder there"),
        ("--data-cache-path", afile / "a" / "b", f"--data-cache-path {afile / 'a' / 'b'}: {afile} is a file"),
    ]
    for flag, path, message in cases:
        cfg = parse_args(["--train-iters", "1", flag, str(path)])
        with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
            cfg.check_folders()
    parse_args(["--train-iters", "1", "--save", str(tmp_path / "new" / "ckpt")]).check_folders()  # may be made
    assert afile.read_text() == "keep me\n"
