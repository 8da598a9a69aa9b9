"""The train_alcf.sh variables in Python (megatron_ext.alcf_env): derived sizes, one error per inconsistency, the
variable table against the schema and the docs. Fast: no process is launched."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext import alcf_env
from megatron_ext.alcf_env import PRESETS, VARIABLES, EnvError, resolve
from megatron_ext.config import ConfigError, parse_args

ROOT = Path(__file__).resolve().parents[1]
CPU = {"CUDA_VISIBLE_DEVICES": ""}  # no GPU detection, whatever the machine


def _pbs(tmp: Path, hosts: list[str]) -> dict[str, str]:
    nodefile = tmp / "nodefile"
    nodefile.write_text("".join(f"{h}\n" for h in hosts))
    return {"PBS_JOBID": "4242.aurora-pbs", "PBS_NODEFILE": str(nodefile), "PBS_O_WORKDIR": str(tmp)}


def _plan(tmp: Path, env: dict[str, str], *extra: str, **kw: str) -> alcf_env.Plan:
    base = {**CPU, "SAVE": str(tmp / "ckpt"), "RUN_DIR": str(tmp / "run")}
    return resolve({**base, **env}, list(extra), **kw)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative defaults (checkpoints/, runs/) stay out of the repository


# ---- derived sizes ----------------------------------------------------------------------------------------------


# fmt: off
SIZES = [  # hosts, variables, WORLD_SIZE, DP, GLOBAL_BATCH, GRAD_ACC_STEPS, TRAIN_ITERS
    # laptop: one host, 2 ranks, the tiny preset's 50 iterations
    (1, {"NGPU_PER_HOST": "2"}, 2, 2, 4, 1, 50),
    # the issue's CPT example shape: 2 Aurora-like nodes x 12 ranks, TP 2 PP 2, 22B tokens of 4096
    (2, {"NGPU_PER_HOST": "12", "TP": "2", "PP": "2", "MODEL_ARCH": "7B", "GRAD_ACC_STEPS": "16",
         "TRAIN_TOKENS": str(22 * 10**9)}, 24, 6, 96, 16, math.ceil(22e9 / (4096 * 96))),
    # GLOBAL_BATCH alone: GRAD_ACC_STEPS is derived
    (4, {"NGPU_PER_HOST": "4", "TP": "4", "MODEL_ARCH": "1B", "GLOBAL_BATCH": "64", "MICRO_BATCH": "2",
         "TRAIN_ITERS": "1000"}, 16, 4, 64, 8, 1000),
    # a token budget with a suffix; GLOBAL_BATCH and GRAD_ACC_STEPS that agree
    (1, {"NGPU_PER_HOST": "4", "GLOBAL_BATCH": "32", "GRAD_ACC_STEPS": "4", "TRAIN_TOKENS": "1M"}, 4, 4, 32, 4,
     math.ceil(1e6 / (128 * 32))),
    # the same run on twice the nodes with GLOBAL_BATCH pinned: fewer accumulation steps, same iterations
    (2, {"NGPU_PER_HOST": "4", "GLOBAL_BATCH": "32", "TRAIN_TOKENS": "1M"}, 8, 8, 32, 2,
     math.ceil(1e6 / (128 * 32))),
]
# fmt: on


@pytest.mark.parametrize(("hosts", "env", "world", "dp", "gb", "gas", "iters"), SIZES)
def test_derived_sizes(
    tmp_path: Path, hosts: int, env: dict, world: int, dp: int, gb: int, gas: int, iters: int
) -> None:
    job = _pbs(tmp_path, [f"x4000c0s{i}b0n0" for i in range(hosts)]) if hosts > 1 else {}
    plan = _plan(tmp_path, {**job, **env}, launcher="auto")
    assert plan.derived["WORLD_SIZE"] == str(world) and plan.derived["DP"] == str(dp)
    assert plan.values["GLOBAL_BATCH"][0] == str(gb) and plan.values["GRAD_ACC_STEPS"][0] == str(gas)
    assert plan.derived["TRAIN_ITERS"] == str(iters)
    cfg = plan.config
    assert cfg is not None and cfg.training.global_batch_size == gb and cfg.training.train_iters == iters
    assert cfg.data_parallel_size(world) == dp


def test_pbs_nodefile_hosts_are_unique(tmp_path: Path) -> None:
    job = _pbs(tmp_path, ["n0", "n0", "n1", "n1", "n0"])  # some PBS sites list a host once per core
    plan = _plan(tmp_path, {**job, "NGPU_PER_HOST": "4"}, launcher="mpiexec")
    assert plan.derived["NHOSTS"] == "2" and plan.derived["WORLD_SIZE"] == "8"


def test_slurm_hosts_and_tasks(tmp_path: Path) -> None:
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "nid[001-003]", "SLURM_NTASKS_PER_NODE": "4",
           "SLURM_CPUS_PER_TASK": "32"}  # fmt: skip
    plan = _plan(tmp_path, env, launcher="srun")
    assert plan.derived["WORLD_SIZE"] == "12" and plan.values["CPUS_PER_RANK"][0] == "32"
    assert plan.command[:12] == ["srun", "--nodes", "3", "--ntasks", "12", "--ntasks-per-node", "4",
                                 "--cpus-per-task", "32", "--kill-on-bad-exit=1", sys.executable,
                                 str(ROOT / "pretrain_gpt.py")]  # fmt: skip
    assert plan.signal == "USR1"  # srun forwards it to the tasks; SIGTERM would end the step


def test_variables_map_to_schema_settings(tmp_path: Path) -> None:
    env = {
        "NGPU_PER_HOST": "2", "TP": "2", "SP": "2", "ZERO_STAGE": "2", "DTYPE": "bf16", "OPT": "sgd",
        "LR_WARMUP_FRAC": "0.01", "LR": "0.001", "MIN_LR": "0.0001", "LR_DECAY_STYLE": "WSD", "SEED": "7",
        "USE_ACTIVATION_CHECKPOINTING": "1", "OVERRIDE_CKPT_OPT_PARAM": "1", "NO_TENSORBOARD": "1",
        "NLAYERS": "4", "SEQ": "256", "EVAL_INTERVAL": "9", "EVAL_ITERS": "3", "SAVE_INTERVAL": "5",
        "LR_DECAY_ITERS": "1.5K",
    }  # fmt: skip
    plan = _plan(tmp_path, env, "--lr-wsd-decay-iters", "100")  # WSD's decay length: checked when parsed
    cfg = plan.config
    assert cfg is not None
    assert cfg.parallel.sequence_parallel and cfg.parallel.use_distributed_optimizer
    assert cfg.precision.bf16 and cfg.optimizer.optimizer == "sgd" and cfg.training.seed == 7
    assert cfg.schedule.lr_warmup_fraction == 0.01 and cfg.schedule.lr_decay_style == "WSD"
    assert cfg.schedule.lr_decay_iters == 1500  # lengths take counts, as their flags do
    assert cfg.optimizer.lr == 0.001 and cfg.optimizer.min_lr == 0.0001
    assert cfg.training.recompute_activations and cfg.schedule.override_opt_param_scheduler
    assert cfg.logging.tensorboard_dir is None and cfg.model.num_layers == 4 and cfg.model.seq_length == 256
    assert (cfg.logging.eval_interval, cfg.logging.eval_iters, cfg.checkpoint.save_interval) == (9, 3, 5)
    assert cfg.training.exit_signal_handler and cfg.logging.run_dir == str(tmp_path / "run")
    assert any("ZERO_STAGE=2: mapped to --use-distributed-optimizer" in n for n in plan.notes)
    assert plan.values["LR_WARMUP_FRAC"] == ("0.01", "env")


def test_presets_are_the_documented_shapes(tmp_path: Path) -> None:
    shapes = {
        name: (p.num_layers, p.hidden_size, p.heads, p.kv_heads, p.ffn_hidden_size) for name, p in PRESETS.items()
    }
    assert shapes["125M"][:3] == (12, 768, 12)
    assert shapes["1B"] == (16, 2048, 32, 8, 8192)
    assert shapes["llama3-3B"] == (28, 3072, 24, 8, 8192)
    assert shapes["7B"] == (32, 4096, 32, 8, 11008) and PRESETS["7B"].seq_length == 4096
    assert shapes["70B"] == (80, 8192, 64, 8, 28672)
    for name in PRESETS:  # every preset resolves into a valid configuration on 8 ranks
        plan = _plan(tmp_path, {"MODEL_ARCH": name, "NGPU_PER_HOST": "8", "TRAIN_ITERS": "10"}, launcher="torchrun")
        assert plan.config is not None and plan.config.model.num_layers == PRESETS[name].num_layers
    assert alcf_env.preset_parameters(PRESETS["70B"]) == pytest.approx(68.98e9, rel=1e-3)


def test_command_line_wins_and_its_group_steps_aside(tmp_path: Path) -> None:
    plan = _plan(tmp_path, {"NGPU_PER_HOST": "1", "LR": "0.001", "TRAIN_ITERS": "9"}, "--lr", "0.002",
                 "--lr-warmup-iters", "3", "--train-samples", "40")  # fmt: skip
    cfg = plan.config
    assert cfg is not None and cfg.optimizer.lr == 0.002
    assert cfg.schedule.lr_warmup_iters == 3 and cfg.schedule.lr_warmup_fraction is None  # default fraction dropped
    assert cfg.training.train_samples == 40 and cfg.training.train_iters is None
    assert any("LR=0.001 is overridden by the command line" in n for n in plan.notes)
    assert any("TRAIN_TOKENS/TRAIN_ITERS ignored" in n for n in plan.notes)


def test_continue_drops_the_one_time_flags(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("30\n")
    (tmp_path / "pretrained").mkdir()
    env = {"NGPU_PER_HOST": "1", "LOAD": str(tmp_path / "pretrained"), "TRAIN_ITERS": "60"}
    with pytest.raises(EnvError, match=r"SAVE=.* already holds a checkpoint \(iteration 30\) but --finetune starts"):
        _plan(tmp_path, env, "--finetune", "--universal-checkpoint")
    plan = _plan(tmp_path, {**env, "CONTINUE": "1"}, "--finetune", "--universal-checkpoint", "--ckpt-step", "3")
    cfg = plan.config
    assert cfg is not None and cfg.checkpoint.load == str(tmp_path / "ckpt") and not cfg.checkpoint.finetune
    assert not cfg.checkpoint.universal_checkpoint and cfg.checkpoint.ckpt_step is None
    assert plan.derived["START_ITERATION"] == "30"
    assert any("ignored --finetune --universal-checkpoint --ckpt-step 3" in n for n in plan.notes)


# ---- one error per inconsistency ----------------------------------------------------------------------------------

ERRORS = [
    ({"GLOBAL_BATCH": "6", "GRAD_ACC_STEPS": "2"},
     "GLOBAL_BATCH=6 does not equal MICRO_BATCH 2 x GRAD_ACC_STEPS 2 x DP 2 = 8"),
    ({"GLOBAL_BATCH": "6", "MICRO_BATCH": "2"},
     "GLOBAL_BATCH (--global-batch-size) 6 is not divisible by MICRO_BATCH (--micro-batch-size) 2 x data-parallel "
     "size 2"),
    ({"TP": "3"}, "HEADS (--num-attention-heads) 4 is not divisible by TP (--tensor-model-parallel-size) 3"),
    ({"TP": "4", "NGPU_PER_HOST": "4"},
     "NUM_KV_HEAD (--num-query-groups) 2 is not divisible by TP (--tensor-model-parallel-size) 4"),
    ({"NGPU_PER_HOST": "3", "TP": "2"}, "WORLD_SIZE 3 (1 host(s) x NGPU_PER_HOST 3) is not divisible by TP 2 x PP 1"),
    ({"NLAYERS": "3", "PP": "2"},
     "NLAYERS (--num-layers) 3 is not divisible by PP (--pipeline-model-parallel-size) 2"),
    ({"SP": "2"}, "SP=2 must be 1 (off) or equal to TP=1"),
    ({"SEQ": "129", "TP": "2", "SP": "2"},
     "SEQ (--seq-length) 129 is not divisible by TP (--tensor-model-parallel-size) 2"),
    ({"HIDDEN": "66"}, "HIDDEN (--hidden-size) 66 is not divisible by HEADS (--num-attention-heads) 4"),
    ({"TRAIN_TOKENS": "1M", "TRAIN_ITERS": "10"}, "TRAIN_TOKENS=1M and TRAIN_ITERS=10 are both set"),
    ({"TRAIN_TOKENS": "lots"}, "TRAIN_TOKENS='lots' is not a count"),
    ({"MODEL_ARCH": "7B"}, "MODEL_ARCH=7B needs a run length; expected TRAIN_TOKENS"),
    ({"MODEL_ARCH": "13B"}, "MODEL_ARCH='13B' is not a preset; expected one of tiny, 125M, 1B, llama3-3B, 7B, 70B"),
    ({"LR_WARMUP_FRACTION": "0.01", "LR_WARMUP_FRAC": "0.05"},
     "LR_WARMUP_FRACTION=0.01 and its alias LR_WARMUP_FRAC=0.05 disagree"),
    ({"LR_WARMUP_FRACTION": "1.5"}, "LR_WARMUP_FRACTION (--lr-warmup-fraction) must be in [0, 1)"),
    ({"LR": "0.001", "MIN_LR": "0.01"}, "MIN_LR (--min-lr) 0.01 must be in [0, LR (--lr) 0.001]"),
    ({"LR_DECAY_STYLE": "linearish"}, "LR_DECAY_STYLE (--lr-decay-style) 'linearish' must be one of"),
    ({"ZERO_STAGE": "3"}, "ZERO_STAGE=3 (parameter sharding) is not supported"),
    ({"OPT": "lamb"}, "OPT='lamb' is not supported; expected adamw"),
    ({"DTYPE": "fp8"}, "DTYPE='fp8' is not a precision; expected bf16, fp16, fp32 or auto"),
    ({"MICRO_BATCH": "two"}, "MICRO_BATCH='two' is not an integer"),
    ({"LR_DECAY_ITERS": "2.5"}, "LR_DECAY_ITERS='2.5' is not a count; expected where the lr reaches --min-lr"),
    ({"GRAD_ACC_STEPS": "0"}, "GRAD_ACC_STEPS=0 is out of range; expected a whole number >= 1"),
    ({"NGPU_PER_HOST": "0"}, "NGPU_PER_HOST=0 is out of range"),
    ({"TOKENIZER_TYPE": "SentencePieceTokenizer"},
     "TOKENIZER_TYPE (--tokenizer-type) SentencePieceTokenizer needs TOKENIZER_MODEL (--tokenizer-model) PATH"),
    ({"TOKENIZER_TYPE": "Llama9Tokenizer"}, "TOKENIZER_TYPE='Llama9Tokenizer' is not one of ByteTokenizer"),
    ({"TOKENIZER_TYPE": "SentencePieceTokenizer", "TOKENIZER_MODEL": "missing.model"},
     "TOKENIZER_MODEL=missing.model does not exist"),
    ({"DATA_FILE_LIST": "missing.txt"}, "DATA_FILE_LIST: missing.txt is not a file"),
    ({"LOAD": "no/such/ckpt"}, "LOAD=no/such/ckpt does not exist"),
    ({"USE_ACTIVATION_CHECKPOINTING": "maybe"},
     "USE_ACTIVATION_CHECKPOINTING='maybe' is not a switch; expected 1 or 0"),
    ({"PBS_JOBID": "1.pbs"}, "PBS_NODEFILE is not set although PBS_JOBID is"),
    ({"PBS_JOBID": "1.pbs", "PBS_NODEFILE": "/no/such/nodefile"}, "PBS_NODEFILE=/no/such/nodefile cannot be read"),
    ({"SLURM_JOB_ID": "5"}, "SLURM_JOB_NODELIST and SLURM_JOB_NUM_NODES are not set although SLURM_JOB_ID is"),
    ({"RUN_DIR": __file__}, f"RUN_DIR (--run-dir) {__file__}: is a file; expected a folder"),
    ({"SAVE": __file__}, f"SAVE (--save) {__file__}: is a file; expected a folder"),
    ({"DATA_CACHE_PATH": __file__}, f"DATA_CACHE_PATH (--data-cache-path) {__file__}: is a file; expected a folder"),
]  # fmt: skip


@pytest.mark.parametrize(("env", "message"), ERRORS, ids=[next(iter(e)) + f"-{i}" for i, (e, _) in enumerate(ERRORS)])
def test_each_inconsistency_is_one_error_naming_the_variable(tmp_path: Path, env: dict, message: str) -> None:
    with pytest.raises((EnvError, ConfigError)) as info:
        _plan(tmp_path, {"NGPU_PER_HOST": "2", **env})
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_launcher_errors(tmp_path: Path) -> None:
    job = _pbs(tmp_path, ["a", "b"])
    with pytest.raises(EnvError, match="LAUNCH_WITH=torchrun runs on one node but the job has 2 hosts"):
        _plan(tmp_path, {**job, "NGPU_PER_HOST": "2"}, launcher="torchrun")
    with pytest.raises(EnvError, match="LAUNCH_WITH=python starts one process but NGPU_PER_HOST is 2"):
        _plan(tmp_path, {"NGPU_PER_HOST": "2"}, launcher="python")


# ---- the table, the schema and the docs ---------------------------------------------------------------------------

ISSUE_VARIABLES = """MODEL_ARCH NLAYERS HIDDEN HEADS NUM_KV_HEAD FFN_HIDDEN_SIZE SEQ TP PP SP NGPU_PER_HOST MICRO_BATCH
GRAD_ACC_STEPS GLOBAL_BATCH TRAIN_TOKENS TRAIN_ITERS LR MIN_LR LR_DECAY_STYLE LR_WARMUP_FRACTION LR_WARMUP_FRAC
LR_DECAY_ITERS DTYPE DATA_FILE_LIST TOKENIZER_TYPE TOKENIZER_MODEL LOAD SAVE SAVE_INTERVAL EVAL_INTERVAL EVAL_ITERS
SEED USE_ACTIVATION_CHECKPOINTING OPT ADAM_BETA1 ADAM_BETA2 ADAM_EPS WEIGHT_DECAY CLIP_GRAD OVERRIDE_CKPT_OPT_PARAM
LAUNCH_WITH DRY_RUN NO_TENSORBOARD WANDB_PROJECT ZERO_STAGE USE_DEEPSPEED""".split()


def test_the_table_has_every_variable_and_real_flags() -> None:
    names = [v.name for v in VARIABLES]
    assert len(names) == len(set(names))
    assert not set(ISSUE_VARIABLES) - set(names)
    for v in VARIABLES:
        assert v.flag is None or v.flag in alcf_env.FIELDS, (v.name, v.flag)
        assert v.section in alcf_env.SECTIONS
    for name in alcf_env.DIRECT:
        assert alcf_env.VAR_BY_NAME[name].flag


def test_docs_hold_the_generated_tables() -> None:
    readme = (ROOT / "ALCF" / "README.md").read_text()
    assert alcf_env.presets_markdown() in readme, "regenerate with: python -m megatron_ext.alcf_env docs"
    assert alcf_env.variables_markdown() in readme, "regenerate with: python -m megatron_ext.alcf_env docs"
    for name in ISSUE_VARIABLES:
        assert f"`{name}`" in readme
    notes = ROOT / "ALCF" / "notes"
    for page in ("running.md", "resume_other_node_count.md", "universal_checkpoints.md", "cooldown.md", "cpt.md"):
        assert (notes / page).is_file(), page


def test_error_examples_in_the_docs_are_real(tmp_path: Path) -> None:
    readme = (ROOT / "ALCF" / "README.md").read_text()
    shown = re.findall(r"^\s+error: (.+)$", readme, re.M)
    assert len(shown) == 3
    real = []
    for env in ({"GLOBAL_BATCH": "6", "GRAD_ACC_STEPS": "2"}, {"TP": "3"}, {"NGPU_PER_HOST": "3", "TP": "2"}):
        with pytest.raises((EnvError, ConfigError)) as info:
            _plan(tmp_path, {"NGPU_PER_HOST": "2", **env})
        real.append(str(info.value))
    assert shown == real


def test_parse_count() -> None:
    assert alcf_env.parse_count("T", "22000000000") == alcf_env.parse_count("T", "22e9") == 22 * 10**9
    assert alcf_env.parse_count("T", "22B") == 22 * 10**9 and alcf_env.parse_count("T", "1.5T") == 15 * 10**11
    for bad in ("0", "1.5", "-3", "B"):
        with pytest.raises(EnvError):
            alcf_env.parse_count("T", bad)


def test_dotenv_round_trip_and_progress(tmp_path: Path) -> None:
    plan = _plan(tmp_path, {"NGPU_PER_HOST": "1", "DATA_CACHE_PATH": "a dir/with 'quotes'"})
    alcf_env.write_run_dir(plan)
    run = Path(plan.run_dir)
    env = alcf_env.read_dotenv(run / ".env")
    assert env["DATA_CACHE_PATH"] == "a dir/with 'quotes'" and env["TRAIN_ITERS"] == "50"
    assert env["WORLD_SIZE"] == "1" and env["SAVE"] == str(tmp_path / "ckpt")
    assert alcf_env.progress(run) == (0, 0, 50)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("20\n")
    assert alcf_env.progress(run) == (0, 20, 50)
    assert "exec " in (run / "launch.sh").read_text() and (run / "config.json").is_file()


def test_universal_checkpoint_of_the_run_resumes_into_its_save(tmp_path: Path) -> None:
    """Resume on another layout: LOAD=a universal conversion of SAVE's latest checkpoint, saving on into SAVE."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("30\n")
    (tmp_path / "univ").mkdir()
    (tmp_path / "univ" / "universal.json").write_text('{"iteration": 30}')
    env = {"NGPU_PER_HOST": "2", "TP": "2", "LOAD": str(tmp_path / "univ"), "TRAIN_ITERS": "60"}
    plan = _plan(tmp_path, env, "--universal-checkpoint")
    assert plan.derived["START_ITERATION"] == "30" and plan.config is not None
    ck = plan.config.checkpoint
    assert ck.load == str(tmp_path / "univ") and ck.save == str(tmp_path / "ckpt")
    (tmp_path / "univ" / "universal.json").write_text('{"iteration": 20}')  # an older checkpoint than SAVE's
    with pytest.raises(EnvError, match=r"iteration 30\) but LOAD holds iteration 20"):
        _plan(tmp_path, env, "--universal-checkpoint")


# ---- one parse, the command line told from defaults, one help per flag -------------------------------------------


def test_the_config_shown_is_the_config_launched(tmp_path: Path) -> None:
    """The plan's config (one parse, then the derived flags) equals what pretrain_gpt.py parses from plan.argv."""
    cases = [
        ({"NGPU_PER_HOST": "2"}, []),
        ({"NGPU_PER_HOST": "2", "TP": "2", "TRAIN_TOKENS": "1M", "LR": "0.001", "DTYPE": "bf16"},
         ["--lr", "3e-4", "--run-dir", str(tmp_path / "cli_run"), "--no-exit-signal-handler"]),
        ({"NGPU_PER_HOST": "1", "GLOBAL_BATCH": "8", "NO_TENSORBOARD": "1"},
         ["--train-samples", "400", "--save", str(tmp_path / "cli_ckpt"), "--fp16"]),
    ]  # fmt: skip
    for env, extra in cases:
        plan = _plan(tmp_path, env, *extra)
        launched = parse_args(plan.argv)
        launched.resolve_batch(int(plan.derived["WORLD_SIZE"]))
        assert launched == plan.config, (env, extra)
    assert plan.config is not None and plan.config.precision.fp16 and not plan.config.precision.bf16


def test_flags_given_are_told_from_defaults(tmp_path: Path) -> None:
    given = alcf_env.given_dests(["--lr", "3e-4", "--no-exit-signal-handler", "--use-flash-attn", "--train-iters=5"])
    assert given == {"optimizer.lr", "training.exit_signal_handler", "model.attention_backend", "training.train_iters"}
    plan = _plan(tmp_path, {"NGPU_PER_HOST": "1", "LR": "0.001"}, "--lr", "3e-4")  # the schema's default value
    assert plan.config is not None and plan.config.optimizer.lr == 3e-4
    assert plan.values["LR"] == ("0.001", "env, overridden by the command line")


def test_a_variables_help_is_its_flags_unless_it_says_more() -> None:
    for v in alcf_env._TABLE:
        flag_help = alcf_env.FIELDS[v.flag][1].metadata["help"] if v.flag else None
        assert v.help != flag_help, f"{v.name}: drop its help, the flag's is used"
    own = {v.name: v.help for v in alcf_env._TABLE}
    for v in VARIABLES:
        assert v.help and v.help == (own[v.name] or alcf_env.FIELDS[v.flag or ""][1].metadata["help"])


def test_config_from_env_points_to_the_resolver() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.config", "--from-env"], capture_output=True, text=True,
                          env=env)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == "error: --from-env moved: python -m megatron_ext.alcf_env resolve [...] [-- flags]\n"


# ---- the LR schedule: one vocabulary, checked before anything starts ---------------------------------------------


def test_every_lr_decay_style_alias_is_accepted(tmp_path: Path) -> None:
    from megatron_ext.lr_schedule import STYLE_ALIASES

    for alias, style in STYLE_ALIASES.items():
        plan = _plan(tmp_path, {"NGPU_PER_HOST": "1", "LR_DECAY_STYLE": alias}, "--lr-wsd-decay-iters", "5",
                     "--constant-lr", "1e-5")  # fmt: skip
        assert plan.config is not None and plan.config.schedule.lr_decay_style == style, alias


def test_dry_run_stops_on_a_schedule_mistake(tmp_path: Path) -> None:
    env = {**os.environ, **CPU, "DRY_RUN": "1", "PYTHONPATH": str(ROOT), "SAVE": str(tmp_path / "c"),
           "RUN_DIR": str(tmp_path / "r")}  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "train_alcf.sh"), "--lr-decay-style", "WSD"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: the LR schedule: WSD needs 0 < lr_wsd_decay <= lr_decay"), proc.stderr
    assert not (tmp_path / "r").exists()  # nothing written
