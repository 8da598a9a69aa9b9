"""Every parallel layout trains exactly like one process: same loss curve for 5 steps (fp32, dropout off)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from launchers import launch_scenarios, ngram_corpus

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "parallel_scenarios.py"
TWO_RANK = [
    "tp2",
    "tp2_sp",
    "pp2",
    "pp2_tied",
    "pp2_interleaved",
    "pp2_uneven",
    "dp2",
    "dp2_distopt",
    "dp2_distopt_overlap",
    "dp2_nan",
    "dp2_nanstop",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("parallel")
    prefix = ngram_corpus(str(tmp / "docs"))
    ref_names = ["reference", "reference_tied", "recompute", "recompute_selective", "recompute_block", "bf16", "fp16"]
    ref = launch_scenarios(SCRIPT, 1, 29517, [prefix], tmp / "ref.json", ref_names)
    two = launch_scenarios(SCRIPT, 2, 29518, [prefix], tmp / "two.json", TWO_RANK)
    return {**ref, **two}


def _close(a: list[float], b: list[float], rtol: float = 1e-5) -> bool:
    return all(math.isclose(x, y, rel_tol=rtol) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "name,reference",
    [
        ("tp2", "reference"),
        ("tp2_sp", "reference"),
        ("pp2", "reference"),
        ("pp2_tied", "reference_tied"),
        ("pp2_interleaved", "reference"),
        ("dp2", "reference"),
        ("dp2_distopt", "reference"),
        ("dp2_distopt_overlap", "reference"),
        ("recompute", "reference"),
        ("recompute_selective", "reference"),
        ("recompute_block", "reference"),
        ("pp2_uneven", "reference"),
    ],
)
def test_layout_matches_single_process(results: dict, name: str, reference: str) -> None:
    ref, got = results[reference]["losses"], results[name]["losses"]
    assert ref[0] > ref[-1], f"reference loss did not fall: {ref}"
    assert _close(got, ref), f"{name} losses {got} differ from {reference} {ref}"
    assert _close(results[name]["grad_norms"], results[reference]["grad_norms"], rtol=1e-4)


def test_uneven_pipeline_puts_the_given_layers_on_the_first_stage(results: dict) -> None:
    """pp2_uneven (--decoder-first-pipeline-num-layers 1 of 4) trains like one process (above) with 1 layer on
    the first stage, where pp2 has 2."""
    assert (results["pp2_uneven"]["layers"], results["pp2"]["layers"], results["reference"]["layers"]) == (1, 2, 4)


def test_injected_nan_never_reaches_the_weights(results: dict) -> None:
    r = results["dp2_nan"]
    assert math.isnan(r["losses"][2]) and r["skipped_step"] == 1.0
    assert r["unchanged_by_nan_step"], "the NaN step changed the weights"
    assert all(math.isfinite(x) for i, x in enumerate(r["losses"]) if i != 2)
    assert _close(r["losses"][:2], results["reference"]["losses"][:2])


def test_nan_policy_stop_stops_with_finite_weights(results: dict) -> None:
    r = results["dp2_nanstop"]
    assert r["stopped_at"] == 3 and r["weights_finite"]


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_half_precision_follows_fp32(results: dict, name: str) -> None:
    """Same weights, same data: bf16/fp16 (fp32 master weights, fp16 with loss scaling) track the fp32 curve."""
    ref, got = results["reference"]["losses"], results[name]["losses"]
    assert all(math.isfinite(x) for x in got), got
    assert _close(got, ref, rtol=2e-2), f"{name} {got} vs fp32 {ref}"
