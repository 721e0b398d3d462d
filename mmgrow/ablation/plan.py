"""An ablation's runs and its plan file ``OUT/ablation.json``.

Run ``OUT/runs/<variant>[/<grid point>]/s<seed>`` trains the base recipe with these overrides, later ones
winning: the variant's keys, the grid point's keys, ``--set`` (so ``--set`` wins over everything), the matched
width (``--match-params``), then ``seed_everything = seed``. A grid point is named by its keys' last dotted
component and value, joined by ``_``: ``--vary model.dim=32,64 --vary model.depth=1,2`` gives ``dim-32_depth-1``
... The data seed (``data.seed``) is never touched: every variant and seed sees the same data.

Before a run trains, its directory gets ``ablation_run.json`` ``{"variant": "<variant>[/<grid point>]", "seed",
"overrides", "ablation": "<OUT>"}``; ``mmgrow report`` groups seeds by its ``variant``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmgrow.ablation.variants import AblationSpec, check_name

PLAN_NAME = "ablation.json"
RUN_RECORD = "ablation_run.json"


@dataclass
class AblationRun:
    """One training run of an ablation (a :class:`~mmgrow.scaling.launch.LaunchRun`)."""

    name: str                 # "<variant>[/<grid point>]/s<seed>": its directory under OUT/runs
    variant: str              # "<variant>[/<grid point>]": what seeds are grouped by
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)   # dotted key -> value, in the order applied
    params: int | None = None  # non-embedding parameters, when measured (--match-params)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self, out: Path) -> dict[str, Any]:
        """The run's ``ablation_run.json``."""
        return {"variant": self.variant, "seed": self.seed, "overrides": self.overrides, "ablation": str(out)}


def value_tag(value: Any) -> str:
    from mmgrow.scaling.sweep import number_tag

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return number_tag(value)


def grid_points(vary: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, overrides)`` of every point of the cross product, the first ``--vary`` key outermost;
    ``[("", {})]`` without ``--vary``."""
    if not vary:
        return [("", {})]
    shorts = [key.rsplit(".", 1)[-1] for key in vary]
    clashes = sorted({s for s in shorts if shorts.count(s) > 1})
    if clashes:
        raise ValueError(f"--vary keys {list(vary)} share the short name(s) {clashes} that run names use; "
                         "vary them in separate ablations")
    points = []
    for values in itertools.product(*vary.values()):
        name = "_".join(f"{short}-{value_tag(v)}" for short, v in zip(shorts, values))
        points.append((check_name(name, "grid point"), dict(zip(vary, values))))
    return points


def expand(spec: AblationSpec, widths: dict[str, dict[str, Any]] | None = None) -> list[AblationRun]:
    """The runs of ``spec``: variants outermost, then grid points, then seeds. ``widths[variant name]`` (from
    parameter matching, keyed by ``<variant>[/<grid point>]``) is applied after ``--set``."""
    runs = []
    for variant, overrides in spec.variants.items():
        for point, keys in grid_points(spec.vary):
            label = f"{variant}/{point}" if point else variant
            matched = (widths or {}).get(label, {})
            for seed in spec.seeds:
                merged = layered(overrides, keys, spec.set, matched, {"seed_everything": seed})
                runs.append(AblationRun(f"{label}/s{seed}", label, seed, merged))
    return runs


def layered(*layers: dict[str, Any]) -> dict[str, Any]:
    """The layers merged, later ones winning; a key a later layer sets moves to the end, so replayed as
    ``mmgrow fit`` arguments it still comes after (and wins over) everything set before it."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            merged.pop(key, None)
            merged[key] = value
    return merged


def check_same_plan(old: dict[str, Any] | None, runs: list[AblationRun], out: Path) -> None:
    """A run name already planned in ``out`` with other overrides is an error (another ablation lives there)."""
    if not old:
        return
    previous = {r["name"]: r for r in old.get("runs", [])}
    for run in runs:
        before = previous.get(run.name)
        now = json.loads(json.dumps(run.overrides))
        then = before.get("overrides") if before is not None else None
        if before is not None and then != now:
            changed = {k: (then.get(k), now.get(k)) for k in {**then, **now} if then.get(k) != now.get(k)}
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()) or "key order"
            raise ValueError(f"{out / PLAN_NAME} holds a different ablation: run {run.name} was planned with other "
                             f"overrides ({listed}); use a new --out (or the original command to resume)")


def read_plan(out: Path) -> dict[str, Any] | None:
    from mmgrow.checks import read_optional_json

    path = out / PLAN_NAME
    plan = read_optional_json(path, "move it away to start a new ablation here")
    if plan is not None and (not isinstance(plan, dict) or plan.get("mmgrow_ablation") != 1):
        raise ValueError(f"{path} is not an mmgrow ablation plan; use a new --out")
    return plan


def write_plan(out: Path, plan: dict[str, Any]) -> None:
    """``OUT/ablation.json`` (atomically) and every run's ``ablation_run.json`` (before any run starts)."""
    from mmgrow.rundir import atomic_write_bytes, strict_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / PLAN_NAME, strict_json(plan))
    for r in plan["runs"]:
        run = AblationRun(**r)
        directory = out / "runs" / run.name
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / RUN_RECORD, strict_json(run.record(out.resolve())))


def format_runs(runs: list[AblationRun], out: Path | None = None) -> str:
    """A table: run name, variant, seed, state (when ``out`` is given), then every override ``key=value``."""
    from mmgrow.scaling.sweep import cli_value, run_state

    rows = [("run", "variant", "seed", *(("state",) if out else ()), "overrides")]
    for r in runs:
        state = (run_state(out / "runs" / r.name),) if out else ()
        sets = " ".join(f"{k}={cli_value(v)}" for k, v in r.overrides.items() if k != "seed_everything")
        rows.append((r.name, r.variant, str(r.seed), *state, sets or "(base recipe)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)
