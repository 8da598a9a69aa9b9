"""The same initial model on any layout from the same seed (megatron_ext/models/init.py): a 1-rank run and 2-rank
runs at TP=2, PP=2 (tied and untied, interleaved) and DP=2 draw equal weights (gathered into full tensors) and give
equal losses over their first 4 steps (dropout off); megatron-core's own per-rank draw does not."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from launchers import launch_scenarios, ngram_corpus

from megatron_ext.models.init import BLOCK, RANDOM_WEIGHTS, draw_rows, tensor_seed

SCRIPT = Path(__file__).with_name("same_init_scenarios.py")
ONE_RANK = ["reference", "reference_tied", "reference_megatron_init"]
TWO_RANK = ["tp2", "tp2_padded", "pp2", "pp2_interleaved", "pp2_tied", "dp2", "pp2_megatron_init"]
# scenario -> the one-rank run it must equal
SAME_AS = {"tp2": "reference", "pp2": "reference", "pp2_interleaved": "reference", "dp2": "reference"}
SAME_AS["pp2_tied"] = "reference_tied"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("same_init")
    prefix = ngram_corpus(str(tmp / "ngrams"))
    one = launch_scenarios(SCRIPT, 1, 29531, [prefix], tmp / "one.json", ONE_RANK)
    two = launch_scenarios(SCRIPT, 2, 29532, [prefix], tmp / "two.json", TWO_RANK)
    return tmp, {**one, **two}


def _weights(tmp: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(tmp / f"init_{name}.pt")


@pytest.mark.parametrize("name", sorted(SAME_AS))
def test_layout_starts_from_the_same_model(runs: tuple[Path, dict], name: str) -> None:
    tmp, results = runs
    mine, reference = _weights(tmp, name), _weights(tmp, SAME_AS[name])
    assert sorted(mine) == sorted(reference)
    different = [k for k in mine if not torch.equal(mine[k], reference[k])]
    assert different == []
    assert results[name]["replicas_disagree"] == []
    torch.testing.assert_close(results[name]["losses"], results[SAME_AS[name]]["losses"], rtol=1e-5, atol=0)


def test_a_vocabulary_padded_further_keeps_the_real_rows(runs: tuple[Path, dict]) -> None:
    """TP=2 with the vocabulary padded to 512 rows instead of 258: the tokenizer's rows are the 1-rank run's."""
    tmp, _ = runs
    mine, reference = _weights(tmp, "tp2_padded"), _weights(tmp, "reference")
    for key, tensor in reference.items():
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert mine[key].shape[0] == 512 and tensor.shape[0] == 258
            assert torch.equal(mine[key][:258], tensor), key
        else:
            assert torch.equal(mine[key], tensor), key


def test_megatron_cores_own_draw_differs_by_layout(runs: tuple[Path, dict]) -> None:
    """The case the layout-free draw exists for (the tests above fail without it): megatron-core seeds each
    pipeline stage apart, so PP=2 starts from another model. (Its CPU draw, used on CPU, cuts TP shards out of one
    full tensor and so agrees at TP=2; on GPU each TP rank draws its own shard.)"""
    tmp, results = runs
    mine, reference = _weights(tmp, "pp2_megatron_init"), _weights(tmp, "reference_megatron_init")
    assert not torch.equal(
        mine["decoder.layers.mlp.linear_fc1.weight"], reference["decoder.layers.mlp.linear_fc1.weight"]
    )
    assert abs(results["pp2_megatron_init"]["losses"][0] - results["reference_megatron_init"]["losses"][0]) > 1e-4


def test_weights_follow_megatron_cores_init_functions(runs: tuple[Path, dict]) -> None:
    """Each random weight has the std of megatron-core's init for its kind (init_method_std 0.02; the output
    projections 0.02 / sqrt(2 x 4 layers)); norms are ones; every layer and key draws other numbers."""
    tmp, _ = runs
    w = _weights(tmp, "reference")
    random = {k.removeprefix("decoder.layers.") for k in w if "norm" not in k}
    assert random == set(RANDOM_WEIGHTS) - {"embedding.position_embeddings.weight"}  # RoPE: no position table
    for key, tensor in w.items():
        if "norm" in key:
            assert torch.equal(tensor, torch.ones_like(tensor)), key
            continue
        std = 0.02 / (8**0.5) if key.endswith(("linear_proj.weight", "linear_fc2.weight")) else 0.02
        assert abs(tensor.std().item() / std - 1) < 0.1, key
    fc1 = w["decoder.layers.mlp.linear_fc1.weight"]
    assert not torch.equal(fc1[0], fc1[1])
    assert not torch.equal(w["embedding.word_embeddings.weight"], w["output_layer.weight"])


def test_rows_are_drawn_block_by_block_whatever_the_slice() -> None:
    """Any row range of a tensor equals those rows of the whole tensor; a block is seeded by its place alone."""
    pool = ThreadPoolExecutor(2)
    shape = (3 * BLOCK // 1000 + 7, 1000)  # blocks of 4194 rows, the last one short
    whole, first = draw_rows(torch.nn.init.normal_, 1, "k", (2,), shape, slice(0, shape[0]), pool)
    assert first == 0 and whole.shape[1:] == shape[1:] and whole.shape[0] >= shape[0]
    longer, _ = draw_rows(torch.nn.init.normal_, 1, "k", (2,), (shape[0] + 9000, 1000), slice(0, shape[0]), pool)
    assert torch.equal(longer[: shape[0]], whole[: shape[0]])  # more padding rows: the same rows before them
    part, first = draw_rows(torch.nn.init.normal_, 1, "k", (2,), shape, slice(5000, 9000), pool)
    assert torch.equal(part[5000 - first : 9000 - first], whole[5000:9000])
    other_layer, _ = draw_rows(torch.nn.init.normal_, 1, "k", (3,), shape, slice(0, shape[0]), pool)
    assert not torch.equal(other_layer[:10], whole[:10])
    expected = torch.empty(BLOCK // 1000, 1000)
    torch.nn.init.normal_(expected, generator=torch.Generator().manual_seed(tensor_seed(1, "k", (2, 0))))
    assert torch.equal(whole[: BLOCK // 1000], expected)
