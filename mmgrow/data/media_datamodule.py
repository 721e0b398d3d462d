"""Raw media batches for training learned codecs: a dataset's ``sample.media[modality]``, stacked.

A codec learns from the raw signal, not from token sequences, so this data module skips tasks and
codecs altogether: a batch is ``torch.stack([sample.media[modality] for sample in samples])``, e.g.

* video: ``uint8 [B, F, H, W, 3]``;
* audio: ``float32 [B, N]`` in ``[-1, 1]``.

Datasets come by registered name (:func:`mmgrow.data.datasets.dataset_class`: ``shapes``, ``tones`` ...), built
as ``cls(num_samples=..., seed=..., split=..., **dataset_args)`` like in
:class:`~mmgrow.data.datamodule.MMDataModule`. Only training code imports this module (it imports
lightning at the top).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mmgrow.data.datasets import dataset_class
from mmgrow.data.resumable_data import ResumableTrainData


def media_item(sample: Any, modality: str) -> Tensor:
    """``sample.media[modality]`` as a tensor (numpy arrays are converted), with a named error when
    the sample has no such item."""
    media = getattr(sample, "media", None)
    if not isinstance(media, dict):
        raise TypeError(f"expected a Sample with a `media` dict, got {type(sample).__name__}")
    if modality not in media:
        raise KeyError(f"sample has media {sorted(media)} but no {modality!r}; set MediaDataModule(modality=...) "
                       f"to one of them")
    item = media[modality]
    if not isinstance(item, Tensor):
        item = torch.as_tensor(item)
    return item


def stack_media(items: Sequence[Tensor]) -> Tensor:
    """``B`` raw items of one shape -> ``[B, *shape]``; a named error when shapes or dtypes differ."""
    first = items[0]
    for i, item in enumerate(items):
        if item.shape != first.shape or item.dtype != first.dtype:
            raise ValueError(f"cannot batch raw items of different shapes/dtypes: item 0 is {tuple(first.shape)} "
                             f"{first.dtype}, item {i} is {tuple(item.shape)} {item.dtype}; expected one shape per "
                             "dataset (fix the dataset_args)")
    return torch.stack(list(items))


class MediaItems(Dataset):
    """``dataset[i].media[modality]``: the raw item of one modality of each sample."""

    def __init__(self, dataset: Any, modality: str) -> None:
        self.dataset, self.modality = dataset, modality

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        return media_item(self.dataset[index], self.modality)


class MediaDataModule(ResumableTrainData, pl.LightningDataModule):
    """Embedded dataset -> batches of raw items of one modality (for :class:`~mmgrow.training.codec_module.CodecModule`).

    Args:
        modality: which ``sample.media`` entry to serve (``"video"``, ``"audio"`` ...).
        dataset: a registered dataset name (``mmgrow plugins list --kind datasets``).
        dataset_args: extra keyword arguments of the dataset class (``{"frames": 4, "size": 32}`` ...).
        num_train, num_val: samples in the ``"train"`` and ``"val"`` splits.
        batch_size, num_workers: DataLoader settings.
        seed: seeds the dataset splits and the training shuffle order (same seed, same batches).

    Resumable like :class:`~mmgrow.data.datamodule.MMDataModule`
    (:class:`~mmgrow.data.resumable_data.ResumableTrainData`).
    """

    def __init__(
        self,
        modality: str = "video",
        dataset: str = "shapes",
        dataset_args: dict | None = None,
        num_train: int = 2048,
        num_val: int = 64,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        dataset_class(dataset)  # an unknown name: ValueError listing the registered datasets
        for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("batch_size", batch_size, 1),
                                 ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"MediaDataModule: {name} must be an int >= {low}, got {value!r}")
        self.modality, self.batch_size, self.num_workers, self.seed = modality, batch_size, num_workers, seed
        cls, args = dataset_class(dataset), dict(dataset_args or {})
        self.train_set = cls(num_samples=num_train, seed=seed, split="train", **args)
        self.val_set = cls(num_samples=num_val, seed=seed, split="val", **args)
        # Fail at construction, not in the first training step, when the dataset lacks the modality.
        media_item(self.train_set[0], modality)

    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        return DataLoader(MediaItems(dataset, self.modality), batch_size=self.batch_size,
                          sampler=self.train_sampler() if shuffle else None, generator=self.loader_generator(), num_workers=self.num_workers, collate_fn=stack_media,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by a resumable sampler seeded by ``seed`` (same order for the same seed)."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
