"""Exact resume for a LightningDataModule: the training data position and the training RNG stream are state.

:class:`ResumableTrainData` is mixed into mmgrow's data modules
(:class:`~mmgrow.data.datamodule.MMDataModule`, :class:`~mmgrow.data.media_datamodule.MediaDataModule`).
Lightning stores ``datamodule.state_dict()`` in every checkpoint and calls ``load_state_dict`` when a
run resumes (``--ckpt_path``), before the training loader is built. The state holds:

* ``sampler``: the training sampler's position: ``(epoch, consumed)`` of a
  :class:`~mmgrow.data.resumable_sampler.ResumableSampler`, or the stream position of a
  :class:`~mmgrow.data.mixture_sampler.MixtureSampler` (:meth:`ResumableTrainData.new_train_sampler` and
  :meth:`ResumableTrainData.advance_train_position` say which, and how a batch moves it).
  It is advanced from the loop side -- in :meth:`on_before_batch_transfer`, which Lightning calls for
  each batch the training loop takes, after loader workers and prefetching -- so the position is the
  batches actually trained on, never the ones a worker has prepared ahead.
* ``rng``: the global torch (CPU and CUDA), Python and NumPy RNG states of the *training stream*: what
  an objective draws from (flow-matching times and noise, condition dropout). Lightning saves none of
  them. They are restored just before the first training batch after a resume, so whatever runs in
  between (model building, loaders, a sanity check) draws nothing from the stream.

Evaluation does not draw from the training stream: the stream is set aside at the first evaluation
batch of ``fit`` and put back before the next training batch. Without that, a run resumed from a
checkpoint written before a validation that Lightning then skips would draw different noise from the
uninterrupted run. Loaders get their own generator for the same reason (a loader without one draws
its worker base seed from the global RNG at every ``iter``).

Under data parallelism every rank advances the position by the global batch (``batch_size *
num_replicas``), so all ranks hold the same position; the checkpoint stores rank 0's RNG state, which
every rank restores (exact when the ranks were seeded alike, as ``seed_everything`` does).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from mmgrow.data.resumable_sampler import ResumableSampler


def capture_rng() -> dict[str, Any]:
    """The global RNG states (torch CPU, CUDA when initialised, Python, NumPy when installed), in types
    a ``weights_only`` checkpoint load accepts."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global RNGs to ``state`` (from :func:`capture_rng`); parts this process lacks are skipped."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    numpy_state = state.get("numpy")
    if numpy_state is not None:
        import numpy as np

        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype("uint32"), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["gauss"]))


class ResumableTrainData:
    """Mixin for a LightningDataModule with ``train_set``, ``batch_size`` and ``seed``: a resumable
    shuffled training order and training RNG stream (see the module docstring).

    Use :meth:`train_sampler` as the training loader's sampler and :meth:`loader_generator` as every
    loader's ``generator``. List it before ``LightningDataModule`` in the bases.
    """

    _sampler: Any = None  # ResumableSampler, or what new_train_sampler makes
    _saved_rng: dict[str, Any] | None = None  # the training stream, while set aside (resume, evaluation)

    def train_sampler(self) -> Any:
        """The one sampler of this data module (its position survives new loaders and ``fit`` calls),
        sharded like the trainer's strategy shards data (``distributed_sampler_kwargs``)."""
        kwargs = {}
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.distributed_sampler_kwargs:
            kwargs = {k: trainer.distributed_sampler_kwargs[k] for k in ("num_replicas", "rank")}
        sampler = self._sampler
        if sampler is None or (sampler.num_replicas, sampler.rank) != (kwargs.get("num_replicas", 1),
                                                                       kwargs.get("rank", 0)):
            position = None if sampler is None else sampler.state_dict()
            sampler = self.new_train_sampler(**kwargs)
            if position is not None:
                sampler.load_state_dict(position)
            self._sampler = sampler
        return sampler

    def new_train_sampler(self, num_replicas: int = 1, rank: int = 0) -> Any:
        """A fresh training sampler at the start of the data (override for another training order; it needs
        ``num_replicas``, ``rank``, ``state_dict`` and ``load_state_dict``)."""
        return ResumableSampler(len(self.train_set), seed=self.seed, num_replicas=num_replicas, rank=rank)

    def advance_train_position(self, sampler: Any) -> None:
        """The training loop took one batch: move the sampler's position (all replicas together)."""
        sampler.advance(self.batch_size * sampler.num_replicas)

    def loader_generator(self) -> torch.Generator:
        """A loader's own generator: its worker base seed then never draws from the global RNG."""
        return torch.Generator().manual_seed(self.seed)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return batch
        if trainer.training:
            if self._saved_rng is not None:
                restore_rng(self._saved_rng)
                self._saved_rng = None
            self.advance_train_position(self.train_sampler())
        elif trainer.state.fn == "fit" and self._saved_rng is None:
            self._saved_rng = capture_rng()  # evaluation inside fit: set the training stream aside
        return batch

    def state_dict(self) -> dict[str, Any]:
        """``{"sampler": position, "rng": training RNG stream}`` (stored in every checkpoint by Lightning)."""
        state: dict[str, Any] = {"rng": self._saved_rng if self._saved_rng is not None else capture_rng()}
        if self._sampler is not None:
            state["sampler"] = self._sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sampler" in state:
            if self._sampler is None:
                self._sampler = self.new_train_sampler()
            self._sampler.load_state_dict(state["sampler"])
        if "rng" in state:
            self._saved_rng = state["rng"]
