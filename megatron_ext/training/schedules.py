"""The learning-rate scheduler: a drop-in for megatron-core's ``OptimizerParamScheduler`` (``step(increment)``,
``get_lr(group)``, ``state_dict()``, ``load_state_dict(sd)``) that follows a schedule of megatron_ext/lr_schedule.py.

Why not megatron-core's class: continual pre-training needs schedules it lacks (infinite cosine / inverse-sqrt with
a held constant LR and a final cooldown), lengths in tokens that survive batch-size and sequence-length changes,
a checkpoint that records the whole schedule (megatron-core's omits init LR and the WSD fields), and a readable
account of what a resumed run will follow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol

from megatron_ext.lr_schedule import Phase, ScheduleConfig, format_count, lr_at, phases, to_samples, wd_at

STATE_FORMAT = "megatron_ext.schedule/1"

# ---------------------------------------------------------------------------------------------------------------
# The scheduler object


class _HasParamGroups(Protocol):
    param_groups: list[dict[str, Any]]


class ParamScheduler:
    """Sets ``lr`` and ``weight_decay`` on every param group from a :class:`ScheduleConfig` at the current position.

    Per group, as megatron-core 0.16: ``max_lr``/``min_lr``/``start_wd``/``end_wd`` keys override the schedule's,
    ``weight_decay`` is multiplied by ``wd_mult``. Unlike megatron-core 0.16 (which ignores it), ``lr_mult`` is
    applied too. A group whose ``max_lr``/``min_lr`` equals the value the scheduler was built with (megatron-core
    copies the optimizer's lr into every group) follows the schedule's current value instead, so a schedule
    restored from a checkpoint really takes effect; groups with their own value (decoupled LR) keep it.
    """

    def __init__(self, optimizer: _HasParamGroups, config: ScheduleConfig, *, position: float = 0) -> None:
        self.optimizer = optimizer
        self.config = config
        self.position = float(position)
        """Where the run is, in ``config.unit``."""
        self.num_steps = 0
        """Samples stepped through (megatron-core's name; equals ``position`` for sample-based schedules)."""
        self._built_with = (config.lr, config.min_lr)
        self.step(0)

    def _advance(self, samples: float) -> float:
        # A schedule in tokens has its seq_length (ScheduleConfig._validate).
        return samples * self.config.seq_length if self.config.unit == "tokens" else samples  # type: ignore[operator]

    def get_lr(self, param_group: Mapping[str, Any] | None = None) -> float:
        """The LR for ``param_group`` (the schedule's own value when None) at the current position."""
        g = param_group or {}
        mx, mn = g.get("max_lr"), g.get("min_lr")
        lr = lr_at(
            self.config,
            self.position,
            max_lr=None if mx is None or mx == self._built_with[0] else mx,
            min_lr=None if mn is None or mn == self._built_with[1] else mn,
        )
        return lr * g.get("lr_mult", 1.0)

    def get_wd(self, param_group: Mapping[str, Any] | None = None) -> float:
        """Weight decay before ``wd_mult`` for ``param_group`` at the current position."""
        g = param_group or {}
        return wd_at(self.config, self.position, start_wd=g.get("start_wd"), end_wd=g.get("end_wd"))

    def step(self, increment: int) -> None:
        """Advance by ``increment`` samples (the global batch size per iteration) and set every group's LR/WD."""
        self.num_steps += increment
        self.position += self._advance(increment)
        for g in self.optimizer.param_groups:
            g["lr"] = self.get_lr(g)
            g["weight_decay"] = self.get_wd(g) * g.get("wd_mult", 1.0)

    def state_dict(self) -> dict[str, Any]:
        """The whole config plus the position (megatron-core's state lacks init LR and the WSD fields)."""
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "position": self.position,
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], *, keep_config: bool = False) -> None:
        """Restore position and (unless ``keep_config``, i.e. the command line wins) the checkpoint's schedule.

        Also reads megatron-core's own state dict (older checkpoints): its fields replace ours, the rest (init LR,
        WSD settings) keep the current values. Unlike megatron-core, the position is set, not added to.
        """
        loaded, samples = self.saved_config(state_dict), int(state_dict.get("num_steps", 0))
        # megatron-core's state has no position of its own: it counts samples.
        position = float(state_dict["position"]) if "config" in state_dict else float(samples)
        if keep_config:
            position = self._position_in_current_unit(loaded, position, samples)
        else:
            self.config = loaded
        self.position = position
        self.num_steps = samples
        self.step(0)

    def saved_config(self, state_dict: Mapping[str, Any]) -> ScheduleConfig:
        """The schedule a checkpoint's scheduler state describes (for :meth:`ScheduleConfig.diff` on resume)."""
        if "config" in state_dict:
            return ScheduleConfig.from_dict(state_dict["config"])
        sd = state_dict

        def first(*keys: str) -> Any:
            return next(sd[k] for k in keys if k in sd)

        legacy: dict[str, Any] = {
            "unit": "samples",
            "lr": float(first("max_lr", "start_lr")),
            "min_lr": float(sd["min_lr"]),
            "lr_warmup": first("lr_warmup_steps", "warmup_steps", "warmup_iter"),
            "lr_decay": first("lr_decay_steps", "decay_steps", "end_iter"),
            "lr_decay_style": first("lr_decay_style", "decay_style"),
        }
        if "start_wd" in sd:
            legacy |= {
                "start_weight_decay": float(sd["start_wd"]),
                "end_weight_decay": float(sd["end_wd"]),
                "weight_decay_incr_style": sd["wd_incr_style"],
                "wd_incr": sd["wd_incr_steps"],
            }
        return replace(self.config, **legacy)

    def _position_in_current_unit(self, loaded: ScheduleConfig, position: float, samples: int) -> float:
        if loaded.unit == self.config.unit:
            return position
        if self.config.unit == "samples":
            return float(samples)
        seq = loaded.seq_length or self.config.seq_length
        return float(samples) * seq  # type: ignore[operator]  # our schedule is in tokens: it has its seq_length

    def phase(self) -> Phase:
        """The phase the current position is in."""
        ps = phases(self.config)
        return next((p for p in ps if p.end is None or self.position <= p.end), ps[-1])

    def describe(self) -> str:
        """The schedule plus where the run stands in it."""
        cfg = self.config
        where = f"now at samples {format_count(to_samples(cfg, self.position))}"
        if cfg.seq_length:
            where += f" (tokens {format_count(to_samples(cfg, self.position) * cfg.seq_length)})"
        return f"{cfg.describe()}\n{where}: {self.phase().name}, lr {lr_at(cfg, self.position):.4g}"
