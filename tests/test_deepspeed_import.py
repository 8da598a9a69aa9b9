"""Import of a DeepSpeed universal checkpoint produced here by DeepSpeed itself (ZeRO-1 on CPU, Megatron-DeepSpeed
parameter names, then DeepSpeed's own ds_to_universal): weights and Adam moments equal those of plain PyTorch
Adam on the same gradients, the model config comes from the saved Megatron-DeepSpeed args, and training starts
from it with (resume) or without (--finetune) the moments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launchers import ROOT, clean_env

from megatron_ext import distributed

pytest.importorskip("deepspeed", reason="DeepSpeed is in the `extras` group (scripts/setup.sh --extras)")
import torch  # noqa: E402

from megatron_ext.convert.deepspeed import _rename  # noqa: E402

MODEL = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
    "--ffn-hidden-size 128 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--untie-embeddings-and-output-weights --disable-bias-linear --seq-length 64"
).split()
RUN = "--micro-batch-size 2 --lr 1e-3 --eval-iters 0 --log-interval 1 --hidden-dropout 0 --attention-dropout 0".split()


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**clean_env(), **env}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("deepspeed")
    _run(
        [sys.executable, str(ROOT / "tests" / "deepspeed_checkpoint.py"), str(work)],
        MASTER_PORT=str(distributed.free_port()),
    )
    ds_universal = work / "ds_universal"
    ds_to_universal = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
    folders = ["--input_folder", str(work / "ds" / "global_step3"), "--output_folder", str(ds_universal)]
    _run([*ds_to_universal, *folders, "--num_extract_workers", "1", "--num_merge_workers", "1"])
    convert = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "from-deepspeed", "--no-progress"]
    _run([*convert, "--load", str(ds_universal), "--save", str(work / "ours")])
    return work


def test_weights_and_moments_equal_plain_pytorch(imported: Path) -> None:
    reference = torch.load(imported / "reference.pt")
    names = _rename(list(reference))
    assert names["language_model.encoder.layers.1.mlp.dense_h_to_4h.weight"] == "decoder.layers.1.mlp.linear_fc1.weight"
    for theirs, expected in reference.items():
        for state, key in (("fp32", "param"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
            ours = torch.load(imported / "ours" / "zero" / names[theirs] / f"{state}.pt", weights_only=True)["param"]
            rows = ours.shape[0]  # DeepSpeed drops the vocabulary padding rows
            assert torch.equal(ours, expected[key][:rows]), (theirs, state)
    meta = json.loads((imported / "ours" / "universal.json").read_text())
    assert meta["iteration"] == 3 and meta["optimizer_step"] == 3 and meta["vocab_size"] == 258
    model = meta["config"]["model"]
    assert (model["num_query_groups"], model["ffn_hidden_size"], model["normalization"]) == (2, 128, "RMSNorm")
    assert model["swiglu"] and model["position_embedding_type"] == "rope" and model["disable_bias_linear"]


def test_training_resumes_with_moments_or_finetunes_without(imported: Path) -> None:
    base = [sys.executable, str(ROOT / "pretrain_gpt.py"), *MODEL, *RUN, "--data-cache-path", str(imported / "cache")]
    env = {"PYTHONPATH": str(ROOT)}
    resumed = _run([*base, "--load", str(imported / "ours"), "--train-iters", "4"], **env).stdout
    assert "with optimizer moments" in resumed and "resumed from" in resumed and "at iteration 3" in resumed
    assert "iter 4/4" in resumed
    tuned = _run([*base, "--load", str(imported / "ours"), "--finetune", "--train-iters", "1"], **env).stdout
    assert "without optimizer moments" in tuned and "fine-tuning from the weights" in tuned and "iter 1/1" in tuned
