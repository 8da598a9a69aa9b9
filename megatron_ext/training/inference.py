"""A frozen model from one of our checkpoints, for inference: sampling (tools/generate.py) and final hidden states
(megatron_ext/hidden_states.py).

The model shape and tokenizer come from the checkpoint itself (its common state holds the run's Config), so no
model flags are repeated by the tools. dist_checkpointing reshards on load, so a checkpoint of any TP/PP layout
loads at any tensor-parallel size (pipeline size 1, no sequence parallelism: every rank ends with the whole hidden
state). Import-light at the top, so a mistyped --load fails before megatron-core is imported.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_ext.training import layout
from megatron_ext.training.layout import CheckpointNotFound

if TYPE_CHECKING:
    import torch
    from megatron.core.transformer.module import MegatronModule


def find_checkpoint(load: str | Path, iteration: int | None = None) -> Path:
    """The iter_%07d folder to read, checked against its manifest; a miss or damage is a CheckpointNotFound."""
    path = layout.find_checkpoint(load, iteration)
    problem = layout.verify(path)
    if problem is not None:
        raise CheckpointNotFound(f"--load {path}: damaged checkpoint ({problem})")
    return path


def saved_config(ckpt: Path, common: dict[str, Any]) -> dict[str, Any]:
    """The run's Config as a dict (a deep copy) from the checkpoint's common state; a checkpoint written by another
    tool without a config falls back to the run's config.json beside it. Also the converters' (megatron_ext/convert)."""
    saved = common.get("config")
    if saved is None:
        run_config = ckpt.parent / "config.json"
        if not run_config.is_file():
            raise CheckpointNotFound(f"{ckpt}: the checkpoint holds no config and {run_config} is missing")
        saved = json.loads(run_config.read_text())
    return json.loads(json.dumps(saved))  # a deep copy that also proves it is plain data


def read_config(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's Config as a dict, the checkpoint's common state), the common state read by megatron-core."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    return saved_config(ckpt, common), common


def inference_config(saved: dict[str, Any], tensor_parallel_size: int = 1) -> tuple[Any, int]:
    """(Config for inference at `tensor_parallel_size`, the saved TP size): pipeline 1, no sequence parallelism or
    recomputation; the padded vocabulary depends on the TP it was saved with."""
    from megatron_ext.config import Config

    d = json.loads(json.dumps(saved))  # a deep copy that also proves it is plain data
    parallel = d.setdefault("parallel", {})
    saved_tp = int(parallel.get("tensor_model_parallel_size", 1))
    parallel.update(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=1,
        num_layers_per_virtual_pipeline_stage=None,
        sequence_parallel=False,
        use_distributed_optimizer=False,
        overlap_grad_reduce=False,
    )
    d.setdefault("training", {})["recompute_activations"] = False
    return Config.from_dict(d), saved_tp


def _start_processes(backend: str, tensor_parallel_size: int) -> Any:
    """The process group: the launcher's (torchrun, mpiexec, srun), else a world of one on a free port (several
    tools may run at once). Inference splits the model only: the world must be exactly the TP size."""
    from megatron_ext import distributed
    from megatron_ext.config import ConfigError

    launched = distributed.discover().world_size > 1
    env = None
    if not launched:
        env = {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(distributed.free_port()),
        }
    world = distributed.discover(env).world_size
    if world != tensor_parallel_size:
        raise ConfigError(
            f"--tensor-model-parallel-size {tensor_parallel_size} needs exactly {tensor_parallel_size} processes; "
            f"{world} were launched"
        )
    return distributed.init_process_group(backend, env=env)


def load_model(
    ckpt: Path,
    device: str = "auto",
    tokenizer_model: str | None = None,
    seed: int = 1,
    tensor_parallel_size: int = 1,
    hidden_states_only: bool = False,
) -> tuple:
    """(model in eval mode, tokenizer, torch device, Config, common state) from an iter_%07d folder.

    The model returns logits [b, s, padded vocab], or with `hidden_states_only` the final layer's post-norm hidden
    states [s, b, h] (the output layer is skipped; see `final_hidden_states`). Starts the process group and
    megatron-core's parallel state; call `megatron_ext.distributed.destroy()` when done.
    """
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    from megatron_ext import distributed, platform
    from megatron_ext.config import ConfigError
    from megatron_ext.data.tokenizers import padded_vocab_size, tokenizer_of
    from megatron_ext.models.gpt import build_model, transformer_config

    saved, common = read_config(ckpt)
    cfg, saved_tp = inference_config(saved, tensor_parallel_size)
    if tokenizer_model is not None:
        cfg.data.tokenizer_model = tokenizer_model
    tokenizer = tokenizer_of(cfg.data)
    vocab = padded_vocab_size(tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by, saved_tp)
    if vocab % tensor_parallel_size:
        raise ConfigError(
            f"--tensor-model-parallel-size {tensor_parallel_size}: the checkpoint's padded vocabulary {vocab} is not "
            "divisible by it (reshard it first: tools/convert_checkpoint.py reshard --target-tp N)"
        )

    plat = platform.select(device, "auto")
    info = _start_processes(plat.backend, tensor_parallel_size)
    platform.setup_device(plat, info.local_rank)
    distributed.initialize_model_parallel(tensor_parallel_size, 1)
    model_parallel_cuda_manual_seed(seed)

    config = transformer_config(cfg, plat)
    gpt = build_model(cfg, plat, config, vocab)
    model = Float16Module(config, gpt) if cfg.precision.bf16 or cfg.precision.fp16 else gpt
    read_weights(gpt, ckpt)
    if hidden_states_only:
        # GPTModel returns the decoder's output (after its final norm) when it is not the post-processing stage.
        gpt.post_process = False
    target = plat.current_device()
    model.to(target).eval()
    return model, tokenizer, target, cfg, common


def read_weights(gpt: MegatronModule, ckpt: Path) -> None:
    """Loads the model weights of the checkpoint `ckpt` (an iter_* folder, any layout) into `gpt`, built at this
    run's tensor-parallel size. Sharded-tensor keys are global (layer offsets included), so one full chunk reads
    what was saved under "model" or "model0".."modelN" (virtual pipeline) alike; the dict key only nests the
    result."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's ShardedTensor/load_state_dict deprecation notes
        loaded = dist_checkpointing.load(
            {"model": gpt.sharded_state_dict()}, str(ckpt), strict=StrictHandling.RAISE_UNEXPECTED
        )
        gpt.load_state_dict(loaded["model"])


def final_hidden_states(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Final-layer post-norm hidden states [b, s, h] in fp32 of `tokens` [b, s] (causal attention: right padding
    leaves the real positions unchanged), from a `load_model(..., hidden_states_only=True)` model. Without sequence
    parallelism every tensor-parallel rank holds the whole result."""
    import torch

    positions = torch.arange(tokens.shape[1], dtype=torch.long, device=tokens.device).expand_as(tokens)
    with torch.no_grad():
        hidden = model(tokens, positions, None)  # [s, b, h]
    return hidden.float().transpose(0, 1).contiguous()
