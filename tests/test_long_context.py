"""Document-masked packing (--reset-attention-mask): boundaries from the .idx, per-document attention on every CPU
backend equal to each document run alone (1 process and TP=2), loss masking at boundaries, the leakage self-check,
chunked cross-entropy, and an exact resume of a packed run."""

from __future__ import annotations

import re
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from launchers import clean_env, launch_scenarios, ngram_corpus

from megatron_ext.config import ConfigError, parse_args
from megatron_ext.data import blend
from megatron_ext.data.blend import BlendSpec, CorpusBlend, gpt_sample
from megatron_ext.data.indexed import IndexedDatasetWriter
from megatron_ext.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "long_context_scenarios.py"
BACKENDS = ["sdpa", "sdpa-dense", "unfused"]  # per-document SDPA, one SDPA under a dense mask, megatron's unfused
DOCUMENT_RUNS = [f"{b}/{p}/{m}" for b in BACKENDS for p in ("rope", "learned") for m in ("reset", "continuous")]


def _corpus(prefix: Path, lengths: list[int]) -> str:
    """Documents whose tokens say where they are: document d holds d * 100 + (0, 1, 2, ...)."""
    with IndexedDatasetWriter(prefix, vocab_size=1 << 16) as w:
        for d, n in enumerate(lengths):
            w.add_document(d * 100 + np.arange(n))
        w.finalize()
    return str(prefix)


def test_samples_carry_the_documents_of_the_idx(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    prefix = _corpus(tmp_path / "docs", [int(x) for x in rng.integers(1, 40, size=300)])
    spec = BlendSpec(((1.0, prefix, "c"),), seq_length=32, split="1,0,0")
    plain = CorpusBlend(spec, 50, tmp_path / "cache")
    packed = CorpusBlend(spec, 50, tmp_path / "cache", document_boundaries=True, reset_position_ids=True)
    for i in range(50):
        sample, text = packed[i], plain.sample_tokens(i)
        assert torch.equal(sample["tokens"], plain[i]["tokens"])  # packing as before: concatenate and cut
        within = torch.from_numpy(text) % 100  # a document's own positions: 0 where one begins (all are < 100)
        changes = (torch.nonzero(within[1:] == 0).flatten() + 1).tolist()
        assert sample["cu_seqlens"].tolist() == [0, *(p for p in changes if p < 32), 32]
        expected_mask = torch.ones(32)
        expected_mask[[p - 1 for p in changes]] = 0  # never predict a document's first token from another's
        assert torch.equal(sample["loss_mask"], expected_mask)
        # Positions restart with each document: those of the documents begun here are their own positions.
        begun = within[:32] - within[0] * (torch.arange(32) < (changes + [32])[0])
        assert torch.equal(sample["position_ids"], begun)


def test_loss_mask_at_boundaries_eod_and_padding() -> None:
    text = torch.tensor([5, 6, 9, 7, 8, 9, 4, 3, 9, 9])  # 9 is the EOD; documents start at 3 and 6, padding at 8
    sample = gpt_sample(text, [3, 6, 8], eod=9, eod_mask_loss=False, reset_position_ids=True, padding=2)
    #                     tokens: 5  6  9  7  8  9  4  3  9    labels: 6 9 7 8 9 4 3 9 9
    assert sample["loss_mask"].tolist() == [1, 1, 0, 1, 1, 0, 1, 0, 0]  # no next document, no padding
    assert sample["cu_seqlens"].tolist() == [0, 3, 6, 8, 9]
    assert sample["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0]
    eod = gpt_sample(text, None, eod=9, eod_mask_loss=True, reset_position_ids=False)  # Megatron-LM's, no bounds
    assert eod["loss_mask"].tolist() == [1, 1, 0, 1, 1, 0, 1, 1, 0] and "cu_seqlens" not in eod


def test_best_fit_packing_loses_no_token_and_keeps_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blend, "MIN_EPOCH_DOCS", 1)  # an epoch is every document once
    lengths = [int(x) for x in np.random.default_rng(1).integers(1, 90, size=200)]  # some longer than a sample
    prefix = _corpus(tmp_path / "docs", lengths)
    spec = BlendSpec(((1.0, prefix, "c"),), seq_length=32, split="1,0,0", packing="best-fit")
    packed = CorpusBlend(spec, 600, tmp_path / "cache", eod=7, document_boundaries=True)
    seen: list[tuple[int, int]] = []
    padding = 0
    for i in range(600):
        text, starts, pad = packed.sample_documents(i)
        padding += pad
        assert (text[33 - pad :] == 7).all()
        for a, b in pairwise([0, *starts, 33]):
            piece = text[a:b]
            if b == 33 and pad and a == 33 - pad:
                continue  # the padding
            doc, pos = piece // 100, piece % 100
            assert (doc == doc[0]).all() and (np.diff(pos) == 1).all() and pos[0] % 33 == 0, (i, piece)
            assert pos[-1] + 1 == lengths[doc[0]] or len(piece) == 33  # a whole document or a whole piece
        sample = packed[i]
        assert sample["loss_mask"][32 - pad :].sum() == 0 and sample["cu_seqlens"][-1] == 32
        if len(seen) < sum(lengths):  # epoch 0: every token of every document exactly once
            seen += [(int(t) // 100, int(t) % 100) for t in text[: 33 - pad]]
    assert sorted(seen) == [(d, j) for d, n in enumerate(lengths) for j in range(n)]
    assert packed.padding_share() == pytest.approx(padding / (600 * 33))


def test_best_fit_decreasing_puts_each_item_in_the_fullest_bin_it_fits() -> None:
    lengths = np.random.default_rng(2).integers(1, 33, size=300)
    rooms: list[int] = []  # a plain reference: items by decreasing length (stable), fullest fitting bin first
    expected: list[list[int]] = []
    for item in sorted(range(300), key=lambda j: -lengths[j]):
        fits = [b for b in range(len(rooms)) if rooms[b] >= lengths[item]]
        b = min(fits, key=lambda b: (rooms[b], b)) if fits else len(rooms)
        if not fits:
            rooms.append(33)
            expected.append([])
        rooms[b] -= int(lengths[item])
        expected[b].append(item)
    assert blend.best_fit_decreasing(lengths, 33) == expected


def test_packing_flags_need_document_masking() -> None:
    for flag in (["--reset-position-ids"], ["--check-document-masking"], ["--packing", "best-fit"]):
        with pytest.raises(ConfigError, match=f"{flag[0]} needs --reset-attention-mask"):
            parse_args([*flag, "--train-iters", "1"])
    with pytest.raises(ConfigError, match="--cross-entropy-chunk must be positive"):
        parse_args(["--cross-entropy-chunk", "0", "--train-iters", "1"])
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size > 1 needs --micro-batch-size 1"):
        parse_args("--reset-attention-mask --pipeline-model-parallel-size 2 --micro-batch-size 2".split())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("long_context") / "one.json"
    return launch_scenarios(SCRIPT, 1, 29621, [], out, [*DOCUMENT_RUNS, "leak", "chunked_ce"])


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("long_context") / "tp2.json"
    return launch_scenarios(SCRIPT, 2, 29622, [], out, [*DOCUMENT_RUNS, "leak", "chunked_ce"])


@pytest.mark.parametrize("world", ["one_process", "tensor_parallel"])
def test_each_packed_document_scores_as_alone(world: str, request: pytest.FixtureRequest) -> None:
    results = request.getfixturevalue(world)
    for name in DOCUMENT_RUNS:
        gaps = results[name]
        assert gaps["mean"] <= 1e-5 and gaps["token"] <= 1e-4, (world, name, gaps)
        assert gaps["causal"] > 1e-2, (world, name, gaps)  # the same tokens without bounds do leak


@pytest.mark.parametrize("world", ["one_process", "tensor_parallel"])
def test_self_check_stops_a_leaking_backend(world: str, request: pytest.FixtureRequest) -> None:
    leak = request.getfixturevalue(world)["leak"]
    assert leak["ok"].startswith("document masking checked: 5 documents"), leak  # all but each sample's first
    leaked = r"document masking leaks: document \d+ of 5 in packed sample 0 .* see each other"
    assert re.fullmatch(leaked, leak["leaking"]), leak


@pytest.mark.parametrize("world", ["one_process", "tensor_parallel"])
def test_chunked_cross_entropy_equals_the_plain_one(world: str, request: pytest.FixtureRequest) -> None:
    result = request.getfixturevalue(world)["chunked_ce"]
    assert result["loss"] <= 1e-6 and result["grad"] <= 1e-5 and result["params"] > 0, result


@pytest.mark.slow
def test_16k_tokens_of_16_documents_train_as_alone(tmp_path: Path) -> None:
    """16K tokens in one packed sequence, trained with recomputation and chunked cross-entropy: each document's
    losses are its losses alone."""
    gaps = launch_scenarios(SCRIPT, 1, 29624, [], tmp_path / "16k.json", ["16k"])["16k"]
    assert gaps["mean"] <= 1e-5 and gaps["token"] <= 1e-4 and gaps["causal"] > 1e-2, gaps


def _train(tmp: Path, *args: str, leaking: bool = False) -> str:
    tiny = (
        "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2 "
        "--global-batch-size 4 --lr 1e-3 --log-interval 1 --eval-iters 1 --eval-interval 4 --hidden-dropout 0 "
        "--attention-dropout 0 --train-iters 4 --reset-attention-mask --reset-position-ids --eod-mask-loss "
        "--position-embedding-type rope --cross-entropy-chunk 50 --packing best-fit"
    ).split()
    data = ["--data-path", ngram_corpus(str(tmp / "docs")), "--data-cache-path", str(tmp / "cache")]
    argv = [sys.executable, str(ROOT / "pretrain_gpt.py"), *tiny, *data, *args]
    if leaking:  # pretrain_gpt.py with a core attention that drops the packed bounds
        argv[1:2] = ["-c", LEAKING_RUN]
    env = {**clean_env(), "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    assert proc.returncode == (1 if leaking else 0), proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stderr if leaking else proc.stdout


LEAKING_RUN = """
import sys
import long_context_scenarios
from megatron_ext.models import gpt
from megatron_ext.training.loop import main
gpt.SDPAttention.forward = long_context_scenarios.leaking_forward
sys.exit(main(sys.argv[1:]))
"""


def _losses(log: str) -> dict[int, float]:
    return {int(i): float(x) for i, x in re.findall(r"^iter (\d+)/\d+ \| loss ([0-9.]+)", log, re.M)}


def test_packed_run_checks_its_masking_and_resumes_exactly(tmp_path: Path) -> None:
    whole = _train(tmp_path, "--save", str(tmp_path / "ckpt"), "--save-interval", "2", "--check-document-masking")
    assert re.search(r"document masking checked: \d+ documents packed and alone", whole), whole[-2000:]
    assert re.search(r"best-fit packing: \d+\.\d% of the training samples' tokens are padding", whole)
    resumed = _train(tmp_path, "--load", str(tmp_path / "ckpt"), "--ckpt-step", "2")
    leaked = _train(tmp_path, "--train-iters", "1", leaking=True).strip().splitlines()  # checked by default
    assert len(leaked) == 1 and re.fullmatch(r"error: document masking leaks: .* see each other", leaked[0]), leaked
    assert sorted(_losses(resumed)) == [3, 4]
    for i, loss in _losses(resumed).items():
        assert loss == pytest.approx(_losses(whole)[i], rel=1e-6), (i, resumed, whole)
