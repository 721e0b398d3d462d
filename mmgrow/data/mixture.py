"""Data mixtures: sources, their sampling weights (explicit or temperature-balanced) and UnIVAL "every" extras.

A *source* is one dataset read through one task (``data.sources`` in a recipe)::

    sources:
      - {name: t2v, dataset: shapes, task: text_to_video, weight: 3}
      - {name: cap, dataset: shapes, task: video_to_text}                 # weight from the temperature
      - {name: qa,  dataset: shapes, task: video_qa, every: 4}            # one extra item every 4
      - {name: col, dataset: shapes, task: video_qa, task_args: {kinds: [colour]}, weight: 1}  # task arguments
    mixture: {temperature: 2.0}

**Main sources** (no ``every``) are drawn at random, source ``k`` with probability
``p_k = w_k / sum_j w_j``. A weight is the source's ``weight``, else (with ``mixture: {temperature: T}``)
the size-balanced weight ``w_k = n_T * size_k^(1/T) / sum_{j in T} size_j^(1/T)`` where ``T`` is the set
of main sources without an explicit weight and ``n_T = |T|`` (so if no source has a weight,
``p_k ∝ size_k^(1/T)``: ``T = 1`` samples in proportion to size, large ``T`` uniformly; and sources without
a weight together weigh as much as ``n_T`` sources of weight 1), else 1. ``size_k`` is the number of
training samples of the source's dataset.

**Extras** (``every: cnt_k``, UnIVAL's balancing of small tasks): after the ``j``-th main item
(``j = 1, 2, ...``), one item of source ``k`` follows whenever ``j % cnt_k == 0``. Over ``K`` main items
there are exactly ``floor(K / cnt_k)`` extras of ``k``, so the expected share of the stream is
``share_k = (1 / cnt_k) / (1 + sum_j 1 / cnt_j)`` for an extra and ``p_k / (1 + sum_j 1 / cnt_j)``
for a main source (:func:`expected_shares`).

This module is pure Python (no torch): it is read by the data module, the sampler and
``mmgrow data inspect``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmgrow.checks import finite_number, mapping_with_keys, positive_int

SOURCE_FIELDS = ("name", "dataset", "dataset_args", "task", "task_args", "weight", "every", "num_train", "num_val")
MIXTURE_FIELDS = ("temperature",)


@dataclass(frozen=True)
class SourceSpec:
    """One validated ``sources`` entry (``weight`` None = not given; ``every`` None = a main source)."""

    name: str
    dataset: str
    task: str
    dataset_args: dict[str, Any] = field(default_factory=dict)
    task_args: dict[str, Any] = field(default_factory=dict)
    weight: float | None = None
    every: int | None = None
    num_train: int | None = None
    num_val: int | None = None

    @property
    def is_extra(self) -> bool:
        return self.every is not None


def _fail(i: int, message: str) -> ValueError:
    return ValueError(f"data.sources[{i}]: {message}")


def parse_sources(entries: Sequence[Mapping[str, Any]], default_dataset: str) -> list[SourceSpec]:
    """Validate the YAML ``sources`` list -> :class:`SourceSpec` s (``name`` defaults to the task's name;
    ``dataset`` to the data module's ``dataset``). Names must be unique and at least one source must be a
    main source (without ``every``)."""
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence) or not entries:
        raise ValueError(f"data.sources must be a non-empty list of mappings with keys among {list(SOURCE_FIELDS)}, "
                         f"got {entries!r}")
    specs: list[SourceSpec] = []
    for i, entry in enumerate(entries):
        mapping_with_keys(f"data.sources[{i}]", entry, SOURCE_FIELDS)
        task = entry.get("task")
        if not isinstance(task, str) or not task:
            raise _fail(i, f"needs a task name (`task: text_to_video` ...), got {task!r}")
        name = entry.get("name", task)
        dataset = entry.get("dataset", default_dataset)
        for key, value in (("name", name), ("dataset", dataset)):
            if not isinstance(value, str) or not value:
                raise _fail(i, f"{key} must be a non-empty string, got {value!r}")
        args = entry.get("dataset_args") or {}
        task_args = entry.get("task_args") or {}
        for key, value in (("dataset_args", args), ("task_args", task_args)):
            if not isinstance(value, Mapping):
                raise _fail(i, f"{key} must be a mapping, got {value!r}")
        if "weight" in entry and "every" in entry:
            raise _fail(i, "give either weight (a main source) or every (an extra), not both")
        weight = entry.get("weight")
        if weight is not None:
            weight = finite_number(f"data.sources[{i}]", "weight", weight, low=0)
        ints = {key: None if entry.get(key) is None else positive_int(f"data.sources[{i}]", key, entry[key])
                for key in ("every", "num_train", "num_val")}
        specs.append(SourceSpec(name=name, dataset=dataset, task=task, dataset_args=dict(args),
                                task_args=dict(task_args), weight=weight, **ints))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"data.sources: names {duplicates} are used twice; give each source a unique `name`")
    if all(s.is_extra for s in specs):
        raise ValueError("data.sources: every source has `every`; at least one main source (with a weight or "
                         "none) is needed to count items against")
    return specs


def parse_mixture(mixture: Mapping[str, Any] | None) -> float | None:
    """The ``mixture`` mapping -> its temperature (None when not given)."""
    if mixture is None:
        return None
    if not isinstance(mixture, Mapping):
        raise TypeError(f"data.mixture must be a mapping such as {{temperature: 2.0}}, got {mixture!r}")
    unknown = sorted(set(mixture) - set(MIXTURE_FIELDS))
    if unknown:
        raise ValueError(f"data.mixture: unknown keys {unknown}; expected keys among {list(MIXTURE_FIELDS)}")
    temperature = mixture.get("temperature")
    if temperature is None:
        return None
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"data.mixture.temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def main_weights(specs: Sequence[SourceSpec], sizes: Mapping[str, int], temperature: float | None) -> dict[str, float]:
    """``{name: w_k}`` of the main sources (module docstring: explicit, temperature-balanced, or 1)."""
    main = [s for s in specs if not s.is_extra]
    free = [s for s in main if s.weight is None]
    weights = {s.name: s.weight for s in main if s.weight is not None}
    if temperature is None:
        weights.update({s.name: 1.0 for s in free})
    elif free:
        scaled = {s.name: float(sizes[s.name]) ** (1.0 / temperature) for s in free}
        total = sum(scaled.values())
        weights.update({name: len(free) * value / total for name, value in scaled.items()})
    out = {s.name: weights[s.name] for s in main}  # declaration order
    if not sum(out.values()) > 0:
        raise ValueError(f"data.sources: the main sources' weights {out} sum to 0; at least one must be > 0")
    return out


def check_stage_weights(weights: Mapping[str, float], main: Sequence[str], where: str) -> None:
    """A stage's mixture names only main sources and keeps a positive total."""
    unknown = sorted(set(weights) - set(main))
    if unknown:
        raise ValueError(f"{where}: mixture names {unknown}, which are not main sources; main sources: "
                         f"{list(main)} (sources with `every` keep their rate)")
    if not sum(weights.get(n, 0.0) for n in main) > 0:
        raise ValueError(f"{where}: the mixture {dict(weights)} gives every main source weight 0")


def expected_shares(weights: Mapping[str, float], every: Mapping[str, int]) -> dict[str, float]:
    """Expected share of the item stream per source: ``p_k / (1 + E)`` for a main source (``p`` = the
    normalised ``weights``) and ``(1 / cnt_k) / (1 + E)`` for an extra, ``E = sum_j 1 / cnt_j``."""
    total = sum(weights.values())
    extra = sum(1.0 / cnt for cnt in every.values())
    shares = {name: w / total / (1.0 + extra) for name, w in weights.items()}
    shares.update({name: (1.0 / cnt) / (1.0 + extra) for name, cnt in every.items()})
    return shares
