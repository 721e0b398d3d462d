"""The training order of a mixture: a resumable stream of batch *keys* (which example of which source).

:class:`MixtureSampler` yields one :class:`BatchKey` per training batch; the loader's dataset
(:class:`~mmgrow.data.batch_builder.BatchBuilder`) turns a key into a ``TokenBatch`` in a loader worker.
Only keys cross the process boundary, so decoding, tokenising and collating run in the workers.

The item stream (see :mod:`mmgrow.data.mixture` for weights and extras). Batch ``k`` belongs to the
curriculum stage ``stage_at(k // accumulate)``; it takes the next ``batch_size * W`` items of the stream
(``batch_size`` of that stage, ``W`` data-parallel replicas), and rank ``r`` keeps ``items[r::W]``. An item
is ``(source, index)``:

* the source of a *main* slot is drawn with the stage's weights from ``random.Random(seed_k)``, a
  generator seeded by ``(seed, k)`` alone; after the ``j``-th main item, the extras with ``j % cnt == 0``
  are queued and fill the next slots (possibly in the next batch);
* the index is the source's next unread position: source ``s`` has a cursor ``c_s`` (items drawn so
  far) and serves ``perm(seed, s, c_s // size_s)[c_s % size_s]``, a per-source, per-pass permutation
  seeded by ``(seed, source name, pass)`` (like
  :class:`~mmgrow.data.resumable_sampler.ResumableSampler`'s epochs), so every pass over a source reads
  each of its samples once.

Position. The state before batch ``k`` is :class:`Position` ``(k, cursors, main_count, pending)``, and
batch ``k`` is a pure function of ``(seed, k, position)``: :meth:`MixtureSampler.step` computes the key
and the next position. The *loop-side* position is moved by :meth:`advance` (called by the data module
for each batch the training loop takes, after loader workers and prefetching), and every
:meth:`__iter__` starts from a copy of it; so :meth:`state_dict` is exactly the batches trained on, and a
run resumed from it continues the uninterrupted run's sequence, also in the middle of a curriculum stage.

Epochs. With a mixture "epoch" has no natural meaning; Lightning still needs one. An epoch is
``batches_per_epoch`` batches (the data module uses ``ceil(training samples / (batch_size * W))``):
epoch ``e`` covers batches ``[e * N, (e + 1) * N)``, and each ``__iter__`` serves the rest of the current
epoch. Sources keep their own passes across epochs.

It subclasses ``DistributedSampler`` only so that Lightning keeps it instead of wrapping it in one of
its own (as ``ResumableSampler`` does); :meth:`set_epoch` is ignored.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate as cumulative_sum
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from mmgrow.data.curriculum import CurriculumSchedule
from mmgrow.data.resumable_sampler import stable_seed


@dataclass(frozen=True)
class BatchKey:
    """What one rank's batch holds: ``items`` = ``(source position, dataset index)`` pairs in order.

    ``batch`` is the global batch number ``k`` and ``stage`` the curriculum stage index (None for an
    evaluation batch, which uses the data module's evaluation settings)."""

    batch: int
    stage: int | None
    items: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Position:
    """The stream state before batch ``batch`` (module docstring)."""

    batch: int
    cursors: tuple[int, ...]
    main_count: int = 0
    pending: tuple[int, ...] = ()


def _seed(*parts: Any) -> int:
    return stable_seed("mmgrow.mixture", *parts)


class MixtureSampler(DistributedSampler):
    """Batch keys of a weighted mixture with extras and curriculum stages (module docstring).

    Args:
        names: source names (checked on resume; they seed the per-source permutations).
        sizes: training samples per source.
        every: ``{source position: cnt}`` of the extras, one dict for every stage or per curriculum stage
            (a list; ``cnt = 0`` = the extra is off in that stage).
        stage_weights: per curriculum stage, one weight per source (0 for extras).
        curriculum: the stages (batch size per stage).
        batches_per_epoch: Lightning's epoch length in batches.
        seed, num_replicas, rank: as ``ResumableSampler``.
        accumulate: micro-batches per optimizer step (``trainer.accumulate_grad_batches``): batch ``k``
            belongs to step ``k // accumulate``.
    """

    def __init__(self, names: Sequence[str], sizes: Sequence[int], every: dict[int, int] | Sequence[dict[int, int]],
                 stage_weights: Sequence[Sequence[float]], curriculum: CurriculumSchedule, batches_per_epoch: int,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0, accumulate: int = 1) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"MixtureSampler: rank {rank} is not in [0, {num_replicas})")
        if len(stage_weights) != len(curriculum):
            raise ValueError(f"MixtureSampler: {len(stage_weights)} weight lists for {len(curriculum)} stages")
        if any(int(n) < 1 for n in sizes):
            raise ValueError(f"MixtureSampler: every source needs >= 1 sample, got sizes {dict(zip(names, sizes))}")
        self.names, self.sizes = list(names), [int(n) for n in sizes]
        per_stage = [every] * len(curriculum) if isinstance(every, dict) else list(every)
        if len(per_stage) != len(curriculum):
            raise ValueError(f"MixtureSampler: {len(per_stage)} extra-rate dicts for {len(curriculum)} stages")
        self.stage_every = [{s: int(cnt) for s, cnt in e.items() if cnt} for e in per_stage]
        self._cumulative = [list(cumulative_sum(float(w) for w in weights)) for weights in stage_weights]
        self.curriculum, self.batches_per_epoch = curriculum, int(batches_per_epoch)
        self.seed, self.num_replicas, self.rank, self.accumulate = int(seed), num_replicas, rank, int(accumulate)
        self.position = Position(0, (0,) * len(self.names))
        self._perms: dict[tuple[int, int], list[int]] = {}
        # DistributedSampler's public attributes, for code that inspects them (Lightning reads `shuffle`)
        self.shuffle, self.drop_last = True, False
        self.num_samples = self.total_size = self.batches_per_epoch

    # -- the stream --------------------------------------------------------------------------------------
    def _index(self, source: int, cursor: int) -> int:
        size = self.sizes[source]
        epoch = cursor // size
        perm = self._perms.get((source, epoch))
        if perm is None:
            if len(self._perms) > 4 * len(self.sizes):  # keep only recent passes
                self._perms.clear()
            generator = torch.Generator().manual_seed(_seed(self.seed, self.names[source], epoch))
            perm = self._perms[(source, epoch)] = torch.randperm(size, generator=generator).tolist()
        return perm[cursor % size]

    def step(self, position: Position) -> tuple[list[tuple[int, int]], int, Position]:
        """``(all ranks' items of batch position.batch, its stage index, the position after it)``."""
        slots, stage, after = self._draw(position)
        return [(source, self._index(source, cursor)) for source, cursor in slots], stage, after

    def _draw(self, position: Position) -> tuple[list[tuple[int, int]], int, Position]:
        """:meth:`step` with ``(source, cursor)`` slots instead of items: only random draws, so advancing the
        loop-side position never builds a permutation (the index of a slot is looked up where it is served)."""
        k = position.batch
        stage = self.curriculum.stage_at(k // self.accumulate)
        cumulative = self._cumulative[stage.index]
        rng = random.Random(_seed(self.seed, "batch", k))
        cursors, main_count, pending = list(position.cursors), position.main_count, list(position.pending)
        items = []
        for _ in range(stage.batch_size * self.num_replicas):
            if pending:
                source = pending.pop(0)
            else:
                # bisect over the cumulative weights: P(source) = w / sum(w); weight-0 sources are never hit
                source = min(bisect_right(cumulative, rng.random() * cumulative[-1]), len(cumulative) - 1)
                main_count += 1
                pending = [s for s, cnt in self.stage_every[stage.index].items() if main_count % cnt == 0]
            items.append((source, cursors[source]))
            cursors[source] += 1
        return items, stage.index, Position(k + 1, tuple(cursors), main_count, tuple(pending))

    def key(self, position: Position) -> tuple[BatchKey, Position]:
        """This rank's key of the batch at ``position`` and the position after it."""
        slots, stage, after = self._draw(position)
        items = tuple((source, self._index(source, cursor)) for source, cursor in slots[self.rank::self.num_replicas])
        return BatchKey(position.batch, stage, items), after

    # -- Sampler / DistributedSampler --------------------------------------------------------------------
    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[BatchKey]:
        start = self.position  # a copy (frozen): prefetching never moves the loop-side position
        end = (start.batch // self.batches_per_epoch + 1) * self.batches_per_epoch
        return self._keys(start, end)

    def _keys(self, position: Position, end: int) -> Iterator[BatchKey]:
        while position.batch < end:
            key, position = self.key(position)
            yield key

    def advance(self) -> None:
        """The training loop took one more batch (all replicas together)."""
        self.position = self._draw(self.position)[2]

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the position follows consumption (see the module docstring)."""

    def state_dict(self) -> dict[str, Any]:
        p = self.position
        return {"batch": p.batch, "cursors": dict(zip(self.names, p.cursors)), "main_count": p.main_count,
                "pending": [self.names[s] for s in p.pending], "seed": self.seed,
                "sizes": dict(zip(self.names, self.sizes))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; a state from other sources, sizes or seed is an error (it would silently
        serve a different order)."""
        mine = {"seed": self.seed, "sizes": dict(zip(self.names, self.sizes))}
        if "sizes" not in state or "cursors" not in state:
            raise ValueError("MixtureSampler: the checkpoint's data position is not a mixture position (it was "
                             "written by another data pipeline); resume with the same data settings")
        for key, value in mine.items():
            theirs = state[key] if key == "seed" else dict(state[key])
            if theirs != value:
                raise ValueError(f"MixtureSampler: the checkpoint's data position has {key}={theirs}, this run has "
                                 f"{key}={value}; resume with the same data settings (or start a new run)")
        index = {name: i for i, name in enumerate(self.names)}
        self.position = Position(int(state["batch"]), tuple(int(state["cursors"][n]) for n in self.names),
                                 int(state["main_count"]), tuple(index[n] for n in state["pending"]))

    def skip_to(self, batch: int) -> None:
        """Replay the stream from the current position up to batch ``batch`` (``mmgrow data inspect --step``)."""
        while self.position.batch < batch:
            self.advance()


class EvalSampler(DistributedSampler):
    """The evaluation batch keys, in order, shared by data-parallel ranks.

    Rank ``r`` of ``W`` takes ``keys[r::W]`` after padding the list to a multiple of ``W`` by wrapping
    around, as Lightning's own ``DistributedSampler`` does (every rank runs the same number of batches; a
    few batches are evaluated twice). A ``DistributedSampler`` so that Lightning keeps it.
    """

    def __init__(self, keys: Sequence[BatchKey], num_replicas: int = 1, rank: int = 0) -> None:
        if not keys:
            raise ValueError("EvalSampler: no evaluation batches (every source's evaluation split is empty)")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"EvalSampler: rank {rank} is not in [0, {num_replicas})")
        total = -(-len(keys) // num_replicas) * num_replicas
        self.keys = (list(keys) * num_replicas)[:total][rank::num_replicas]
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.shuffle, self.drop_last = False, False
        self.num_samples, self.total_size = len(self.keys), total

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[BatchKey]:
        return iter(self.keys)
