"""Exact resume in every layout and resharding through the universal format, optimizer moments included.

A reference run (1 process) saves at step 3 and converts that checkpoint to the universal format. Loading the
universal folder at (TP,PP,DP) = (1,1,1), (2,1,1), (1,2,1), (1,1,2 with the distributed optimizer) must continue
the reference's loss curve within 1e-6 (the steps after the first depend on the restored Adam moments), and each
layout's own checkpoint must resume bit-exactly.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launchers import ROOT, clean_env, launch_scenarios, ngram_corpus

SCRIPT = ROOT / "tests" / "checkpoint_scenarios.py"
LAYOUTS = ["univ1", "tp2", "pp2", "dp2_distopt"]
CONVERT = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
# Converted checkpoints (tool, source, flags), each loaded by the 2-process launch in its layout
RESHARDED = {
    "tp2": ["from-universal", "universal", "--target-tp", "2"],
    "dp2_distopt": ["from-universal", "universal", "--use-distributed-optimizer"],
    "pp2": ["reshard", "reference", "--target-pp", "2"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("universal")
    prefix = ngram_corpus(str(work / "docs"))
    one = ["reference", "resume", "univ1", "univ1_resume", "univ1_no_moments", "async", "async_resume"]
    two = [name for layout in LAYOUTS[1:] for name in (layout, f"{layout}_resume")]
    found = launch_scenarios(SCRIPT, 1, 29521, [prefix, str(work)], work / "one.json", one)
    for layout, (tool, source, *flags) in RESHARDED.items():
        out = work / f"resharded_{layout}"
        proc = subprocess.run([*CONVERT, tool, "--load", str(work / source), "--save", str(out), *flags,
                               "--no-progress"], capture_output=True, text=True, env=clean_env())  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        two.append(out.name)
    found |= launch_scenarios(SCRIPT, 2, 29522, [prefix, str(work)], work / "two.json", two)
    return found, work


def _save_at(found: dict) -> int:
    return found["settings"]["save_at"]


def test_resume_is_bit_exact(results: tuple[dict, Path]) -> None:
    found, _ = results
    assert found["resume"] == found["reference"][_save_at(found) :]


def test_background_save_publishes_when_complete_and_resumes_exactly(results: tuple[dict, Path]) -> None:
    found, _ = results
    assert found["async"] == found["reference"]  # no NaN: nothing was visible before the writer finished
    assert found["async_resume"] == found["reference"][_save_at(found) :]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_universal_reshards_with_moments(results: tuple[dict, Path], layout: str) -> None:
    found, _ = results
    assert found[layout] == pytest.approx(found["reference"][_save_at(found) :], rel=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_in_layout_is_bit_exact(results: tuple[dict, Path], layout: str) -> None:
    found, _ = results
    assert found[f"{layout}_resume"] == found[layout][1:]


@pytest.mark.parametrize("layout", RESHARDED)
def test_converted_checkpoint_continues_like_the_universal_load(results: tuple[dict, Path], layout: str) -> None:
    """from-universal (and reshard, straight from our checkpoint) write what a run of the layout then loads with
    plain --load: the same weights and moments as loading the universal folder itself, so the same losses, bit for
    bit."""
    found, work = results
    assert found[f"resharded_{layout}"] == found[layout]
    saved = json.loads((work / f"resharded_{layout}" / "config.json").read_text())["parallel"]
    assert saved["tensor_model_parallel_size"] == (2 if layout == "tp2" else 1)
    assert saved["pipeline_model_parallel_size"] == (2 if layout == "pp2" else 1)
    assert saved["use_distributed_optimizer"] == (layout == "dp2_distopt")


def test_converted_checkpoint_files_hold_at_most_the_largest_tensor(results: tuple[dict, Path]) -> None:
    """What bounds from-universal's memory: PyTorch's writer keeps a file's tensors until the file is closed, so
    no file may hold more tensor bytes than the largest single tensor (one layer of one parameter or state)."""
    import math
    from collections import Counter

    from torch.distributed.checkpoint import FileSystemReader

    _, work = results
    folder = next((work / "resharded_tp2").glob("iter_*"))
    meta = FileSystemReader(str(folder)).read_metadata()
    per_file: Counter[str] = Counter()
    largest = 0
    for index, info in meta.storage_data.items():
        tensor = meta.state_dict_metadata[index.fqn]
        if not hasattr(tensor, "chunks"):
            continue  # a sharded object (bytes)
        chunk = next(c for c in tensor.chunks if tuple(c.offsets) == tuple(index.offset))
        nbytes = math.prod(chunk.sizes) * tensor.properties.dtype.itemsize
        per_file[info.relative_path] += nbytes
        largest = max(largest, nbytes)
    assert len(per_file) > 1 and max(per_file.values()) <= largest, (largest, per_file)
    assert set(per_file) == {f.name for f in folder.glob("*.distcp")}


def test_from_universal_pads_the_vocabulary_for_the_target(results: tuple[dict, Path], tmp_path: Path) -> None:
    """A target whose vocabulary padding differs (here --make-vocab-size-divisible-by 128: 258 rows -> 384) gets
    zero rows for the new padding, weights and moments alike; everything else is copied unchanged."""
    import shutil

    import torch

    from megatron_ext.convert.reshard import from_universal
    from megatron_ext.convert.universal import to_universal

    _, work = results
    univ = tmp_path / "universal"
    shutil.copytree(work / "universal", univ)
    meta = json.loads((univ / "universal.json").read_text())
    meta["config"]["model"]["make_vocab_size_divisible_by"] = 128
    (univ / "universal.json").write_text(json.dumps(meta))
    from_universal(univ, tmp_path / "padded", progress=False)
    to_universal(tmp_path / "padded", tmp_path / "back", progress=False)
    for f in sorted((univ / "zero").rglob("*.pt")):
        a = torch.load(f, weights_only=True)
        b = torch.load(tmp_path / "back" / f.relative_to(univ), weights_only=True)
        a, b = (x["param"] if isinstance(x, dict) else x for x in (a, b))
        if f.parent.name in ("embedding.word_embeddings.weight", "output_layer.weight") and f.name != "step.pt":
            assert b.shape == (384, *a.shape[1:]) and torch.equal(b[: len(a)], a) and not b[len(a) :].any(), f
        else:
            assert torch.equal(a, b), f


def test_moments_matter(results: tuple[dict, Path]) -> None:
    """Control: without the universal folder's moments the curve leaves the reference after one step."""
    found, _ = results
    fresh, ref = found["univ1_no_moments"], found["reference"][_save_at(found) :]
    assert fresh[0] == pytest.approx(ref[0], rel=1e-6)  # the weights alone decide the first loss
    assert abs(fresh[1] - ref[1]) > 1e-4


def test_universal_folder_layout(results: tuple[dict, Path]) -> None:
    found, work = results
    univ, save_at = work / "universal", _save_at(found)
    meta = json.loads((univ / "universal.json").read_text())
    assert meta["format"] == "megatron_ext.universal/1" and meta["iteration"] == save_at
    assert meta["optimizer_step"] == save_at and meta["train_state"]["consumed_samples"] == save_at * 8
    qkv = univ / "zero" / "decoder.layers.3.self_attention.linear_qkv.weight"
    assert sorted(p.name for p in qkv.iterdir()) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]
    import torch

    t = torch.load(qkv / "fp32.pt", weights_only=True)["param"]
    assert tuple(t.shape) == ((4 + 2 * 2) * 16, 64) and t.dtype == torch.float32


def test_dry_run_lists_and_writes_nothing(results: tuple[dict, Path], tmp_path: Path) -> None:
    _, work = results
    cmd = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "to-universal", "--load"]
    proc = subprocess.run([*cmd, str(work / "reference"), "--dry-run"], capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert "decoder.layers.self_attention.linear_qkv.weight[3] -> zero/decoder.layers.3." in proc.stdout
    assert "{fp32,exp_avg,exp_avg_sq}" in proc.stdout and "nothing written" in proc.stderr


def test_damaged_universal_file_is_one_clear_error(results: tuple[dict, Path], tmp_path: Path) -> None:
    import shutil

    found, work = results
    damaged = tmp_path / "damaged"
    shutil.copytree(work / "universal", damaged)
    victim = damaged / "zero" / "output_layer.weight" / "exp_avg.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    argv = [*found["settings"]["base"], "--data-path", str(work / "docs"), "--data-cache-path", str(work / "cache")]
    argv += ["--load", str(damaged)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_gpt.py"), *argv],
        capture_output=True, text=True, env={**clean_env(), "PYTHONPATH": str(ROOT)}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "output_layer.weight/exp_avg.pt: unreadable" in errors[0] and "damaged" in errors[0]
    out = tmp_path / "converted"  # the converter reads the file only when it writes that tensor: same one line
    proc = subprocess.run([*CONVERT, "from-universal", "--load", str(damaged), "--save", str(out), "--no-progress"],
                          capture_output=True, text=True, env=clean_env())  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "exp_avg.pt: unreadable" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]


def test_reshard_tool_keeps_every_tensor(results: tuple[dict, Path], tmp_path: Path) -> None:
    """reshard to TP=2 with the distributed optimizer, back to universal: every weight and moment is unchanged."""
    import torch

    _, work = results
    tool = CONVERT
    out, back = tmp_path / "tp2", tmp_path / "back"
    args = ["--load", str(work / "reference"), "--save", str(out), "--target-tp", "2", "--use-distributed-optimizer"]
    proc = subprocess.run([*tool, "reshard", *args, "--no-progress"], capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TP=2 PP=1, distributed optimizer, with Adam moments" in proc.stdout
    saved = json.loads((out / "config.json").read_text())["parallel"]
    assert saved["tensor_model_parallel_size"] == 2 and saved["use_distributed_optimizer"]
    proc = subprocess.run([*tool, "to-universal", "--load", str(out), "--save", str(back), "--no-progress"],
                          capture_output=True, text=True, env=clean_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    original = sorted((work / "universal" / "zero").rglob("*.pt"))
    assert [f.relative_to(work / "universal") for f in original] == [
        f.relative_to(back) for f in sorted((back / "zero").rglob("*.pt"))
    ]
    for f in original:
        a = torch.load(f, weights_only=True)
        b = torch.load(back / f.relative_to(work / "universal"), weights_only=True)
        a, b = (x["param"] if isinstance(x, dict) else x for x in (a, b))
        assert torch.equal(a, b), f


def test_megatron_lm_checkpoint_loads(results: tuple[dict, Path], tmp_path: Path) -> None:
    """A checkpoint as Megatron-LM's training writes it (same megatron-core model; its own common state: `args`,
    `checkpoint_version`, `opt_param_scheduler`; no manifest) resumes: weights, moments and consumed samples."""
    import argparse
    import shutil

    import torch

    found, work = results
    save_at = _save_at(found)
    mlm = tmp_path / "megatron_lm"
    shutil.copytree(work / "reference" / f"iter_{save_at:07d}", mlm / f"iter_{save_at:07d}")
    (mlm / "latest_checkpointed_iteration.txt").write_text(str(save_at))
    (mlm / f"iter_{save_at:07d}" / "manifest.json").unlink()
    common_file = mlm / f"iter_{save_at:07d}" / "common.pt"
    ours = torch.load(common_file, weights_only=False)
    args = argparse.Namespace(consumed_train_samples=save_at * 8, seq_length=64, num_layers=4)
    common = {"args": args, "checkpoint_version": 3.0, "iteration": save_at, "optimizer": ours["optimizer"]}
    common |= {"opt_param_scheduler": {"max_lr": 4e-3, "num_steps": save_at * 8}, "rng_state": None}
    torch.save(common, common_file)
    argv = [*found["settings"]["base"], "--data-path", str(work / "docs"), "--data-cache-path", str(work / "cache")]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_gpt.py"), *argv, "--load", str(mlm), "--log-interval", "1"],
        capture_output=True, text=True, env={**clean_env(), "PYTHONPATH": str(ROOT)}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Megatron-LM checkpoint (version 3.0): iteration 3, 24 samples consumed" in proc.stdout
    losses = [float(x) for x in re.findall(r"^iter \d+/\d+ \| loss ([0-9.]+)", proc.stdout, re.M)]
    assert losses == pytest.approx(found["reference"][save_at:], abs=1e-4)  # printed with 4 decimals


def test_load_into_fills_the_targets_in_place(tmp_path: Path) -> None:
    """`--load UNIV` and from-universal write each slice straight into the tensor it restores (no second copy of
    the model): a weight's tensor-parallel half and a whole moment, against plain slicing."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_ext.convert import universal

    name = "decoder.final_layernorm.weight"
    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    moment = full * 0.5
    univ = tmp_path / "univ"
    triples = iter([(name, "fp32", full), (name, "exp_avg", moment)])
    universal.write_renamed(univ, triples, 2, config={}, vocab=0, step=None, iteration=7, source="test", progress=False)
    half = torch.zeros(3, 4)  # rows 3..5, as the second of two tensor-parallel ranks holds them
    whole = torch.zeros(6, 4)
    state = {
        "w": ShardedTensor.from_rank_offsets(name, half, (0, 1, 2)),
        "m": ShardedTensor.from_rank_offsets(f"optimizer.state.exp_avg.{name}", whole),
    }
    loaded = universal.load_into(univ, state)
    assert loaded["w"] is half and torch.equal(half, full[3:])
    assert loaded["m"] is whole and torch.equal(whole, moment)


def test_from_universal_on_a_regular_checkpoint_points_to_reshard(tmp_path: Path) -> None:
    from megatron_ext.convert import ConvertError
    from megatron_ext.convert.universal import read_meta

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("200\n")
    with pytest.raises(ConvertError, match="a regular checkpoint, not a universal one .*use `reshard`"):
        read_meta(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(ConvertError, match="universal.json: unreadable"):
        read_meta(tmp_path)
