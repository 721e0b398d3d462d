"""Expand a base recipe and a :class:`~mmgrow.scaling.grid.SweepGrid` into runs, and know each run's state.

Every run is an ordinary ``mmgrow fit`` of the base recipe with overrides: the size preset's keys, the grid's
``set``, ``model.lr``, ``data.batch_size`` (the batch in tokens divided by the tokens per sample),
``seed_everything``, ``trainer.max_steps`` (the largest budget the run covers, in steps),
``trainer.val_check_interval`` (so validation lands exactly on every budget it covers) and
``trainer.default_root_dir`` = ``OUT/runs/<size>/lr<lr>_bs<batch>[_t<tokens>]_s<seed>``. Beside the run's own
files the sweep writes ``scaling.json`` (its budgets, size, lr, batch in tokens, non-embedding parameters,
seed), which ``mmgrow scaling fit`` reads to turn one run into one row per budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmgrow.parallel.distributed_checkpoint import is_complete, settle
from mmgrow.scaling.grid import SweepGrid

SCALING_RECORD = "scaling.json"


@dataclass
class SweepRun:
    """One training run of a sweep."""

    name: str                # "<size>/lr<lr>_bs<batch>[_t<tokens>]_s<seed>", its directory under OUT/runs
    size: str
    lr: float
    batch_size: int          # tokens per optimiser step
    batch_samples: int       # data.batch_size
    budgets: list[int]       # token budgets validated in this run (ascending)
    seed: int
    max_steps: int
    val_every: int           # trainer.val_check_interval (steps)
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, in order

    def record(self, params: int | None) -> dict[str, Any]:
        """The run's ``scaling.json``."""
        return {"budgets": self.budgets, "size": self.size, "lr": self.lr, "batch_size": self.batch_size,
                "params": params, "seed": self.seed}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def number_tag(x: float) -> str:
    """A short, exact-enough, file-name-safe spelling of a grid value: 0.0005 -> "5e-04", 512 -> "512"."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e7 else f"{x:.3g}".replace("+", "")


def schedule_is_constant(base: dict[str, Any], grid: SweepGrid) -> bool:
    """The learning rate stays at its peak after warm-up: ``model.min_lr_ratio`` (the grid's ``set`` wins over the
    base recipe) is 1. ``MMGrowModule``'s default (0.1) decays."""
    ratio = grid.set.get("model.min_lr_ratio", _lookup(base, "model.min_lr_ratio"))
    if ratio is None:
        ratio = _lookup(base, "model.init_args.min_lr_ratio")
    return ratio is not None and float(ratio) == 1.0


def _lookup(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def shares_budgets(base: dict[str, Any], grid: SweepGrid) -> bool:
    constant = schedule_is_constant(base, grid)
    if grid.share_budgets is True and not constant:
        raise ValueError("share_budgets: true needs a constant learning rate after warm-up (set "
                         "model.min_lr_ratio: 1.0 in the grid's `set` or the recipe): under a decaying schedule the "
                         "loss after T tokens of a longer run is not the loss of a T-token run")
    return constant if grid.share_budgets == "auto" else bool(grid.share_budgets)


def expand(grid: SweepGrid, tokens_per_sample: int, share: bool) -> list[SweepRun]:
    """The runs of the grid, sizes outermost then seeds, lr, batch (and budget when not shared).

    Budgets and batches must fit whole steps: a batch of ``b`` tokens is ``b / tokens_per_sample`` samples and a
    budget of ``T`` tokens ``T / b`` steps, both integers (else a ValueError names the pair)."""
    if tokens_per_sample <= 0:
        raise ValueError(f"tokens_per_sample must be positive, got {tokens_per_sample}")
    runs: list[SweepRun] = []
    for size, overrides in grid.sizes.items():
        for seed in grid.seeds:
            for lr in grid.lr:
                for batch in grid.batch_size:
                    if batch % tokens_per_sample:
                        raise ValueError(f"batch_size {batch} tokens is not a whole number of samples of "
                                         f"{tokens_per_sample} tokens; use multiples of {tokens_per_sample}")
                    steps = []
                    for budget in grid.tokens:
                        if budget % batch:
                            raise ValueError(f"token budget {budget} is not a whole number of steps of {batch} "
                                             f"tokens; use budgets that are multiples of every batch size")
                        steps.append(budget // batch)
                    groups = [list(grid.tokens)] if share else [[t] for t in grid.tokens]
                    for budgets in groups:
                        run_steps = [b // batch for b in budgets]
                        tag = "" if share else f"_t{number_tag(budgets[0])}"
                        name = f"{size}/lr{number_tag(lr)}_bs{number_tag(batch)}{tag}_s{seed}"
                        run = SweepRun(name=name, size=size, lr=lr, batch_size=batch,
                                       batch_samples=batch // tokens_per_sample, budgets=budgets, seed=seed,
                                       max_steps=run_steps[-1], val_every=math.gcd(*run_steps))
                        run.overrides = {**overrides, **grid.set, "model.lr": lr,
                                         "data.batch_size": run.batch_samples, "seed_everything": seed,
                                         "trainer.max_steps": run.max_steps,
                                         "trainer.val_check_interval": run.val_every,
                                         "trainer.check_val_every_n_epoch": None}
                        runs.append(run)
    return runs


def cli_value(value: Any) -> str:
    """A value as jsonargparse reads it on the command line (YAML flow style for mappings and lists)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def fit_arguments(base: str | Path, run: SweepRun, root: Path, ckpt_path: str | None = None) -> list[str]:
    """``mmgrow fit`` arguments (after ``mmgrow``) that train ``run`` into ``root / run.name``."""
    args = ["fit", "--config", str(base)]
    for key, value in run.overrides.items():
        args += [f"--{key}", cli_value(value)]
    args += ["--trainer.default_root_dir", str(root / run.name)]
    if ckpt_path:
        args += ["--ckpt_path", ckpt_path]
    return args


def run_state(directory: Path) -> str:
    """``"complete"`` / ``"diverged"`` (sealed by the run itself), ``"partial"`` (has a resumable
    ``checkpoints/last.ckpt``), or ``"new"``."""
    manifest = directory / "manifest.json"
    if manifest.is_file():
        try:
            status = json.loads(manifest.read_text()).get("status")
        except (OSError, ValueError):
            status = None
        if status in ("complete", "diverged"):
            return status
    last = directory / "checkpoints" / "last.ckpt"
    if last.is_file() or is_complete(settle(last)):  # a file, or a sharded (FSDP) checkpoint directory
        return "partial"
    return "new"
