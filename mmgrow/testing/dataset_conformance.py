"""Conformance checks of the ``datasets`` plugin kind (run by ``mmgrow plugins check NAME``).

Each dataset is built small, ``cls(num_samples=N, seed=0, split=s, **cls.conformance_kwargs())``
(the classmethod is optional; a folder dataset uses it to point at a fixture folder), once per
split in :data:`~mmgrow.protocols.DATASET_SPLITS`, and checked:

1. ``dataset_contract``: a non-empty ``name`` and string ``modalities``;
2. ``dataset_builds_every_split``: every split builds, ``0 <= len(ds) <= N`` and ``train`` is not
   empty; ``skipped`` is a list of ``{"path": str, "reason": str}``;
3. ``dataset_samples``: every item is a :class:`~mmgrow.protocols.Sample` whose media keys are among
   the declared ``modalities`` and whose text is a str;
4. ``dataset_deterministic``: the same index twice, and from a second instance with the same
   ``(seed, split)``, gives equal samples (media tensors bit-equal);
5. ``dataset_index_range``: ``ds[len(ds)]`` and ``ds[-len(ds) - 1]`` raise ``IndexError``.

Each check is a no-argument callable raising ``AssertionError`` with a message naming what differs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmgrow.protocols import DATASET_SPLITS, Sample

Check = tuple[str, Callable[[], None]]

NUM_SAMPLES = 6
"""Samples asked of every split: enough to see several items, few enough to decode quickly."""


def build(cls: type, split: str = "train", num_samples: int = NUM_SAMPLES) -> Any:
    """``cls`` built small for the checks (``conformance_kwargs()`` when the class defines it)."""
    extra = cls.conformance_kwargs() if hasattr(cls, "conformance_kwargs") else {}
    return cls(num_samples=num_samples, seed=0, split=split, **extra)


def same_sample(a: Sample, b: Sample) -> str | None:
    """None when ``a`` and ``b`` are equal (tensors bit-equal), else what differs."""
    if a.text != b.text:
        return f"text {a.text!r:.80} != {b.text!r:.80}"
    if set(a.media) != set(b.media):
        return f"media keys {sorted(a.media)} != {sorted(b.media)}"
    for key, x in a.media.items():
        y = b.media[key]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                return f"media[{key!r}] differs ({tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype})"
        elif x != y:
            return f"media[{key!r}] differs"
    if a.meta != b.meta:
        return f"meta {a.meta!r:.80} != {b.meta!r:.80}"
    return None


def dataset_checks(cls: type) -> list[Check]:
    """The checks above for dataset class ``cls``."""

    def contract() -> None:
        assert isinstance(cls.name, str) and cls.name, f"a dataset needs a non-empty class attribute name, got {cls.name!r}"
        mods = cls.modalities
        assert not isinstance(mods, str) and mods and all(isinstance(m, str) and m for m in mods), \
            f"modalities must be a non-empty sequence of media keys, got {mods!r}"

    def builds_every_split() -> None:
        for split in DATASET_SPLITS:
            ds = build(cls, split)
            n = len(ds)
            assert isinstance(n, int) and 0 <= n <= NUM_SAMPLES, \
                f"split {split!r}: len(ds) = {n!r}, expected an int in [0, num_samples={NUM_SAMPLES}]"
            if split == "train":
                assert n > 0, "split 'train' is empty"
            assert isinstance(ds.skipped, list), f"skipped must be a list, got {type(ds.skipped).__name__}"
            for row in ds.skipped:
                assert isinstance(row, dict) and isinstance(row.get("path"), str) and isinstance(row.get("reason"), str), \
                    f"split {split!r}: skipped entries must be {{'path': str, 'reason': str}}, got {row!r}"

    def samples() -> None:
        for split in DATASET_SPLITS:
            ds = build(cls, split)
            for i in range(len(ds)):
                s = ds[i]
                assert isinstance(s, Sample), f"split {split!r}: ds[{i}] is a {type(s).__name__}, expected Sample"
                extra = set(s.media) - set(cls.modalities)
                assert not extra, f"split {split!r}: ds[{i}] carries media {sorted(extra)} not in modalities " \
                                  f"{list(cls.modalities)}"
                assert isinstance(s.text, str), f"split {split!r}: ds[{i}].text is a {type(s.text).__name__}"

    def deterministic() -> None:
        for split in DATASET_SPLITS:
            first, second = build(cls, split), build(cls, split)
            for i in range(len(first)):
                for what, other in (("the same index twice", first[i]), ("a second instance", second[i])):
                    diff = same_sample(first[i], other)
                    assert diff is None, f"split {split!r}: ds[{i}] differs from {what}: {diff}"

    def index_range() -> None:
        ds = build(cls, "train")
        for bad in (len(ds), -len(ds) - 1):
            try:
                ds[bad]
            except IndexError:
                continue
            raise AssertionError(f"ds[{bad}] with len(ds) = {len(ds)} did not raise IndexError")

    return [("dataset_contract", contract), ("dataset_builds_every_split", builds_every_split),
            ("dataset_samples", samples), ("dataset_deterministic", deterministic),
            ("dataset_index_range", index_range)]
