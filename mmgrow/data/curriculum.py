"""Curriculum stages: a YAML list of stages, each ``until`` a step or a token count, resolved to step ranges.

A recipe declares (``data.curriculum``)::

    curriculum:
      - {until: {step: 200}, length: 512, rope_theta: 1.0e4}
      - {until: {tokens: 2000000}, length: 2048, rope_theta: 1.0e5, mixture: {t2v: 1, qa: 3}}
      - {length: 8192, rope_theta: 1.0e6, lr_scale: 0.5, batch_size: 2}   # the last stage: open-ended

Every field but ``until`` is optional and inherits from the stage before it (the first stage from the
data module's own settings): ``mixture`` (relative weights by source name; sources not named keep
theirs), ``length`` (packing length, or the padded sequence length without packing), ``batch_size``
(examples per step), ``every`` (``{extra source: cnt}``: the rate of an extra source from this stage on,
0 = none; UnIVAL adds video at ``cnt = 1`` in its second stage; extras not named keep their declared
``every``), ``rope_theta`` (the model's RoPE base, None = leave the model's), ``lr_scale``
(multiplies the optimiser's learning rate, after the scheduler; default 1), ``name`` (for logs).

Step boundaries. A stage ``until: {step: N}`` covers global steps ``[start, N)``. ``until: {tokens: N}``
counts *nominal* tokens, ``batch_size * length`` per step (LWM's "tokens per batch" convention: a
packed row is full by definition; an unpacked row counts its padded length), cumulated from step 0,
and ends at the first step at which the cumulative count reaches ``N``:
``end = start + ceil((N - tokens_at_start) / (batch_size * length))``. So every boundary is a step
number known before training starts: the data side (which batch has which size, mixture and length)
and the model side (RoPE theta, learning-rate scale) agree on it without communicating, in loader
workers and after a resume. The last stage may omit ``until`` (it runs to the end of training); every
other stage needs one, and boundaries must increase.

This module imports only the standard library (it is read by data modules, callbacks and
``mmgrow data inspect``).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mmgrow.checks import finite_number, mapping_with_keys, positive_int

STAGE_FIELDS = ("until", "name", "mixture", "every", "length", "batch_size", "rope_theta", "lr_scale")


@dataclass(frozen=True)
class Stage:
    """One resolved stage: every field filled (inherited), ``[start, end)`` in global steps
    (``end`` None = open-ended)."""

    index: int
    name: str
    start: int
    end: int | None
    mixture: dict[str, float] | None = None
    every: dict[str, int] = field(default_factory=dict)
    """Extras whose rate this stage (or an earlier one) overrides: ``{source: cnt}``, 0 = off."""
    length: int | None = None
    batch_size: int = 1
    rope_theta: float | None = None
    lr_scale: float = 1.0
    tokens_at_start: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    """The fields this stage's YAML entry set itself (for logs and ``mmgrow data inspect``)."""

    def contains(self, step: int) -> bool:
        return step >= self.start and (self.end is None or step < self.end)


def _fail(index: int, message: str) -> ValueError:
    return ValueError(f"curriculum stage {index}: {message}")


def _positive_number(index: int, name: str, value: Any) -> float:
    if isinstance(value, str):  # PyYAML reads 1.0e6 (no exponent sign) as a string
        try:
            value = float(value)
        except ValueError:
            raise _fail(index, f"{name} must be a finite number > 0, got {value!r}") from None
    return finite_number(f"curriculum stage {index}", name, value, low=0, low_open=True)


def _every(index: int, value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping) or not value:
        raise _fail(index, f"every must be a non-empty mapping extra source name -> cnt (0 = off), got {value!r}")
    out = {}
    for name, cnt in value.items():
        if isinstance(cnt, bool) or not isinstance(cnt, int) or cnt < 0:
            raise _fail(index, f"every[{name!r}] must be an int >= 0 (one item every cnt main items; 0 = none in "
                               f"this stage), got {cnt!r}")
        out[str(name)] = cnt
    return out


def _mixture(index: int, value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise _fail(index, f"mixture must be a non-empty mapping source name -> weight, got {value!r}")
    return {str(name): finite_number(f"curriculum stage {index}", f"mixture[{name!r}]", weight, low=0)
            for name, weight in value.items()}


class CurriculumSchedule:
    """Stages resolved to step ranges (module docstring).

    Args:
        stages: the YAML list (mappings with the keys of :data:`STAGE_FIELDS`).
        batch_size: the data module's batch size (inherited by the first stage).
        length: the data module's packing length / ``seq_len`` (None when neither is set; a token
            boundary then needs a stage ``length``).
        mixture: the data module's declared source weights (inherited by the first stage).

    An empty ``stages`` list is one open-ended stage with the data module's settings.
    """

    def __init__(self, stages: Sequence[Mapping[str, Any]] | None, *, batch_size: int, length: int | None = None,
                 mixture: Mapping[str, float] | None = None) -> None:
        if stages is not None and (isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence)):
            raise ValueError(f"curriculum must be a list of stages (mappings), got {type(stages).__name__}")
        raw = list(stages or [{}])
        resolved: list[Stage] = []
        current = {"mixture": dict(mixture) if mixture else None, "every": {}, "length": length,
                   "batch_size": batch_size, "rope_theta": None, "lr_scale": 1.0}
        start, tokens = 0, 0
        for i, entry in enumerate(raw):
            mapping_with_keys(f"curriculum stage {i}", entry, STAGE_FIELDS)
            settings = {k: v for k, v in entry.items() if k not in ("until", "name")}
            if "mixture" in entry:
                current["mixture"] = {**(current["mixture"] or {}), **_mixture(i, entry["mixture"])}
            if "every" in entry:
                current["every"] = {**current["every"], **_every(i, entry["every"])}
            if "length" in entry:
                current["length"] = positive_int(f"curriculum stage {i}", "length", entry["length"])
            if "batch_size" in entry:
                current["batch_size"] = positive_int(f"curriculum stage {i}", "batch_size", entry["batch_size"])
            if "rope_theta" in entry:
                current["rope_theta"] = _positive_number(i, "rope_theta", entry["rope_theta"])
            if "lr_scale" in entry:
                current["lr_scale"] = _positive_number(i, "lr_scale", entry["lr_scale"])
            end = self._end(i, entry.get("until"), start, tokens, current, last=i == len(raw) - 1)
            name = entry.get("name", f"stage{i}")
            if not isinstance(name, str) or not name:
                raise _fail(i, f"name must be a non-empty string, got {name!r}")
            resolved.append(Stage(index=i, name=name, start=start, end=end, tokens_at_start=tokens,
                                  settings=settings, **current))
            if end is not None:
                tokens += (end - start) * current["batch_size"] * (current["length"] or 0)
                start = end
        self.stages: list[Stage] = resolved
        self._starts = [s.start for s in resolved]

    @staticmethod
    def _end(i: int, until: Any, start: int, tokens: int, current: dict[str, Any], last: bool) -> int | None:
        if until is None:
            if not last:
                raise _fail(i, "only the last stage may omit `until` ({step: N} or {tokens: N})")
            return None
        if not isinstance(until, Mapping) or len(until) != 1 or next(iter(until)) not in ("step", "tokens"):
            raise _fail(i, f"until must be {{step: N}} or {{tokens: N}}, got {until!r}")
        (kind, value), = until.items()
        value = positive_int(f"curriculum stage {i}", f"until.{kind}", value)
        if kind == "step":
            end = value
        else:
            if current["length"] is None:
                raise _fail(i, "until: {tokens: N} needs a length (set the stage's `length`, the data module's "
                               "seq_len or packing length): tokens per step = batch_size * length")
            per_step = current["batch_size"] * current["length"]
            end = start + math.ceil(max(value - tokens, 0) / per_step)
        if end <= start:
            raise _fail(i, f"ends at step {end}, which is not after its start (step {start}); boundaries must "
                           "increase")
        return end

    def __len__(self) -> int:
        return len(self.stages)

    def stage_at(self, step: int) -> Stage:
        """The stage that global step ``step`` (0-based) belongs to."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"CurriculumSchedule.stage_at: step must be an int >= 0, got {step!r}")
        return self.stages[max(bisect_right(self._starts, step) - 1, 0)] if step < (self.stages[-1].end or math.inf) \
            else self.stages[-1]

    @property
    def boundaries(self) -> list[int]:
        """The steps at which a new stage begins (after the first)."""
        return self._starts[1:]

    def with_defaults(self, **defaults: Any) -> CurriculumSchedule:
        """A copy whose stages fill still-unset ``length`` / ``mixture`` from ``defaults`` (not re-resolving
        boundaries)."""
        out = object.__new__(CurriculumSchedule)
        out.stages = [replace(s, **{k: v for k, v in defaults.items() if getattr(s, k) is None}) for s in self.stages]
        out._starts = list(self._starts)
        return out

    def describe(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per stage (name, steps, settings)."""
        return [{"name": s.name, "start_step": s.start, "end_step": s.end, "batch_size": s.batch_size,
                 "length": s.length, "rope_theta": s.rope_theta, "lr_scale": s.lr_scale, "mixture": s.mixture,
                 **({"every": s.every} if s.every else {})}
                for s in self.stages]
