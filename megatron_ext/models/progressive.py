"""Progressive depth growth (Apollo, "Preparing Lessons for Progressive Training on Language Models", arXiv
2401.09192) as `--model-variant progressive`.

The full-depth GPT (`--num-layers L`, megatron-core's layers, the normal checkpoint keys) is built once. Stage s
trains N(s) unique layers, kept in positions 0..N-1 of the block (the others wait, unused, for a growth). Each
training micro-batch runs a network of depth D drawn by `sample_depth` (LVPS, uniform or full) whose position j
runs unique layer `layer_map(N, D)[j]`: a layer may run several times (its gradient is the sum over its copies)
and the positions N..L-1 do not run. Validation runs depth L. At a stage boundary (`--progressive-stages`) the
unique layers are copied to their new positions by the same map (`growth_sources`), which leaves the depth-L
function unchanged, and the Adam moments are copied or reset (`--growth-moments`).

Depths come from a generator seeded by (seed, iteration, global micro-batch), so every rank of a model-parallel
group draws the same, a data-parallel run draws what one process with gradient accumulation draws, and a resumed
run (also across a growth) repeats the run it continues. What the parallel features do: tensor parallelism and
data parallelism run as for GPT (each rank runs the same mapped layers of its shards); the distributed
optimizer's sharded fp32 weights and moments are gathered over the data-parallel group at a growth; bf16/fp16 keep
the fp32 main weights and copy them too; activation recompute (`--recompute-activations`) runs through
`ProgressiveBlock`, which holds the layers of each segment itself (megatron-core's looks them up by index at
backward time). Refused at parse time (config.ProgressiveOptions.check): pipeline parallelism (the unique layers
sit on the first stage) and `--overlap-grad-reduce` (unused and twice-used layers break its bookkeeping).
"""

from __future__ import annotations

import copy
import math
from typing import Any, cast

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_ext.config import ConfigError, ProgressiveOptions
from megatron_ext.models.gpt import GPTRecipe, flops_per_token
from megatron_ext.models.recipe import Batch, Progress, register_variant

X_MIN = 1e-6


def lvps_depth(u: float, num_layers: int, unique: int) -> int:
    """Low-value-prioritized sampling: the depth for a uniform draw `u` in [0, 1) (Apollo's formula; for L=12,
    N=3 depth 3 has probability 0.637, the mean is 4.22)."""
    rho = num_layers / unique
    b, e = rho + 0.4, 0.6
    n = (b * X_MIN - e) / (e - b)
    m = e * (n + 1)
    x = X_MIN + (1 - X_MIN) * u
    y = min(max(m / (x + n), 1.0), rho)
    return num_layers if y >= rho else math.floor(y * unique)


def sample_depth(sampling: str, num_layers: int, unique: int, seed: int, iteration: int, micro_batch: int) -> int:
    """The depth of global micro-batch `micro_batch` of step `iteration`: the same on every rank and every run."""
    if sampling == "full" or unique == num_layers:
        return num_layers
    u = float(np.random.default_rng([seed, iteration, micro_batch]).random())
    if sampling == "uniform":
        return unique + min(int(u * (num_layers - unique + 1)), num_layers - unique)
    return lvps_depth(u, num_layers, unique)


def layer_map(growth: str, unique: int, depth: int) -> list[int]:
    """The unique layer each position of a depth-`depth` network runs: interpolate floor(j / (depth / N)) (N=3,
    depth 7: 0,0,0,1,1,2,2) or stack j mod N."""
    if growth == "stack":
        return [j % unique for j in range(depth)]
    return [j * unique // depth for j in range(depth)]


def growth_sources(growth: str, old: int, new: int) -> list[int]:
    """For each of the `new` unique layers, the old unique layer it starts as: with N | N' and N' | L, the depth-L
    map of N' layers composed with this equals the map of N layers, so the depth-L function is unchanged."""
    return layer_map(growth, old, new)


class ProgressiveBlock(TransformerBlock):
    """megatron-core's TransformerBlock that runs `plan` (layer indices, repeats allowed) instead of all layers.

    megatron-core's recompute re-runs `self._get_layer(index)` during backward, when `self.layers` would be back to
    the full list (and the next micro-batch may have another plan): here each recomputed segment holds its layer
    objects from the forward."""

    plan: list[int] | None = None
    layers: torch.nn.ModuleList  # megatron-core's, set in TransformerBlock.__init__

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.plan is None:
            return super().forward(*args, **kwargs)
        full = self.layers
        self.layers = torch.nn.ModuleList([full[i] for i in self.plan])
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.layers = full

    def _checkpointed_forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        rotary_pos_emb: torch.Tensor,
        attention_bias: torch.Tensor,
        packed_seq_params: Any,
        use_inner_quantization_context: bool,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Uniform recompute of `recompute_num_layers` layers at a time (the method the GPT config sets)."""
        layers = list(self.layers)  # the planned layers, bound now
        step = self.config.recompute_num_layers or 1

        def segment(part: list[torch.nn.Module]) -> Any:
            def run(
                hidden: torch.Tensor,
                mask: torch.Tensor,
                ctx: torch.Tensor,
                ctx_mask: torch.Tensor,
                rope: torch.Tensor,
                padding: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
                for layer in part:
                    hidden, ctx = layer(
                        hidden_states=hidden, attention_mask=mask, context=ctx, context_mask=ctx_mask,
                        rotary_pos_emb=rope, attention_bias=attention_bias, inference_context=None,
                        packed_seq_params=packed_seq_params, padding_mask=padding,
                    )  # fmt: skip
                return hidden, ctx

            return run

        for start in range(0, len(layers), step):
            hidden_states, context = tensor_parallel.checkpoint(
                segment(layers[start : start + step]),
                self.config.distribute_saved_activations,
                hidden_states, attention_mask, context, context_mask, rotary_pos_emb, padding_mask,
            )  # fmt: skip
        return hidden_states


# ---- the optimizer state of a parameter, whatever the optimizer --------------------------------------------------

STATES = ("param", "exp_avg", "exp_avg_sq")
"""What a growth copies per parameter: the fp32 main weight (where one is kept apart) and Adam's moments."""


def _local_states(sub: Any, param: torch.nn.Parameter) -> dict[str, torch.Tensor] | None:
    """This rank's main weight and moments of model parameter `param` in one (unchained) megatron-core optimizer:
    whole tensors, or flat shards for the distributed optimizer; None when `param` is not this optimizer's (or not
    on this rank)."""
    if hasattr(sub, "model_param_gbuf_map"):  # DistributedOptimizer: a flat shard per rank
        if param not in sub.model_param_gbuf_map:
            return None
        return {k: v for k, v in sub._get_main_param_and_optimizer_states(param).items() if k in STATES}
    main = param
    if hasattr(sub, "float16_groups"):  # Float16OptimizerWithFloat16Params: fp32 copies of bf16/fp16 params
        pairs = zip((p for g in sub.float16_groups for p in g), (p for g in sub.fp32_from_float16_groups for p in g))
        main = next((m for p, m in pairs if p is param), param)
    owned = any(main is p for g in sub.optimizer.param_groups for p in g["params"])
    if not owned:
        return None
    return {"param": main, **{k: v for k, v in sub.optimizer.state.get(main, {}).items() if k in STATES}}


def _shard_range(sub: Any, param: torch.nn.Parameter) -> tuple[int, int]:
    """Where this rank's distributed-optimizer shard of `param` lies in the flattened parameter."""
    r = sub._get_model_param_range_map(param)["param"]
    return r.start, r.end


def copy_optimizer_state(
    optimizer: MegatronOptimizer, pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]], moments: str
) -> None:
    """For each (source, destination) model parameter: the destination's main weight becomes the source's, its
    Adam moments the source's (`moments` "copy") or zero ("reset"). Collective over the data-parallel group with
    the distributed optimizer (a shard's source may be on another rank)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        distributed = hasattr(sub, "model_param_gbuf_map")
        for src, dst in pairs:
            if distributed:
                _copy_sharded(sub, src, dst, moments)
                continue
            source, target = _local_states(sub, src), _local_states(sub, dst)
            if source is None or target is None:
                continue
            for key, tensor in target.items():
                if key == "param" or moments == "copy":
                    tensor.copy_(source.get(key, torch.zeros_like(tensor)))
                else:
                    tensor.zero_()


def _copy_sharded(sub: Any, src: torch.nn.Parameter, dst: torch.nn.Parameter, moments: str) -> None:
    """The distributed optimizer's case of `copy_optimizer_state`: the source's full state is summed from every
    rank's shard (all-reduce), and each rank cuts its own shard of the destination out of it."""
    if src not in sub.model_param_group_index_map and dst not in sub.model_param_group_index_map:
        owned = torch.zeros(1)
    else:
        owned = torch.ones(1)
    torch.distributed.all_reduce(owned, group=sub.data_parallel_group)
    if not owned.item():
        return  # another optimizer's (chained) parameters
    source = _local_states(sub, src) if src in sub.model_param_group_index_map else None
    target = _local_states(sub, dst) if dst in sub.model_param_group_index_map else None
    for key in STATES:
        full = torch.zeros(src.numel(), dtype=torch.float32, device=src.device)
        if source is not None and key in source:
            start, end = _shard_range(sub, src)
            full[start:end] = source[key].reshape(-1).float()
        torch.distributed.all_reduce(full, group=sub.data_parallel_group)
        if target is None or key not in target:
            continue
        start, end = _shard_range(sub, dst)
        if key == "param" or moments == "copy":
            target[key].copy_(full[start:end].view_as(target[key]))
        else:
            target[key].zero_()


# ---- the recipe -------------------------------------------------------------------------------------------------


class ProgressiveRecipe(GPTRecipe):
    """GPT trained by progressive depth growth (see the module's doc)."""

    options: ProgressiveOptions

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.schedule = self.options.layers()
        self.starts = self.options.stages()
        self.stage = 0
        self.grown_at: int | None = None  # the iteration of the last growth (for --growth-lr-rewarm)
        self.blocks: list[ProgressiveBlock] = []
        self._iteration = 0
        self._micro_batch = 0
        self._flops_at_depth: dict[int, float] = {}

    # ---- where the run stands ---------------------------------------------------------------------------------

    @property
    def unique(self) -> int:
        return self.schedule[self.stage]

    def stage_at(self, progress: Progress) -> int:
        """The stage a step starting at `progress` trains in."""
        unit = self.options.progressive_stage_unit
        position = {"tokens": progress.consumed_tokens, "samples": progress.consumed_samples}.get(
            unit, progress.iteration
        )
        return sum(position >= start for start in self.starts)

    def depth(self, iteration: int, micro_batch: int, unique: int | None = None) -> int:
        L = self.cfg.model.num_layers
        return sample_depth(
            self.options.depth_sampling, L, unique or self.unique, self.cfg.training.seed, iteration, micro_batch
        )

    def _micro_batches_per_step(self, global_batch: int) -> int:
        return global_batch // self.cfg.training.micro_batch_size

    # ---- the model ----------------------------------------------------------------------------------------------

    def build_model(self, config: TransformerConfig, vp_stage: int | None) -> torch.nn.Module:
        model = super().build_model(config, vp_stage)
        block = cast(ProgressiveBlock, model.decoder)
        block.__class__ = ProgressiveBlock  # same module and state, another forward
        self.blocks.append(block)
        return model

    def forward_step(self, batch: Batch, chunk: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        L = self.cfg.model.num_layers
        if chunk.training:
            dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
            depth = self.depth(self._iteration, self._micro_batch * dp + rank)
            self._micro_batch += 1
        else:
            depth = L  # validation: the full-depth function
        for block in self.blocks:
            block.plan = layer_map(self.options.growth, self.unique, depth)
        return super().forward_step(batch, chunk)

    def before_step(self, progress: Progress, model: list[torch.nn.Module], optimizer: MegatronOptimizer) -> str | None:
        notes = [super().before_step(progress, model, optimizer)]
        self._iteration, self._micro_batch = progress.iteration, 0
        target = self.stage_at(progress)
        while self.stage < target:
            notes.append(self.grow(optimizer))
            self.grown_at = progress.iteration
        self.rewarm(progress.iteration, optimizer)
        return "\n".join(n for n in notes if n) or None

    def rewarm(self, iteration: int, optimizer: MegatronOptimizer) -> None:
        """--growth-lr-rewarm N: the k-th step after a growth (k = 1..N) runs at k/(N+1) of the schedule's LR. The
        schedule sets the LR after each step, so the scaling lasts one step and never enters the schedule."""
        n = self.options.growth_lr_rewarm
        if self.grown_at is None or not 0 <= iteration - self.grown_at < n:
            return
        factor = (iteration - self.grown_at + 1) / (n + 1)
        for group in optimizer.param_groups:
            group["lr"] *= factor

    def grow(self, optimizer: MegatronOptimizer) -> str:
        """Moves to the next stage: unique layer k of the new stage starts as old layer `growth_sources[k]`, with
        its main weight and (per --growth-moments) its Adam moments. Collective with the distributed optimizer."""
        old, new = self.unique, self.schedule[self.stage + 1]
        sources = growth_sources(self.options.growth, old, new)
        with torch.no_grad():
            for block in self.blocks:
                # A source never comes after its destination: from the last, each is read before it is written.
                for k in reversed(range(new)):
                    if sources[k] == k:
                        continue
                    pairs = list(zip(block.layers[sources[k]].parameters(), block.layers[k].parameters()))
                    copy_optimizer_state(optimizer, pairs, self.options.growth_moments)
                    for s, d in pairs:
                        d.copy_(s)
        self.stage += 1
        moments = "copied" if self.options.growth_moments == "copy" else "reset"
        return (
            f"progressive: grew from {old} to {new} unique layers ({self.options.growth}: new layer k <- "
            f"{','.join(map(str, sources))}; Adam moments {moments})"
        )

    # ---- FLOPs --------------------------------------------------------------------------------------------------

    def flops_per_token_at(self, depth: int) -> float:
        """Training FLOPs per token of a depth-`depth` network (embedding and output included)."""
        if depth not in self._flops_at_depth:
            cfg = copy.copy(self.cfg)
            cfg.model = copy.copy(cfg.model)
            cfg.model.num_layers = depth
            self._flops_at_depth[depth] = flops_per_token(cfg, self.vocab_size)
        return self._flops_at_depth[depth]

    def step_flops(self, progress: Progress, global_batch: int) -> float:
        """The sampled depths of the step's global micro-batches, drawn again (the generator is deterministic)."""
        unique = self.schedule[self.stage]
        tokens = self.cfg.training.micro_batch_size * self.cfg.model.seq_length
        return sum(
            tokens * self.flops_per_token_at(self.depth(progress.iteration, g, unique))
            for g in range(self._micro_batches_per_step(global_batch))
        )

    # ---- checkpoints --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"unique_layers": self.unique, "grown_at": self.grown_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unique = state.get("unique_layers", self.schedule[0])
        if unique not in self.schedule:
            raise ConfigError(
                f"the checkpoint trains {unique} unique layers, not one of --progressive-layers "
                f"{self.options.progressive_layers}"
            )
        self.stage = self.schedule.index(unique)
        self.grown_at = state.get("grown_at")


register_variant("progressive", ProgressiveRecipe, ProgressiveOptions)
