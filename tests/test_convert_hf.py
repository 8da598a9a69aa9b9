"""tools/convert_checkpoint.py to-hf / from-hf: transformers' LlamaForCausalLM gives our model's logits (GQA, tied and
untied), the round trip is exact, --dry-run writes nothing, and non-Llama checkpoints are refused in one line.

Megatron work runs in one worker subprocess (megatron-core's CPU substitutes patch modules process-wide, and one
slow import serves every step); transformers runs here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_ext.distributed import free_port

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "convert_checkpoint.py"
LLAMA_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
    "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear",
    "--seq-length", "64", "--micro-batch-size", "2", "--train-iters", "3", "--eval-iters", "0",
]  # fmt: skip
TOL = 1e-5

# Converts with the CLI's main() in-process and computes our logits with tools/generate.py's loader.
WORKER = """
import contextlib, importlib.util, io, json, sys
from pathlib import Path
import torch

def module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

cli = module("convert_tool", "tools/convert_checkpoint.py")
gen = module("generate_tool", "tools/generate.py")
from megatron_ext import distributed

tmp = Path(sys.argv[1])
tokens = torch.load(tmp / "tokens.pt")

def ours(ckpt, out):
    model, *_ = gen.load_model(gen.find_checkpoint(ckpt), "cpu")
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    with torch.no_grad():
        torch.save(model(tokens, positions, None).float(), out)
    distributed.destroy()

def convert(*args):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main([*args, "--no-progress"])
    assert rc == 0, (args, rc)
    return stdout.getvalue()

dry = convert("to-hf", "--load", str(tmp / "ckpt"), "--save", str(tmp / "never"), "--dry-run")
(tmp / "dry_run.txt").write_text(dry)
convert("to-hf", "--load", str(tmp / "ckpt"), "--save", str(tmp / "hf"))
ours(tmp / "ckpt", tmp / "ours.pt")
convert("from-hf", "--load", str(tmp / "hf"), "--save", str(tmp / "ckpt2"))
convert("to-hf", "--load", str(tmp / "ckpt2"), "--save", str(tmp / "hf2"))
tied = ["--load", str(tmp / "hf_tied"), "--save", str(tmp / "ckpt_tied"), "--tokenizer-type", "ByteTokenizer"]
convert("from-hf", *tied)
ours(tmp / "ckpt_tied", tmp / "ours_tied.pt")
convert("to-hf", "--load", str(tmp / "ckpt_tied"), "--save", str(tmp / "hf_tied2"))
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def _tied_llama(path: Path) -> None:
    """A random tied GQA Llama with weights large enough that attention (and so RoPE) shapes the logits."""
    config = transformers.LlamaConfig(
        vocab_size=258, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
        initializer_range=0.1, bos_token_id=None, eos_token_id=256, pad_token_id=257,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("convert_hf")
    train = [
        "pretrain_gpt.py", *LLAMA_FLAGS, "--untie-embeddings-and-output-weights",
        "--save", str(tmp / "ckpt"), "--data-cache-path", str(tmp / "data"),
    ]  # fmt: skip
    proc = _run(train)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _tied_llama(tmp / "hf_tied")
    torch.save(torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0)), tmp / "tokens.pt")
    proc = _run(["-c", textwrap.dedent(WORKER), str(tmp)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp


def _hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_transformers_logits_match_ours_untied(work: Path) -> None:
    tokens, ours = torch.load(work / "tokens.pt"), torch.load(work / "ours.pt")
    config = json.loads((work / "hf" / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4
    assert not config["tie_word_embeddings"] and config["vocab_size"] == 258  # cut from the padded 384 rows
    theirs = _hf_logits(work / "hf", tokens)
    assert ours.shape[-1] == 384 and theirs.shape[-1] == 258
    diff = (theirs - ours[..., :258]).abs().max().item()
    assert diff <= TOL, f"max |logit difference| {diff}"


def _rope_interleaved(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows of each head reordered as a converter assuming interleaved RoPE would write them."""
    heads = w.view(-1, 2, dim // 2, w.size(-1))
    return heads.transpose(1, 2).reshape(w.shape)


def test_transformers_logits_match_ours_tied_and_layout_matters(work: Path) -> None:
    tokens, ours = torch.load(work / "tokens.pt"), torch.load(work / "ours_tied.pt")
    theirs = _hf_logits(work / "hf_tied", tokens)
    diff = (theirs - ours[..., :258]).abs().max().item()
    assert diff <= TOL, f"max |logit difference| {diff}"
    # The comparison has teeth: the interleaved-RoPE row order or swapped query groups change the logits.
    model = transformers.LlamaForCausalLM.from_pretrained(work / "hf_tied", dtype=torch.float32).eval()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.copy_(_rope_interleaved(proj.weight, 16))
        wrong_rope = model(tokens).logits
    assert (wrong_rope - ours[..., :258]).abs().max().item() > 100 * TOL
    assert json.loads((work / "hf_tied2" / "config.json").read_text())["tie_word_embeddings"]
    assert "lm_head.weight" not in _safetensors(work / "hf_tied2" / "model.safetensors")


def test_round_trips_are_exact(work: Path) -> None:
    first, second = _safetensors(work / "hf" / "model.safetensors"), _safetensors(work / "hf2" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (work / "hf" / "config.json").read_text() == (work / "hf2" / "config.json").read_text()
    original = _safetensors(work / "hf_tied" / "model.safetensors")
    back = _safetensors(work / "hf_tied2" / "model.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    assert (work / "ckpt2" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"


def test_dry_run_lists_mapping_and_writes_nothing(work: Path) -> None:
    lines = (work / "dry_run.txt").read_text().splitlines()
    qkv = "decoder.layers.self_attention.linear_qkv.weight[1] [128, 64]"
    assert f"{qkv} -> model.layers.1.self_attn.k_proj.weight [32, 64]" in lines
    assert "embedding.word_embeddings.weight [384, 64] -> model.embed_tokens.weight [258, 64]" in lines
    assert "decoder.layers.mlp.linear_fc1.weight[0] [384, 64] -> model.layers.0.mlp.up_proj.weight [192, 64]" in lines
    assert len(lines) == 1 + 2 * 9 + 2
    assert not (work / "never").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_gpt_style_checkpoint_is_refused_in_one_line(work: Path, tmp_path: Path) -> None:
    # The refusal reads only the saved config, so a copy of the common state with GPT-2 options stands for a
    # LayerNorm/GELU/learned-position/bias checkpoint without training one.
    common = torch.load(work / "ckpt" / "iter_0000003" / "common.pt")
    common["config"]["model"].update(
        normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute", disable_bias_linear=False
    )
    ckpt = tmp_path / "gpt"
    (ckpt / "iter_0000003").mkdir(parents=True)
    torch.save(common, ckpt / "iter_0000003" / "common.pt")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3\n")
    proc = _run([str(TOOL), "to-hf", "--load", str(ckpt), "--save", str(tmp_path / "out")])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--normalization LayerNorm" in lines[0], lines
    assert "GELU" in lines[0] and "learned_absolute" in lines[0]
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("convert_tool", TOOL)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    before = sorted(p.name for p in (work / "hf").iterdir())
    assert tool.main(["to-hf", "--load", str(work / "ckpt"), "--save", str(work / "hf")]) == 2  # before any reading
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {work / 'hf'}: already exists and is not empty; choose a new output folder"]
    assert sorted(p.name for p in (work / "hf").iterdir()) == before
    assert tool.main(["from-hf", "--load", str(work / "nope"), "--save", str(work / "x")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {work / 'nope'}: no config.json (expected a Hugging Face model folder)"
    )


def test_training_starts_from_an_imported_model(work: Path) -> None:
    """Public weights in, training on: `pretrain_gpt.py --load <imported> --finetune` with the model's flags."""
    tied = [f for f in LLAMA_FLAGS if f not in ("--train-iters", "3")]
    args = ["pretrain_gpt.py", *tied, "--train-iters", "1", "--load", str(work / "ckpt_tied"), "--finetune",
            "--data-cache-path", str(work / "data"), "--make-vocab-size-divisible-by", "128",
            "--log-interval", "1"]  # fmt: skip
    proc = _run(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "fine-tuning from the weights of" in proc.stdout and "iter 1/1" in proc.stdout
