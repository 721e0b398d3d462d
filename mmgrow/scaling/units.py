"""Units stored beside every scaling law's constants.

A law's constants only mean something together with the units of its inputs: the video-DiT hyperparameter
laws take N and T in *billions* and give B in *tokens*; Chinchilla takes raw counts. Mixing them silently
changes answers by orders of magnitude, so every law carries a :class:`Units` and refuses to be combined
with a law or a table measured differently (:class:`UnitMismatchError`).

Conventions
-----------
* ``params``: ``"non_embedding"`` (Kaplan's N, no token/position embeddings) or ``"total"``.
* ``params_scale`` / ``tokens_scale`` / ``flops_scale``: the law's N, T, C are counted in units of this many
  parameters / tokens / FLOPs (1.0 raw, 1e9 billions). Laws are always *called* with raw counts and divide
  by these scales themselves.
* ``batch``: ``"tokens"`` (tokens per optimiser step), the only supported batch unit.
* ``flops``: ``"6NT"``: C = 6 N T with N and T in raw units (the Kaplan / Chinchilla convention), or
  ``"video_dit_c_token"`` (the video-DiT paper's own count, used by its N_opt(C) presets only).
* ``lr_schedule``: schedule of the runs a law was fitted on; hyperparameter laws hold for that schedule only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

PARAMS_KINDS = ("non_embedding", "total")
BATCH_KINDS = ("tokens",)
# "6NT": C = 6 N T (Kaplan, Chinchilla; what mmgrow's allocation uses). "video_dit_c_token": the video-DiT
# paper's C = C_token T with C_token = 3/4 N (7 + n_ctx / d) as transcribed (unverified); only for its presets.
FLOPS_CONVENTIONS = ("6NT", "video_dit_c_token")

# Fields that change the meaning of a law's numbers; lr_schedule is provenance, not a unit.
_COMPARED = ("params", "params_scale", "tokens_scale", "batch", "flops", "flops_scale")


class UnitMismatchError(ValueError):
    """Two things measured in different units were combined (e.g. a law in billions fed raw counts)."""


@dataclass(frozen=True)
class Units:
    """How the numbers a law consumes and produces are measured (see the module docstring)."""

    params: str = "non_embedding"
    params_scale: float = 1.0
    tokens_scale: float = 1.0
    batch: str = "tokens"
    flops: str = "6NT"
    flops_scale: float = 1.0
    lr_schedule: str = "unknown"

    def __post_init__(self) -> None:
        if self.params not in PARAMS_KINDS:
            raise ValueError(f"Units.params={self.params!r}: expected one of {PARAMS_KINDS}")
        if self.batch not in BATCH_KINDS:
            raise ValueError(f"Units.batch={self.batch!r}: expected one of {BATCH_KINDS}")
        if self.flops not in FLOPS_CONVENTIONS:
            raise ValueError(f"Units.flops={self.flops!r}: expected one of {FLOPS_CONVENTIONS}")
        for name in ("params_scale", "tokens_scale", "flops_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"Units.{name}={value!r}: expected a positive finite number")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.lr_schedule, str) or not self.lr_schedule:
            raise ValueError(f"Units.lr_schedule={self.lr_schedule!r}: expected a non-empty string "
                             "('constant', 'cosine', 'unknown', ...)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Units:
        """Inverse of :meth:`to_dict`; unknown keys or bad values -> ValueError naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"units: expected a mapping, got {type(d).__name__}")  # noqa: TRY004 (file content)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"units: unknown keys {unknown}; expected some of {known}")
        return cls(**d)

    def check_compatible(self, other: Units, what: str) -> None:
        """Raise UnitMismatchError naming the differing fields (params, scales, batch, flops) and ``what``.

        ``lr_schedule`` is not compared: it is recorded provenance (a warning matter for callers)."""
        diff = [f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}"
                for name in _COMPARED if getattr(self, name) != getattr(other, name)]
        if diff:
            raise UnitMismatchError(f"{what}: units differ ({'; '.join(diff)}); convert to the same units first")
