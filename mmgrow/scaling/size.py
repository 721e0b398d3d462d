"""Parameter and FLOP counts of a size preset, before anything trains.

The counts are exact, not a formula that can drift from the code: the base recipe is parsed with the
preset's overrides (``mmgrow fit`` parsing, nothing run), the model is built, and its parameters are split
by :func:`~mmgrow.training.scaling_record.split_parameters` -- the same split ``summary.json`` records, so a
sweep's planned ``N`` and the fitted runs' ``N`` are one number. FLOPs per token follow
:func:`~mmgrow.training.scaling_record.model_flops_per_token` (``6 N + 3 sum mixing_flops(S)``, ``6 N + 6 L S D``
for an all-attention model) with ``S`` the tokens per sample: the function ``summary.json`` uses, so plan and
runs agree (``flops_per_token_partial`` when a mixer's count is unknown).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class SizeCounts:
    non_embedding: int
    embedding: int
    dim: int | None
    depth: int | None
    flops_per_token: float
    flops_per_token_partial: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_parsed(base: str | Path, overrides: list[str]):
    """The LightningCLI of ``mmgrow fit --config base <overrides>``, instantiated but not run."""
    from mmgrow.training.cli import build_cli

    with tempfile.TemporaryDirectory() as tmp:
        return build_cli(["--config", str(base), *overrides, "--trainer.default_root_dir", tmp,
                          "--trainer.logger", "false"], run=False)


def measure_size(cli: Any, tokens_per_sample: int) -> SizeCounts:
    """Counts of the model a parsed CLI (:func:`build_parsed`) describes."""
    from mmgrow.training.scaling_record import model_flops_per_token, split_parameters

    module = cli.model
    if getattr(module, "model", None) is None and callable(getattr(module, "configure_model", None)):
        module.configure_model()
    non_embedding, embedding = split_parameters(module.model)
    hp = module.hparams
    dim, depth = hp.get("dim"), hp.get("depth")
    count = model_flops_per_token(module.model, non_embedding, tokens_per_sample)
    return SizeCounts(non_embedding, embedding, dim, depth, count.per_token, count.partial)


def measure_tokens_per_sample(cli: Any) -> int:
    """Non-padding tokens per training example of the recipe's data (its first training batch); a ValueError when
    rows differ in length (then the grid must give ``tokens_per_sample``)."""
    dm = cli.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    rows = batch.input_ids.shape[0]
    counts = (batch.segment_ids >= 0).sum(dim=1).tolist()  # non-padding tokens per row
    total = sum(counts)
    if len(set(counts)) > 1:
        raise ValueError("the recipe's training rows differ in length, so a batch size in tokens is not a whole "
                         "number of samples; give tokens_per_sample in the grid")
    return total // rows
