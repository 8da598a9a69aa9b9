"""The model-variant interface (megatron_ext/models/recipe.py): a variant defined outside the package
(tests/toy_variant.py: a GPT whose loss counts every second token) is chosen by --model-variant, its options are
flags of their own checked at parse time, and it trains, checkpoints and resumes exactly through the loop."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import toy_variant
from launchers import clean_env, ngram_corpus

from megatron_ext import config
from megatron_ext.config import Config, ConfigError, build_parser, parse_args
from megatron_ext.distributed import free_port
from megatron_ext.models import recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 --lr 1e-3 "
    "--hidden-dropout 0 --attention-dropout 0 --log-interval 1 --eval-interval 4 --eval-iters 1 --split 90,10,0 "
    "--train-iters 4 --model-variant every-other --counted-parity 1"
).split()


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The toy variant registered for one test only (the registries are restored afterwards)."""
    monkeypatch.setattr(config, "VARIANTS", dict(config.VARIANTS))
    monkeypatch.setattr(recipe, "_RECIPES", dict(recipe._RECIPES))
    toy_variant.register()


def test_variant_options_are_flags_checked_at_parse_time(registered: None) -> None:
    cfg = parse_args(["--model-variant", "every-other", "--counted-parity", "1", "--train-iters", "1"])
    assert isinstance(cfg.variant_options, toy_variant.EveryOtherOptions) and cfg.variant_options.counted_parity == 1
    assert cfg.to_dict()["variant_options"] == {"counted_parity": 1} and Config.from_dict(cfg.to_dict()) == cfg
    assert type(parse_args(["--train-iters", "1"]).variant_options) is config.VariantOptions  # gpt has none
    help_text = build_parser().format_help()
    assert "every-other:" in help_text and "Train on the tokens at even (0) or odd (1) positions." in help_text
    for argv, message in (
        (["--counted-parity", "1"], "--counted-parity is an option of --model-variant every-other, not of gpt"),
        (["--model-variant", "every-other", "--counted-parity", "2"], "--counted-parity 2 must be 0 or 1"),
        (["--model-variant", "every-other", "--seq-length", "63"], "needs an even --seq-length, not 63"),
        (
            ["--model-variant", "every_other"],
            f"--model-variant 'every_other' must be one of {', '.join(config.VARIANTS)}",
        ),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_args(argv)
    with pytest.raises(ConfigError, match="the name is taken"):
        recipe.register_variant("model", recipe.Recipe)  # a schema section's name


def test_unregistered_variant_is_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_ext.config", "--model-variant", "every-other"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    builtin = ", ".join(v for v in config.VARIANTS if v != toy_variant.NAME)  # gpt and the package's variants
    assert proc.returncode != 0 and proc.stderr == f"error: --model-variant 'every-other' must be one of {builtin}\n"


def _losses(log: str) -> dict[int, float]:
    return {int(i): float(x) for i, x in re.findall(r"^iter (\d+)/\d+ \| loss ([0-9.]+)", log, re.M)}


def test_toy_variant_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    env = {**clean_env(), "PYTHONPATH": str(ROOT), "MASTER_PORT": str(free_port())}
    data = ["--data-path", ngram_corpus(str(tmp_path / "ngrams")), "--data-cache-path", str(tmp_path / "cache")]
    argv = [sys.executable, str(ROOT / "tests" / "toy_variant.py"), str(tmp_path), *TINY, *data]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    for name in ("lm_loss", "left_out_loss"):  # the recipe's masks, against plain PyTorch's cross-entropy
        assert result["first_step"][name] == pytest.approx(result["by_hand"][name], rel=1e-5), result
    assert result["first_step"]["lm_loss"] != pytest.approx(result["first_step"]["left_out_loss"], rel=1e-3)

    whole, saved = (tmp_path / "whole" / "train.log").read_text(), (tmp_path / "ckpt" / "train.log").read_text()
    first, resumed = saved.split("resumed from")
    assert "exiting at iteration 2" in first and "every-other: step 2 at iteration 1" in first
    assert "every-other: step 3 at iteration 2" in resumed  # the recipe's state came back from the checkpoint
    from_universal = (tmp_path / "from_universal" / "train.log").read_text()
    assert "every-other: step 3 at iteration 2" in from_universal  # and through the universal format
    for i, loss in _losses(from_universal).items():
        assert loss == pytest.approx(_losses(whole)[i], rel=1e-5), (i, from_universal, whole)
    assert re.search(r"^validation at iter 4 \| \S+ \| loss [0-9.]+ \| ppl [0-9.]+ \| left_out_loss [0-9.]+$", whole,
                     re.M)  # fmt: skip
    assert sorted(_losses(resumed)) == [3, 4]
    for i, loss in _losses(resumed).items():  # fp32 on CPU: the resumed run is the uninterrupted run
        assert loss == pytest.approx(_losses(whole)[i], rel=1e-6), (i, resumed, whole)
    saved_config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved_config["variant"] == {"model_variant": "every-other"}
    assert saved_config["variant_options"] == {"counted_parity": 1}
