"""The grid of a scaling sweep (``grid.yaml``): model sizes x learning rates x batch sizes x token budgets.

.. code-block:: yaml

    sizes:                      # preset name -> overrides of the base recipe (dotted keys)
      d32: {model.dim: 32, model.depth: 2, model.mixer.init_args.num_heads: 2}
      d64: {model.dim: 64, model.depth: 4, model.mixer.init_args.num_heads: 4}
    lr: [5.0e-4, 1.0e-3, 2.0e-3]           # model.lr (peak)
    batch_size: [256, 512, 1024]           # TOKENS per optimiser step (-> data.batch_size samples)
    tokens: [65536, 131072, 262144]        # training budgets in tokens
    seeds: [0]                             # seed_everything (default [0])
    tokens_per_sample: 64                  # optional: measured from the recipe's data when absent
    share_budgets: auto                    # auto | true | false (see below)
    set: {model.min_lr_ratio: 1.0, trainer.callbacks: []}   # applied to every run

``share_budgets``: with a constant learning rate after warm-up (``model.min_lr_ratio: 1.0``, the video-DiT
paper's setting) the validation loss after ``T`` tokens of a longer run *is* the loss of a ``T``-token run
(same data order, same updates), so one run per (size, lr, batch, seed) is validated at every budget.
With a decaying schedule each budget needs its own run (its decay ends at its own budget). ``auto`` shares
exactly when the schedule is constant; ``true`` with a decaying schedule is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmgrow.checks import read_yaml

GRID_KEYS = ("sizes", "lr", "batch_size", "tokens", "seeds", "tokens_per_sample", "share_budgets", "set")


@dataclass
class SweepGrid:
    sizes: dict[str, dict[str, Any]]
    lr: list[float]
    batch_size: list[int]
    tokens: list[int]
    seeds: list[int] = field(default_factory=lambda: [0])
    tokens_per_sample: int | None = None
    share_budgets: str | bool = "auto"
    set: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> SweepGrid:
        return cls.from_dict(read_yaml(path, "sweep grid"), str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "grid") -> SweepGrid:
        if not isinstance(data, dict):
            raise TypeError(f"{source}: a sweep grid is a mapping with keys {', '.join(GRID_KEYS)}, "
                             f"got {type(data).__name__}")
        unknown = sorted(set(data) - set(GRID_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown grid key(s) {unknown}; expected some of {list(GRID_KEYS)}")
        missing = [k for k in ("sizes", "lr", "batch_size", "tokens") if k not in data]
        if missing:
            raise ValueError(f"{source}: missing grid key(s) {missing} (a sweep needs sizes, lr, batch_size "
                             "in tokens per step, and tokens budgets)")
        sizes = data["sizes"]
        if not isinstance(sizes, dict) or not sizes:
            raise ValueError(f"{source}: 'sizes' must map preset names to overrides, e.g. "
                             "{d32: {model.dim: 32, model.depth: 2}}")
        for name, overrides in sizes.items():
            if not isinstance(overrides, dict) or not overrides:
                raise ValueError(f"{source}: size {name!r} must be a non-empty mapping of dotted keys "
                                 f"(e.g. model.dim: 64), got {overrides!r}")
            if not _safe_name(str(name)):
                raise ValueError(f"{source}: size name {name!r} must be letters, digits, '-', '_' or '.'")
        share = data.get("share_budgets", "auto")
        if share not in ("auto", True, False):
            raise ValueError(f"{source}: share_budgets must be auto, true or false, got {share!r}")
        extra = data.get("set") or {}
        if not isinstance(extra, dict):
            raise TypeError(f"{source}: 'set' must be a mapping of dotted keys to values, got {extra!r}")
        for name, overrides in sizes.items():
            both = sorted(set(overrides) & set(extra))
            if both:
                raise ValueError(f"{source}: size {name!r} and 'set' both give {', '.join(both)}; a key belongs to "
                                 "the sizes (what varies) or to set (what every run shares), not both")
        tps = data.get("tokens_per_sample")
        return cls(
            sizes={str(k): dict(v) for k, v in sizes.items()},
            lr=_numbers(source, "lr", data["lr"], float),
            batch_size=_numbers(source, "batch_size", data["batch_size"], int),
            tokens=sorted(_numbers(source, "tokens", data["tokens"], int)),
            seeds=_numbers(source, "seeds", data.get("seeds", [0]), int, allow_zero=True),
            tokens_per_sample=None if tps is None else _numbers(source, "tokens_per_sample", [tps], int)[0],
            share_budgets=share,
            set=dict(extra),
        )


def _safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")


def _numbers(source: str, key: str, values: Any, kind: type, allow_zero: bool = False) -> list:
    if not isinstance(values, list) or not values:
        raise ValueError(f"{source}: {key!r} must be a non-empty list, got {values!r}")
    out = []
    for v in values:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if ok and kind is int:
            ok = float(v).is_integer()
        if not ok or v < 0 or (v == 0 and not allow_zero):
            what = "non-negative integers" if allow_zero else ("positive integers" if kind is int else "positive numbers")
            raise ValueError(f"{source}: {key!r} must hold {what}, got {v!r}")
        out.append(kind(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{source}: {key!r} lists a value twice: {values!r}")
    return out
