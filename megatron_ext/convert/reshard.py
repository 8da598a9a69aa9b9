"""Universal folder -> our checkpoint in a chosen TP/PP layout, and direct resharding (ours -> ours) through it.

The checkpoint is written by the training code itself: TP x PP processes (gloo, on CPU) build the model and
optimizer of the target layout, fill their shards from the universal folder exactly as `--load UNIV` does, and save
with the training's save. So a resharded checkpoint is what a run in that layout would have saved, optimizer
moments included, and loads with plain `--load` (and `--ckpt-step`). Memory: the whole model and optimizer state
across the processes (as in a one-node run); `to-universal` itself streams.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

from megatron_ext.config import Config, ConfigError
from megatron_ext.convert import ConvertError, atomic_output_dir, check_output_dir
from megatron_ext.convert.universal import read_meta, to_universal


class _SavedSchedule:
    """The universal folder's LR-schedule state, handed to the checkpoint writer as a scheduler would."""

    def __init__(self, state: dict[str, Any] | None) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any] | None:
        return self._state


def _target_config(meta: dict[str, Any], tp: int | None, pp: int | None, distributed_optimizer: bool | None) -> Config:
    saved = meta["config"]
    par = saved.setdefault("parallel", {})
    if tp is not None:
        par["tensor_model_parallel_size"] = tp
    if pp is not None:
        par["pipeline_model_parallel_size"] = pp
    if distributed_optimizer is not None:
        par["use_distributed_optimizer"] = distributed_optimizer
    par["num_layers_per_virtual_pipeline_stage"] = None
    par["device"] = "cpu"
    par["distributed_backend"] = "gloo"
    saved.setdefault("checkpoint", {}).update(load=None, save=None)
    try:
        return Config.from_dict(saved)
    except ConfigError as e:
        raise ConvertError(f"the target layout does not fit the model: {e}") from e


def _worker(rank: int, world: int, port: int, cfg_dict: dict[str, Any], univ: str, out: str) -> None:
    """One rank of the target layout: build, fill from the universal folder, save."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from megatron_ext.platform import quiet_optional_dependency_warnings

    quiet_optional_dependency_warnings()
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_ext import distributed, platform
    from megatron_ext.data.tokenizers import padded_vocab_size
    from megatron_ext.models.gpt import build_model, transformer_config
    from megatron_ext.training import checkpointing
    from megatron_ext.training.optim import build_optimizer, wrap_model

    cfg = Config.from_dict(cfg_dict)
    meta = read_meta(univ)
    plat = platform.select("cpu", "gloo")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        platform.setup_device(plat, rank)
        distributed.initialize_model_parallel(
            cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size, None
        )
        model_parallel_cuda_manual_seed(cfg.training.seed)
        m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
        vocab = padded_vocab_size(meta["vocab_size"], m.make_vocab_size_divisible_by, tp)
        config = transformer_config(cfg, plat)
        model = wrap_model(cfg, config, [build_model(cfg, plat, config, vocab)])
        with_moments = meta.get("optimizer_step") is not None
        optimizer = build_optimizer(cfg, model)
        loaded = checkpointing.load(univ, model, optimizer if with_moments else None, load_rng=False, log=_quiet)
        assert loaded is not None
        extra = {
            "train_state": loaded["train_state"],
            "data_state": loaded["data_state"],
            "config": cfg.to_dict(),
            "vocab_size": meta["vocab_size"],
        }
        checkpointing.save(out, meta["iteration"], model, optimizer, _SavedSchedule(loaded["scheduler"]), extra)  # type: ignore[arg-type]
    finally:
        distributed.destroy()


def _quiet(line: str) -> None:
    """The workers' load notes (the converter prints its own summary)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def from_universal(
    univ_dir: str | Path,
    out_dir: str | Path | None,
    *,
    tensor_model_parallel_size: int | None = None,
    pipeline_model_parallel_size: int | None = None,
    use_distributed_optimizer: bool | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Writes our checkpoint (iter_%07d + tracker + config.json) in the target layout (default: the universal
    folder's source layout); returns a description of what is (or would be) written."""
    univ = Path(univ_dir)
    meta = read_meta(univ)
    cfg = _target_config(meta, tensor_model_parallel_size, pipeline_model_parallel_size, use_distributed_optimizer)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    lines = [
        f"{univ} (iteration {meta['iteration']}, {len(meta['params'])} parameters) -> TP={tp} PP={pp} "
        f"({tp * pp} processes), {'distributed' if cfg.parallel.use_distributed_optimizer else 'plain'} optimizer, "
        f"{'with' if meta.get('optimizer_step') is not None else 'without'} Adam moments"
    ]
    if dry_run:
        return lines
    if out_dir is None:
        raise ConvertError("from-universal needs an output folder")
    check_output_dir(out_dir)
    import torch.multiprocessing as mp

    with atomic_output_dir(out_dir) as tmp:
        world = tp * pp
        try:
            worker_args = (world, _free_port(), cfg.to_dict(), str(univ.absolute()), str(tmp))
            mp.start_processes(_worker, worker_args, nprocs=world, start_method="spawn")
        except mp.ProcessRaisedException as e:
            raise ConvertError(f"a conversion process failed: {str(e).strip().splitlines()[-1]}") from e
        cfg.to_json(tmp / "config.json")
    return lines


def reshard(
    ckpt_dir: str | Path,
    out_dir: str | Path | None,
    iteration: int | None = None,
    *,
    tensor_model_parallel_size: int | None = None,
    pipeline_model_parallel_size: int | None = None,
    use_distributed_optimizer: bool | None = None,
    dry_run: bool = False,
    progress: bool = True,
) -> list[str]:
    """Our checkpoint -> our checkpoint in another layout, through a temporary universal folder beside the output."""
    if out_dir is None and not dry_run:
        raise ConvertError("reshard needs an output folder")
    if dry_run:
        return to_universal(ckpt_dir, None, iteration, dry_run=True)
    out = check_output_dir(out_dir).absolute()  # type: ignore[arg-type]
    staging = out.with_name(f".{out.name}.universal-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        to_universal(ckpt_dir, staging, iteration, progress=progress)
        return from_universal(
            staging,
            out,
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            use_distributed_optimizer=use_distributed_optimizer,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
