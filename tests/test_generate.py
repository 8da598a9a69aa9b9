"""tools/generate.py: the sampling rules by hand-made logits, the decoding loop on a fake model, and one tiny
trained checkpoint end to end (deterministic greedy text, one-line errors)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.distributed import free_port
from megatron_ext.training.layout import CheckpointNotFound

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "generate.py"
_spec = importlib.util.spec_from_file_location("generate_tool", SCRIPT)
assert _spec is not None and _spec.loader is not None
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

DRAWS = 4000


def _draws(logits: torch.Tensor, seed: int = 0, **kw: object) -> torch.Tensor:
    """DRAWS samples from one row of logits, in one batched call."""
    g = torch.Generator().manual_seed(seed)
    return gen.sample_next(logits.expand(DRAWS, -1), generator=g, **kw)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gen.sample_next(logits, temperature=0.0), logits.argmax(-1))
    assert int(gen.sample_next(logits[3], temperature=0.0)) == int(logits[3].argmax())


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    for temperature in (0.5, 1.0, 3.0):
        drawn = gen.sample_next(logits, temperature=temperature, top_k=1, generator=g)
        assert torch.equal(drawn, logits.argmax(-1))


def test_top_k_support() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    assert set(_draws(logits, top_k=2).tolist()) == {1, 3}


@pytest.mark.parametrize("top_p,support", [(0.4, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(top_p: float, support: set[int]) -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[[2, 0, 3, 1]]  # shuffled: ids 1, 3, 0, 2 carry 0.5, 0.3, 0.15, 0.05
    to_id = {0: 1, 1: 3, 2: 0, 3: 2}
    drawn = _draws(logits, top_p=top_p)
    assert set(drawn.tolist()) == {to_id[r] for r in support}
    if top_p == 0.75:  # renormalised over the kept set: 0.5 / 0.8
        assert abs((drawn == 1).float().mean().item() - 0.625) < 0.03


def test_lower_temperature_concentrates() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    share = {t: (_draws(logits, temperature=t) == 0).float().mean().item() for t in (2.0, 1.0, 0.5, 0.05)}
    assert share[2.0] < share[1.0] < share[0.5] < share[0.05] == 1.0
    expected = torch.softmax(logits, -1)[0].item()
    assert abs(share[1.0] - expected) < 0.03


def test_masked_ids_never_drawn() -> None:
    logits = torch.zeros(10)
    logits[6:] = float("-inf")  # a padded vocabulary
    assert _draws(logits, temperature=5.0).max().item() < 6


def test_bad_sampling_values_raise() -> None:
    for kw in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(gen.GenerateError):
            gen.sample_next(torch.zeros(4), **kw)


class CountingModel:
    """Predicts (last token + 1) and puts the largest logit on a padded id, which must be masked out."""

    def __init__(self, vocab: int, padded: int) -> None:
        self.vocab, self.padded, self.calls = vocab, padded, []

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: None) -> torch.Tensor:
        assert mask is None and tokens.shape == positions.shape and tokens.shape[0] == 1
        assert positions[0].tolist() == list(range(tokens.shape[1]))
        self.calls.append(tokens[0].tolist())
        logits = torch.zeros(1, tokens.shape[1], self.padded)
        logits[0, -1, (int(tokens[0, -1]) + 1) % self.vocab] = 10.0
        logits[0, -1, self.padded - 1] = 100.0
        return logits


def test_generate_stops_at_eod_and_keeps_last_context_tokens() -> None:
    model = CountingModel(vocab=10, padded=16)
    new = gen.generate(model, [3, 4, 5], 20, context_length=4, vocab_size=10, eod=9, temperature=0.0)
    assert new == [6, 7, 8]  # the next would be eod (9): stop, eod not returned
    assert model.calls[0] == [3, 4, 5] and model.calls[-1] == [5, 6, 7, 8]
    assert all(len(c) <= 4 for c in model.calls)
    assert gen.generate(model, [1], 2, context_length=4, vocab_size=10, eod=9, temperature=0.0) == [2, 3]
    assert gen.generate(model, [], 1, context_length=4, vocab_size=10, eod=9, temperature=0.0) == [0]  # from eod


def test_generate_sampling_is_reproducible_with_a_seed() -> None:
    class Flat:
        def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: None) -> torch.Tensor:
            return torch.zeros(1, tokens.shape[1], 32)

    def run(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return gen.generate(Flat(), [1], 30, context_length=8, vocab_size=30, eod=31, temperature=1.0, generator=g)

    assert run(5) == run(5) != run(6)
    assert max(run(5)) < 30


def test_find_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound, match="latest_checkpointed_iteration.txt is missing"):
        gen.find_checkpoint(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    with pytest.raises(CheckpointNotFound, match="iteration 7"):
        gen.find_checkpoint(tmp_path)
    for it in (5, 7):
        (tmp_path / f"iter_{it:07d}").mkdir()
        (tmp_path / f"iter_{it:07d}" / "common.pt").write_bytes(b"")
        (tmp_path / f"iter_{it:07d}" / "metadata.json").write_text("{}")
    assert gen.find_checkpoint(tmp_path) == tmp_path / "iter_0000007"
    assert gen.find_checkpoint(tmp_path, 5) == tmp_path / "iter_0000005"
    assert gen.find_checkpoint(tmp_path / "iter_0000005") == tmp_path / "iter_0000005"


# ---- end to end ---------------------------------------------------------------------------------------------


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return _finish(_start(args))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("generate")
    proc = _run([
        "pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--micro-batch-size", "2", "--train-iters", "3", "--eval-iters", "0",
        "--save", str(tmp / "ckpt"), "--data-cache-path", str(tmp / "data"),
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp / "ckpt"


def test_greedy_end_to_end_is_deterministic(checkpoint: Path) -> None:
    # Two processes at once (each picks its own free port). Greedy ignores the seed, and every weight comes from
    # the checkpoint, so different seeds (different initial weights) must still give the same text.
    args = [str(SCRIPT), "--load", str(checkpoint), "--prompt", "def main(", "--max-new-tokens", "12", "--greedy"]
    args.append("--json")
    procs = [_start([*args, "--seed", seed]) for seed in ("1", "2")]
    outputs = []
    for proc in map(_finish, procs):
        assert proc.returncode == 0, proc.stderr[-5000:]
        outputs.append(json.loads(proc.stdout))
    assert outputs[0] == outputs[1]
    out = outputs[0]
    assert out["prompt"] == "def main("
    assert out["completion"] and 0 < len(out["tokens"]) <= 12
    assert all(0 <= t < 258 and t != 256 for t in out["tokens"])  # byte tokenizer: no eod, no padded ids


def test_empty_load_dir_is_one_line_error(tmp_path: Path) -> None:
    proc = _run([str(SCRIPT), "--load", str(tmp_path), "--greedy"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_missing_prompt_file_is_one_line_error(tmp_path: Path) -> None:
    proc = _run([str(SCRIPT), "--load", str(tmp_path), "--prompt-file", str(tmp_path / "nope.txt")])
    assert proc.returncode == 2
    expected = f"error: --prompt-file {tmp_path / 'nope.txt'}: no such file; expected a text file"
    assert proc.stderr.strip().splitlines() == [expected]


def test_binary_prompt_and_damaged_checkpoint_are_one_line_errors(checkpoint: Path, tmp_path: Path) -> None:
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(b"def \xec\x00")
    proc = _run([str(SCRIPT), "--load", str(checkpoint), "--prompt-file", str(binary)])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --prompt-file {binary}: not UTF-8 text (byte 4)"
    ]
    damaged = tmp_path / "ckpt"
    shutil.copytree(checkpoint, damaged)
    common = next(damaged.glob("iter_*/common.pt"))
    common.write_bytes(common.read_bytes()[:50])
    proc = _run([str(SCRIPT), "--load", str(damaged)])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "damaged checkpoint (common.pt has 50 bytes" in lines[0]
