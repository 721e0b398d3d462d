"""A shuffling sampler that resumes at the exact batch: its position is state, not the history of an RNG.

Why not ``DataLoader(shuffle=True, generator=...)``: a resumed run builds a fresh generator, so it
replays the first epoch's order from its first batch, whatever the checkpoint's position was (Lightning
restores its batch counters but does not fast-forward a plain DataLoader).

Order: the permutation of epoch ``e`` is ``torch.randperm(n)`` drawn from a generator seeded by
``(seed, e)`` alone, so any epoch's order can be rebuilt without replaying the epochs before it.

Position: ``(epoch, consumed)``, the number of indices of epoch ``epoch``'s permutation that the
*training loop* has consumed (over all data-parallel replicas). It is advanced by :meth:`advance`,
called by whoever sees a batch being trained on (:class:`~mmgrow.data.resumable_data.ResumableTrainData`)
-- not by iteration, which runs ahead of training with loader workers and prefetching. At ``n`` it
rolls over to ``(epoch + 1, 0)``. Every :meth:`__iter__` serves the rest of the current epoch's
permutation from the position at the moment iteration starts, so a stream of Lightning epochs (even
ones cut short by ``limit_train_batches``) is one contiguous stream of permutations, and a run resumed
from :meth:`state_dict` continues that stream exactly.

Data parallelism: with ``num_replicas > 1`` rank ``r`` takes ``rest[r::num_replicas]`` of the
remaining indices (padded by wrapping around to a multiple of ``num_replicas``, as
:class:`~torch.utils.data.DistributedSampler` does) and each training step consumes
``batch_size * num_replicas`` indices. It subclasses ``DistributedSampler`` only so that Lightning
keeps it instead of wrapping it in one of its own; :meth:`set_epoch` is ignored (the position is
counted here; Lightning's epoch number can skip after a resume).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler


def stable_seed(*parts: Any) -> int:
    """A 63-bit generator seed from ``parts`` joined by ``/`` (SHA-256: the same on every run and platform)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for epoch ``epoch`` of a sampler seeded by ``seed`` (stable across runs)."""
    return stable_seed("mmgrow.sampler", seed, epoch)


class ResumableSampler(DistributedSampler):
    """Shuffled indices of ``range(num_samples)``, one permutation per epoch, resumable at any index.

    Args:
        num_samples: size of the dataset.
        seed: seeds every epoch's permutation (with the epoch number).
        num_replicas, rank: data-parallel replicas and this replica's rank (1 and 0 without).
    """

    def __init__(self, num_samples: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"ResumableSampler: num_samples must be >= 1, got {num_samples}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"ResumableSampler: rank {rank} is not in [0, {num_replicas})")
        # DistributedSampler.__init__ would query torch.distributed and wants a dataset: not needed here.
        self.num_samples_total, self.seed, self.num_replicas, self.rank = int(num_samples), int(seed), num_replicas, rank
        self.epoch = 0
        self.consumed = 0
        # DistributedSampler's public attributes, for code that inspects them (Lightning reads `shuffle`)
        self.shuffle, self.drop_last = True, False
        self.num_samples = math.ceil(self.num_samples_total / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def permutation(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s order of all indices (the same for every replica)."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_samples_total, generator=generator).tolist()

    def __len__(self) -> int:
        """Indices this replica serves in a *whole* epoch (Lightning's batches per epoch come from it)."""
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.consumed >= self.num_samples_total:  # a state loaded from elsewhere at the very end
            self.epoch, self.consumed = self.epoch + 1, 0
        rest = self.permutation(self.epoch)[self.consumed:]
        if self.num_replicas > 1:
            total = math.ceil(len(rest) / self.num_replicas) * self.num_replicas
            rest = (rest * math.ceil(total / len(rest)))[:total][self.rank::self.num_replicas]
        return iter(rest)

    def advance(self, count: int) -> None:
        """The training loop consumed ``count`` more indices (all replicas together); rolls over at the epoch end."""
        self.consumed += int(count)
        if self.consumed >= self.num_samples_total:
            self.epoch, self.consumed = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the epoch follows consumption (see the module docstring)."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "num_samples": self.num_samples_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; a state from another dataset size or seed is an error (it would
        silently serve a different order)."""
        for key, mine in (("seed", self.seed), ("num_samples", self.num_samples_total)):
            if int(state[key]) != mine:
                raise ValueError(f"ResumableSampler: the checkpoint's data position has {key}={state[key]}, this "
                                 f"run has {key}={mine}; resume with the same data settings (or start a new run)")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
