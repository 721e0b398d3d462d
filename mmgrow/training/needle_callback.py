"""``NeedleEvaluation``: needle-retrieval accuracy at the end of ``fit`` (what ``mmgrow evaluate needle`` does).

Add it to a recipe so a long-context run ends with its accuracy grid::

    trainer:
      callbacks:
        - class_path: mmgrow.training.needle_callback.NeedleEvaluation
          init_args: {lengths: [512, 2048, 8192], depths: [0, 0.5, 1], samples: 8}

On global rank 0 it scores the trained model with the data module's codecs and the run's objective
(:func:`mmgrow.evaluation.needle.evaluate_needle`) and writes ``needle.json`` and ``needle.png`` into
``<run>/eval/needle-<n>/``, logging each cell's accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning.pytorch as pl

from mmgrow.checks import finite_number, positive_int
from mmgrow.training.rank_zero import model_on_rank_zero

log = logging.getLogger(__name__)


class NeedleEvaluation(pl.Callback):
    """Needle retrieval after training (module docstring).

    Args:
        lengths: context lengths in tokens of the run's codecs (haystack + question).
        depths: needle depths in ``[0, 1]``.
        samples: examples per (length, depth) cell.
        kind: ``"text"`` or ``"video"`` haystacks.
        seed: seeds the needle examples.
    """

    def __init__(self, lengths: Sequence[int] = (256, 1024), depths: Sequence[float] = (0.0, 0.5, 1.0),
                 samples: int = 4, kind: str = "text", seed: int = 0) -> None:
        if isinstance(lengths, (int, str)) or not lengths or isinstance(depths, (int, float, str)) or not depths:
            raise ValueError(f"NeedleEvaluation: lengths and depths must be non-empty lists, got {lengths!r} and "
                             f"{depths!r}")
        self.lengths = [positive_int("NeedleEvaluation", "lengths", v) for v in lengths]
        self.depths = [finite_number("NeedleEvaluation", "depths", d, low=0, high=1) for d in depths]
        self.samples = positive_int("NeedleEvaluation", "samples", samples)
        if kind not in ("text", "video"):
            raise ValueError(f"NeedleEvaluation: kind must be 'text' or 'video', got {kind!r}")
        self.kind, self.seed = kind, seed

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = model_on_rank_zero(pl_module)  # every rank: under FSDP / tensor parallelism the gather is a collective
        if not trainer.is_global_zero:
            return
        from mmgrow.evaluation.needle import evaluate_needle, next_eval_dir, video_frame_args, write_needle_results

        dm = trainer.datamodule
        trained = (getattr(dm, "hparams", None) or {}).get("dataset_args")
        dataset_args = video_frame_args(dm.builder, trained) if self.kind == "video" else {}
        result = evaluate_needle(model, pl_module.objective, dm.builder, lengths=self.lengths,
                                 depths=self.depths, samples=self.samples, kind=self.kind, seed=self.seed,
                                 dataset_args=dataset_args, condition_encoder=getattr(dm, "condition_encoder", None),
                                 checkpoint=str(trainer.default_root_dir))
        json_path, _ = write_needle_results(result, next_eval_dir(trainer.default_root_dir, "needle"))
        for length, row in zip(result["lengths"], result["accuracy"]):
            log.info("needle %s, %d tokens: accuracy %s by depth %s", self.kind, length,
                     [round(a, 3) for a in row], result["depths"])
        log.info("needle evaluation written to %s", json_path)
