"""Progressive depth growth (`--model-variant progressive`, megatron_ext/models/progressive.py): LVPS against its
closed form, the layer maps, parse-time refusals, and training scenarios (tests/progressive_scenarios.py) with 1
and 2 processes: growth keeps the full-depth output, shared-layer gradients, recompute, TP/DP/distributed
optimizer/bf16 against the single process, moments copied or reset, exact resume across a growth."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from launchers import launch_scenarios, ngram_corpus

from megatron_ext.config import ConfigError, parse_args
from megatron_ext.models.progressive import growth_sources, layer_map, lvps_depth, sample_depth

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "progressive_scenarios.py"


def lvps_closed_form(L: int, N: int) -> np.ndarray:
    """P(depth = d) for d = N..L: depth >= d iff y = m / (x + n) >= d / N (y clipped to [1, L/N]), i.e.
    x <= m N / d - n, with x uniform on [x_min, 1]."""
    rho, b, e, x_min = L / N, L / N + 0.4, 0.6, 1e-6
    n = (b * x_min - e) / (e - b)
    m = e * (n + 1)

    def at_least(d: int) -> float:
        if d <= N:
            return 1.0
        if d > L:
            return 0.0
        t = min(d / N, rho)
        return (min(max(m / t - n, x_min), 1.0) - x_min) / (1 - x_min)

    return np.array([at_least(d) - at_least(d + 1) for d in range(N, L + 1)])


def chi_square_limit(df: int, z: float = 3.29) -> float:
    """The chi-square quantile at p = 0.9995 (Wilson-Hilferty): a correct sampler fails 1 run in 2000."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("L,N", [(12, 3), (12, 1), (24, 4), (16, 8)])
def test_lvps_draws_match_the_closed_form(L: int, N: int) -> None:
    draws = np.array([sample_depth("lvps", L, N, 1234, i, 3) for i in range(100_000)])
    expected = lvps_closed_form(L, N) * len(draws)
    observed = np.bincount(draws - N, minlength=L - N + 1)
    keep = expected > 5  # cells too rare for the chi-square approximation are merged into one
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < chi_square_limit(len(obs) - 1), (stat, observed, expected.round())
    assert draws.min() >= N and draws.max() <= L


def test_lvps_numbers_of_the_paper() -> None:
    p = lvps_closed_form(12, 3)
    assert p[0] == pytest.approx(0.637, abs=5e-4)  # P(depth 3)
    assert float(np.dot(p, np.arange(3, 13))) == pytest.approx(4.22, abs=0.01)  # 4.2256
    assert lvps_depth(0.0, 12, 3) == 12 and lvps_depth(0.999, 12, 3) == 3
    assert sample_depth("full", 12, 3, 1, 2, 3) == 12 and sample_depth("lvps", 12, 12, 1, 2, 3) == 12
    uniform = np.bincount([sample_depth("uniform", 6, 2, 7, i, 0) for i in range(20_000)], minlength=7)[2:]
    assert np.allclose(uniform / 20_000, 0.2, atol=0.015)


def test_layer_maps() -> None:
    assert layer_map("interpolate", 3, 7) == [0, 0, 0, 1, 1, 2, 2]  # the example
    assert layer_map("stack", 3, 7) == [0, 1, 2, 0, 1, 2, 0]
    assert layer_map("interpolate", 1, 4) == [0] * 4 and layer_map("interpolate", 4, 4) == [0, 1, 2, 3]
    assert layer_map("interpolate", 2, 5) == [0, 0, 0, 1, 1]
    assert growth_sources("interpolate", 3, 6) == [0, 0, 1, 1, 2, 2]
    assert growth_sources("stack", 3, 6) == [0, 1, 2, 0, 1, 2]
    # Growth keeps the full-depth network: the new map composed with the sources is the old map.
    for growth in ("interpolate", "stack"):
        for L, old, new in ((12, 1, 3), (12, 3, 6), (12, 6, 12), (24, 2, 8), (16, 4, 16)):
            sources = growth_sources(growth, old, new)
            assert [sources[k] for k in layer_map(growth, new, L)] == layer_map(growth, old, L), (growth, old, new)


BASE = ["--train-iters", "10", "--model-variant", "progressive", "--num-layers", "12"]


@pytest.mark.parametrize(
    "flags,message",
    [
        ([], "needs --progressive-layers, e.g. 1,3,6,12"),
        (["--progressive-layers", "2,3", "--progressive-stages", "5"], "2 does not divide 3"),
        (["--progressive-layers", "1,5", "--progressive-stages", "5"], "5 does not divide --num-layers 12"),
        (["--progressive-layers", "1,3,6", "--progressive-stages", "5"], "needs 2 start(s)"),
        (["--progressive-layers", "1,3,6", "--progressive-stages", "5,5"], "starts must be positive and increasing"),
        (["--progressive-layers", "1,3", "--progressive-stages", "5X"], "--progressive-stages 5X: '5X': expected"),
        (
            ["--progressive-layers", "1,3", "--progressive-stages", "5", "--pipeline-model-parallel-size", "2"],
            "needs --pipeline-model-parallel-size 1",
        ),
        (
            [
                "--progressive-layers",
                "1,3",
                "--progressive-stages",
                "5",
                "--use-distributed-optimizer",
                "--overlap-grad-reduce",
            ],
            "cannot take --overlap-grad-reduce",
        ),  # fmt: skip
        (["--progressive-layers", "3"], "--progressive-layers is an option of --model-variant progressive"),
    ],
)
def test_refusals_are_one_line(flags: list[str], message: str) -> None:
    argv = BASE + flags if "--model-variant" not in message else ["--train-iters", "1", *flags]
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        parse_args(argv)
    assert "\n" not in str(e.value)


def test_options_parse() -> None:
    cfg = parse_args([*BASE, "--progressive-layers", "1,3,6,12", "--progressive-stages", "2B,4B,10B"])
    o = cfg.variant_options
    assert o.layers() == [1, 3, 6, 12] and o.stages() == [2 * 10**9, 4 * 10**9, 10**10]  # type: ignore[attr-defined]
    assert (o.depth_sampling, o.growth, o.growth_moments) == ("lvps", "interpolate", "copy")  # type: ignore[attr-defined]


ONE = ["shared_gradients", "shared_gradients_recompute", "reference", "reset", "stack", "recompute", "bf16",
       "resume_2", "resume_3", "rewarm", "resume_3_rewarm"]  # fmt: skip
TWO = ["tp2", "tp2_sp", "dp2_distopt", "dp2_distopt_reset"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("progressive")
    prefix = ngram_corpus(str(tmp / "docs"))
    one = launch_scenarios(SCRIPT, 1, 29531, [prefix], tmp / "one.json", ONE)
    two = launch_scenarios(SCRIPT, 2, 29532, [prefix], tmp / "two.json", TWO)
    return {**one, **two}


def _close(a: list[float], b: list[float], rtol: float = 1e-5) -> bool:
    return all(math.isclose(x, y, rel_tol=rtol) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("recompute", ["", "_recompute"])
def test_shared_layer_gradients_are_sums_over_copies(results: dict, recompute: str) -> None:
    r = results["shared_gradients" + recompute]
    assert r["max_relative_error"] <= 1e-6 and r["unused_have_no_grad"] and r["embedding_equal"], r


@pytest.mark.parametrize("name", ["reference", "stack", "reset"])
def test_growth_keeps_full_depth_output_and_copies_state(results: dict, name: str) -> None:
    g = results[name]["growth"]
    assert g["equal_outputs"] == [True, True] and g["weights_copied"] == [True, True], g
    assert g["moments_as_flagged"] == [True, True], g


@pytest.mark.parametrize(
    "name,reference,rtol",
    [
        ("recompute", "reference", 1e-6),
        ("tp2", "reference", 1e-5),
        ("tp2_sp", "reference", 1e-5),
        ("dp2_distopt", "reference", 1e-5),
        ("dp2_distopt_reset", "reset", 1e-5),
        ("resume_2", "reference", 0),
        ("resume_3", "reference", 0),
        ("bf16", "reference", 2e-3),
    ],
)
def test_layouts_and_resume_match_the_single_process(results: dict, name: str, reference: str, rtol: float) -> None:
    ref, got = results[reference]["losses"], results[name]["losses"]
    assert ref[0] > ref[-1], f"reference loss did not fall: {ref}"
    assert _close(got, ref, rtol) if rtol else got == ref, f"{name} {got} vs {reference} {ref}"


def test_moments_reset_changes_the_run(results: dict) -> None:
    ref, reset = results["reference"]["losses"], results["reset"]["losses"]
    assert ref[:3] == reset[:3] and ref[3:] != reset[3:]  # the same until the first growth (before iteration 2)


def test_lr_rewarm_after_growth(results: dict) -> None:
    """--growth-lr-rewarm 2: the two steps after the growth at iteration 2 run at 1/3 and 2/3 of the LR (the loss
    of the growth step is taken before its update), and a resume in the middle of the rewarm continues it."""
    ref, rewarm = results["reference"]["losses"], results["rewarm"]["losses"]
    assert ref[:3] == rewarm[:3] and all(abs(a - b) > 1e-5 for a, b in zip(ref[3:], rewarm[3:])), (ref, rewarm)
    assert results["resume_3_rewarm"]["losses"] == rewarm


def test_flops_follow_the_sampled_depth(results: dict) -> None:
    flops = results["reference"]["flops"]
    # Stage 1 (1 unique layer) samples depths of at most 4 layers, the last stage runs all 4: the most per step.
    assert max(flops[:4]) < flops[4] == flops[5] == results["reference"]["gpt_step_flops"]
    assert results["tp2"]["flops"] == flops


GROW_SCRIPT = """
import contextlib, importlib.util, io, json, sys
from pathlib import Path
import torch
from megatron_ext import distributed
from megatron_ext.models.progressive import layer_map
from megatron_ext.training.inference import load_model
from megatron_ext.training.layout import find_checkpoint

spec = importlib.util.spec_from_file_location("convert_tool", sys.argv[2])
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
tmp = Path(sys.argv[1])
tokens = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))

def logits(ckpt, plan=None):
    model, *_ = load_model(find_checkpoint(ckpt), "cpu")
    if plan is not None:  # the progressive run's full-depth network, by hand
        model.decoder.layers = torch.nn.ModuleList([model.decoder.layers[k] for k in plan])
    with torch.no_grad():
        out = model(tokens, torch.arange(32).expand_as(tokens), None).float()
    distributed.destroy()
    return out

def grow(*args):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["grow", *args, "--no-progress"]) == 0, args
    return stdout.getvalue()

out = {}
src = logits(tmp / "gpt")
out["preserving_note"] = grow("--load", str(tmp / "gpt"), "--save", str(tmp / "fp"), "--target-layers", "4",
                              "--function-preserving")
out["preserving_error"] = float((logits(tmp / "fp") - src).abs().max())
out["plain_note"] = grow("--load", str(tmp / "gpt"), "--save", str(tmp / "plain"), "--target-layers", "4",
                         "--growth", "interpolate")
out["plain_error"] = float((logits(tmp / "plain") - src).abs().max())
full_depth = logits(tmp / "prog", layer_map("interpolate", 2, 4))
grow("--load", str(tmp / "prog"), "--save", str(tmp / "prog_grown"), "--target-layers", "4")
out["progressive_error"] = float((logits(tmp / "prog_grown") - full_depth).abs().max())
grow("--load", str(tmp / "gpt"), "--save", str(tmp / "reset"), "--target-layers", "4", "--reset-progress")
out["reset_tracker"] = (tmp / "reset" / "latest_checkpointed_iteration.txt").read_text().strip()
out["kept_tracker"] = (tmp / "fp" / "latest_checkpointed_iteration.txt").read_text().strip()
(tmp / "grow.json").write_text(json.dumps(out))
"""


def _train(tmp: Path, run: str, flags: list[str]) -> str:
    import subprocess
    import sys

    from launchers import clean_env

    argv = [sys.executable, str(ROOT / "pretrain_gpt.py"), *flags, "--data-cache-path", str(tmp / "cache")]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**clean_env(), "PYTHONPATH": str(ROOT)}, cwd=tmp)
    assert proc.returncode == 0, f"{run}: {proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_grow_a_checkpoint(tmp_path: Path) -> None:
    """tools/convert_checkpoint.py grow: --function-preserving keeps the logits, plain copies change them, a
    progressive checkpoint mid-stage grows to its full-depth function, and the grown checkpoint trains on."""
    import json
    import subprocess
    import sys

    from launchers import clean_env

    data = ["--data-path", ngram_corpus(str(tmp_path / "docs"))]
    tiny = ("--hidden-size 32 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 --global-batch-size 4 "
            "--hidden-dropout 0 --attention-dropout 0 --eval-iters 0 --lr 1e-2 --lr-decay-style constant "
        "--make-vocab-size-divisible-by 1 "
            "--log-interval 1").split()  # fmt: skip
    _train(
        tmp_path,
        "gpt",
        [
            *tiny,
            *data,
            "--num-layers",
            "2",
            "--train-iters",
            "5",
            "--exit-interval",
            "3",
            "--save",
            str(tmp_path / "gpt"),
        ],
    )
    prog = ["--model-variant", "progressive", "--progressive-layers", "1,2,4", "--progressive-stages", "2,100",
            "--progressive-stage-unit", "iters"]  # fmt: skip
    _train(tmp_path, "prog", [*tiny, *data, "--num-layers", "4", "--train-iters", "4", *prog,
                              "--save", str(tmp_path / "prog")])  # fmt: skip
    env = {**clean_env(), "PYTHONPATH": str(ROOT)}
    script = [sys.executable, "-c", GROW_SCRIPT, str(tmp_path), str(ROOT / "tools" / "convert_checkpoint.py")]
    proc = subprocess.run(script, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "grow.json").read_text())
    assert out["preserving_error"] == 0.0 and "logits equal the source's" in out["preserving_note"], out
    assert out["plain_error"] > 1e-3 and "not function-preserving" in out["plain_note"], out
    assert out["progressive_error"] == 0.0, out
    assert (out["reset_tracker"], out["kept_tracker"]) == ("0", "3"), out
    log = _train(tmp_path, "on", [*tiny, *data, "--num-layers", "4", "--train-iters", "5", "--load",
                                  str(tmp_path / "fp"), "--save", str(tmp_path / "fp")])  # fmt: skip
    assert "at iteration 3" in log and re.search(r"^iter 5/5 \| loss [0-9.]+", log, re.M), log[-2000:]
    bad = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "grow", "--load", str(tmp_path / "gpt"),
         "--save", str(tmp_path / "never"), "--target-layers", "3"], capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "must be a multiple" in bad.stderr, bad.stderr
    assert not (tmp_path / "never").exists()
