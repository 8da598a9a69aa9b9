"""Runs the document-masking scenarios in one process group and writes, per scenario, how far each packed
document's loss is from the same document run alone (JSON, rank 0).

Launched by tests/test_long_context.py once with 1 process and once under torchrun with 2 at TP=2, so every CPU
attention backend and position mode is built in one start-up per world size. A scenario name is
`BACKEND/POSITIONS/MODE`: backend sdpa (per-document SDPA), sdpa-dense or unfused; positions rope or learned
(absolute); mode reset (--reset-position-ids) or continuous. `leak` runs a deliberately leaking backend through
the self-check; `chunked_ce` compares --cross-entropy-chunk with the plain loss and gradients.

usage: long_context_scenarios.py OUT_JSON SCENARIO [SCENARIO ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_ext.platform import quiet_optional_dependency_warnings

quiet_optional_dependency_warnings()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402

from megatron_ext import distributed, platform  # noqa: E402
from megatron_ext.config import parse_args  # noqa: E402
from megatron_ext.data.blend import gpt_sample  # noqa: E402
from megatron_ext.data.gpt_data import collate  # noqa: E402
from megatron_ext.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_ext.models import gpt  # noqa: E402
from megatron_ext.models.long_context import DocumentMaskingError, check_document_masking  # noqa: E402

SEQ = 64
LONG = 16384
# Two samples of one micro-batch: documents that start where these offsets say (a 1-token one included).
STARTS = [[9, 26, 27, 40], [33]]
BASE = (
    f"--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --seq-length {SEQ} "
    "--swiglu --normalization RMSNorm --disable-bias-linear --hidden-dropout 0 --attention-dropout 0 "
    "--micro-batch-size 2 --train-iters 1 --make-vocab-size-divisible-by 1 --reset-attention-mask --init-method-std 0.2"
).split()


def flags(name: str) -> list[str]:
    backend, positions, mode = name.split("/")
    out = [*BASE, "--attention-backend", backend]
    out += ["--position-embedding-type", "rope" if positions == "rope" else "learned_absolute"]
    out += ["--reset-position-ids"] if mode == "reset" else []
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return [*out, "--tensor-model-parallel-size", str(tp)] + (["--sequence-parallel"] if tp > 1 else [])


def samples(reset_positions: bool, starts: list[list[int]] = STARTS, seq: int = SEQ) -> list[dict[str, torch.Tensor]]:
    """The packed samples (same tokens on every rank)."""
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, 256, (seq + 1,), generator=g) for _ in starts]
    return [gpt_sample(t, s, 0, False, reset_positions) for t, s in zip(texts, starts)]


def batch(reset_positions: bool, starts: list[list[int]] = STARTS, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """The packed micro-batch of the samples."""
    return collate(samples(reset_positions, starts, seq))


def recipe_of(name_flags: list[str], plat: platform.Platform) -> tuple[gpt.GPTRecipe, torch.nn.Module]:
    cfg = parse_args(name_flags)
    cfg.resolve_batch(torch.distributed.get_world_size())
    recipe = gpt.GPTRecipe(cfg, plat, build_tokenizer("ByteTokenizer", None))
    torch.manual_seed(1)
    model = recipe.build_model(recipe.transformer_config(), None).eval()
    return recipe, model


def document_gaps(
    name: str, plat: platform.Platform, more: tuple[str, ...] = (), starts: list[list[int]] = STARTS, seq: int = SEQ
) -> dict[str, float]:
    """Largest |packed - alone| over documents of the mean document loss and of any token's loss; `causal` is
    the same for the packed tokens run without bounds (plain causal attention: must leak). `more` flags (a
    longer `seq`) train the packed sample: forward and backward in training mode (recomputation applies)."""
    reset = name.endswith("/reset")
    recipe, model = recipe_of([*flags(name), *more], plat)
    b = batch(reset, starts, seq)
    if more:
        model.train()
        packed_train = recipe.forward_step(b, model)[0]
        (packed_train * b["loss_mask"].reshape(1, -1)).sum().backward()
    with torch.no_grad():
        packed = packed_train.detach().flatten() if more else recipe.forward_step(b, model)[0].flatten()
        unmasked = {k: v for k, v in b.items() if k not in ("cu_seqlens", "max_seqlen")}
        causal = recipe.forward_step(unmasked, model)[0].flatten()
        cu, mask = b["cu_seqlens"].tolist(), b["loss_mask"].flatten().bool()
        mean_gap, token_gap, causal_gap = 0.0, 0.0, 0.0
        for lo, hi in zip(cu, cu[1:]):
            if not mask[lo:hi].any():
                continue  # a 1-token document: its only token predicts the next document
            row, col = divmod(lo, seq)
            alone_batch = {k: b[k][row : row + 1, col : col + hi - lo] for k in ("tokens", "labels", "loss_mask")}
            alone_batch["position_ids"] = b["position_ids"][row : row + 1, col : col + hi - lo]
            pad = -(hi - lo) % parallel_state.get_tensor_model_parallel_world_size()
            alone_batch = {k: F.pad(v, (0, pad)) for k, v in alone_batch.items()}
            alone = recipe.forward_step(alone_batch, model)[0].flatten()[: hi - lo]
            keep = mask[lo:hi]
            mean_gap = max(mean_gap, abs(float(alone[keep].mean() - packed[lo:hi][keep].mean())))
            token_gap = max(token_gap, float((alone[keep] - packed[lo:hi][keep]).abs().max()))
            causal_gap = max(causal_gap, float((alone[keep] - causal[lo:hi][keep]).abs().max()))
    return {"mean": mean_gap, "token": token_gap, "causal": causal_gap}


ORIGINAL_FORWARD = gpt.SDPAttention.forward


def leaking_forward(self: gpt.SDPAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object,
                    packed_seq_params: object = None, **kwargs: object) -> torch.Tensor:  # fmt: skip
    """A deliberately leaking SDPAttention.forward: it drops the packed bounds (plain causal attention over all
    the packed tokens), as a backend that ignores a packed mask does."""
    if packed_seq_params is None:
        return ORIGINAL_FORWARD(self, q, k, v, *args, **kwargs)
    return ORIGINAL_FORWARD(self, q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), *args, **kwargs).squeeze(1)


def leak(plat: platform.Platform) -> dict[str, str]:
    """The self-check on the per-document backend (passes) and on one that drops the bounds (must fail)."""
    recipe, model = recipe_of(flags("sdpa/rope/reset"), plat)
    b = [collate([sample]) for sample in samples(True)]
    dtype = torch.float32

    def forward(x: dict) -> torch.Tensor:
        return recipe.forward_step(x, model)[0]

    tp = parallel_state.get_tensor_model_parallel_world_size()
    result = {"ok": check_document_masking(forward, b, dtype, tp, full=True)}
    gpt.SDPAttention.forward = leaking_forward  # type: ignore[method-assign]
    try:
        check_document_masking(forward, b, dtype, tp, full=False)
        result["leaking"] = "passed"
    except DocumentMaskingError as e:
        result["leaking"] = str(e)
    finally:
        gpt.SDPAttention.forward = ORIGINAL_FORWARD  # type: ignore[method-assign]
    return result


def chunked_ce(plat: platform.Platform) -> dict[str, float]:
    """--cross-entropy-chunk 24 against the plain loss: loss and every parameter's gradient, same weights."""
    runs = []
    for chunk in ([], ["--cross-entropy-chunk", "24"]):
        recipe, model = recipe_of(flags("sdpa/rope/reset") + chunk, plat)
        b = batch(True)
        loss = (recipe.forward_step(b, model)[0] * b["loss_mask"].reshape(1, -1)).sum()
        loss.backward()
        runs.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, grads), (chunked, chunked_grads) = runs
    return {
        "loss": abs(plain - chunked) / abs(plain),
        "grad": max(float((grads[n] - chunked_grads[n]).abs().max() / grads[n].abs().max()) for n in grads),
        "params": len(grads),
    }


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    plat = platform.select("cpu", "gloo")
    info = distributed.init_process_group(plat.backend, 10)
    platform.setup_device(plat, info.local_rank)
    distributed.initialize_model_parallel(info.world_size, 1, None)  # every rank in one tensor-parallel group
    model_parallel_cuda_manual_seed(1)
    results: dict[str, object] = {}
    for name in names:
        if name == "leak":
            results[name] = leak(plat)
        elif name == "chunked_ce":
            results[name] = chunked_ce(plat)
        elif name == "16k":  # 16 documents, recomputation and chunked cross-entropy
            starts = sorted(torch.randperm(16383, generator=torch.Generator().manual_seed(3))[:15] + 1)
            more = f"--seq-length {LONG} --micro-batch-size 1 --recompute-activations --cross-entropy-chunk 2048"
            long_starts = [[int(x) for x in starts]]
            results[name] = document_gaps("sdpa/rope/reset", plat, tuple(more.split()), long_starts, LONG)
        else:
            results[name] = document_gaps(name, plat)
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
    distributed.destroy()


if __name__ == "__main__":
    main()
