"""Learning-rate and weight-decay schedules as data and as pure functions of the position in the run: the one
vocabulary of decay styles and their aliases, the resolved schedule (`ScheduleConfig`, validated when built),
lengths in iterations, samples or tokens, and the LR / weight decay at any position.

It imports nothing of the project but cli, so the schema (megatron_ext/config.py) checks a command line's schedule
when it is parsed, and the scheduler (megatron_ext/training/schedules.py), plot_lr and inspect_checkpoint compute
it alike. The styles megatron-core also has use its formulas and boundary conventions exactly (``<=`` warmup end,
``>`` decay end), so swapping schedulers does not move the LR.

Positions count in ``ScheduleConfig.unit``: samples (as Megatron-LM, ``step(increment=global_batch_size)``) or
tokens (``increment * seq_length`` per step, so a later ``--seq-length`` change keeps the token position).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from megatron_ext.cli import UserError

LR_DECAY_STYLES = (
    "constant",
    "linear",
    "cosine",
    "inverse-square-root",
    "WSD",
    "infinite-cosine",
    "infinite-inv-sqrt",
)
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")
UNITS = ("samples", "tokens")
INFINITE_STYLES = ("infinite-cosine", "infinite-inv-sqrt")
STYLE_ALIASES = {  # other spellings -> the style
    "wsd": "WSD",
    # ALCF's "constant LR plus cooldown" is WSD: hold the peak, then anneal over the last stretch.
    "constant-cooldown": "WSD",
    "constant_cooldown": "WSD",
    "constant-with-cooldown": "WSD",
    "constant+cooldown": "WSD",
    "infinite_cosine": "infinite-cosine",
    "infinite-inv-square-root": "infinite-inv-sqrt",
    "infinite_inv_sqrt": "infinite-inv-sqrt",
    "inverse_square_root": "inverse-square-root",
}
LR_LENGTHS = ("lr_warmup", "lr_decay", "lr_wsd_decay", "lr_infinite_decay", "lr_cooldown")
"""The schedule's lengths, each given as --NAME-iters, --NAME-samples or --NAME-tokens."""


def canonical_style(name: str) -> str:
    """The decay style `name` stands for (an alias resolved; an unknown name is returned as it is)."""
    return STYLE_ALIASES.get(name, name)


class ScheduleError(UserError, ValueError):
    """A schedule that cannot be followed (bad style, lengths out of order): one readable line for the user."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ScheduleError(message)


@dataclass(frozen=True)
class ScheduleConfig:
    """Everything that decides the LR and weight decay at a position; stored whole in checkpoints."""

    lr: float
    """Peak learning rate, reached at the end of warmup (megatron-core's ``max_lr``)."""
    min_lr: float = 0.0
    """LR at the end of decay/cooldown and after it; 0 is allowed everywhere."""
    lr_warmup_init: float = 0.0
    """LR at position 0, rising linearly to ``lr`` over ``lr_warmup``."""
    lr_decay_style: str = "linear"
    """One of constant, linear, cosine, inverse-square-root, WSD, infinite-cosine, infinite-inv-sqrt (aliases:
    constant-cooldown / constant-with-cooldown = WSD)."""
    unit: str = "samples"
    """What every length and the position count: ``samples`` or ``tokens``."""
    seq_length: int | None = None
    """Tokens per sample: required for ``unit="tokens"`` (a step of N samples advances N * seq_length); else only
    used to print token counts."""
    lr_warmup: float = 0
    """Warmup length from position 0 (Megatron ``--lr-warmup-*``)."""
    lr_decay: float | None = None
    """Position where the schedule reaches ``min_lr`` (Megatron ``--lr-decay-*``: counted from 0, warmup
    included); None only for constant, or infinite with no cooldown."""
    lr_wsd_decay_style: str = "exponential"
    """Shape of the final anneal of WSD and of the infinite schedules' cooldown: linear, cosine, exponential
    (megatron-core's ``2 * 0.5**r - 1``, which reaches exactly 0) or minus_sqrt."""
    lr_wsd_decay: float = 0
    """WSD: length of the final anneal, ending at ``lr_decay`` (Megatron ``--lr-wsd-decay-*``)."""
    constant_lr: float | None = None
    """Infinite schedules: the LR held between the decay phase and the cooldown (in [min_lr, lr])."""
    lr_infinite_decay: float = 0
    """Infinite schedules: length of the decay from ``lr`` to ``constant_lr``, starting at the end of warmup."""
    lr_cooldown: float = 0
    """Infinite schedules: length of the final cooldown from ``constant_lr`` to ``min_lr``, ending at
    ``lr_decay``; 0 = hold ``constant_lr`` for ever (a truly infinite run, cool down later by resuming with
    a cooldown)."""
    lr_timescale: float = 10.0
    """infinite-inv-sqrt: steepness alpha of ``h(x) = 1/sqrt(1 + alpha x) - 1`` (larger = faster early drop)."""
    start_weight_decay: float = 0.0
    """Weight decay at position 0."""
    end_weight_decay: float = 0.0
    """Weight decay at ``wd_incr`` and after (equal to start for the constant style)."""
    weight_decay_incr_style: str = "constant"
    """constant, linear or cosine increment from start to end weight decay (megatron-core's formulas)."""
    wd_incr: float | None = None
    """Length of the weight-decay ramp; None = ``lr_decay`` (Megatron-LM uses the run length)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_decay_style", canonical_style(self.lr_decay_style))
        self._validate()

    def _validate(self) -> None:
        s = self.lr_decay_style
        _check(s in LR_DECAY_STYLES, f"lr_decay_style {s!r} is not one of {', '.join(LR_DECAY_STYLES)}")
        _check(self.unit in UNITS, f"unit {self.unit!r} is not samples or tokens")
        _check(self.unit != "tokens" or (self.seq_length or 0) > 0, "token-based lengths need a positive seq_length")
        _check(0.0 <= self.min_lr <= self.lr, f"min_lr {self.min_lr} must be in [0, lr {self.lr}]")
        _check(0.0 <= self.lr_warmup_init <= self.lr, f"lr_warmup_init {self.lr_warmup_init} must be in [0, lr]")
        for name in ("lr_warmup", "lr_wsd_decay", "lr_infinite_decay", "lr_cooldown"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0")
        _check(
            self.lr_wsd_decay_style in WSD_DECAY_STYLES,
            f"lr_wsd_decay_style {self.lr_wsd_decay_style!r} is not one of {', '.join(WSD_DECAY_STYLES)}",
        )
        if s in INFINITE_STYLES:
            c = self.constant_lr
            _check(c is not None and self.min_lr <= c <= self.lr, f"{s} needs constant_lr in [min_lr, lr], got {c}")
            _check(self.lr_timescale > 0, "lr_timescale must be positive")
            if self.lr_cooldown > 0:
                if self.lr_decay is None:
                    raise ScheduleError(f"{s} with a cooldown needs lr_decay (where the cooldown ends)")
                stable = self.lr_warmup + self.lr_infinite_decay
                _check(
                    stable <= self.lr_decay - self.lr_cooldown,
                    f"{s}: warmup + infinite decay ({stable:g}) run past the cooldown start "
                    f"({self.lr_decay - self.lr_cooldown:g})",
                )
        elif s != "constant":
            if self.lr_decay is None:
                raise ScheduleError(f"{s} needs lr_decay (where the LR reaches min_lr)")
            _check(
                self.lr_decay > self.lr_warmup,
                f"lr_decay {self.lr_decay} must be beyond lr_warmup {self.lr_warmup}",
            )
            if s == "WSD":
                _check(
                    0 < self.lr_wsd_decay <= self.lr_decay,
                    f"WSD needs 0 < lr_wsd_decay <= lr_decay, got {self.lr_wsd_decay}",
                )
        _check(self.start_weight_decay >= 0 and self.end_weight_decay >= 0, "weight decay must be >= 0")
        _check(
            self.weight_decay_incr_style in WD_INCR_STYLES,
            f"weight_decay_incr_style {self.weight_decay_incr_style!r} is not one of {', '.join(WD_INCR_STYLES)}",
        )
        if self.weight_decay_incr_style == "constant":
            _check(
                self.start_weight_decay == self.end_weight_decay,
                "constant weight decay needs start_weight_decay == end_weight_decay",
            )
        else:
            _check(self.wd_incr_length > 0, "a weight-decay increment needs wd_incr (or lr_decay) > 0")

    @property
    def wd_incr_length(self) -> float:
        """The weight-decay ramp length actually used (``wd_incr``, else ``lr_decay``, else 0)."""
        if self.wd_incr is not None:
            return self.wd_incr
        return self.lr_decay if self.lr_decay is not None else 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScheduleConfig:
        """Rebuild from ``asdict`` output; unknown keys (a newer writer) are ignored, missing ones defaulted."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for checkpoints and JSON."""
        return asdict(self)

    def diff(self, other: ScheduleConfig) -> list[str]:
        """Names of the fields that differ (floats compared to 1e-12 relative), e.g. checkpoint vs command line."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, float) and isinstance(b, float):
                same = math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
            else:
                same = a == b
            if not same:
                out.append(f.name)
        return out

    def phases(self) -> list[Phase]:
        """The schedule as named spans (see :func:`phases`)."""
        return phases(self)

    def describe(self) -> str:
        """A few lines naming each phase with its span in samples (and tokens) and LR values."""
        return describe(self)


@dataclass(frozen=True)
class Phase:
    """One stretch of the schedule, for printing and plot shading."""

    name: str
    """warmup, decay, stable, cooldown or final (holding min_lr after the end)."""
    start: float
    """First position (in the config's unit)."""
    end: float | None
    """Last position; None for an open-ended phase."""
    lr_start: float
    """LR at ``start``."""
    lr_end: float
    """LR at ``end`` (equal to ``lr_start`` when open-ended)."""


# ---------------------------------------------------------------------------------------------------------------
# Pure functions


def anneal_coeff(style: str, ratio: float) -> float:
    """megatron-core's WSD anneal shapes: 1 at ratio 0, 0 at ratio 1."""
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    if style == "exponential":
        return (2.0 * math.pow(0.5, ratio)) - 1.0
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(ratio)
    raise ScheduleError(f"lr_wsd_decay_style {style!r} is not one of {', '.join(WSD_DECAY_STYLES)}")


def _inv_sqrt_shape(alpha: float, x: float) -> float:
    """h(x) = 1/sqrt(1 + alpha x) - 1: 0 at x=0, falls fastest early (Ibrahim et al. 2024)."""
    return 1.0 / math.sqrt(1.0 + alpha * x) - 1.0


def lr_at(cfg: ScheduleConfig, t: float, *, max_lr: float | None = None, min_lr: float | None = None) -> float:
    """LR at position ``t``. ``max_lr``/``min_lr`` override the peak/floor for one param group (megatron-core's
    per-group keys); the infinite schedules' ``constant_lr`` then scales with the peak."""
    mx = cfg.lr if max_lr is None else max_lr
    mn = cfg.min_lr if min_lr is None else min_lr
    warmup = cfg.lr_warmup
    if warmup > 0 and t <= warmup:
        return cfg.lr_warmup_init + ((mx - cfg.lr_warmup_init) * float(t) / float(warmup))
    style = cfg.lr_decay_style
    if style == "constant":
        return mx
    if style in INFINITE_STYLES:
        return _infinite_lr(cfg, t, mx, mn)
    decay_end = float(cfg.lr_decay)  # type: ignore[arg-type]  # set for these styles: ScheduleConfig._validate
    if t > decay_end:
        return mn
    if style == "inverse-square-root":
        # megatron-core: relative to position 0 (not to the warmup end), floored at min_lr, min_lr after decay end.
        lr = mx * max(warmup, 1) ** 0.5 / (max(t, 1) ** 0.5)
        return max(mn, lr)
    delta_lr = mx - mn
    if style == "linear":
        coeff = 1.0 - float(t - warmup) / float(decay_end - warmup)
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * (float(t - warmup) / float(decay_end - warmup))) + 1.0)
    else:  # WSD
        anneal_start = decay_end - cfg.lr_wsd_decay
        if t <= anneal_start:
            coeff = 1.0
        else:
            coeff = anneal_coeff(cfg.lr_wsd_decay_style, float(t - anneal_start) / float(cfg.lr_wsd_decay))
    return mn + coeff * delta_lr


def _infinite_lr(cfg: ScheduleConfig, t: float, mx: float, mn: float) -> float:
    """After warmup: decay to constant_lr, hold, cool down to min_lr over the last lr_cooldown, then min_lr."""
    const = float(cfg.constant_lr)  # type: ignore[arg-type]  # set for these styles: ScheduleConfig._validate
    if mx != cfg.lr and cfg.lr > 0:
        const *= mx / cfg.lr  # a group with its own peak keeps the same constant/peak ratio
    decay_start, decay_len = cfg.lr_warmup, cfg.lr_infinite_decay
    if decay_len > 0 and t <= decay_start + decay_len:
        r = max(0.0, float(t - decay_start) / float(decay_len))
        if cfg.lr_decay_style == "infinite-cosine":
            return const + (mx - const) * 0.5 * (math.cos(math.pi * r) + 1.0)
        alpha = cfg.lr_timescale
        return mx + (const - mx) * _inv_sqrt_shape(alpha, r) / _inv_sqrt_shape(alpha, 1.0)
    if cfg.lr_cooldown <= 0:
        return const
    end = float(cfg.lr_decay)  # type: ignore[arg-type]  # set with a cooldown: ScheduleConfig._validate
    cool_start = end - cfg.lr_cooldown
    if t <= cool_start:
        return const
    if t > end:
        return mn
    return mn + anneal_coeff(cfg.lr_wsd_decay_style, float(t - cool_start) / float(cfg.lr_cooldown)) * (const - mn)


def wd_at(cfg: ScheduleConfig, t: float, *, start_wd: float | None = None, end_wd: float | None = None) -> float:
    """Weight decay at ``t`` (megatron-core's ``get_wd``; ``start_wd``/``end_wd`` are per-group overrides)."""
    start = cfg.start_weight_decay if start_wd is None else start_wd
    end = cfg.end_weight_decay if end_wd is None else end_wd
    length = cfg.wd_incr_length
    if t > length or cfg.weight_decay_incr_style == "constant" or length <= 0:
        return end
    ratio = float(t) / float(length)
    if cfg.weight_decay_incr_style == "linear":
        coeff = ratio
    else:  # cosine
        coeff = 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
    return start + coeff * (end - start)


def phases(cfg: ScheduleConfig) -> list[Phase]:
    """Named spans of the schedule in ``cfg.unit``; empty spans are left out."""
    spans: list[tuple[str, float, float | None]] = []
    w, style = float(cfg.lr_warmup), cfg.lr_decay_style
    if w > 0:
        spans.append(("warmup", 0.0, w))
    if style == "constant":
        spans.append(("stable", w, None))
    elif style in INFINITE_STYLES:
        hold = w + cfg.lr_infinite_decay
        spans.append(("decay", w, hold))
        if cfg.lr_cooldown > 0:
            end = float(cfg.lr_decay)  # type: ignore[arg-type]  # set with a cooldown: ScheduleConfig._validate
            spans += [("stable", hold, end - cfg.lr_cooldown), ("cooldown", end - cfg.lr_cooldown, end)]
            spans.append(("final", end, None))
        else:
            spans.append(("stable", hold, None))
    else:
        end = float(cfg.lr_decay)  # type: ignore[arg-type]  # set for these styles: ScheduleConfig._validate
        if style == "WSD":
            anneal = max(w, end - cfg.lr_wsd_decay)
            spans += [("stable", w, anneal), ("cooldown", anneal, end)]
        else:
            spans.append(("decay", w, end))
        spans.append(("final", end, None))
    out = []
    for name, a, b in spans:
        if b is not None and b <= a:
            continue
        lr_a = cfg.min_lr if name == "final" else lr_at(cfg, a)
        out.append(Phase(name, a, b, lr_a, lr_at(cfg, b) if b is not None else lr_a))
    return out


def format_count(x: float) -> str:
    """Compact human count: 1,234 below a million, else 1.23M / 4.5B / 2T."""
    if abs(x) < 1e6:
        return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.2f}"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:g}"  # pragma: no cover


def to_samples(cfg: ScheduleConfig, pos: float) -> float:
    """A position in ``cfg.unit`` as samples (tokens divided by ``seq_length``)."""
    return pos / _token_length(cfg.seq_length) if cfg.unit == "tokens" else pos


def describe(cfg: ScheduleConfig) -> str:
    """Multi-line account of the schedule, e.g. printed on resume so the user sees what will be followed."""
    style = cfg.lr_decay_style
    extras = []
    if style == "infinite-inv-sqrt":
        extras.append(f"timescale {cfg.lr_timescale:g}")
    if style == "WSD" or (style in INFINITE_STYLES and cfg.lr_cooldown > 0):
        extras.append(f"cooldown {cfg.lr_wsd_decay_style}")
    head = f"lr schedule: {style}" + (f" ({', '.join(extras)})" if extras else "")
    head += f", counted in {cfg.unit}" + (f", seq_length {cfg.seq_length}" if cfg.seq_length else "")
    lines = [head]
    for p in phases(cfg):
        a, b = to_samples(cfg, p.start), None if p.end is None else to_samples(cfg, p.end)
        span = f"samples {format_count(a)} -> {'end' if b is None else format_count(b)}"
        if cfg.seq_length:
            tok_b = "end" if b is None else format_count(b * cfg.seq_length)
            span += f" (tokens {format_count(a * cfg.seq_length)} -> {tok_b})"
        flat = math.isclose(p.lr_end, p.lr_start, rel_tol=1e-9, abs_tol=0.0)
        lrs = f"lr {p.lr_start:.4g}" if flat else f"lr {p.lr_start:.4g} -> {p.lr_end:.4g}"
        lines.append(f"  {p.name:<9}{span:<56} {lrs}")
    if cfg.weight_decay_incr_style == "constant":
        lines.append(f"weight decay: constant {cfg.end_weight_decay:g}")
    else:
        wd_end = format_count(to_samples(cfg, cfg.wd_incr_length))
        lines.append(
            f"weight decay: {cfg.weight_decay_incr_style} {cfg.start_weight_decay:g} -> {cfg.end_weight_decay:g} "
            f"over samples 0 -> {wd_end}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Lengths given in iterations, samples or tokens


def iters_to_samples(iters: float, global_batch_size: int) -> float:
    """Iteration-based length as samples (fixed batch size: Megatron-LM's ``--lr-*-iters * --global-batch-size``)."""
    _check(global_batch_size > 0, "iteration-based lengths need a positive global batch size")
    return iters * global_batch_size


def convert_length(
    value: float, given: str, unit: str, *, global_batch_size: int | None = None, seq_length: int | None = None
) -> float:
    """``value`` counted in ``given`` (iters, samples, tokens) expressed in ``unit`` (samples or tokens)."""
    _check(given in ("iters", "samples", "tokens"), f"length unit {given!r} is not iters, samples or tokens")
    _check(unit in UNITS, f"unit {unit!r} is not samples or tokens")
    if given == unit:
        return value
    if given == "iters":
        samples = iters_to_samples(value, global_batch_size or 0)
    elif given == "samples":
        samples = value
    else:  # tokens -> samples
        return value / _token_length(seq_length)
    if unit == "samples":
        return samples
    return samples * _token_length(seq_length)


def _token_length(seq_length: int | None) -> int:
    """Tokens per sample, which a length in tokens needs."""
    if seq_length is None or seq_length <= 0:
        raise ScheduleError("token lengths need a positive seq_length")
    return seq_length


def resolve_lengths(
    lengths: Mapping[str, tuple[float, str] | None],
    *,
    global_batch_size: int | None = None,
    seq_length: int | None = None,
    unit: str | None = None,
) -> tuple[str, dict[str, float]]:
    """Express every given length, e.g. ``{"lr_warmup": (100, "iters"), "lr_decay": (2e9, "tokens")}``, in one
    unit: tokens if any was given in tokens (the position then survives seq-length changes), else samples."""
    given = {k: v for k, v in lengths.items() if v is not None}
    if unit is None:
        unit = "tokens" if any(u == "tokens" for _, u in given.values()) else "samples"
    out = {
        k: convert_length(v, u, unit, global_batch_size=global_batch_size, seq_length=seq_length)
        for k, (v, u) in given.items()
    }
    return unit, out
