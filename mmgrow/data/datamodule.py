"""The LightningDataModule of mmgrow recipes: dataset -> tasks -> codecs -> padded TokenBatch.

Only training code imports this module (it imports lightning at the top). Everything in the
signature is a plain type, so LightningCLI / jsonargparse can fill it from YAML, and the attributes
the model needs (``token_space``, ``vocab``) exist right after ``__init__`` for instantiate-time links
such as ``data.vocab -> model.vocab``.

Datasets are registered plugins (kind ``datasets``, :func:`mmgrow.data.datasets.dataset_class`).

Conditioning. With a ``condition_encoder`` (e.g. a frozen
:class:`~mmgrow.tokenizers.text_encoder.FrozenTextEncoder`), every batch also carries the embeddings
of each row's caption as ``TokenBatch.condition [B, S, C]`` / ``condition_mask [B, S]``, which the
objective passes on to cross-attention through ``SeqContext``. The encoder runs in the collate
function: in the main process with the default ``num_workers=0``, in each loader worker otherwise
(each with its own copy and cache; the encoder is deterministic, so the batches are the same). It
runs on the CPU and caches per caption, so after the first epoch a batch costs a dictionary lookup
per row; the condition moves to the accelerator with the rest of the batch. A row holds one
example, so one caption conditions it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

import mmgrow
from mmgrow.batch import TokenBatch
from mmgrow.checks import int_at_least, positive_int
from mmgrow.data.collate import ConditionedSequence, ConditionEncoder, pad_collate, pad_collate_with_condition
from mmgrow.data.datasets import dataset_class
from mmgrow.data.resumable_data import ResumableTrainData
from mmgrow.data.sequence import EncodedSequence, SequenceBuilder
from mmgrow.protocols import Task

DEFAULT_CODECS: dict[str, str] = {"text": "bytes", "video": "pixels"}


class TaskSequenceDataset(Dataset):
    """``dataset[i]`` run through one task and the builder -> :class:`EncodedSequence` (or, with
    ``conditioned=True``, a :class:`~mmgrow.data.collate.ConditionedSequence` with its condition text).

    The task is chosen round-robin by index: sample ``i`` uses ``tasks[i % len(tasks)]``. This is
    deterministic, needs no state shared with loader workers, and with a shuffled sampler every
    batch mixes tasks in equal shares (the dataset draws a fresh random video for every index, so
    every task still sees every combination).

    The condition text of an example is the task's :meth:`~mmgrow.protocols.Task.condition_text`
    (by default its first ``"text"`` *input* segment; none for ``video_to_text``, whose caption is the
    answer).
    """

    def __init__(self, dataset: Any, tasks: list[Task], builder: SequenceBuilder, conditioned: bool = False) -> None:
        self.dataset, self.tasks, self.builder, self.conditioned = dataset, tasks, builder, conditioned

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> EncodedSequence | ConditionedSequence:
        task = self.tasks[index % len(self.tasks)]
        sample = self.dataset[index]
        segments = task.segments(sample)
        sequence = self.builder.build(segments)
        if not self.conditioned:
            return sequence
        return ConditionedSequence(sequence, task.condition_text(sample, segments))


class MMDataModule(ResumableTrainData, pl.LightningDataModule):
    """Embedded dataset + tasks + codecs -> padded :class:`~mmgrow.batch.TokenBatch` es.

    Args:
        tasks: registered task names (``mmgrow.available("tasks")``), mixed round-robin per sample.
        codecs: ``{modality: tokenizer name}``; default ``{"text": "bytes", "video": "pixels"}``. The
            order fixes the token-space offsets and ``modality_ids``.
        codec_args: ``{modality: {kwarg: value}}`` for the codecs (e.g. ``{"video": {"grid": 4}}``).
        dataset: a registered dataset name (``mmgrow plugins list --kind datasets``).
        dataset_args: extra keyword arguments of the dataset class (e.g. ``{"frames": 4}``; for shapes
            also ``shapes``, ``colours``, ``motions``, ``captions: short | detailed`` ...).
        num_train, num_val: samples in the ``"train"`` and ``"val"`` splits; ``num_val`` also sizes
            the ``"heldout"`` split used by ``test_dataloader`` / ``predict_dataloader``.
        seq_len: pad every batch to this length (an example longer than it is an error), or None to
            pad each batch to its longest example.
        batch_size, num_workers: DataLoader settings.
        seed: seeds the dataset splits and the training shuffle order.
        condition_encoder: an object with ``latent_dim`` and ``encode(list[str]) -> (emb [B, S, C],
            mask [B, S])`` (:class:`~mmgrow.data.collate.ConditionEncoder`), e.g. ``class_path:
            mmgrow.tokenizers.text_encoder.FrozenTextEncoder``; None (default) = no conditioning.
            Its output width is :attr:`condition_dim` (link it to the model's cross-attention).

    Resumable: the training order and the training RNG stream are checkpoint state, so a run resumed
    from any checkpoint sees the batches and draws the noise of the uninterrupted run
    (:class:`~mmgrow.data.resumable_data.ResumableTrainData`).
    """

    def __init__(
        self,
        tasks: list[str] = ["text_to_video"],  # noqa: B006 - never mutated; a plain default for jsonargparse
        codecs: dict[str, str] | None = None,
        codec_args: dict[str, dict] | None = None,
        dataset: str = "shapes",
        dataset_args: dict | None = None,
        num_train: int = 2048,
        num_val: int = 64,
        seq_len: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        condition_encoder: ConditionEncoder | None = None,
    ) -> None:
        super().__init__()
        # The encoder object (possibly a whole frozen language model) stays out of the hyperparameters
        # that Lightning pickles into every checkpoint; the recipe's config.yaml records how it was built.
        self.save_hyperparameters(ignore=["condition_encoder"])
        if isinstance(tasks, str) or not tasks:
            raise ValueError(f"MMDataModule: tasks must be a non-empty list of task names, got {tasks!r}")
        dataset_class(dataset)  # an unknown name: ValueError listing the registered datasets
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"MMDataModule: seq_len must be a positive int or None, got {seq_len!r}")
        positive_int("MMDataModule", "batch_size", batch_size)
        positive_int("MMDataModule", "num_train", num_train)
        positive_int("MMDataModule", "num_val", num_val)  # also sizes the held-out split: an empty one breaks test
        int_at_least("MMDataModule", "num_workers", num_workers, 0)
        codecs = dict(DEFAULT_CODECS if codecs is None else codecs)
        codec_args = dict(codec_args or {})
        unknown = sorted(set(codec_args) - set(codecs))
        if unknown:
            raise ValueError(f"MMDataModule: codec_args given for {unknown} which have no codec; codecs: {sorted(codecs)}")

        self.codecs = {m: mmgrow.create("tokenizers", name, **codec_args.get(m, {})) for m, name in codecs.items()}
        self.builder = SequenceBuilder(self.codecs)
        self.token_space = self.builder.token_space
        self.vocab: dict[str, int] = self.token_space.to_dict()
        self.continuous: dict[str, int] = dict(self.builder.continuous)
        """``{modality: latent_dim}`` of the continuous codecs (linked into ``model.continuous``)."""
        self.tasks: list[Task] = [mmgrow.create("tasks", name) for name in tasks]
        for name, task in zip(tasks, self.tasks):
            missing = [m for m in task.modalities if m not in self.codecs]
            if missing:
                raise ValueError(f"MMDataModule: task {name!r} needs codecs for {missing}; codecs: {sorted(self.codecs)}")

        if condition_encoder is not None and not isinstance(condition_encoder, ConditionEncoder):
            raise TypeError(f"MMDataModule: condition_encoder must have latent_dim and encode(list[str]) -> "
                            f"(embeddings, mask), got {type(condition_encoder).__name__}")
        self.condition_encoder = condition_encoder
        self.condition_dim: int | None = None if condition_encoder is None else int(condition_encoder.latent_dim)

        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed
        dataset_cls, args = dataset_class(dataset), dict(dataset_args or {})
        self.train_set = dataset_cls(num_samples=num_train, seed=seed, split="train", **args)
        self.val_set = dataset_cls(num_samples=num_val, seed=seed, split="val", **args)
        # `mmgrow test` / `predict` run on the held-out combinations: never seen in train or val.
        self.test_set = dataset_cls(num_samples=num_val, seed=seed, split="heldout", **args)

    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        encoder = self.condition_encoder
        if encoder is None:
            collate = partial(pad_collate, seq_len=self.seq_len)
        else:
            collate = partial(pad_collate_with_condition, encoder=encoder, seq_len=self.seq_len)
        return DataLoader(
            TaskSequenceDataset(dataset, self.tasks, self.builder, conditioned=encoder is not None),
            batch_size=self.batch_size,
            sampler=self.train_sampler() if shuffle else None,
            generator=self.loader_generator(),
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by the data module's :class:`~mmgrow.data.resumable_sampler.ResumableSampler` (seeded by
        ``seed``): one permutation per epoch, continuing from the position of a resumed checkpoint."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The ``"heldout"`` split (``num_val`` samples): the loss on compositions never trained on."""
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def heldout_prompts(self) -> list[tuple[str, dict]]:
        """``(caption, meta)`` of the dataset's held-out combinations (never seen in train / val)."""
        prompts = getattr(self.train_set, "heldout_prompts", None)
        if prompts is None:
            raise NotImplementedError(f"dataset {self.hparams.dataset!r} declares no held-out prompts")
        return prompts()

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # TokenBatch.to moves every field in one call and re-runs its shape checks.
        if isinstance(batch, TokenBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
