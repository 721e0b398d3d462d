"""Datasets as a plugin kind: resolution by name, a locally registered dataset feeding the data
module, conformance checks that catch broken datasets, ``mmgrow plugins`` and the run summary."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from mmgrow import registry
from mmgrow.data.datasets import dataset_class
from mmgrow.data.synthetic.shapes import ShapesDataset
from mmgrow.plugin_cli import plugins_main
from mmgrow.protocols import KINDS, Dataset, Sample
from mmgrow.testing.conformance import run_checks
from mmgrow.training.callbacks import skipped_media


class Flashes(Dataset):
    """A third-party-style dataset: 2-frame 8 x 8 videos, the first frame one of two colours."""

    name: ClassVar[str] = "flashes"
    modalities: ClassVar[tuple[str, ...]] = ("video",)

    def __init__(self, num_samples: int = 8, seed: int = 0, split: str = "train", frames: int = 2) -> None:
        super().__init__(num_samples, seed, split)
        self.frames = frames

    def __len__(self) -> int:
        return self.num_samples

    def draw(self, index: int) -> tuple[str, torch.Tensor]:
        colour = random.Random(f"flashes/{self.seed}/{self.split}/{index}").choice(["red", "blue"])
        video = torch.zeros(self.frames, 8, 8, 3, dtype=torch.uint8)
        video[0, :, :, 0 if colour == "red" else 2] = 255
        return colour, video

    def __getitem__(self, index: int) -> Sample:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"flashes index {index} out of range")
        colour, video = self.draw(index % self.num_samples)
        return Sample(media={"video": video}, text=f"a {colour} flash")


class Flaky(Flashes):
    """Not deterministic: draws from the global RNG."""

    def draw(self, index: int) -> tuple[str, torch.Tensor]:
        colour, video = super().draw(index)
        return colour, video + torch.randint(0, 2, video.shape, dtype=torch.uint8)


class Undeclared(Flashes):
    """Carries an ``audio`` entry its ``modalities`` do not declare, and never raises IndexError."""

    def __getitem__(self, index: int) -> Sample:
        sample = super().__getitem__(index % self.num_samples)
        sample.media["audio"] = torch.zeros(4)
        return sample


@pytest.fixture
def flashes():
    registry.register("datasets", "flashes", Flashes)
    yield Flashes
    registry.unregister("datasets", "flashes")


def test_datasets_are_a_kind_with_the_builtins():
    assert "datasets" in KINDS and registry.base_class("datasets") is Dataset
    assert {"shapes", "storyboards", "tones", "media_folder"} <= set(registry.available("datasets"))
    assert dataset_class("shapes") is ShapesDataset and issubclass(ShapesDataset, Dataset)
    assert ShapesDataset(num_samples=2).skipped == []
    with pytest.raises(ValueError, match=r"unknown dataset 'shapez'; known datasets: .*shapes.*did you mean 'shapes'"):
        dataset_class("shapez")


def test_a_registered_dataset_feeds_the_data_module(flashes):
    from mmgrow.data.datamodule import MMDataModule

    dm = MMDataModule(dataset="flashes", tasks=["video_to_text"], codec_args={"video": {"grid": 2}},
                      num_train=8, num_val=2, batch_size=4)
    assert isinstance(dm.train_set, Flashes) and len(dm.train_set) == 8
    batch = next(iter(dm.train_dataloader()))
    assert batch.input_ids.shape[0] == 4


def test_conformance_passes_a_good_dataset_and_names_what_is_wrong_with_bad_ones():
    assert [r.name for r in run_checks("datasets", Flashes) if not r.passed] == []
    flaky = {r.name: r for r in run_checks("datasets", Flaky)}
    assert not flaky["dataset_deterministic"].passed and "differs" in flaky["dataset_deterministic"].message
    bad = {r.name: r for r in run_checks("datasets", Undeclared)}
    assert not bad["dataset_samples"].passed and "['audio'] not in modalities" in bad["dataset_samples"].message
    assert not bad["dataset_index_range"].passed and "did not raise IndexError" in bad["dataset_index_range"].message
    not_a_dataset = run_checks("datasets", torch.utils.data.TensorDataset)
    assert [(r.name, r.passed) for r in not_a_dataset] == [("subclass", False)]


def test_plugins_cli_lists_and_checks_datasets(flashes, capsys):
    assert plugins_main(["list", "--kind", "datasets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"shapes", "media_folder", "flashes"} <= set(rows) and rows["flashes"]["status"] == "ok"
    assert plugins_main(["check", "media_folder"]) == 0
    out = capsys.readouterr().out
    assert "PASS dataset_deterministic" in out and "FAIL" not in out


def test_run_summary_reports_skipped_files():
    skipped = [{"path": "a.mp4", "reason": "empty file (0 bytes)"}]
    trainer = SimpleNamespace(datamodule=SimpleNamespace(skipped_files=lambda: skipped))
    assert skipped_media(trainer) == {"data": {"skipped": skipped, "skipped_count": 1}}
    assert skipped_media(SimpleNamespace(datamodule=object())) == {}
