"""Hidden-state dimension compressor (LLM-TRM phase 1): train a tied linear map [B, L, D] -> [B, L, D'] -> [B, L, D]
on a frozen LM's final-layer hidden states, with PCA beside it as the exact optimum it can at best match.

    python -m megatron_ext.dimension_compressor --load CKPT --d-compressed 256                  # stage 1a
    python -m megatron_ext.dimension_compressor --load CKPT --stage 1b --input chat.jsonl       # from 1a's best
    python -m megatron_ext.dimension_compressor --hidden-store STORE --sweep                     # D' = H/16 .. H/2

A standalone job with its own short loop: one matrix trained for epochs on stored hidden states needs neither the
pipeline schedule nor DDP. Hidden states come from a store made by tools/extract_hidden.py (--hidden-store), or
are extracted here first from --load into `<output-dir>/hidden/` (resumable). Each evaluation (on the held-out
--valid-fraction of sequences, padding excluded) prints and logs to tensorboard mse, relative error, cosine and
variance ratio beside PCA's on the same data; early stopping on the validation MSE keeps the best weights only
(`stage1a_best.pt`, written atomically). The reference's flag spellings (`--d_compressed`, `--num_epochs`,
`--no_early_stopping`, ...) are accepted. Models: megatron_ext/models/dimension_compressor.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_ext.cli import OneLineParser, UserError, report
from megatron_ext.config import ConfigError, add_section, folder_problem, opt
from megatron_ext.hidden_states import (
    HiddenSourceConfig,
    HiddenStore,
    extract,
    frozen_lm,
    open_complete,
    prepare,
    split_sequences,
)
from megatron_ext.models.dimension_compressor import (
    ReconstructionMetrics,
    SecondMoment,
    TiedLinearCompressor,
    masked_mse,
    principal_axes,
)

CHECKPOINT_FORMAT = "megatron_ext.dimension_compressor"


@dataclass
class CompressorConfig:
    """What is trained, from what, and where it goes."""

    d_compressed: int = opt(256, "Compressed dimension D' (below the LM's hidden size).", aliases=["--d_compressed"])
    init: str = opt(
        "orthogonal",
        "Initial W: orthogonal (random orthonormal rows) or pca (PCA's optimum).",
        choices=["orthogonal", "pca"],
    )
    stage: str = opt("1a", "1a: plain text; 1b: reasoning/chat text, starting from 1a's best.", choices=["1a", "1b"])
    init_from: str | None = opt(
        None,
        "Stage 1b's starting checkpoint (default <output-dir>/stage1a_best.pt, per D' with --sweep).",
        aliases=["--init_from", "--compressor-checkpoint", "--compressor_checkpoint"],
    )
    sweep: bool = opt(False, "Train one compressor per --sweep-d-values (a folder d<D'> each) and tabulate them.")
    sweep_d_values: list[int] | None = opt(
        None, "D' values of --sweep (default H/16 H/8 H/4 H/2 of the LM's hidden size H).", aliases=["--sweep_d_values"]
    )
    hidden_store: str | None = opt(None, "Read hidden states from this store (tools/extract_hidden.py).")
    output_dir: str = opt("checkpoints/dimension_compressor", "Checkpoints, logs, results.", aliases=["--output_dir"])

    def __post_init__(self) -> None:
        values = [self.d_compressed, *(self.sweep_d_values or [])]
        if min(values) < 1:
            raise ConfigError(f"--d-compressed / --sweep-d-values must be positive, not {min(values)}")


@dataclass
class CompressorTrainingConfig:
    """The compressor's short training loop: AdamW, warmup then cosine decay per step, clipping, early stopping."""

    micro_batch_size: int = opt(8, "Sequences per step.", aliases=["--batch-size", "--batch_size"])
    num_epochs: int = opt(10, "Epochs at most.", aliases=["--num_epochs"])
    lr: float = opt(1e-3, "Peak learning rate.", aliases=["--learning-rate", "--learning_rate"])
    min_lr: float = opt(0.0, "Learning rate at the end of the cosine decay.")
    lr_warmup_fraction: float = opt(
        0.1, "Share of the steps spent warming up linearly from 0.", aliases=["--warmup-ratio", "--warmup_ratio"]
    )
    weight_decay: float = opt(0.0, "AdamW weight decay (0: decay would pull W away from the PCA optimum).")
    clip_grad: float = opt(
        1.0, "Clip the gradient norm to this (0 disables).", aliases=["--max-grad-norm", "--max_grad_norm"]
    )
    early_stopping: bool = opt(
        True,
        "Stop after --early-stopping-patience evaluations without a better validation "
        "loss (--no-early-stopping: all epochs).",
        aliases=["--early_stopping"],
    )
    early_stopping_patience: int = opt(
        3, "Evaluations without improvement before stopping.", aliases=["--early_stopping_patience"]
    )
    early_stopping_min_delta: float = opt(
        1e-6, "Least decrease of the validation MSE that counts as improvement.", aliases=["--early_stopping_min_delta"]
    )
    eval_interval: int | None = opt(None, "Evaluate every N steps (default: at the end of each epoch).")
    valid_fraction: float = opt(0.05, "Share of the sequences held out for validation (early stopping, metrics).")
    log_interval: int = opt(50, "Print a training line every N steps.")
    seed: int = opt(1234, "Seed of the split, the shuffling and the orthogonal initialisation.")
    torch_compile: bool | None = opt(
        None, "torch.compile the compressor (default: on with CUDA, off on CPU).", aliases=["--torch_compile"]
    )
    tensorboard_dir: str | None = opt(None, "Tensorboard logs (default <output-dir>[/d<D'>]/tensorboard).")
    use_wandb: bool = opt(
        False, "Also log to wandb (offline unless WANDB_MODE says otherwise).", aliases=["--use_wandb"]
    )
    wandb_project: str = opt("dimension-compressor", "wandb project.", aliases=["--wandb_project"])
    wandb_run_name: str | None = opt(
        None, "wandb run name, _d<D'> appended (default: the stage).", aliases=["--wandb_run_name"]
    )

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "num_epochs", "early_stopping_patience", "log_interval", "eval_interval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, not {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, not {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        if not 0 <= self.lr_warmup_fraction < 1:
            raise ConfigError(f"--lr-warmup-fraction {self.lr_warmup_fraction} must be in [0, 1)")
        if not 0 < self.valid_fraction < 1:
            raise ConfigError(f"--valid-fraction {self.valid_fraction} must be in (0, 1)")
        for name in ("weight_decay", "clip_grad", "early_stopping_min_delta", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, not {getattr(self, name)}")


SECTIONS: dict[str, type] = {
    "compressor": CompressorConfig,
    "training": CompressorTrainingConfig,
    "hidden": HiddenSourceConfig,
}
# The reference's negative spellings (add_section renders --no-X for each boolean X).
NEGATIVE_SPELLINGS = {
    "--no_early_stopping": "training.early_stopping",
    "--no_torch_compile": "training.torch_compile",
    "--no_wandb": "training.use_wandb",
}


@dataclass
class RunConfig:
    """Every section of one run; saved as `<output-dir>/config.json`."""

    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    training: CompressorTrainingConfig = field(default_factory=CompressorTrainingConfig)
    hidden: HiddenSourceConfig = field(default_factory=HiddenSourceConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m megatron_ext.dimension_compressor",
        description="Train a tied linear hidden-state compressor on a frozen LM, with PCA beside it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for section, cls in SECTIONS.items():
        add_section(parser, section, cls)
    for spelling, dest in NEGATIVE_SPELLINGS.items():
        parser.add_argument(spelling, dest=dest, action="store_false", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
    """Flags -> a validated RunConfig; ConfigError names a bad value."""
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in vars(build_parser().parse_args(argv)).items():
        section, name = key.split(".", 1)
        values[section][name] = value
    cfg = RunConfig(**{s: cls(**values[s]) for s, cls in SECTIONS.items()})
    c = cfg.compressor
    h = cfg.hidden
    if (c.hidden_store is None) == (h.load is None):
        raise ConfigError("give the hidden states: --load CHECKPOINT (extracted here) or --hidden-store STORE")
    if c.stage == "1b" and h.load is not None and not (h.input or h.data_path or h.data_file_list):
        raise ConfigError("--stage 1b trains on reasoning/chat text: give --input FILE.jsonl (or --data-file-list)")
    return cfg


# ---- pieces of a run -----------------------------------------------------------------------------------------------


class EarlyStopping:
    """Counts evaluations without a validation loss below best - min_delta; `stop` after `patience` of them."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best = math.inf
        self.bad = 0

    def update(self, loss: float) -> bool:
        """Records one evaluation; True when it is the new best."""
        if loss < self.best - self.min_delta:
            self.best, self.bad = loss, 0
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad >= self.patience


@dataclass
class Data:
    """The store and its split into training and validation sequences."""

    store: HiddenStore
    train_ids: np.ndarray
    valid_ids: np.ndarray

    @property
    def hidden_size(self) -> int:
        return self.store.hidden_size


@dataclass
class Result:
    """One trained D': the best evaluation, PCA's on the same data, and how the run went."""

    d_compressed: int
    hidden_size: int
    best: dict[str, float]
    pca: dict[str, float]
    epochs: int
    steps: int
    best_epoch: float
    stopped_early: bool
    seconds: float
    checkpoint: str
    history: list[dict[str, float]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The sweep table's row."""
        return {
            "d_compressed": self.d_compressed,
            "ratio": self.hidden_size / self.d_compressed,
            "parameters": self.hidden_size * self.d_compressed,
            "cosine_trained": self.best["cosine"],
            "cosine_pca": self.pca["cosine"],
            "relative_error": self.best["relative_error"],
            "variance_ratio": self.best["variance_ratio"],
            "mse": self.best["mse"],
            "mse_pca": self.pca["mse"],
            "epochs": self.epochs,
            "stopped_early": self.stopped_early,
            "seconds": round(self.seconds, 2),
        }


def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor], data: Data, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Reconstruction metrics of `model` (a module or its compiled forward) on the validation sequences (real
    tokens only)."""
    metrics = ReconstructionMetrics(data.hidden_size)
    with torch.no_grad():
        for x, mask in data.store.batches(data.valid_ids, batch_size):
            x, mask = x.to(device), mask.to(device)
            metrics.update(x, model(x), mask)
    return metrics.result()


def second_moment(data: Data, batch_size: int, device: torch.device) -> torch.Tensor:
    """E[x x^T] over the training sequences' real tokens, streamed from the store."""
    moment = SecondMoment(data.hidden_size)
    for x, mask in data.store.batches(data.train_ids, batch_size):
        moment.update(x.to(device), mask.to(device))
    return moment.matrix()


def save_checkpoint(path: Path, model: TiedLinearCompressor, info: dict[str, Any]) -> None:
    """Writes the weights and their record to a temporary file and renames it over `path` (never half-written)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "weight": model.weight.detach().cpu().clone(),
        "d_model": model.d_model,
        "d_compressed": model.d_compressed,
        **info,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, flag: str, d_model: int, d_compressed: int) -> dict[str, Any]:
    """A compressor checkpoint of this shape, or a ConfigError naming `flag`."""
    if not path.is_file():
        hint = " (stage 1b starts from stage 1a's best: run --stage 1a first, or pass --init-from)"
        raise ConfigError(f"{flag} {path}: no such file{hint if flag == '--init-from' else ''}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise ConfigError(f"{flag} {path}: not a readable compressor checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{flag} {path}: not a dimension-compressor checkpoint")
    if (state["d_model"], state["d_compressed"]) != (d_model, d_compressed):
        raise ConfigError(
            f"{flag} {path}: a {state['d_model']} -> {state['d_compressed']} compressor; this run "
            f"trains {d_model} -> {d_compressed} (--d-compressed)"
        )
    return state


class Logs:
    """Scalars to tensorboard and (with --use-wandb) wandb; lines through `log`."""

    def __init__(self, run_dir: Path, cfg: RunConfig, d: int, log: Callable[[str], None]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        t = cfg.training
        self.log = log
        folder = Path(t.tensorboard_dir) / (f"d{d}" if cfg.compressor.sweep else "") if t.tensorboard_dir else None
        self.writer = SummaryWriter(str(folder or run_dir / "tensorboard"))
        self.wandb: Any = None
        if t.use_wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("--use-wandb: the wandb package is not installed") from None
            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(
                project=t.wandb_project,
                name=f"{t.wandb_run_name or cfg.compressor.stage}_d{d}",
                config=cfg.to_dict(),
                dir=str(run_dir),
                reinit=True,
            )

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        for key, value in values.items():
            self.writer.add_scalar(prefix + key, value, step)
        if self.wandb is not None:
            self.wandb.log({prefix + k: v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _eval_line(epoch: float, step: int, m: dict[str, float], pca: dict[str, float], best: bool) -> str:
    return (
        f"eval epoch {epoch:.2f} step {step} | mse {m['mse']:.4e} | rel_err {m['relative_error']:.4f} | "
        f"cosine {m['cosine']:.4f} | var_ratio {m['variance_ratio']:.4f} | pca: mse {pca['mse']:.4e} "
        f"cosine {pca['cosine']:.4f}{' | best' if best else ''}"
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch reports no CUDA device")
    return torch.device(name)


def lr_schedule(t: CompressorTrainingConfig, total_steps: int) -> Any:
    """Linear warmup from 0 over --lr-warmup-fraction of the steps, then cosine decay to --min-lr at the last step
    (the project's schedule code, positions counted in steps)."""
    from megatron_ext.training.schedules import ScheduleConfig

    return ScheduleConfig(
        lr=t.lr,
        min_lr=t.min_lr,
        lr_decay_style="cosine",
        lr_warmup=int(t.lr_warmup_fraction * total_steps),
        lr_decay=max(total_steps, 1),
        start_weight_decay=t.weight_decay,
        end_weight_decay=t.weight_decay,
    )


def initial_model(cfg: RunConfig, axes: torch.Tensor, H: int, d: int, run_dir: Path, log: Callable) -> Any:
    """W at step 0: orthogonal or PCA (--init) for stage 1a; stage 1a's best (--init-from) for stage 1b."""
    c = cfg.compressor
    generator = torch.Generator().manual_seed(cfg.training.seed)
    model = TiedLinearCompressor(H, d, basis=axes[:d] if c.init == "pca" else None, generator=generator)
    if c.stage == "1b":
        source = Path(c.init_from) if c.init_from else run_dir / "stage1a_best.pt"
        state = load_checkpoint(source, "--init-from", H, d)
        model.weight.data.copy_(state["weight"])
        log(f"stage 1b from {source} (validation mse {state['metrics']['mse']:.4e} on its own data)")
    return model


def train_step(
    forward: Callable,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    x: torch.Tensor,
    mask: torch.Tensor,
    clip_grad: float,
) -> tuple[float, float]:
    """One AdamW step on the MSE over real tokens; returns (loss, gradient norm before clipping)."""
    loss = masked_mse(forward(x), x, mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad or math.inf)
    optimizer.step()
    scheduler.step(1)
    return float(loss.detach()), float(grad_norm)


@dataclass
class Evaluations:
    """Evaluates on the validation sequences, logs beside PCA, keeps the best weights, decides early stopping."""

    cfg: RunConfig
    data: Data
    pca: dict[str, float]
    best_path: Path
    logs: Logs
    device: torch.device
    stopper: EarlyStopping
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)
    best_epoch: float = 0.0

    def __call__(self, model: TiedLinearCompressor, forward: Callable, step: int, epoch: float) -> bool:
        """One evaluation; True when training should stop."""
        model.eval()
        metrics = evaluate(forward, self.data, self.cfg.training.micro_batch_size, self.device)
        model.train()
        improved = self.stopper.update(metrics["mse"])
        self.history.append({"step": step, "epoch": epoch, **metrics})
        self.logs.scalars(step, metrics, "valid/")
        self.logs.log(_eval_line(epoch, step, metrics, self.pca, improved))
        if improved:
            self.best, self.best_epoch = metrics, epoch
            info = {
                "stage": self.cfg.compressor.stage,
                "step": step,
                "epoch": epoch,
                "metrics": metrics,
                "pca_metrics": self.pca,
                "store": self.data.store.meta.get("inputs"),
                "config": self.cfg.to_dict(),
            }
            save_checkpoint(self.best_path, model, info)
        return self.cfg.training.early_stopping and self.stopper.stop


def train_one(
    cfg: RunConfig, data: Data, axes: torch.Tensor, d: int, pca: dict[str, float], run_dir: Path, log: Callable
) -> Result:
    """Trains one D' and keeps its best weights in `run_dir/stage<S>_best.pt`; `axes` are PCA's (rows)."""
    from megatron_ext.training.schedules import ParamScheduler

    t = cfg.training
    device = _device(cfg.hidden.device)
    model = initial_model(cfg, axes, data.hidden_size, d, run_dir, log).to(device)
    use_compile = t.torch_compile if t.torch_compile is not None else device.type == "cuda"
    forward = torch.compile(model) if use_compile else model
    steps_per_epoch = math.ceil(len(data.train_ids) / t.micro_batch_size)
    total = steps_per_epoch * t.num_epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = ParamScheduler(optimizer, lr_schedule(t, total))
    logs = Logs(run_dir, cfg, d, log)
    stopper = EarlyStopping(t.early_stopping_patience, t.early_stopping_min_delta)
    evaluations = Evaluations(cfg, data, pca, run_dir / f"stage{cfg.compressor.stage}_best.pt", logs, device, stopper)
    eval_every = t.eval_interval or steps_per_epoch
    rng = np.random.default_rng(t.seed)
    start = time.perf_counter()
    logs.scalars(0, pca, "pca/")
    step, epoch = 0, 0
    stopped = evaluations(model, forward, 0, 0.0)
    while epoch < t.num_epochs and not stopped:
        for x, mask in data.store.batches(rng.permutation(data.train_ids), t.micro_batch_size):
            loss, grad_norm = train_step(
                forward, model, optimizer, scheduler, x.to(device), mask.to(device), t.clip_grad
            )
            step += 1
            if step % t.log_interval == 0:
                values = {"loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm}
                logs.scalars(step, values, "train/")
                log(
                    f"epoch {step / steps_per_epoch:.2f} step {step}/{total} | loss {loss:.4e} | "
                    f"lr {values['lr']:.3e} | grad_norm {grad_norm:.3e}"
                )
            if step % eval_every == 0 and evaluations(model, forward, step, step / steps_per_epoch):
                stopped = True
                break
        epoch += 1
    if stopped:
        log(f"early stopping after {t.early_stopping_patience} evaluations without improvement (epoch {epoch})")
    logs.close()
    return Result(
        d,
        data.hidden_size,
        evaluations.best,
        pca,
        epoch,
        step,
        evaluations.best_epoch,
        stopped,
        time.perf_counter() - start,
        str(evaluations.best_path),
        evaluations.history,
    )


# ---- the run -----------------------------------------------------------------------------------------------------


def hidden_store(cfg: RunConfig, log: Callable[[str], None]) -> HiddenStore | None:
    """The store to train on: --hidden-store, or one extracted here from --load into <output-dir>/hidden/ (named by
    its inputs, so a changed input makes a new one). None on ranks other than 0 of a TP extraction."""
    c = cfg.compressor
    if c.hidden_store is not None:
        return open_complete(c.hidden_store)
    lm = frozen_lm(cfg.hidden)
    check_d_values(cfg, lm.hidden_size)  # before the extraction, which may take long
    prepared = prepare(cfg.hidden, lm)
    folder = Path(c.output_dir) / "hidden" / f"{c.stage}-{prepared.key}"
    if not extract(cfg.hidden, prepared, folder, log):
        return None
    return open_complete(folder)


def d_values(cfg: RunConfig, hidden_size: int) -> list[int]:
    c = cfg.compressor
    if not c.sweep:
        return [c.d_compressed]
    return c.sweep_d_values or [hidden_size // k for k in (16, 8, 4, 2) if hidden_size // k >= 1]


def check_d_values(cfg: RunConfig, hidden_size: int) -> None:
    flag = "--sweep-d-values" if cfg.compressor.sweep else "--d-compressed"
    for d in d_values(cfg, hidden_size):
        if d >= hidden_size:
            raise ConfigError(f"{flag} {d}: must be below the LM's hidden size {hidden_size}")


def write_sweep(results: list[Result], out: Path, stage: str) -> list[Path]:
    """`sweep_<stage>.md`, `.json` and `.png` (cosine against D', trained and PCA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r.row() for r in results]
    md = [
        "| D' | ratio | parameters | cosine trained | cosine PCA | relative error | variance ratio | epochs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['d_compressed']} | {r['ratio']:.1f}x | {r['parameters']:,} | {r['cosine_trained']:.4f} | "
            f"{r['cosine_pca']:.4f} | {r['relative_error']:.4f} | {r['variance_ratio']:.4f} | {r['epochs']} |"
        )
    paths = [out / f"sweep_{stage}.md", out / f"sweep_{stage}.json", out / f"sweep_{stage}.png"]
    paths[0].write_text("\n".join(md) + "\n")
    paths[1].write_text(json.dumps(rows, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    ds = [r["d_compressed"] for r in rows]
    ax.plot(ds, [r["cosine_trained"] for r in rows], "o-", label="trained")
    ax.plot(ds, [r["cosine_pca"] for r in rows], "s--", label="PCA (optimum)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.set_xlabel("D'")
    ax.set_ylabel("cosine similarity (validation)")
    ax.set_title(f"stage {stage}: reconstruction of H={results[0].hidden_size} hidden states")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


def train_all(cfg: RunConfig, store: HiddenStore, log: Callable[[str], None]) -> list[Result]:
    """PCA on the training tokens, then every D' of the run trained and reported beside it."""
    c, t = cfg.compressor, cfg.training
    out, H = Path(c.output_dir), store.hidden_size
    train_ids, valid_ids = split_sequences(store.num_sequences, t.valid_fraction, t.seed)
    data = Data(store, train_ids, valid_ids)
    device = _device(cfg.hidden.device)
    tokens = int(store.lengths()[train_ids].sum())
    log(f"hidden states H={H}: {len(train_ids)} training sequences ({tokens} tokens), {len(valid_ids)} validation")
    _, axes = principal_axes(second_moment(data, 4 * t.micro_batch_size, device))
    start = "stage 1a's best" if c.stage == "1b" else f"{c.init} initialisation"
    results = []
    for d in d_values(cfg, H):
        run_dir = out / f"d{d}" if c.sweep else out
        run_dir.mkdir(parents=True, exist_ok=True)
        pca = evaluate(TiedLinearCompressor(H, d, basis=axes[:d]).to(device), data, 4 * t.micro_batch_size, device)
        log(f"D'={d} ({H / d:.1f}x, {H * d:,} parameters): training from {start}")
        result = train_one(cfg, data, axes, d, pca, run_dir, log)
        results.append(result)
        log(f"D'={d} cosine trained {result.best['cosine']:.4f} pca {result.pca['cosine']:.4f}")
        log(
            f"  {result.epochs} epochs ({'early stop' if result.stopped_early else 'all'}), best at epoch "
            f"{result.best_epoch:.2f}, {result.seconds:.1f} s -> {result.checkpoint}"
        )
    if c.sweep:
        for path in write_sweep(results, out, c.stage):
            log(f"wrote {path}")
    return results


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> list[Result]:
    """Checks the folders, gets the hidden states, trains on rank 0 (other ranks of a TP extraction return []);
    writes `<output-dir>/config.json` and appends every line to `<output-dir>/train.log`."""
    c, t = cfg.compressor, cfg.training
    out = Path(c.output_dir)
    for flag, folder in (("--output-dir", out), ("--tensorboard-dir", t.tensorboard_dir)):
        problem = None if folder is None else folder_problem(folder)
        if problem is not None:
            raise ConfigError(f"{flag} {folder}: {problem}")
    store = hidden_store(cfg, log)
    if store is None:
        return []
    check_d_values(cfg, store.hidden_size)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    with (out / "train.log").open("a") as log_file:

        def tee(line: str) -> None:
            log(line)
            log_file.write(line + "\n")
            log_file.flush()

        return train_all(cfg, store, tee)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: parse, train; a user mistake is one `error:` line and exit status 2."""
    from megatron_ext.platform import quiet_optional_dependency_warnings

    quiet_optional_dependency_warnings()
    try:
        run(parse_args(argv))
    except (UserError, OSError) as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
