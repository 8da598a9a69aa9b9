"""The vocabulary of Megatron-LM's and ALCF's command lines that this project reads without a field of its own.

Tables only: the schema (megatron_ext/config.py) turns them into flags, checks and the one start-up note, so a
pasted Megatron-LM line either means what it says, says in one note which of its flags cannot matter here, stops at
start-up naming a flag whose feature is not built, or is refused before any other check when it asks for a model
family outside this project. Flags with an effect here are fields of the schema (with their legacy spellings in
`LEGACY_SPELLINGS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Accepted:
    """A Megatron-LM flag accepted for its command lines. `takes`: None for a switch, else the type of its value
    (`nargs` values); `fine`: values that ask for what happens here anyway (no note, no stop)."""

    reason: str
    takes: type | None = None
    nargs: str | None = None
    choices: tuple[str, ...] | None = None
    fine: tuple[Any, ...] = ()


_FUSION = "a kernel fusion: megatron-core picks fusions by device, results are the same"
_TE_GPU = "a Transformer Engine knob on GPU; results are the same"
_PERF = "a speed or memory knob without its mechanism here; results are the same"

# Cannot matter here: accepted, and the run prints one note listing each such flag given with its reason.
NO_EFFECT: dict[str, Accepted] = {
    "--no-bias-gelu-fusion": Accepted(_FUSION),
    "--no-bias-swiglu-fusion": Accepted(_FUSION),
    "--no-bias-dropout-fusion": Accepted(_FUSION),
    "--no-masked-softmax-fusion": Accepted(_FUSION),
    "--no-gradient-accumulation-fusion": Accepted(_FUSION),
    "--no-async-tensor-model-parallel-allreduce": Accepted(_FUSION),
    "--no-rope-fusion": Accepted(_FUSION),
    "--cross-entropy-loss-fusion": Accepted(_FUSION),
    "--cross-entropy-fusion-impl": Accepted(_FUSION, str, choices=("native", "te")),
    "--use-mcore-models": Accepted("models are always megatron-core's"),
    "--transformer-impl": Accepted(
        "layers are Transformer Engine's when it is installed on a GPU, else megatron-core's local ones "
        "(--attention-backend chooses the attention)",
        str,
        choices=("local", "transformer_engine", "inference_optimized"),
    ),
    "--DDP-impl": Accepted("data parallelism is always megatron-core's DistributedDataParallel", str),
    "--ckpt-format": Accepted(
        "checkpoints are written as torch_dist (megatron-core dist_checkpointing)",
        str,
        choices=("torch", "torch_dist", "zarr", "torch_dcp", "fsdp_dtensor"),
        fine=("torch_dist",),
    ),
    "--auto-detect-ckpt-format": Accepted("--load recognises its checkpoint's format by itself"),
    "--use-persistent-ckpt-worker": Accepted(_PERF),
    "--ckpt-fully-parallel-load": Accepted(_PERF),
    "--no-ckpt-fully-parallel-save": Accepted(_PERF),
    "--ckpt-assume-constant-structure": Accepted(_PERF),
    "--dist-ckpt-strictness": Accepted(
        "loads check every tensor of the model and optimizer against the checkpoint",
        str,
        choices=(
            "assume_ok_unexpected",
            "log_unexpected",
            "log_all",
            "raise_unexpected",
            "raise_all",
            "return_unexpected",
            "return_all",
            "ignore_all",
        ),  # fmt: skip
    ),
    "--dist-ckpt-optim-fully-reshardable": Accepted(
        "the distributed optimizer's state is saved reshardable to any layout anyway"
    ),
    "--tp-comm-overlap": Accepted(_TE_GPU),
    "--use-nccl-ub": Accepted("NCCL user buffers; " + _PERF),
    "--overlap-param-gather": Accepted(_PERF),
    "--overlap-param-gather-with-optimizer-step": Accepted(_PERF),
    "--no-create-attention-mask-in-dataloader": Accepted("the data loader never builds attention masks here"),
    "--no-mmap-bin-files": Accepted(".bin files are always memory-mapped"),
    "--calculate-per-token-loss": Accepted("the loss is always averaged over the tokens of the global batch"),
    "--accumulate-allreduce-grads-in-fp32": Accepted(
        "gradients are always accumulated and reduced in fp32 (unless --grad-reduce-in-bf16)"
    ),
    "--empty-unused-memory-level": Accepted(_PERF, int),
    "--defer-embedding-wgrad-compute": Accepted(_PERF),
    "--wgrad-deferral-limit": Accepted(_PERF, int),
    "--rerun-mode": Accepted(
        "a NaN/inf step is never applied (--nan-policy skip or stop) rather than re-run",
        str,
        choices=("disabled", "validate_results", "report_stats"),
        fine=("disabled",),
    ),
    "--verify-integrity": Accepted("data files and lists are always checked before training"),
    "--attention-softmax-in-fp32": Accepted("the attention softmax is always computed in fp32 here"),
    "--no-query-key-layer-scaling": Accepted("query-key layer scaling is never applied here"),
    "--shuffle-sample-in-corpus": Accepted("samples are always shuffled within each corpus"),
    "--adjust-word-embedding-init": Accepted(
        "the word embedding's init std is --word-embedding-init-std when given, else --init-method-std"
    ),
    "--manual-gc": Accepted(_PERF),
    "--manual-gc-interval": Accepted(_PERF, int),
    "--num-workers-per-rank": Accepted(_PERF, int),
    # Logging: what these ask for is always logged here (megatron_ext/training/metrics.py); the others are fields
    "--log-throughput": Accepted(
        "tokens/s, TFLOP/s per device and MFU are always in the log line and tensorboard", fine=(True,)
    ),
    "--log-validation-ppl-to-tensorboard": Accepted(
        "the validation perplexity is always in tensorboard (valid/<corpus>/ppl)", fine=(True,)
    ),
    "--log-batch-size-to-tensorboard": Accepted(
        "the batch size is always in tensorboard (train/global_batch_size)", fine=(True,)
    ),
    "--no-log-learning-rate-to-tensorboard": Accepted("the learning rate is always in tensorboard (train/lr)"),
    "--no-log-loss-scale-to-tensorboard": Accepted("the loss scale is always in tensorboard (train/loss_scale)"),
    "--tensorboard-log-interval": Accepted("tensorboard is written at every --log-interval", int),
    "--tensorboard-queue-size": Accepted("the tensorboard writer's queue; " + _PERF, int),
    "--use-pytorch-profiler": Accepted("--profile always records with torch's profiler here", fine=(True,)),
    "--log-progress": Accepted("no progress.txt is written here; train.log holds every log line"),
    "--log-energy": Accepted("the GPUs' energy is not read here"),
    "--log-straggler": Accepted(
        "the straggler detector is not built here; --timing-log-option all prints each rank's times"
    ),
    "--record-memory-history": Accepted("CUDA memory snapshots are not recorded here"),
    "--memory-snapshot-path": Accepted("CUDA memory snapshots are not recorded here", str),
}

# Change the run but are not built here: parsed (so the configuration prints and DRY_RUN shows them), and the run
# stops at start-up in one line naming the flag, unless its value is `fine`.
NOT_BUILT: dict[str, Accepted] = {
    "--use-megatron-fsdp": Accepted("Megatron FSDP; --use-distributed-optimizer shards the optimizer state"),
    "--use-torch-fsdp2": Accepted("torch FSDP2; --use-distributed-optimizer shards the optimizer state"),
    "--data-parallel-sharding-strategy": Accepted(
        "Megatron FSDP sharding",
        str,
        choices=("no_shard", "optim", "optim_grads", "optim_grads_params"),
        fine=("no_shard",),
    ),
    "--init-model-with-meta-device": Accepted("Megatron FSDP's meta-device initialisation"),
    "--fsdp-double-buffer": Accepted("Megatron FSDP's double buffer"),
    "--fsdp-manual-registration": Accepted("Megatron FSDP's buffer registration"),
    "--num-distributed-optimizer-instances": Accepted(
        "several distributed-optimizer instances (hierarchical data parallelism)", int, fine=(1,)
    ),
    "--use-tp-pp-dp-mapping": Accepted("the tp-pp-dp rank order; ranks are ordered tp-cp-dp-pp here"),
}

# Out of scope, refused before any other check: (flag, or a prefix ending in "-") -> the feature it belongs to.
REFUSED: dict[str, str] = {
    "--num-experts": "mixture of experts",
    "--moe-": "mixture of experts",
    "--expert-": "mixture of experts",
    "--experimental-attention-variant": "gated delta net and other experimental attention variants",
    "--linear-": "gated delta net (linear attention)",
    "--enable-gpt-oss": "gpt-oss",
    "--quick-geglu": "gpt-oss",
    "--window-size": "gpt-oss (sliding-window attention)",
    "--export-": "ModelOpt export and distillation",
}

# Other names of flags that have a field: canonical flag -> the legacy or underscore spellings it also takes.
LEGACY_SPELLINGS: dict[str, tuple[str, ...]] = {
    "--recompute-activations": ("--checkpoint-activations",),
    "--recompute-method": ("--activations-checkpoint-method",),
    "--recompute-num-layers": ("--checkpoint-num-layers",),
    "--rotary-base": ("--rotary-position-embeddings-theta",),
}

# Megatron-DeepSpeed switches that set another field's value: flag -> (section, field, value).
VALUE_ALIASES: dict[str, tuple[str, str, Any]] = {
    "--use-rotary-position-embeddings": ("model", "position_embedding_type", "rope"),
    "--use-flash-attn": ("model", "attention_backend", "sdpa"),
    "--use-flash-attn-v2": ("model", "attention_backend", "sdpa"),
    "--use-flash-attn-builder": ("model", "attention_backend", "sdpa"),  # ALCF's XPU flash attention (Aurora)
}

# --attention-backend values of Megatron-LM -> ours: flash attention is SDPA's flash kernels; cuDNN's fused
# attention is Transformer Engine's, so auto (te where it is installed on a GPU, else sdpa: the same function);
# Megatron-LM's local is megatron-core's DotProductAttention.
ATTENTION_BACKENDS: dict[str, str] = {"flash": "sdpa", "fused": "auto", "local": "unfused"}


def refused_feature(arg: str) -> str | None:
    """The out-of-scope feature a command-line word asks for (`--moe-router-topk=2` -> mixture of experts)."""
    if not arg.startswith("--"):
        return None
    flag = arg.split("=", 1)[0]
    for name, feature in REFUSED.items():
        if flag == name or (name.endswith("-") and flag.startswith(name)):
            return feature
    return None
