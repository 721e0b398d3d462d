"""Shared pieces of the data benchmarks: build a data module + model from plain dicts, train with
Lightning's own loop (the Curriculum callback included), time training steps, and describe the device.

No LightningCLI: the benchmarks run where jsonargparse is absent (the GPU image), and the dicts are
exactly what a recipe's ``data:`` / ``model:`` sections hold.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import torch


def device_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads (torch {torch.__version__})"


def build(data: dict[str, Any], model: dict[str, Any]):
    """``(datamodule, module)`` as the CLI links them (``data.<x> -> model.<y>`` for every pair of
    :data:`mmgrow.training.cli.DATA_TO_MODEL_LINKS`: vocabulary, continuous latent widths, input encoders)."""
    from mmgrow.data.datamodule import MMDataModule
    from mmgrow.training.cli import DATA_TO_MODEL_LINKS
    from mmgrow.training.module import MMGrowModule

    torch.manual_seed(0)
    dm = MMDataModule(**data)
    module = MMGrowModule(**{y: getattr(dm, x) for x, y in DATA_TO_MODEL_LINKS}, **model)
    return dm, module


def fit(data: dict[str, Any], model: dict[str, Any], steps: int, device: str, precision: str = "32-true"):
    """Train ``steps`` optimizer steps with ``lightning.Trainer`` (no validation, no files); returns
    ``(datamodule, module, seconds)``."""
    import lightning.pytorch as pl

    from mmgrow.training.curriculum import Curriculum

    dm, module = build(data, model)
    trainer = pl.Trainer(max_steps=steps, accelerator=device, devices=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
                         callbacks=[Curriculum()])
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return dm, module, time.perf_counter() - start


def step_rates(data: dict[str, Any], model: dict[str, Any], steps: int, device: str) -> dict[str, Any]:
    """A bare training loop over the data module's training batches: per step the seconds (forward,
    backward, AdamW; first step excluded), the real (non-padding) tokens and the row slots."""
    dm, module = build(data, model)
    module.configure_model()
    net, objective = module.model.to(device), module.objective
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    times, real, slots, examples, rows = [], 0, 0, 0, 0
    batches = iter(dm.train_dataloader())
    for step in range(steps + 1):
        batch = next(batches).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = objective.loss(net(batch.input_ids, objective.context(batch)), batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            continue  # warm-up
        times.append(time.perf_counter() - start)
        real += int((batch.segment_ids >= 0).sum())
        slots += batch.segment_ids.numel()
        examples += _examples_in(batch)
        rows += batch.input_ids.shape[0]
    return {"steps": steps, "seconds": sum(times), "median_step_s": statistics.median(times), "tokens": real,
            "slots": slots, "examples": examples, "rows": rows, "tokens_per_s": real / sum(times),
            "padding_fraction": 1 - real / slots}


def _examples_in(batch) -> int:
    seg = batch.segment_ids
    return int(sum(len(set(row[row >= 0].tolist())) for row in seg))
