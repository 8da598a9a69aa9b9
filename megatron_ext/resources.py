"""What a run needs before it starts: memory per rank against the accelerator's, and time at the device's peak.

`DRY_RUN=1 MODEL_ARCH=7B TRAIN_TOKENS=2T bash train_alcf.sh` prints it (megatron_ext/alcf_env.py), so that a run
that cannot fit or cannot finish is seen on the login node. No torch: arithmetic on the validated config.

Memory per rank (GB = 1e9 bytes), on the busiest rank (the first or last pipeline stage):

* weights: the rank's parameters (its layers / TP, plus the embedding / TP on the first stage and the output layer
  / TP on the last; a tied output layer is a copy there when PP > 1) x 2 bytes in bf16/fp16, 4 in fp32;
* gradients: megatron-core's DDP buffer, fp32 (4 bytes) unless `--grad-reduce-in-bf16` with bf16;
* optimizer: Adam's two fp32 moments (8 bytes) plus fp32 main weights in bf16/fp16 (4 bytes), SGD's momentum
  (4) plus main weights; divided by the data-parallel size with `--use-distributed-optimizer`;
* activations of the micro-batch kept for backward, per layer (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", section 4, generalised to GQA and SwiGLU and without the attention
  score terms, which SDPA/flash attention do not keep): inputs of the two norms, of QKV and of fc1 (replicated
  over TP unless sequence parallel), Q/K/V, the attention output, fc1's output and the activation's output (split
  over TP), 1-byte dropout masks when dropout is on; with full recomputation only each layer's input plus one
  layer's activations. The first pipeline stage holds min(PP, micro-batches per step) micro-batches in flight (1F1B;
  interleaving adds a little more). Plus the output layer's logits with their fp32 copy in the loss (or a
  `--cross-entropy-chunk` of them). Not counted: temporary buffers, communication buffers, fragmentation, so a
  total near the device's memory is a warning too.

Time: training FLOPs (megatron_ext/models/size.py's FLOPs per token x the run's tokens) over all devices at their
peak, and at ASSUMED_MFU.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from megatron_ext.config import Config, ConfigError
from megatron_ext.models.size import flops_per_token, input_parameters, layer_parameters, output_parameters


@dataclass(frozen=True)
class Device:
    """An accelerator: its memory (GB) and dense bf16 peak (TFLOP/s, no sparsity), per device as torch sees it."""

    memory_gb: float
    peak_tflops: float


# Matched as a substring of the device's name, in this order (GH200 before H200, A100 80GB before A100).
DEVICES: dict[str, Device] = {
    "GH200": Device(96, 989.0),
    "H200": Device(141, 989.0),
    "H100": Device(80, 989.0),
    "B200": Device(180, 2250.0),
    "A100-SXM4-80GB": Device(80, 312.0),
    "A100 80GB": Device(80, 312.0),
    "A100": Device(40, 312.0),
    "MI250X": Device(64, 191.5),  # one GCD (half a card), what ROCm shows as a device
    "Max 1550": Device(64, 419.0),  # one tile (half a card) of Intel's Data Center GPU Max 1550 (Aurora)
}
# ALCF machines, for a login node without the accelerator (its hostname or PBS_O_HOST names the machine).
MACHINES = {"polaris": "A100", "sophia": "A100", "aurora": "Max 1550", "sunspot": "Max 1550"}
ASSUMED_MFU = 0.4
"""The MFU the time estimate states beside the peak: a typical figure of dense GPT pre-training at scale."""


def device_spec(name: str) -> Device | None:
    """The table's entry for a device name (e.g. torch's or nvidia-smi's 'NVIDIA H100 80GB HBM3'), or None."""
    return next((d for key, d in DEVICES.items() if key in name), None)


def device_name(env: Mapping[str, str]) -> tuple[str | None, str]:
    """(the job's accelerator, where that came from): nvidia-smi on a GPU node, else the ALCF machine named by the
    host, else (None, ...)."""
    if shutil.which("nvidia-smi") and env.get("CUDA_VISIBLE_DEVICES") != "":
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            return out.splitlines()[0].strip(), "nvidia-smi"
    for host in (env.get("PBS_O_HOST", ""), socket.gethostname()):
        machine = next((m for m in MACHINES if m in host.lower()), None)
        if machine:
            return MACHINES[machine], f"the {machine} machine"
    return None, "no accelerator here"


@dataclass(frozen=True)
class Estimate:
    """Bytes per rank (busiest rank) and the run's FLOPs."""

    parameters: int  # on the busiest rank
    weights: float
    gradients: float
    optimizer: float
    activations: float
    flops: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def rank_parameters(cfg: Config, vocab_size: int) -> int:
    """Parameters held by the busiest rank: its stage's layers and, at the ends, the embedding or output layer."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    layers = -(-cfg.model.num_layers // pp) * layer_parameters(cfg)
    first = input_parameters(cfg, vocab_size)
    last = output_parameters(cfg, vocab_size)
    if pp > 1 and not cfg.model.untie_embeddings_and_output_weights:
        last += vocab_size * cfg.model.hidden_size  # the last stage's copy of the tied embedding
    ends = first + last if pp == 1 else max(first, last)
    return (layers + ends) // tp


def layer_activation_bytes(cfg: Config) -> float:
    """Bytes one layer keeps for backward per micro-batch (see the module's docstring)."""
    m, p = cfg.model, cfg.parallel
    tp, sp = p.tensor_model_parallel_size, p.sequence_parallel
    e = 2 if cfg.precision.bf16 or cfg.precision.fp16 else 4
    sb = m.seq_length * cfg.training.micro_batch_size
    head = m.kv_channels or m.hidden_size // m.num_attention_heads
    q, kv = head * m.num_attention_heads, head * (m.num_query_groups or m.num_attention_heads)
    h, f = m.hidden_size, m.ffn_hidden_size
    split = e * (q + 2 * kv) + e * q + e * f * (2 if m.swiglu else 1) + e * f  # Q, K, V, attention out, fc1, act
    replicated = e * 4 * h + e * h + e * h  # two norm inputs, QKV input, fc1 input
    masks = (h if m.attention_dropout > 0 else 0) + (2 * h if m.hidden_dropout > 0 else 0)
    replicated += masks
    return sb * (split / tp + replicated / (tp if sp else 1))


def activation_bytes(cfg: Config, vocab_size: int, microbatches: int) -> float:
    """Activations on the first pipeline stage (the most micro-batches in flight), plus the last stage's logits."""
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    layers = -(-m.num_layers // pp)
    per_layer = layer_activation_bytes(cfg)
    if cfg.training.recompute_activations:
        e = 2 if cfg.precision.bf16 or cfg.precision.fp16 else 4
        inputs = e * m.seq_length * cfg.training.micro_batch_size * m.hidden_size / (tp if p.sequence_parallel else 1)
        stage = layers * inputs + per_layer
    else:
        stage = layers * per_layer
    in_flight = min(pp, microbatches)
    tokens = cfg.training.cross_entropy_chunk or m.seq_length * cfg.training.micro_batch_size
    logits = tokens * vocab_size / tp * ((2 if cfg.precision.bf16 or cfg.precision.fp16 else 4) + 4)
    if pp == 1:
        return stage + logits
    return max(stage * in_flight, stage + logits)  # first stage, last stage (one micro-batch in flight)


def estimate(cfg: Config, vocab_size: int, data_parallel: int, train_tokens: int) -> Estimate:
    """The per-rank memory and the run's FLOPs of `cfg` (its batch resolved) with `vocab_size` padded rows."""
    half = cfg.precision.bf16 or cfg.precision.fp16
    n = rank_parameters(cfg, vocab_size)
    grad_bytes = 2 if cfg.parallel.grad_reduce_in_bf16 and cfg.precision.bf16 else 4
    state_bytes = (8 if cfg.optimizer.optimizer == "adam" else 4) + (4 if half else 0)
    shard = data_parallel if cfg.parallel.use_distributed_optimizer else 1
    microbatches = cfg.training.global_batch_size // (cfg.training.micro_batch_size * data_parallel)
    return Estimate(
        parameters=n,
        weights=n * (2 if half else 4),
        gradients=n * grad_bytes,
        optimizer=n * state_bytes / shard,
        activations=activation_bytes(cfg, vocab_size, microbatches),
        flops=flops_per_token(cfg, vocab_size) * train_tokens,
    )


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"DEVICE_MEMORY_GB={text!r} is not a number of GB > 0; expected e.g. 80")
    return value


def _duration(seconds: float) -> str:
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def report(
    cfg: Config, vocab_size: int, data_parallel: int, devices: int, train_tokens: int, env: Mapping[str, str]
) -> list[str]:
    """The lines DRY_RUN prints: memory per rank against the device's (or DEVICE_MEMORY_GB) with a warning when
    it does not fit, and the run's time at the device's peak and at ASSUMED_MFU."""
    est = estimate(cfg, vocab_size, data_parallel, train_tokens)
    name, source = device_name(env)
    spec = device_spec(name) if name else None
    memory, memory_source = (spec.memory_gb, f"{name}, from {source}") if spec else (None, "")
    if env.get("DEVICE_MEMORY_GB"):
        memory, memory_source = _gigabytes(env["DEVICE_MEMORY_GB"]), "DEVICE_MEMORY_GB"
    peak = cfg.logging.peak_tflops or (spec.peak_tflops if spec else None)
    p = cfg.parallel
    optimizer = "distributed over DP " + str(data_parallel) if p.use_distributed_optimizer else "not sharded"
    layout = f"TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size}"
    lines = [
        f"resources per rank (estimate; the busiest rank holds {est.parameters:,} parameters at {layout}; "
        "GB = 1e9 bytes; megatron_ext/resources.py):",
        f"  weights {est.weights / 1e9:.2f} GB, gradients {est.gradients / 1e9:.2f} GB, optimizer state "
        f"{est.optimizer / 1e9:.2f} GB ({optimizer}), activations {est.activations / 1e9:.2f} GB (micro-batch "
        f"{cfg.training.micro_batch_size} x {cfg.model.seq_length} tokens)",
    ]
    total = est.total / 1e9
    if memory is None:
        lines.append(f"  total {total:.2f} GB; device memory unknown ({source}): set DEVICE_MEMORY_GB to compare")
    else:
        lines.append(f"  total {total:.2f} GB of {memory:g} GB ({memory_source})")
        if total > memory:
            lines.append(
                f"warning: {total:.2f} GB per rank does not fit in {memory:g} GB: raise TP or PP, lower MICRO_BATCH, "
                "set USE_ACTIVATION_CHECKPOINTING=1 or ZERO_STAGE=1 (the distributed optimizer)"
            )
        elif total > 0.9 * memory:
            lines.append(f"warning: {total:.2f} GB is over 90% of {memory:g} GB; buffers not counted may not fit")
    if peak is None or devices == 0:
        lines.append(f"  {est.flops:.3g} FLOPs; no accelerator peak known here (--peak-tflops gives one)")
    else:
        at_peak = est.flops / (devices * peak * 1e12)
        lines.append(
            f"  {est.flops:.3g} FLOPs on {devices} devices of {peak:g} TFLOP/s: {_duration(at_peak)} at peak, "
            f"{_duration(at_peak / ASSUMED_MFU)} at {ASSUMED_MFU:.0%} MFU"
        )
    return lines
