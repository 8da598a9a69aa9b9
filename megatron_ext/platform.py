"""Device and backend choice, and the one place where megatron-core is taught to run on a CPU.

megatron-core 0.16 assumes CUDA in a few dozen spots: `torch.cuda.current_device()`
for allocations, literal `device="cuda"` factory calls, CUDA RNG state in the tensor-parallel RNG tracker,
`torch.cuda.synchronize()`, `Tensor.cuda()` and optimizer checks of `param.type()` against CUDA type names.
On CPU we substitute, in this module only:

1. a `torch` facade in every loaded `megatron.core` module: `torch.cuda` becomes a CPU stand-in (current device
   is the CPU, RNG calls use the CPU generator, synchronize/streams/events/NVTX do nothing) and tensor factories
   map `device="cuda"` to the CPU;
2. the tensor-parallel RNG state helpers (`_get_cuda_rng_state`, `_set_cuda_rng_state`) use the CPU generator,
   which is the one dropout on CPU draws from;
3. `Tensor.cuda()` and `Tensor.type()` are answered as on a GPU, but only during the few megatron-core calls
   that use them (optimizer construction, gradient clipping, tying embeddings across pipeline stages);
4. the RNG tracker's warning "CPU RNG state changed within GPU RNG context" is filtered: on CPU the tracked
   "GPU" state is the CPU generator, so the change is the expected effect of dropout, not a bug;
5. for speed only, with bit-identical results: gradient clipping's fallbacks for Apex's multi-tensor kernels
   (`local_multi_tensor_l2_norm`, `local_multi_tensor_scale`) use torch's foreach ops (no Python float per
   gradient tensor, no scaled copy of every gradient), and the unfused rotary embedding skips its final copy
   (`torch.cat` with an empty pass-through part) when it rotates whole heads.

On CUDA and XPU none of this is installed. One fix applies on every device: megatron-core's distributed optimizer,
when it falls back to torch's AdamW (no Apex / Transformer Engine), gets each parameter's Adam step restored as a
tensor of its own on load (`keep_adam_step_on_load`). `tests/test_platform.py` checks that each substituted spot
still exists in megatron-core (so an upgrade that fixes or moves one fails loudly) and that it works on CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import logging
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_ext.cli import UserError
from megatron_ext.config import PRECISIONS

# The torch dtype of each precision name (config.PRECISIONS): a run's parameters, a conversion's --dtype.
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in PRECISIONS.values()}


class PlatformError(UserError, RuntimeError):
    """The requested device or backend cannot be used here; the message says what is missing."""


@dataclass(frozen=True)
class Platform:
    """Where this process trains."""

    device_type: str  # "cuda" | "xpu" | "cpu"
    backend: str  # process-group backend: "nccl" | "xccl" | "ccl" | "gloo"

    def current_device(self) -> torch.device:
        """The device this process was bound to by `setup_device`."""
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, getattr(torch, self.device_type).current_device())

    @property
    def is_cpu(self) -> bool:
        return self.device_type == "cpu"


def _xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def quiet_optional_dependency_warnings() -> None:
    """Hides megatron-core's import-time notes that Apex/Transformer Engine are absent (they are optional)."""
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed", category=UserWarning)
    warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)


def select(device: str = "auto", backend: str = "auto") -> Platform:
    """Picks the device (cuda, then xpu, then cpu) and a matching collective backend."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "xpu" if _xpu_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PlatformError("--device cuda: torch reports no CUDA device (CPU build or no GPU visible)")
    if device == "xpu":
        if not _xpu_available():
            raise PlatformError("--device xpu: torch reports no XPU (needs an XPU build of torch and the driver)")
        if backend in ("auto", "ccl"):
            # torch >= 2.8 ships xccl; older stacks need Intel's oneccl_bindings_for_pytorch for "ccl".
            if backend == "ccl" or not torch.distributed.is_xccl_available():
                try:
                    importlib.import_module("oneccl_bindings_for_pytorch")
                except ImportError as e:
                    raise PlatformError(
                        "XPU training needs the xccl backend (torch >= 2.8) or oneccl_bindings_for_pytorch for ccl"
                    ) from e
                backend = "ccl"
            else:
                backend = "xccl"
    if backend == "auto":
        backend = {"cuda": "nccl", "cpu": "gloo"}.get(device, backend)
    if device == "cpu" and backend != "gloo":
        raise PlatformError(f"--distributed-backend {backend} does not run on CPU: use gloo")
    return Platform(device, backend)


def setup_device(platform: Platform, local_rank: int) -> None:
    """Binds this process to its device; on CPU installs megatron-core's substitutes."""
    if platform.device_type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    elif platform.device_type == "xpu":
        torch.xpu.set_device(local_rank % torch.xpu.device_count())
    else:
        install_cpu_substitutes()
        keep_freed_memory()
    keep_adam_step_on_load()


def keep_adam_step_on_load() -> None:
    """megatron-core's distributed optimizer, falling back to torch's AdamW (no Apex / Transformer Engine), keeps
    Adam's `step` in each parameter's state. Its load (1) restores that step as ONE tensor shared by every
    parameter, so each parameter's update advances all of them and Adam's bias correction drifts after a resume,
    and (2) in the model-space ("fully_reshardable") format copies every state key from the checkpoint's tensors,
    which carry no step: a KeyError. Give each parameter its own copy of the restored step. Idempotent; no-op
    with Apex/TE (their step lives in the param groups)."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    cls = dopt.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states
    if dopt.HAVE_APEX_OR_TE or getattr(original, "__megatron_ext_wrapped__", False):
        return

    def set_states(self: Any, model_param: torch.nn.Parameter, tensors: dict[str, torch.Tensor]) -> None:
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if state.get("step") is not None:
                state["step"] = state["step"].detach().clone()
                tensors = {**tensors, "step": state["step"]}
        original(self, model_param, tensors)

    set_states.__megatron_ext_wrapped__ = True  # type: ignore[attr-defined]  # marks the patch as installed
    cls._set_main_param_and_optimizer_states = set_states


def keep_freed_memory() -> None:
    """glibc hands memory freed at the end of a step back to the system, and the next step takes it again page
    fault by page fault (measured: tens of thousands per step, ~7% of a CPU step). Raise the mmap and trim
    thresholds so the allocator keeps it (as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ would)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: large blocks from the heap, not fresh mappings
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not give the heap top back after every step


# ---- CPU substitutes ----------------------------------------------------------------------------------------


class _NoOp:
    """Stands in for CUDA streams and events: every method does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda *args, **kwargs: 0.0 if name == "elapsed_time" else None


def _cpu_cuda_namespace() -> types.SimpleNamespace:
    """What `torch.cuda` means to megatron-core on a CPU."""
    nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None)
    return types.SimpleNamespace(
        is_available=lambda: False,
        current_device=lambda: torch.device("cpu"),
        device_count=lambda: 0,
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=torch.manual_seed,
        random=types.SimpleNamespace(get_rng_state=lambda *a, **k: torch.get_rng_state()),
        Stream=_NoOp,
        Event=_NoOp,
        stream=lambda *a, **k: contextlib.nullcontext(),
        current_stream=lambda *a, **k: _NoOp(),
        default_stream=lambda *a, **k: _NoOp(),
        nvtx=nvtx,
        amp=torch.cuda.amp,
        # The legacy tensor types exist at run time but not in torch's stubs.
        FloatTensor=torch.cuda.FloatTensor,  # type: ignore[attr-defined]
        HalfTensor=torch.cuda.HalfTensor,  # type: ignore[attr-defined]
        BFloat16Tensor=torch.cuda.BFloat16Tensor,  # type: ignore[attr-defined]
        CUDAGraph=torch.cuda.CUDAGraph,
    )


_FACTORIES = (
    "tensor", "as_tensor", "empty", "zeros", "ones", "full", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "linspace", "empty_strided",
)  # fmt: skip


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


def _make_torch_facade() -> types.ModuleType:
    """A module that is `torch` except for `cuda` and the device argument of tensor factories."""
    facade = types.ModuleType("torch")
    facade.__dict__.update(torch.__dict__)
    facade.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[method-assign]  # lazy submodules
    facade.cuda = _cpu_cuda_namespace()  # type: ignore[attr-defined]  # a new module: set at run time
    for name in _FACTORIES:
        setattr(facade, name, _cpu_factory(getattr(torch, name)))
    facade.__megatron_ext_cpu_facade__ = True  # type: ignore[attr-defined]  # as cuda above
    return facade


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _tensors_look_like_cuda() -> Iterator[None]:
    """While active, `t.cuda()` is a no-op and `t.type()` spells CUDA type names."""
    orig_cuda, orig_type = torch.Tensor.cuda, torch.Tensor.type

    def cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None and not kwargs:
            name = orig_type(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return orig_type(self, dtype, non_blocking, **kwargs)

    # The patch itself: methods replaced on the class, for the duration only.
    torch.Tensor.cuda, torch.Tensor.type = cuda, type_  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.type = orig_cuda, orig_type  # type: ignore[method-assign]


def _wrap_in_cuda_look(owner: Any, name: str) -> None:
    fn = getattr(owner, name)
    if getattr(fn, "__megatron_ext_wrapped__", False):
        return

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _tensors_look_like_cuda():
            return fn(*args, **kwargs)

    wrapper.__megatron_ext_wrapped__ = True  # type: ignore[attr-defined]  # marks the patch as installed
    setattr(owner, name, wrapper)


# Modules whose CUDA assumptions are on the training, evaluation and checkpointing path; importing them first
# means the facade reaches them (modules imported later are patched by a later call, which is idempotent).
CPU_PATCHED_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.module",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.timers",
)

_installed = False


def install_cpu_substitutes() -> None:
    """Makes megatron-core run on CPU. Idempotent; only ever called for a CPU platform."""
    global _installed
    for name in CPU_PATCHED_MODULES:
        importlib.import_module(name)
    facade = sys.modules.get("megatron_ext._torch_cpu_facade") or _make_torch_facade()
    sys.modules["megatron_ext._torch_cpu_facade"] = facade
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = facade  # type: ignore[attr-defined]  # the patch: a ModuleType from sys.modules
    if _installed:
        return
    random = sys.modules["megatron.core.tensor_parallel.random"]
    # The patch: megatron-core's CUDA RNG state functions, found in sys.modules (a plain ModuleType to mypy).
    random._get_cuda_rng_state = _cpu_get_rng_state  # type: ignore[attr-defined]
    random._set_cuda_rng_state = _cpu_set_rng_state  # type: ignore[attr-defined]

    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    _wrap_in_cuda_look(Float16OptimizerWithFloat16Params, "__init__")
    _wrap_in_cuda_look(DistributedOptimizer, "__init__")
    _wrap_in_cuda_look(LanguageModule, "setup_embeddings_and_output_layer")
    _wrap_in_cuda_look(sys.modules["megatron.core.optimizer.optimizer"], "clip_grad_by_total_norm_fp32")
    logging.getLogger(random.__name__).addFilter(_drop_rng_context_warning)
    _use_foreach_clipping()
    _use_rope_without_copy()
    _installed = True


def _foreach_l2_norm(
    chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]], per_tensor: bool, *args: Any
) -> tuple[torch.Tensor, None]:
    """megatron-core's `local_multi_tensor_l2_norm` (the norm of all per-tensor norms, shape [1], float32)
    without its Python round trip: it converts every per-tensor norm to a float, one synchronising `.item()`
    per gradient tensor."""
    tensors = [t for tensors in tensor_lists for t in tensors]
    if not tensors:
        return torch.zeros(1, dtype=torch.float), None
    norms = torch.stack(torch._foreach_norm(tensors))  # in the gradients' dtype, as megatron-core's
    return torch.linalg.vector_norm(norms).reshape(1).float(), None


def _foreach_scale(
    chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]], scale: float
) -> None:
    """megatron-core's `local_multi_tensor_scale` (dst = src * scale): in place when src is dst, as in gradient
    clipping, instead of a scaled copy of each gradient copied back."""
    src, dst = tensor_lists
    if len(src) == len(dst) and all(s is d for s, d in zip(src, dst)):
        if all(d.dtype == torch.float32 for d in dst):
            torch._foreach_mul_(dst, scale)
        else:  # foreach rounds half-precision products differently from `src * scale`
            for d in dst:
                d.mul_(scale)
        return
    for s, d in zip(src, dst):
        d.copy_(s * scale)


def _use_foreach_clipping() -> None:
    """Gradient clipping through `_foreach_l2_norm`/`_foreach_scale` where megatron-core fell back to its local
    implementations (no Apex / Transformer Engine)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
    if clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = _foreach_scale


def _rope_without_copy(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """megatron-core's unfused rotary embedding (`_apply_rotary_pos_emb_bshd`) ends with
    `torch.cat((rotated, t_pass))`, a copy of every query and key even when `t_pass` (the dimensions past
    rotary_percent) is empty. Whole heads rotated: the same arithmetic without that copy."""
    from megatron.core.models.common.embeddings import rope_utils

    @functools.wraps(original)
    def apply(
        t: torch.Tensor,
        freqs: torch.Tensor,
        rotary_interleaved: bool = False,
        multi_latent_attention: bool = False,
        mscale: float = 1.0,
    ) -> torch.Tensor:
        if multi_latent_attention or freqs.shape[-1] != t.shape[-1]:
            return original(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
        cos_ = (torch.cos(freqs) * mscale).to(t.dtype)
        sin_ = (torch.sin(freqs) * mscale).to(t.dtype)
        return (t * cos_) + (rope_utils._rotate_half(t, rotary_interleaved) * sin_)

    apply.__megatron_ext_wrapped__ = True  # type: ignore[attr-defined]  # marks the patch as installed
    return apply


def _use_rope_without_copy() -> None:
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    original = rope_utils._apply_rotary_pos_emb_bshd
    if getattr(original, "__megatron_ext_wrapped__", False):
        return
    apply = _rope_without_copy(original)
    for module in (rope_utils, rotary_pos_embedding):
        if getattr(module, "_apply_rotary_pos_emb_bshd", None) is original:
            module._apply_rotary_pos_emb_bshd = apply


def _drop_rng_context_warning(record: logging.LogRecord) -> bool:
    return "CPU RNG state changed within GPU RNG context" not in record.getMessage()
