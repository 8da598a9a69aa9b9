"""Draw a run's train and validation loss against tokens to a PNG and print the last values, in bits per byte too.

    python tools/plot_loss.py runs/demo                        # writes runs/demo/loss_curve.png
    python tools/plot_loss.py RUN_DIR --out loss.png [--tensorboard-dir DIR]

RUN_DIR is the folder holding the run's config.json (--run-dir, else --save); the curves come from its
tensorboard events (--tensorboard-dir of the run). Validation loss is also given in bits per byte of the
validation text (see megatron_ext/training/curves.py), which compares across tokenizers; with one validation
corpus the plot gets a bits-per-byte axis. Mistakes end in one ``error:`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_ext.cli import OneLineParser, UserError, check_image_path, run_tool
from megatron_ext.platform import quiet_optional_dependency_warnings

quiet_optional_dependency_warnings()  # before megatron-core is imported (through the data modules)

from megatron_ext.config import Config  # noqa: E402
from megatron_ext.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_ext.training import curves  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="tools/plot_loss.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, help="The run's folder (holding config.json).")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/loss_curve.png).")
    p.add_argument("--tensorboard-dir", type=Path, default=None, help="Events folder (default: the run's).")
    return p


def summarize(run_dir: Path, out: Path, tensorboard_dir: Path | None) -> list[str]:
    """Writes the PNG; returns the summary lines. A user mistake raises UserError (one line)."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{run_dir}: no config.json; expected a run's folder (--run-dir, else --save)")
    cfg = Config.from_json(config_path)
    events = tensorboard_dir or cfg.logging.tensorboard_dir
    if not events or not Path(events).is_dir():
        raise UserError(f"{run_dir}: no tensorboard folder {events or ''} (run with --tensorboard-dir)")
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    try:
        loss = curves.loss_curves(curves.read_scalars(events), cfg.model.seq_length)
        ratios = {
            corpus: curves.bytes_per_token(prefixes, split, index, tokenizer)
            for corpus, (prefixes, split, index) in curves.validation_prefixes(cfg, tokenizer).items()
        }
    except ValueError as e:
        raise UserError(f"{run_dir}: {e}") from None
    train = loss["train"]
    lines = [f"train loss {train.values[-1]:.4f} at iteration {train.steps[-1]} ({train.tokens[-1]:,.0f} tokens)"]
    for name, c in loss.items():
        corpus = name.removeprefix("valid/")
        if name != "train" and corpus in ratios:
            bpb = curves.bits_per_byte(c.values[-1], ratios[corpus])
            lines.append(
                f"validation loss {c.values[-1]:.4f} nats/token = {bpb:.3f} bits/byte ({corpus}, "
                f"{ratios[corpus]:.2f} bytes/token, {tokenizer.name}) at iteration {c.steps[-1]}"
            )
    single = next(iter(ratios.values())) if len(ratios) == 1 else None
    curves.plot_loss_curves(loss, out, single, title=f"{run_dir} ({tokenizer.name})")
    lines.append(f"wrote {out}")
    return lines


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or args.run_dir / "loss_curve.png"
    check_image_path("--out", out)
    print("\n".join(summarize(args.run_dir, out, args.tensorboard_dir)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
