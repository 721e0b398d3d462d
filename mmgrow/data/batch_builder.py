"""A batch key -> a ``TokenBatch``: the loader dataset of :class:`~mmgrow.data.datamodule.MMDataModule`.

The DataLoader runs with ``batch_size=None``: its sampler yields one
:class:`~mmgrow.data.mixture_sampler.BatchKey` per batch, and ``builder[key]`` -- in a loader worker when
``num_workers > 0`` -- builds every example of the key (``dataset[index]`` -> ``task.segments`` ->
``SequenceBuilder.build``) and collates them with the key's curriculum-stage settings:

* without packing: :func:`~mmgrow.data.collate.pad_collate` (one example per row) padded to the
  stage's ``length`` (None = the longest example of the batch);
* with packing: ``pack_collate`` with the packing config at the stage's ``length``: rows of exactly
  ``length`` tokens, as many as the examples need.

With a condition encoder each example carries its condition text (the task's ``condition_text``) and
the collate functions attach the encoded conditions. Evaluation keys (``stage`` None) use the
evaluation length given at construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch.utils.data import Dataset

from mmgrow.batch import TokenBatch
from mmgrow.data.collate import ConditionedSequence, ConditionEncoder, pad_collate, pad_collate_with_condition
from mmgrow.data.curriculum import CurriculumSchedule
from mmgrow.data.mixture_sampler import BatchKey
from mmgrow.data.sequence import EncodedSequence, SequenceBuilder
from mmgrow.protocols import Task


class BatchBuilder(Dataset):
    """``builder[key] -> TokenBatch`` for keys over ``sources`` (one ``(dataset, task)`` per source position).

    Args:
        datasets, tasks: per source position, the dataset of this split and the task that reads it.
        builder: the data module's :class:`~mmgrow.data.sequence.SequenceBuilder`.
        curriculum: the stages (a key's ``stage`` indexes them: its ``length``).
        eval_length: the length of evaluation keys (``stage`` None).
        packing: a ``PackingConfig`` (its ``length`` is replaced by the stage's), or None = padding.
        encoder: the condition encoder, or None.
    """

    def __init__(self, datasets: Sequence[Any], tasks: Sequence[Task], builder: SequenceBuilder,
                 curriculum: CurriculumSchedule, eval_length: int | None, packing: Any = None,
                 encoder: ConditionEncoder | None = None) -> None:
        if len(datasets) != len(tasks):
            raise ValueError(f"BatchBuilder: {len(datasets)} datasets for {len(tasks)} tasks; expected one each")
        self.datasets, self.tasks, self.builder = list(datasets), list(tasks), builder
        self.curriculum, self.eval_length, self.packing, self.encoder = curriculum, eval_length, packing, encoder

    def example(self, source: int, index: int) -> EncodedSequence | ConditionedSequence:
        """Item ``index`` of source ``source`` through its task and the builder."""
        task, sample = self.tasks[source], self.datasets[source][index]
        segments = task.segments(sample)
        sequence = self.builder.build(segments)
        if self.encoder is None:
            return sequence
        return ConditionedSequence(sequence, task.condition_text(sample, segments))

    def length(self, key: BatchKey) -> int | None:
        """The key's row length (packing length, or padded length; None = pad to the longest)."""
        return self.eval_length if key.stage is None else self.curriculum.stages[key.stage].length

    def collate(self, examples: Sequence[EncodedSequence | ConditionedSequence], length: int | None) -> TokenBatch:
        if self.packing is not None:
            from mmgrow.data.packing import pack_collate

            return pack_collate(examples, replace(self.packing, length=length), encoder=self.encoder)
        if self.encoder is not None:
            return pad_collate_with_condition(examples, self.encoder, seq_len=length)
        return pad_collate(examples, seq_len=length)

    def __getitem__(self, key: BatchKey) -> TokenBatch:
        if not isinstance(key, BatchKey):
            raise TypeError(f"BatchBuilder: expected a BatchKey from the data module's sampler, got "
                            f"{type(key).__name__}")
        return self.collate([self.example(s, i) for s, i in key.items], self.length(key))


def identity(batch: Any) -> Any:
    """The loader's collate_fn: ``BatchBuilder`` already returns a whole batch (a module-level function,
    so that it pickles into loader workers)."""
    return batch
