"""What Megatron-DeepSpeed users bring, and what it means here: blendcorpus' mix_datasets.py command line, a
DeepSpeed JSON config mapped onto the schema, the DeepSpeed flags, the helpers.sh variables, the compatibility
table. Fast: one interpreter start (the guide's mixing command as a shell runs it), the rest in-process."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.data_list import parse_data_list
from megatron_ext.data.indexed import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    """tools/<name>.py as a module, to call main() in-process."""
    key = f"_tools_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "tools" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _dataset(prefix: Path, n_tokens: int) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(prefix, 258) as w:
        w.add_document(np.arange(n_tokens) % 258)


# ---- tools/mix_datasets.py: blendcorpus' interface ----------------------------------------------------------


@pytest.fixture
def guide_lists(tmp_path: Path) -> Path:
    """papers.txt (two datasets, weights on a token scale, one of them tiny) and dolma.txt (three), as in the
    continual pre-training guide, in the working folder."""
    for name, n in [("papers/p0", 300), ("papers/p1", 100), ("dolma/d0", 200), ("dolma/d1", 50), ("dolma/d2", 9)]:
        _dataset(tmp_path / name, n)
    (tmp_path / "papers.txt").write_text("3e9 papers/p0 papers\n1e-3 papers/p1 papers\n")
    (tmp_path / "dolma.txt").write_text("0.5 dolma/d0 dolma\n0.25 dolma/d1 dolma\n0.25 dolma/d2 dolma\n")
    return tmp_path


def test_the_guides_mixing_command_verbatim_writes_the_exact_mix(guide_lists: Path) -> None:
    command = "python3 tools/mix_datasets.py --input 0.9 papers.txt 0.1 dolma.txt > mix.txt"
    shell = command.replace("python3 tools/", f"{sys.executable} {ROOT}/tools/")
    done = subprocess.run(shell, shell=True, cwd=guide_lists, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "wrote 5 datasets from 2 lists to standard output\n"
    got = [
        (Path(e.prefix).relative_to(guide_lists).as_posix(), e.weight, e.corpus)
        for e in parse_data_list(guide_lists / "mix.txt")
    ]
    papers, dolma = 3e9 + 1e-3, 1.0
    assert got == [
        ("papers/p0", 0.9 / 1.0 * (3e9 / papers), "papers"),
        ("papers/p1", 0.9 / 1.0 * (1e-3 / papers), "papers"),  # 3e-13: blendcorpus' %.6f wrote 0.000000
        ("dolma/d0", 0.1 / 1.0 * (0.5 / dolma), "dolma"),
        ("dolma/d1", 0.1 / 1.0 * (0.25 / dolma), "dolma"),
        ("dolma/d2", 0.1 / 1.0 * (0.25 / dolma), "dolma"),
    ]
    assert got[1][1] > 0 and math.isclose(math.fsum(w for _, w, _ in got), 1.0, rel_tol=1e-15)


def test_lists_of_files_not_staged_here_are_mixed_with_a_warning(
    guide_lists: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(guide_lists)
    lus = "/lus/flare/projects/none/dolma"  # a login node's list, before the data is staged
    (guide_lists / "remote.txt").write_text(f"2 {lus}/a dolma\n1 {lus}/b dolma\n1 papers/p0 papers\n")
    mix = _tool("mix_datasets").main
    assert mix(["--inputs", "1", "remote.txt", "3", "dolma.txt"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"warning: remote.txt: 2 of 3 datasets are not on this machine (first: remote.txt:1: {lus}/a.idx not "
        "found); mixed as listed (--no-check skips this check)",
        "wrote 6 datasets from 2 lists to standard output",
    ]
    lines = [line.split() for line in out.splitlines() if not line.startswith("#")]
    assert [(float(w), p) for w, p, _ in lines[:3]] == [(0.25 * 2 / 4, f"{lus}/a"), (0.25 / 4, f"{lus}/b"),
                                                        (0.25 / 4, str(guide_lists / "papers/p0"))]  # fmt: skip
    assert mix(["--inputs", "1", "remote.txt", "--no-check", "--output", "m.txt", "--summary"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("wrote 3 datasets from 1 lists to m.txt\n")
    assert [line.split()[:3] for line in out.splitlines()[3:5]] == [["dolma", "2", "0"], ["papers", "1", "300"]]
    # present files must still be whole, and a missing list is still an error
    (guide_lists / "papers" / "p0.bin").write_bytes(b"\0" * 7)
    assert mix(["--inputs", "1", "remote.txt"]) == 2
    assert "has 7 bytes but the .idx implies 600" in capsys.readouterr().err
    assert mix(["--input", "1", "absent.txt"]) == 2
    assert capsys.readouterr().err == "error: absent.txt: cannot read data list: No such file or directory\n"


# ---- --deepspeed_config: DeepSpeed's JSON mapped onto the schema when the run starts ------------------------

# As ALCF's helpers.sh writes it for MICRO_BATCH=2 GRAD_ACC_STEPS=4 on 4 ranks, ZERO_STAGE=1, DTYPE=bf16, OPT=adamw.
ALCF_JSON = {
    "train_batch_size": 32,
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 4,
    "steps_per_print": 1,
    "gradient_clipping": 1.0,
    "wall_clock_breakdown": False,
    "zero_optimization": {"stage": 1, "overlap_comm": True, "reduce_bucket_size": 5e8, "contiguous_gradients": True},
    "bf16": {"enabled": True},
    "fp16": {"enabled": False, "loss_scale": 0, "initial_scale_power": 16},
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-5, "weight_decay": 0.1}},
    "activation_checkpointing": {"partition_activations": True, "cpu_checkpointing": True},
    "comms_logger": {"enabled": False},
    "data_types": {"grad_accum_dtype": "fp32"},
}
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--train-iters", "10"]


def _ds(tmp_path: Path, ds: dict, *flags: str, world_size: int = 4):
    from megatron_ext.config import parse_args
    from megatron_ext.deepspeed_config import apply

    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(ds))
    cfg = parse_args([*MODEL, "--deepspeed", "--deepspeed_config", str(path), *flags])
    return apply(cfg, world_size), str(path)


def test_an_alcf_json_maps_to_the_schema_with_one_note(tmp_path: Path) -> None:
    from megatron_ext.config import startup_note

    cfg, path = _ds(tmp_path, ALCF_JSON, "--zero-stage", "1", "--use-flash-attn-builder")
    t, p, o = cfg.training, cfg.parallel, cfg.optimizer
    assert (t.micro_batch_size, t.global_batch_size, cfg.precision.bf16, cfg.precision.fp16) == (2, 32, True, False)
    assert (p.use_distributed_optimizer, p.overlap_grad_reduce, o.clip_grad) == (True, True, 1.0)
    assert (o.optimizer, o.lr, o.adam_beta1, o.adam_beta2, o.adam_eps, o.weight_decay) == (
        "adam",
        2e-4,
        0.9,
        0.95,
        1e-5,
        0.1,
    )
    assert cfg.model.attention_backend == "sdpa"
    cfg.resolve_batch(4)  # 2 x 4 accumulation steps x 4 data-parallel ranks
    assert cfg.training.global_batch_size // (2 * 4) == 4
    source = f"--deepspeed_config {path}"
    lines = startup_note(cfg).splitlines()
    taken = (
        f"  {source}: taken: train_micro_batch_size_per_gpu -> --micro-batch-size 2, train_batch_size -> "
        "--global-batch-size 32, bf16.enabled -> --bf16 true, zero_optimization.overlap_comm -> --overlap-grad-reduce "
        "true, optimizer.params.betas[1] -> --adam-beta2 0.95, optimizer.params.eps -> --adam-eps 1e-05, "
        "optimizer.params.lr -> --lr 0.0002, optimizer.params.weight_decay -> --weight-decay 0.1"
    )
    assert taken in lines
    assert [x for x in lines if "-> --use-distributed-optimizer: megatron-core's distributed optimizer" in x] == [
        "  --zero-stage 1 -> --use-distributed-optimizer: megatron-core's distributed optimizer shards the Adam state "
        "and fp32 master weights over the data-parallel ranks and reduce-scatters the gradients (ZeRO-1's memory "
        "saving; the bf16/fp16 gradient buffer stays whole, as ZeRO-2 would shard it)"
    ]  # once: the JSON's stage 1 says the same
    assert any(x.startswith(f"  {source}: activation_checkpointing (cpu_checkpointing, partition_activations)")
               for x in lines)  # fmt: skip
    assert f"  {source}: no counterpart here, ignored: comms_logger, data_types, fp16.initial_scale_power, " \
        "fp16.loss_scale, steps_per_print, wall_clock_breakdown, zero_optimization.contiguous_gradients, " \
        "zero_optimization.reduce_bucket_size" in lines  # fmt: skip


def test_a_conflicting_batch_size_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_ext.training.loop import main

    ds = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    common = [*MODEL, "--deepspeed", "--deepspeed_config", str(path), "--device", "cpu"]
    assert main([*common, "--global-batch-size", "16"]) == 2
    assert capsys.readouterr().err == (
        f"error: --deepspeed_config {path}: train_batch_size 8 conflicts with --global-batch-size 16; expected the "
        "same value (or leave the flag out)\n"
    )
    path.write_text(json.dumps({**ds, "train_batch_size": 16}))  # DeepSpeed's own check, against the world size
    assert main(common) == 2
    assert capsys.readouterr().err == (
        f"error: --deepspeed_config {path}: train_batch_size 16 is not train_micro_batch_size_per_gpu 2 x "
        "gradient_accumulation_steps 4 x data-parallel size 1 (world size 1 / TP 1 / PP 1)\n"
    )
    # python -m megatron_ext.config never reads the JSON: a file absent here still prints the configuration
    from megatron_ext.config import parse_args

    assert parse_args([*MODEL, "--deepspeed_config", str(tmp_path / "absent.json")]).deepspeed.deepspeed_config


def test_fp16_scheduler_and_what_the_command_line_keeps(tmp_path: Path) -> None:
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 2,
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
                 "hysteresis": 2, "min_loss_scale": 1},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1e-3, "warmup_num_steps": 3,
                                                          "total_num_steps": 10, "warmup_type": "linear"}},
    }  # fmt: skip
    cfg, path = _ds(tmp_path, ds, "--lr", "5e-4", "--clip-grad", "0.5", world_size=2)
    pr, sc = cfg.precision, cfg.schedule
    assert (pr.fp16, pr.loss_scale, pr.initial_loss_scale, pr.loss_scale_window, pr.min_loss_scale) == (
        True, None, 4096.0, 500, 1.0)  # fmt: skip
    assert (cfg.training.micro_batch_size, cfg.training.global_batch_size) == (1, 1 * 2 * 2)
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.clip_grad) == (5e-4, 0.0, 0.5)
    assert (sc.lr_decay_style, sc.lr_warmup_iters, sc.lr_decay_iters, sc.lr_warmup_init) == ("linear", 3, 10, 0.0)
    source = f"--deepspeed_config {path}"
    assert f"{source}: differs from the command line: optimizer.params.lr 0.001 (the command line's --lr 0.0005 " \
        "is kept), scheduler.params.warmup_max_lr 0.001 (the command line's --lr 0.0005 is kept)" in \
        cfg.compat.readings  # fmt: skip
    assert f"{source}: no gradient_clipping (DeepSpeed would not clip): --clip-grad 0.5 clips here" in \
        cfg.compat.readings  # fmt: skip


@pytest.mark.parametrize(
    ("ds", "flags", "message"),
    [
        ({"zero_optimization": {"stage": 3}}, [],
         "{src}: zero_optimization.stage 3 is not supported here (ZeRO-3 shards the parameters); expected 0, 1 or 2 "
         "(megatron-core's distributed optimizer), or tensor/pipeline parallelism to split the model"),
        ({}, ["--zero-stage", "3"], "--zero-stage 3 is not supported here (ZeRO-3 shards the parameters); expected "
         "0, 1 or 2 (megatron-core's distributed optimizer), or tensor/pipeline parallelism to split the model"),
        ({}, ["--ds-sequence-parallel-size", "4"], "--ds-sequence-parallel-size 4 is not supported here (DeepSpeed "
         "Ulysses sequence parallelism); expected 1 (--sequence-parallel is Megatron's, within the tensor-parallel "
         "group)"),
        ({"bf16": {"enabled": True}}, ["--fp16"], "{src}: bf16.enabled true conflicts with --fp16; expected one "
         "precision"),
        ({"optimizer": {"type": "OneBitLamb"}}, [], "{src}: optimizer.type 'OneBitLamb' is not supported here; "
         "expected Adam, AdamW or SGD (or remove the block: --optimizer decides)"),
        ({"train_micro_batch_size_per_gpu": "two"}, [], '{src}: train_micro_batch_size_per_gpu "two" is not an '
         "integer"),
    ],
)  # fmt: skip
def test_what_is_not_supported_stops_at_start_up_in_one_line(
    tmp_path: Path, ds: dict, flags: list[str], message: str
) -> None:
    from megatron_ext.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _ds(tmp_path, ds, *flags)
    assert str(e.value) == message.format(src=f"--deepspeed_config {tmp_path / 'ds_config.json'}")


# ---- the helpers.sh variables train_alcf.sh lacked ---------------------------------------------------------


def _resolve(tmp_path: Path, env: dict[str, str]):
    from megatron_ext.alcf_env import resolve

    base = {"CUDA_VISIBLE_DEVICES": "", "DRY_RUN": "1", "RUN_DIR": str(tmp_path / "run")}
    return resolve({**base, **env})


def test_each_helpers_sh_variable_resolves_under_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_ext.alcf_env import report

    monkeypatch.chdir(tmp_path)
    env = {
        "ROPE_THETA": "50000", "INIT_METHOD_STD": "0.006", "NO_FLASH_ATTN": "1", "TIMING_LOG_LEVEL": "1",
        "TRAIN_SPLIT": "98", "VAL_SPLIT": "2", "USE_ACTIVATION_CHECKPOINTING": "1", "ACT_CKPT_NUM_LAYERS": "2",
        "OPTIM": "sgd", "NHEADS": "8", "NUM_LAYERS": "4", "TRAIN_ITER": "7", "GPUS_PER_NODE": "2",
        "CKPT_DIR": str(tmp_path / "ckpt"), "TRAIN_TOKEN": "2T",
    }  # fmt: skip
    plan = _resolve(tmp_path, env)
    cfg = plan.config
    assert (cfg.model.rotary_base, cfg.model.init_method_std, cfg.model.attention_backend) == (50000, 0.006, "unfused")
    assert (cfg.logging.timing_log_level, cfg.data.split) == (1, "98,2,0")  # helpers.sh's TEST_SPLIT default
    assert (cfg.training.recompute_granularity, cfg.training.recompute_num_layers) == ("full", 2)
    assert (cfg.optimizer.optimizer, cfg.model.num_attention_heads, cfg.model.num_layers) == ("sgd", 8, 4)
    assert cfg.training.train_iters == 7 and plan.derived["WORLD_SIZE"] == "2"
    assert cfg.checkpoint.save == cfg.checkpoint.load == str(tmp_path / "ckpt")
    assert plan.values["OPTIM"] == ("sgd", "alias of OPT") and plan.values["VAL_SPLIT"] == ("2", "env")
    assert "note: TRAIN_TOKEN is not a train_alcf.sh variable; did you mean TRAIN_TOKENS?" in report(plan).splitlines()
    assert not any("did you mean" in n for n in _resolve(tmp_path, {"NGPU_PER_HOST": "1", "HOME": "/x"}).notes)


def test_aliases_must_agree_and_hostfile_replaces_the_pbs_nodefile(tmp_path: Path) -> None:
    from megatron_ext.launch import EnvError

    with pytest.raises(EnvError) as e:
        _resolve(tmp_path, {"NGPU_PER_HOST": "1", "OPT": "adamw", "OPTIMIZER": "sgd"})
    assert str(e.value) == "OPTIMIZER=sgd and OPT=adamw disagree (OPTIMIZER is an alias of OPT); set one"
    nodes, part = tmp_path / "nodefile", tmp_path / "hostfile"
    nodes.write_text("x1\nx2\nx3\nx4\n")
    part.write_text("x3\nx4\n")
    pbs = {"PBS_JOBID": "1.pbs", "PBS_NODEFILE": str(nodes), "NGPU_PER_HOST": "3", "HOSTFILE": str(part)}
    plan = _resolve(tmp_path, pbs)
    assert plan.derived["NHOSTS"] == "2" and plan.derived["WORLD_SIZE"] == "6"
    plan = _resolve(tmp_path, {"NGPU_PER_HOST": "1", "HOSTFILE": str(part)})
    assert plan.derived["NHOSTS"] == "1"
    assert f"HOSTFILE={part} ignored: it replaces PBS_NODEFILE inside a PBS job only" in plan.notes


# ---- the compatibility table ---------------------------------------------------------------------------------


def test_the_committed_compatibility_table_is_the_generated_one(tmp_path: Path) -> None:
    table = _tool("compat_table")
    readme = (ROOT / "ALCF" / "README.md").read_text()
    assert table.section() in readme, "regenerate: python tools/compat_table.py --write ALCF/README.md"
    from megatron_ext import compat

    for flag in [*compat.NO_EFFECT, *compat.NOT_BUILT, "--deepspeed_config FILE", "--zero-stage", "--rope-theta"]:
        assert f"| `{flag}" in readme, flag
    # --write replaces only the section between the markers
    doc = tmp_path / "doc.md"
    doc.write_text(f"# title\n\n{table.BEGIN}\nold\n{table.END}\n\ntail\n")
    assert table.main(["--write", str(doc)]) == 0
    assert doc.read_text() == f"# title\n\n{table.section()}\n\ntail\n"


def test_helpers_sh_deepspeed_arguments_as_it_writes_them(tmp_path: Path) -> None:
    """set_args' ds_args and the DeepSpeed-related train_args of ALCF's helpers.sh, `=` forms as written there."""
    from megatron_ext.config import startup_note

    ds_args = ["--no-pipeline-parallel", "--zero-stage=1", "--deepspeed-activation-checkpointing",
               "--checkpoint-activations", "--checkpoint-num-layers=1", "--use-flash-attn-builder",
               "--ds-sequence-parallel-size=1", "--bf16", "--micro-batch-size=2", "--global-batch-size=32"]  # fmt: skip
    cfg, path = _ds(tmp_path, ALCF_JSON, *ds_args)
    assert (cfg.training.recompute_granularity, cfg.training.recompute_num_layers) == ("full", 1)
    assert cfg.parallel.use_distributed_optimizer and cfg.model.attention_backend == "sdpa" and cfg.precision.bf16
    note = startup_note(cfg)
    assert "--deepspeed-activation-checkpointing: recomputation is megatron-core's, as --recompute-activations " \
        "says (every layer is recomputed)" in note  # fmt: skip
    assert "train_batch_size" not in note  # the flags already say what the JSON says
