"""The CPU scaling experiment of docs/scaling.md: fit the t2v DiT mini-sweep, predict a held-out size, check it.

Steps (each re-runnable; the sweeps themselves are `mmgrow scaling sweep` runs, see docs/scaling.md):

    python benchmarks/scaling_experiment.py fit     --sweep runs/scaling/t2v_dit
        -> laws.json, the prediction for the held-out size, and sweeps/t2v_dit_heldout.yaml's lr/batch grid
    python benchmarks/scaling_experiment.py check   --sweep runs/scaling/t2v_dit --heldout runs/scaling/t2v_dit_heldout
        -> did the predicted (lr, batch) land on the held-out grid's best cell or a neighbour; loss-prediction
           error; the inference-cost comparison (compute-optimal N under the optimal-hyperparameter loss law vs
           the fixed-hyperparameter law at the same budget); JSON in benchmarks/results/scaling_t2v_dit.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from mmgrow.scaling.study import fit_study, predict, read_laws, write_laws
from mmgrow.scaling.table import load_runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scaling_t2v_dit.json"


def _heldout_plan(heldout: Path) -> dict:
    return json.loads((heldout / "sweep.json").read_text())


def fit(args) -> dict:
    sweep = Path(args.sweep)
    table = load_runs(sweep / "runs")
    study = fit_study(table, bootstrap=args.bootstrap, seed=0)
    write_laws(sweep / "laws.json", study)
    laws = read_laws(sweep / "laws.json")
    out = {"sweep": str(sweep), "rows": len(table.loss), "excluded": table.excluded, "predictions": {}}
    for params, tokens in args.predict:
        out["predictions"][f"{int(params)}@{int(tokens)}"] = predict(laws, params=params, tokens=tokens)
    print(json.dumps(out["predictions"], indent=1))
    return out


def _nearest(values: list[float], x: float) -> int:
    return int(np.argmin([abs(math.log(v / x)) for v in values]))


def check(args) -> dict:
    sweep, heldout = Path(args.sweep), Path(args.heldout)
    laws = read_laws(sweep / "laws.json")
    table = load_runs(heldout / "runs")
    lrs, batches = sorted(set(table.lr.tolist())), sorted(set(table.batch_size.tolist()))
    report: dict = {"heldout_params": sorted(set(table.params.tolist())), "budgets": {}}
    for tokens in sorted(set(table.tokens.tolist())):
        sel = table.tokens == tokens
        params = float(table.params[sel][0])
        pred = predict(laws, params=params, tokens=tokens)
        losses = {(float(lr), float(b)): float(loss) for lr, b, loss in
                  zip(table.lr[sel], table.batch_size[sel], table.loss[sel])}
        best = min(losses, key=losses.get)
        cell = (lrs[_nearest(lrs, pred["lr_opt"])], batches[_nearest(batches, pred["batch_size_opt"])])
        steps = (abs(lrs.index(cell[0]) - lrs.index(best[0])), abs(batches.index(cell[1]) - batches.index(best[1])))
        report["budgets"][str(int(tokens))] = {
            "prediction": pred, "predicted_cell": cell, "predicted_cell_loss": losses.get(cell),
            "best_cell": best, "best_loss": losses[best],
            "grid_steps_from_best": steps, "lands": "best" if steps == (0, 0) else
            ("neighbour" if max(steps) <= 1 else "off"),
            "loss_prediction_error": (pred["loss"] - losses[best]) / losses[best],
            "grid": {f"{lr:g}/{int(b)}": v for (lr, b), v in sorted(losses.items())}}
    report["inference_cost"] = inference_cost(laws, args.flops)
    return report


def inference_cost(laws, budgets: list[float]) -> list[dict]:
    """Compute-optimal size under the optimal-hyperparameter loss law vs the fixed-hyperparameter one."""
    rows = []
    for flops in budgets:
        opt = predict(laws, flops=flops)
        fixed_law = laws.loss_fixed_hparams.law if laws.loss_fixed_hparams is not None else None
        row = {"flops": flops, "optimal_hparams": {k: opt.get(k) for k in ("params_opt", "tokens_opt", "loss")},
               "params_opt_interval": opt["intervals"].get("params_opt")}
        if fixed_law is not None:
            n_fixed, t_fixed = fixed_law.compute_optimal(flops)
            row["fixed_hparams"] = {"params_opt": n_fixed, "tokens_opt": t_fixed, "loss": float(fixed_law(n_fixed, t_fixed)),
                                    "loss_under_optimal_law": float(laws.loss.law(n_fixed, t_fixed))}
            row["params_ratio"] = opt["params_opt"] / n_fixed
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=("fit", "check"))
    p.add_argument("--sweep", default="runs/scaling/t2v_dit")
    p.add_argument("--heldout", default="runs/scaling/t2v_dit_heldout")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--predict", type=float, nargs=2, action="append", default=[], metavar=("PARAMS", "TOKENS"))
    p.add_argument("--flops", type=float, nargs="*", default=[1e11, 1e12, 1e13])
    args = p.parse_args()
    result = fit(args) if args.step == "fit" else check(args)
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    old[args.step] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(old, indent=1, default=float))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
