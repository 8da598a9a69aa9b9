"""GPT model provider: megatron-core's GPTModel with the Llama options, built per pipeline stage.

The local (pure megatron-core) spec is used unless Transformer Engine is installed on a GPU. Modules added to
it: `TorchNorm` (torch LayerNorm/RMSNorm that, unlike megatron-core's WrappedTorchNorm, supports sequence
parallelism by marking its parameters for the tensor-parallel gradient all-reduce), `SDPAttention` (core
attention through `torch.nn.functional.scaled_dot_product_attention`: flash/memory-efficient kernels on GPU
without the flash-attn package, and fewer copies than the unfused path on CPU) and, on CPU, `NativeColumnLinear`
/ `NativeRowLinear` (the transformer layers' linears without tensor parallelism as one `F.linear`: bias added
inside the matmul, autograd in C++) and `SwiGLU` (the gated activation with one full pass fewer each way).
`bench/cpu_substitutes.py` times each CPU substitute against the megatron-core code it replaces.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.activations import squared_relu
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from torch.autograd.function import once_differentiable

from megatron_ext.config import Config
from megatron_ext.data.gpt_data import (
    MicroBatches,
    TrainData,
    build_train_data,
    build_validation_sets,
    collate,
    training_entries,
)
from megatron_ext.data.tokenizers import Tokenizer
from megatron_ext.models.init import initialise
from megatron_ext.models.long_context import check_document_masking, chunked_cross_entropy
from megatron_ext.models.recipe import Batch, Progress, Recipe, register_variant
from megatron_ext.models.size import flops_per_token, num_parameters
from megatron_ext.platform import DTYPES, Platform

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


class LayerNorm1P(torch.nn.LayerNorm):
    """LayerNorm with zero-centred gamma (--apply-layernorm-1p): the weight starts at 0 and scales by
    (1 + weight), so weight decay pulls the scale towards 1. megatron-core's torch norm wrapper refuses it (TE's
    norms do it on GPU)."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.elementwise_affine:
            torch.nn.init.zeros_(self.weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        return F.layer_norm(input, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class TorchNorm:
    """torch.nn.LayerNorm / RMSNorm with the `sequence_parallel` marking megatron-core's grad reduction reads."""

    def __new__(  # type: ignore[misc]  # returns a torch norm, not a TorchNorm: a factory with a class's name
        cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object
    ) -> torch.nn.Module:
        norm_cls: type[torch.nn.Module] = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        if config.layernorm_zero_centered_gamma:
            norm_cls = LayerNorm1P
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]  # megatron-core's mark
        return norm


def document_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total, total] bool, True where a query (row) may attend a key (column): causal within each document of
    the packed bounds `cu_seqlens`. O(total^2) memory: for the reference backends only."""
    doc = torch.repeat_interleave(
        torch.arange(len(cu_seqlens) - 1, device=cu_seqlens.device), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    )
    return (doc[:, None] == doc[None, :]) & torch.ones(total, total, dtype=torch.bool, device=doc.device).tril()


class SDPAttention(DotProductAttention):
    """Core attention on torch's scaled_dot_product_attention; same inputs/outputs as DotProductAttention.

    Packed documents (megatron-core's "thd" PackedSeqParams: [tokens, heads, dim] and `cu_seqlens`) run causal
    SDPA on each document, so no score across documents is ever computed (no O(s^2) mask either);
    `dense_document_mask` makes it one call with `document_mask` instead (the `sdpa-dense` reference)."""

    dense_document_mask = False

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention: attention bias needs --attention-backend te")
        if packed_seq_params is not None:  # thd: [t, heads, dim] -> [t, b=1, heads, dim]
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        # [s, b, heads, dim] -> [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3).contiguous() for t in (query, key, value))  # faster kernels
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        # Grouped-query attention: the CPU kernels read each key/value head for its query heads (enable_gqa);
        # elsewhere the heads are repeated (not every GPU kernel takes enable_gqa).
        gqa = groups > 1 and q.device.type == "cpu"
        if groups > 1 and not gqa:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        mask = None if attention_mask is None else ~attention_mask  # megatron masks where True
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        dropout = self.attention_dropout.p if self.training else 0.0
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout > 0 and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        sdpa = partial(F.scaled_dot_product_attention, dropout_p=dropout, scale=scale, enable_gqa=gqa)
        with rng:
            if packed_seq_params is None:
                out = sdpa(q, k, v, attn_mask=mask, is_causal=causal)
            elif self.dense_document_mask:
                out = sdpa(q, k, v, attn_mask=document_mask(packed_seq_params.cu_seqlens_q, q.size(2)))
            else:  # split, not slices: a slice's backward writes a gradient of the whole sequence, per document
                cu = packed_seq_params.cu_seqlens_q
                lengths = (cu[1:] - cu[:-1]).tolist()
                parts = zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2))
                out = torch.cat([sdpa(*qkv, is_causal=True) for qkv in parts], dim=2)
        # [b, heads, s, dim] -> [s, b, heads * dim]
        return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), self.hidden_size_per_partition)


class DenseMaskSDPAttention(SDPAttention):
    """SDPAttention with packed documents as one call under a dense document mask (`--attention-backend
    sdpa-dense`): O(s^2) memory, a reference for tests and benchmarks."""

    dense_document_mask = True


class UnfusedAttention(DotProductAttention):
    """megatron-core's unfused DotProductAttention, which refuses packed sequences, given them as one sequence
    under the dense `document_mask` (`--attention-backend unfused`; O(s^2) memory, a reference)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            attention_mask = ~document_mask(packed_seq_params.cu_seqlens_q, query.size(0))[None, None]
        return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)


class _SwiGLUFunction(torch.autograd.Function):
    """silu(a) * b for y = [a | b] (last dimension)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, y: torch.Tensor) -> torch.Tensor:
        a, b = y.chunk(2, dim=-1)
        gate = F.silu(a)
        ctx.save_for_backward(y, gate)
        return gate * b

    @staticmethod
    @once_differentiable  # the backward writes into views of one buffer: no graph of its own
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        y, gate = ctx.saved_tensors  # type: ignore[attr-defined]  # set by autograd; FunctionCtx's stubs lack it
        a, b = y.chunk(2, dim=-1)
        grad_y = torch.empty_like(y)
        grad_a, grad_b = grad_y.chunk(2, dim=-1)
        torch.mul(grad, gate, out=grad_b)
        torch.ops.aten.silu_backward.grad_input(grad * b, a, grad_input=grad_a)
        return grad_y


class SwiGLU(MegatronModule):
    """The MLP's gated activation as a module (megatron-core's activation hook, `use_te_activation_func`).

    megatron-core's unfused GLU adds `glu_linear_offset` (0.0) to the linear half, a full copy, and autograd joins
    the two halves' gradients with a concatenation; here the backward writes both halves of the input gradient in
    place. Used on CPU (see `transformer_config`), where megatron-core's fused (compiled) bias-SwiGLU is off."""

    def __init__(self, config: TransformerConfig, **_: object) -> None:
        super().__init__(config)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return _SwiGLUFunction.apply(y)


def _native_linear_applies(layer: ColumnParallelLinear | RowParallelLinear) -> bool:
    """Whether `layer` is a plain linear: no tensor-parallel group to talk to and no megatron-core feature that
    needs its own autograd function (weight-gradient fusion, deferred embedding wgrad, expert communication,
    activation offloading). Checked per call: a layer outside these cases runs megatron-core's forward."""
    config = layer.config
    return (
        layer.tp_group.size() == 1
        and not layer.sequence_parallel
        and not layer.explicit_expert_comm
        and not layer.gradient_accumulation_fusion
        and not config.defer_embedding_wgrad_compute
        and config._cpu_offloading_context is None
    )


def _native_linear(
    layer: ColumnParallelLinear | RowParallelLinear, input_: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output, bias left to the caller) as megatron-core returns them, computed by one `F.linear`.

    megatron-core computes `matmul` and adds the bias in a separate pass, in its own Python autograd function,
    and with `skip_bias_add` (attention output, both MLP linears) leaves the addition to the bias-activation /
    bias-dropout-add fusions. Where those fusions are off (CPU) the bias is folded into the matmul (addmm), as
    `torch.nn.Linear` does: the same sums up to fp32 rounding, one pass and two autograd functions fewer.
    """
    config = layer.config
    fold = not layer.skip_bias_add or not (config.bias_activation_fusion or config.bias_dropout_fusion)
    bias = layer.bias if fold else None
    if _accumulates_into_main_grad(weight, input_):
        output = _LinearIntoMainGrad.apply(input_, weight, bias)
    else:
        output = F.linear(input_, weight, bias)
    return output, None if fold else layer.bias


def _accumulates_into_main_grad(weight: torch.Tensor, input_: torch.Tensor) -> bool:
    """Whether megatron-core's DDP gave `weight` a gradient buffer slice the weight gradient can be summed into
    directly (same dtype as the matmul: the mixed fp32-buffer/bf16-input case keeps autograd's path)."""
    main_grad = getattr(weight, "main_grad", None)
    return (
        main_grad is not None
        and hasattr(weight, "grad_added_to_main_grad")
        and weight.requires_grad
        and torch.is_grad_enabled()
        and not getattr(weight, "zero_out_wgrad", False)
        and main_grad.dtype == input_.dtype == weight.dtype
    )


class _LinearIntoMainGrad(torch.autograd.Function):
    """`F.linear` whose backward sums the weight gradient into `weight.main_grad` inside the matmul (`addmm_`).

    This is megatron-core's gradient-accumulation fusion (`fused_weight_gradient_mlp_cuda`, a CUDA-only apex
    kernel) in plain torch: without it autograd writes each weight gradient to a fresh tensor that DDP's hook then
    adds into the buffer, two extra passes over every weight gradient per micro-batch. As in megatron-core the
    weight gets an unfilled placeholder gradient and `grad_added_to_main_grad`, so DDP's hook skips its add but
    still runs (it marks the bucket ready when overlapping the gradient reduction)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]  # our field on the context
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        # saved_tensors and needs_input_grad are set by autograd; FunctionCtx's stubs lack them.
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_2d = grad.reshape(-1, grad.size(-1))
        grad_x = grad.matmul(weight) if needs_x else None
        grad_weight = None
        if needs_weight:
            weight.main_grad.addmm_(grad_2d.t(), x.reshape(-1, x.size(-1)))
            grad_weight = torch.empty_like(weight)
            weight.grad_added_to_main_grad = True
        grad_bias = grad_2d.sum(0) if ctx.has_bias and needs_bias else None  # type: ignore[attr-defined]
        return grad_x, grad_weight, grad_bias


class NativeColumnLinear(ColumnParallelLinear):
    """ColumnParallelLinear that runs as `F.linear` without tensor parallelism (see `_native_linear`)."""

    def forward(
        self,
        input_: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if weight is not None or self.weight is None or not _native_linear_applies(self):
            return super().forward(input_, weight, runtime_gather_output)
        return _native_linear(self, input_, self.weight)


class NativeRowLinear(RowParallelLinear):
    """RowParallelLinear that runs as `F.linear` without tensor parallelism (see `_native_linear`)."""

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not _native_linear_applies(self):
            return super().forward(input_)
        return _native_linear(self, input_, self.weight)


def resolve_attention_backend(requested: str, platform: Platform) -> str:
    if requested == "te" and not (HAVE_TE and platform.device_type == "cuda"):
        raise ValueError("--attention-backend te needs Transformer Engine on a CUDA device")
    if requested != "auto":
        return requested
    return "te" if HAVE_TE and platform.device_type == "cuda" else "sdpa"


def transformer_config(cfg: Config, platform: Platform) -> TransformerConfig:
    """megatron-core's TransformerConfig for this run."""
    m, p, prec = cfg.model, cfg.parallel, cfg.precision
    dtype = DTYPES[prec.params_dtype]
    fused = platform.device_type == "cuda"
    t = cfg.training
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups if m.group_query_attention else None,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.kv_channels,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=not m.disable_bias_linear,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else squared_relu if m.squared_relu else F.gelu,
        init_method_std=m.init_method_std,
        embedding_init_method_std=m.word_embedding_init_std,
        layernorm_zero_centered_gamma=m.apply_layernorm_1p,
        rotary_interleaved=m.rotary_interleaved,
        num_layers_in_first_pipeline_stage=p.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=p.decoder_last_pipeline_num_layers,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=prec.bf16,
        fp16=prec.fp16,
        use_cpu_initialization=platform.is_cpu,
        recompute_granularity=t.recompute_granularity,
        recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
        deterministic_mode=t.deterministic_mode,
        fp8=prec.fp8_format,
        fp8_amax_history_len=prec.fp8_amax_history_len,
        fp8_amax_compute_algo=prec.fp8_amax_compute_algo,
        # Batched p2p with both pipeline neighbours on one rank (interleaved PP=2) mismatches messages on gloo.
        batch_p2p_comm=platform.backend != "gloo",
        masked_softmax_fusion=fused,
        bias_activation_fusion=fused and not m.disable_bias_linear and not m.squared_relu,
        bias_dropout_fusion=fused,
        apply_rope_fusion=False,
        # On CPU the MLP calls the spec's activation module (megatron-core's hook for TE's): our SwiGLU.
        use_te_activation_func=platform.is_cpu and m.swiglu,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        # Micro-batches return loss sums; finalize_model_grads divides by the global token count.
        calculate_per_token_loss=True,
    )


def layer_spec(
    cfg: Config, config: TransformerConfig, backend: str, vp_stage: int | None, native_linears: bool = False
) -> object:
    """The block spec: local or TE layers, our norm, the chosen core attention and (`native_linears`, used on
    CPU) our linears."""
    if backend == "te":
        return get_gpt_layer_with_transformer_engine_spec(normalization=cfg.model.normalization)
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=cfg.model.normalization))
    norm = ModuleSpec(module=TorchNorm)
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    core_attention = {"sdpa": SDPAttention, "sdpa-dense": DenseMaskSDPAttention, "unfused": UnfusedAttention}
    spec.submodules.self_attention.submodules.core_attention = core_attention[backend]
    if config.use_te_activation_func:
        spec.submodules.mlp.submodules.activation_func = SwiGLU
    if native_linears:
        attention, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
        attention.linear_qkv, attention.linear_proj = NativeColumnLinear, NativeRowLinear
        mlp.linear_fc1, mlp.linear_fc2 = NativeColumnLinear, NativeRowLinear
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=norm)


class _DeferredOutputLayer(ColumnParallelLinear):
    """The output layer of `ChunkedLossGPTModel`: while `defer` (a forward with labels) it hands its input on
    as GPTModel's "logits", and the model's loss computes the logits chunk by chunk."""

    defer = False

    def forward(
        self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.defer:
            return super().forward(input_, weight, runtime_gather_output)
        return input_, None


class ChunkedLossGPTModel(GPTModel):
    """GPTModel whose loss never materialises all logits (`--cross-entropy-chunk N`): the output layer and the
    cross-entropy run N tokens at a time, recomputed in backward (long_context.chunked_cross_entropy). Same
    parameters and checkpoints as GPTModel; without labels (generation) it returns the logits as GPTModel does."""

    def __init__(self, *args: Any, cross_entropy_chunk: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cross_entropy_chunk = cross_entropy_chunk
        if self.post_process:
            self.output_layer.__class__ = _DeferredOutputLayer  # same module and state, another forward

    def forward(self, *args: Any, labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if self.post_process:
            self.output_layer.defer = labels is not None
        return super().forward(*args, labels=labels, **kwargs)

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not self.output_layer.defer:
            return super().compute_language_model_loss(labels, logits)
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else self.output_layer.weight
        )
        return chunked_cross_entropy(
            logits, weight, labels, self.cross_entropy_chunk, self.output_layer.sequence_parallel
        )


def build_model(
    cfg: Config,
    platform: Platform,
    config: TransformerConfig,
    padded_vocab_size: int,
    vp_stage: int | None = None,
) -> GPTModel:
    """One model chunk for this rank's pipeline stage (and virtual stage, when interleaving)."""
    backend = resolve_attention_backend(cfg.model.attention_backend, platform)
    chunk = cfg.training.cross_entropy_chunk
    model_class = GPTModel if chunk is None else partial(ChunkedLossGPTModel, cross_entropy_chunk=chunk)
    return model_class(
        config=config,
        transformer_layer_spec=layer_spec(cfg, config, backend, vp_stage, platform.is_cpu),
        vocab_size=padded_vocab_size,
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.model.position_embedding_type,
        rotary_percent=cfg.model.rotary_percent,
        rotary_base=cfg.model.rotary_base,
        vp_stage=vp_stage,
    )


def packed_seq_params(batch: Batch, restart_positions: bool = True) -> PackedSeqParams | None:
    """megatron-core's description of packed documents ("thd") when a batch carries their boundaries: `cu_seqlens`
    (int32 cumulative document lengths over the micro-batch's tokens) and optionally `max_seqlen`.

    megatron-core's thd RoPE restarts positions at every document unless its frequencies cover all the tokens
    (rope_utils._apply_rotary_pos_emb_thd): `restart_positions=False` asks for that by giving the token count as
    `max_seqlen` (an upper bound, as kernels take it), so RoPE positions run on over the packed tokens."""
    cu = batch.get("cu_seqlens")
    if cu is None:
        return None
    longest = int(batch["max_seqlen"]) if "max_seqlen" in batch else int((cu[1:] - cu[:-1]).max())
    if not restart_positions:
        longest = int(cu[-1])
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )


class GPTRecipe(Recipe):
    """megatron-core GPTModel on GPT samples (tokens, labels, loss mask, positions; packed-document boundaries
    where a batch has them) from the blended training data: the default `--model-variant gpt`, and the base of
    variants that change one part (subclass and override, e.g. `forward_step` for another loss mask)."""

    train_data: TrainData
    valid_sets: dict[str, torch.utils.data.Dataset]
    _masking_checked = False

    def __init__(self, cfg: Config, platform: Platform, tokenizer: Tokenizer) -> None:
        super().__init__(cfg, platform, tokenizer)
        self._readers: list[MicroBatches] = []  # every micro-batch reader made, for data_problem

    def transformer_config(self) -> TransformerConfig:
        return transformer_config(self.cfg, self.platform)

    def build_model(self, config: TransformerConfig, vp_stage: int | None) -> torch.nn.Module:
        model = build_model(self.cfg, self.platform, config, self.vocab_size, vp_stage)
        if self.cfg.model.use_cpu_initialization:  # the same initial model on every layout
            initialise([model], config, self.cfg.training.seed)
        return model

    def num_parameters(self) -> int:
        return num_parameters(self.cfg, self.vocab_size)

    def build_data(self, run_samples: int, consumed_samples: int, saved: dict[str, Any] | None) -> str:
        cfg, eod = self.cfg, self.tokenizer.eod
        entries = training_entries(cfg, self.tokenizer)
        self.train_data = build_train_data(cfg, entries, run_samples, consumed_samples, saved, eod)
        valid_samples = cfg.logging.eval_iters * cfg.training.eval_global_batch_size
        self.valid_sets = build_validation_sets(cfg, entries, valid_samples, eod)
        return self.train_data.note

    def _micro_batches(self, dataset: torch.utils.data.Dataset, position: int = 0) -> MicroBatches:
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        mbs = self.cfg.training.micro_batch_size
        reader = MicroBatches(dataset, mbs, dp_rank, dp_size, position, self.tokenizer.vocab_size)
        self._readers.append(reader)
        return reader

    def data_problem(self) -> str | None:
        return next((r.problem for r in self._readers if r.problem), None)

    def train_batches(self, consumed_samples: int) -> Iterator[Batch]:
        return self._micro_batches(self.train_data.blend, self.train_data.position(consumed_samples))

    def validation_sets(self) -> list[str]:
        return list(self.valid_sets)

    def valid_batches(self, name: str) -> Iterator[Batch]:
        return self._micro_batches(self.valid_sets[name])

    def data_state(self, consumed_samples: int) -> dict[str, Any]:
        return self.train_data.state_dict(consumed_samples)

    def forward_step(self, batch: Batch, chunk: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        packed = packed_seq_params(batch, self.cfg.data.reset_position_ids)
        if packed is not None:  # thd: the micro-batch's samples in order as one sequence [1, b x s]
            batch = {k: batch[k].reshape(1, -1) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        output = chunk(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=packed)
        return output, {"lm_loss": batch["loss_mask"]}

    def before_step(self, progress: Progress, model: list[torch.nn.Module], optimizer: MegatronOptimizer) -> str | None:
        """With --reset-attention-mask, the first step of the process checks the document masking of the model
        as built (long_context.check_document_masking; in full with --check-document-masking)."""
        if not self.cfg.data.reset_attention_mask or self._masking_checked:
            return None
        self._masking_checked = True
        if len(model) > 1 or self.cfg.parallel.pipeline_model_parallel_size > 1:
            return "document masking not checked: the check runs the whole model on one pipeline stage"
        samples = self._multi_document_samples(
            progress.consumed_samples, 8 if self.cfg.data.check_document_masking else 1
        )
        chunk, training = model[0], model[0].training
        chunk.eval()  # no dropout
        try:
            return check_document_masking(
                lambda b: self.forward_step(b, chunk)[0].cpu(),
                samples,
                DTYPES[self.cfg.precision.params_dtype],
                self.cfg.parallel.tensor_model_parallel_size if self.cfg.parallel.sequence_parallel else 1,
                self.cfg.data.check_document_masking,
            )
        finally:
            chunk.train(training)

    def _multi_document_samples(self, consumed_samples: int, count: int, scan: int = 1024) -> list[Batch]:
        """Up to `count` training samples of several documents each, as one-sample batches, from the first `scan`
        after the run's position."""
        blend, start = self.train_data.blend, self.train_data.position(consumed_samples)
        found = []
        for i in range(start, min(start + scan, len(blend))):
            sample = collate([blend[i]])
            if len(sample["cu_seqlens"]) > 2:
                found.append(sample)
                if len(found) == count:
                    break
        return found

    def step_flops(self, progress: Progress, global_batch: int) -> float:
        return flops_per_token(self.cfg, self.vocab_size) * global_batch * self.cfg.model.seq_length


register_variant("gpt", GPTRecipe)
