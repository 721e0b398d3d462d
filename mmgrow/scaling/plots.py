"""``mmgrow scaling plot``: PNG figures of a sweep and its fitted laws.

Figures (each drawn only when its inputs exist; :func:`plot_scaling` draws every one it can):

* ``loss_vs_lr.png``    -- one panel per (budget T row, model size N column), x = peak lr (log), y = final
  validation loss, one line per batch size; a star at each cell's optimum (lr_opt, loss_opt) from the study.
* ``loss_vs_batch.png`` -- the same with x = batch size (tokens per optimiser step), one line per lr.
* ``lr_law.png`` / ``batch_law.png`` -- the cell optima vs N (log-log), one colour per T, the fitted law
  y = coef N^a T^b per T, and its bootstrap band: the ``level`` percentiles of law_i(N, T) over the refits.
* ``loss_vs_compute.png`` -- every run at C = 6 N T (FLOPs, log x) vs its loss, coloured by N; the loss law's
  compute-optimal frontier L(N_opt(C), T_opt(C)) with its bootstrap band (each refit allocates C itself), and
  the fixed-hyperparameter law's own frontier dashed.

Every figure has a ``*_series`` function returning the arrays it draws, so tests check data, not pixels.
matplotlib is imported inside the drawing functions and draws on an explicit Agg canvas (no pyplot, no global
backend change); files are written atomically.
"""
from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mmgrow.scaling.fit_result import FitResult
from mmgrow.scaling.study import Study
from mmgrow.scaling.table import RunTable

DPI = 120
GRID_POINTS = 60  # points of the drawn law curves (log-spaced)
_PAD = 1.25       # law curves extend this factor beyond the fitted N (or C) range on each side


# ------------------------------------------------------------------ formatting
def sci(x: float, digits: int = 3) -> str:
    """Compact scientific text for a title or legend: 105000 -> '1.05e5', 2e9 -> '2e9', 256 -> '256'."""
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{float(x):.{digits}g}")


def _batch_text(b: float) -> str:
    """Batch sizes are token counts: whole numbers up to 1e7 are written out (8192), larger ones as 1.05e7."""
    return f"{round(b)}" if abs(b - round(b)) < 1e-9 and b < 1e7 else sci(b)


def _params_label(study_or_table: Any) -> str:
    units = getattr(study_or_table, "units", None)
    kind = getattr(units, "params", "non_embedding").replace("_", "-")
    return f"N ({kind} parameters)"


# ------------------------------------------------------------------ series (the data of each figure)
def _sweep_series(table: RunTable, study: Study | None, x_col: str, line_col: str, opt_key: str) -> dict:
    """{N: {T: {"lines": {line value: {"x": sorted x, "loss": loss}}, "optimum": (x_opt, loss_opt) | None}}}."""
    if not table.has_hyperparameters:
        raise ValueError(f"loss vs {x_col}: the table has no lr/batch_size columns (a loss-only table)")
    x_all, line_all = getattr(table, x_col), getattr(table, line_col)
    optima = {}
    for cell in (study.cells if study is not None else []):
        optima[(float(cell["params"]), float(cell["tokens"]))] = (float(cell[opt_key]), float(cell["loss_opt"]))
    out: dict[float, dict[float, dict]] = {}
    for n in sorted(set(table.params.tolist())):
        for t in sorted(set(table.tokens[table.params == n].tolist())):
            in_cell = (table.params == n) & (table.tokens == t)
            lines = {}
            for v in sorted(set(line_all[in_cell].tolist())):
                sel = in_cell & (line_all == v)
                order = np.argsort(x_all[sel], kind="stable")
                lines[float(v)] = {"x": x_all[sel][order], "loss": table.loss[sel][order]}
            out.setdefault(float(n), {})[float(t)] = {"lines": lines, "optimum": optima.get((float(n), float(t)))}
    return out


def loss_vs_lr_series(table: RunTable, study: Study | None = None) -> dict:
    """Per N, per T: one line per batch size, x = lr ascending; ``optimum`` = (lr_opt, loss_opt) of the cell."""
    return _sweep_series(table, study, "lr", "batch_size", "lr_opt")


def loss_vs_batch_series(table: RunTable, study: Study | None = None) -> dict:
    """Per N, per T: one line per lr, x = batch size (tokens) ascending; ``optimum`` = (batch_size_opt,
    loss_opt)."""
    return _sweep_series(table, study, "batch_size", "lr", "batch_size_opt")


def _band(fit: FitResult, fn: Callable, level: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Percentile band of fn(law_i) over the bootstrap refits; (None, None) when not bootstrapped."""
    if fit.bootstrap.size == 0:
        return None, None
    lo, hi = fit.predict_interval(fn, level)
    return np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)


def _law_series(study: Study, key: str, level: float) -> dict[float, dict[str, Any]]:
    fit: FitResult | None = getattr(study, key)
    if fit is None:
        raise ValueError(f"{key} law: this study has none (see its data.warnings)")
    cells = [c for c in study.cells if c.get(key) is not None]
    if not cells:
        raise ValueError(f"{key} law: the study has no cell optima to draw")
    params = np.array([c["params"] for c in cells], dtype=float)
    grid = np.geomspace(params.min() / _PAD, params.max() * _PAD, GRID_POINTS)
    out = {}
    for t in sorted({float(c["tokens"]) for c in cells}):
        mine = [c for c in cells if float(c["tokens"]) == t]
        lo, hi = _band(fit, lambda law, t=t: law(grid, t), level)
        out[t] = {"params": grid, "fit": np.asarray(fit.law(grid, t), dtype=float), "lo": lo, "hi": hi,
                  "points_params": np.array([c["params"] for c in mine], dtype=float),
                  "points": np.array([c[key] for c in mine], dtype=float)}
    return out


def lr_law_series(study: Study, level: float = 0.9) -> dict[float, dict[str, Any]]:
    """{T: {"params": N grid, "fit": lr_opt law(N, T), "lo"/"hi": bootstrap band (None when not bootstrapped),
    "points_params", "points": the cells' lr_opt at T}}."""
    return _law_series(study, "lr_opt", level)


def batch_law_series(study: Study, level: float = 0.9) -> dict[float, dict[str, Any]]:
    """As :func:`lr_law_series` for ``batch_size_opt`` (tokens per optimiser step)."""
    return _law_series(study, "batch_size_opt", level)


def _frontier(fit: FitResult, flops: np.ndarray, level: float | None) -> dict[str, Any]:
    """L(N_opt(C), T_opt(C)) of ``fit.law`` on the C grid; with ``level`` the bootstrap band, where every refit
    allocates each C itself (the band of the frontier, not of the loss at the central allocation)."""
    def along(law) -> np.ndarray:
        alloc = np.array([law.compute_optimal(float(c)) for c in flops])
        return np.asarray(law(alloc[:, 0], alloc[:, 1]), dtype=float)

    alloc = np.array([fit.law.compute_optimal(float(c)) for c in flops])
    lo, hi = _band(fit, along, level) if level is not None else (None, None)
    return {"flops": flops, "params_opt": alloc[:, 0], "tokens_opt": alloc[:, 1],
            "loss": np.asarray(fit.law(alloc[:, 0], alloc[:, 1]), dtype=float), "lo": lo, "hi": hi}


def loss_vs_compute_series(table: RunTable | None, study: Study | None = None, level: float = 0.9) -> dict:
    """{"points": {"flops": 6 N T, "loss", "params"} | None, "frontier": ... | None, "frontier_fixed": ... | None}.

    The C grid spans the runs' 6 N T (or, without a table, 6 N T over the study's fitted N and T ranges).
    Frontier dicts hold "flops", "params_opt", "tokens_opt", "loss" and the band "lo"/"hi" (None for the
    fixed-hyperparameter law, which is drawn for comparison only, and for fits without bootstrap)."""
    points = None
    if table is not None:
        points = {"flops": 6.0 * table.params * table.tokens, "loss": table.loss.copy(), "params": table.params.copy()}
        c_lo, c_hi = float(points["flops"].min()), float(points["flops"].max())
    elif study is not None and study.data.get("params_range") and study.data.get("tokens_range"):
        (n_lo, n_hi), (t_lo, t_hi) = study.data["params_range"], study.data["tokens_range"]
        c_lo, c_hi = 6.0 * n_lo * t_lo, 6.0 * n_hi * t_hi
    else:
        raise ValueError("loss vs compute: needs a run table, or a study with its fitted params/tokens ranges")
    out: dict[str, Any] = {"points": points, "frontier": None, "frontier_fixed": None}
    if study is not None and (study.loss is not None or study.loss_fixed_hparams is not None):
        if study.units.flops != "6NT":
            raise ValueError(f"loss vs compute: the study's FLOPs convention is {study.units.flops!r}; the "
                             "frontier allocates C = 6 N T")
        flops = np.geomspace(c_lo / _PAD, c_hi * _PAD, GRID_POINTS) if c_hi > c_lo else np.array([c_lo])
        if study.loss is not None:
            out["frontier"] = _frontier(study.loss, flops, level)
        if study.loss_fixed_hparams is not None:
            out["frontier_fixed"] = _frontier(study.loss_fixed_hparams, flops, None)
    return out


# ------------------------------------------------------------------ drawing
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    from mmgrow.rundir import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=DPI)
    return path


def _colours(values: list[float], cmap: str = "viridis") -> dict[float, Any]:
    """One colour per distinct value, spread over the colormap in sorted order (same value, same colour in
    every panel)."""
    from matplotlib import colormaps

    values = sorted(values)
    cm = colormaps[cmap]
    return {v: cm(0.0 if len(values) == 1 else 0.85 * i / (len(values) - 1)) for i, v in enumerate(values)}


def _grid_ticks(ax, xs: list[float]) -> None:
    """Log x axis ticked at the grid values themselves: a sweep grid spans about a decade, where matplotlib's
    minor log labels (3x10^-4, 4x10^-4, ...) overlap."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(xs, [_batch_text(x) if x >= 1 else sci(x, 2) for x in xs], fontsize=7,
                  rotation=30 if len(xs) > 4 else 0)
    ax.grid(True, alpha=0.3)


def _draw_sweep(series: dict, path: Path, x_label: str, line_label: Callable[[float], str], title: str) -> Path:
    sizes = sorted(series)
    budgets = sorted({t for per_n in series.values() for t in per_n})
    line_values = sorted({v for per_n in series.values() for cell in per_n.values() for v in cell["lines"]})
    colour = _colours(line_values)
    xs = sorted({float(x) for per_n in series.values() for cell in per_n.values() for line in cell["lines"].values()
                 for x in line["x"]})
    fig = _figure(3.4 * len(sizes) + 2.0, 2.6 * len(budgets) + 1.4)
    axes = fig.subplots(len(budgets), len(sizes), squeeze=False, sharex=True)
    for i, t in enumerate(budgets):
        for j, n in enumerate(sizes):
            ax = axes[i][j]
            cell = series[n].get(t)
            ax.set_title(f"N = {sci(n)}, T = {sci(t)} tok", fontsize=9)
            _grid_ticks(ax, xs)
            if cell is None:
                ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="grey")
                continue
            for v, line in cell["lines"].items():
                ax.plot(line["x"], line["loss"], marker="o", markersize=3, color=colour[v], label=line_label(v))
            if cell["optimum"] is not None:
                ax.plot(*cell["optimum"], marker="*", markersize=13, color="crimson", markeredgecolor="black",
                        linestyle="none", label="cell optimum", zorder=5)
            if i == len(budgets) - 1:
                ax.set_xlabel(x_label, fontsize=9)
            if j == 0:
                ax.set_ylabel("final validation loss", fontsize=9)
    handles, labels = {}, []
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    # fixed margins in inches, not tight_layout: it measures every tick label of every panel (most of the time)
    w, h = fig.get_figwidth(), fig.get_figheight()
    fig.subplots_adjust(left=0.75 / w, right=1 - 1.6 / w, bottom=0.75 / h, top=1 - 0.65 / h, wspace=0.28, hspace=0.42)
    return _save(fig, path)


def plot_loss_vs_lr(table: RunTable, study: Study | None, path: Path) -> dict:
    """Draw :func:`loss_vs_lr_series` into ``path``; returns the series."""
    series = loss_vs_lr_series(table, study)
    _draw_sweep(series, path, "peak learning rate", lambda b: f"B = {_batch_text(b)} tok",
                "Final validation loss vs learning rate (rows: token budget T, columns: model size N)")
    return series


def plot_loss_vs_batch(table: RunTable, study: Study | None, path: Path) -> dict:
    """Draw :func:`loss_vs_batch_series` into ``path``; returns the series."""
    series = loss_vs_batch_series(table, study)
    _draw_sweep(series, path, "batch size (tokens per step)", lambda lr: f"lr = {sci(lr)}",
                "Final validation loss vs batch size (rows: token budget T, columns: model size N)")
    return series


def _wrap(text: str, width: int = 95) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _plot_law(study: Study, key: str, path: Path, level: float, y_label: str) -> dict:
    series = _law_series(study, key, level)
    colour = _colours(list(series), "plasma")
    fig = _figure(7.5, 5.2)
    ax = fig.add_subplot()
    for t, s in series.items():
        c = colour[t]
        ax.plot(s["params"], s["fit"], color=c, label=f"fit, T = {sci(t)} tok")
        if s["lo"] is not None:
            ax.fill_between(s["params"], s["lo"], s["hi"], color=c, alpha=0.2, linewidth=0)
        ax.plot(s["points_params"], s["points"], marker="o", linestyle="none", color=c, markeredgecolor="black",
                label=f"cell optima, T = {sci(t)} tok")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(_params_label(study))
    ax.set_ylabel(y_label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title=f"bands: {level:.0%} bootstrap", title_fontsize=8)
    ax.set_title(_wrap(getattr(study, key).law.describe()), fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return series


def plot_lr_law(study: Study, path: Path, level: float = 0.9) -> dict:
    """Draw :func:`lr_law_series` into ``path``; returns the series."""
    return _plot_law(study, "lr_opt", path, level, "optimal peak learning rate")


def plot_batch_law(study: Study, path: Path, level: float = 0.9) -> dict:
    """Draw :func:`batch_law_series` into ``path``; returns the series."""
    return _plot_law(study, "batch_size_opt", path, level, "optimal batch size (tokens per step)")


def plot_loss_vs_compute(table: RunTable | None, study: Study | None, path: Path, level: float = 0.9) -> dict:
    """Draw :func:`loss_vs_compute_series` into ``path``; returns the series."""
    series = loss_vs_compute_series(table, study, level)
    fig = _figure(7.5, 5.2)
    ax = fig.add_subplot()
    pts = series["points"]
    if pts is not None:
        colour = _colours(sorted(set(pts["params"].tolist())))
        for n, c in colour.items():
            sel = pts["params"] == n
            ax.plot(pts["flops"][sel], pts["loss"][sel], marker="o", markersize=4, linestyle="none", color=c,
                    alpha=0.8, label=f"runs, N = {sci(n)}")
    front = series["frontier"]
    titles = []
    if front is not None:
        ax.plot(front["flops"], front["loss"], color="black", linewidth=2,
                label="compute-optimal frontier (loss law)")
        if front["lo"] is not None:
            ax.fill_between(front["flops"], front["lo"], front["hi"], color="black", alpha=0.15, linewidth=0,
                            label=f"{level:.0%} bootstrap band")
        titles.append("loss law: " + study.loss.law.describe())
    fixed = series["frontier_fixed"]
    if fixed is not None:
        hp = study.fixed_hparams or {}
        where = f" (lr = {sci(hp['lr'])}, B = {_batch_text(hp['batch_size'])} tok)" if hp else ""
        ax.plot(fixed["flops"], fixed["loss"], color="grey", linestyle="--", linewidth=1.5,
                label=f"frontier, fixed hyperparameters{where}")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = 6 N T (FLOPs)")
    ax.set_ylabel("final validation loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_wrap("; ".join(titles)) if titles else "Loss vs compute", fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return series


# ------------------------------------------------------------------ everything
def plot_scaling(table: RunTable | None, study: Study | None, out_dir: Path, level: float = 0.9) -> list[Path]:
    """Write every figure the inputs allow into ``out_dir``; return their paths (in the module docstring's
    order). A figure whose inputs are missing is skipped; ValueError when none can be drawn."""
    out_dir = Path(out_dir)
    hyper = table is not None and table.has_hyperparameters
    jobs: list[tuple[str, Callable[[Path], Any]]] = []
    if hyper:
        jobs.append(("loss_vs_lr.png", lambda p: plot_loss_vs_lr(table, study, p)))
        jobs.append(("loss_vs_batch.png", lambda p: plot_loss_vs_batch(table, study, p)))
    if study is not None and study.lr_opt is not None and study.cells:
        jobs.append(("lr_law.png", lambda p: plot_lr_law(study, p, level)))
    if study is not None and study.batch_size_opt is not None and study.cells:
        jobs.append(("batch_law.png", lambda p: plot_batch_law(study, p, level)))
    has_ranges = study is not None and bool(study.data.get("params_range")) and bool(study.data.get("tokens_range"))
    has_loss = study is not None and (study.loss is not None or study.loss_fixed_hparams is not None)
    if table is not None or (has_loss and has_ranges):
        jobs.append(("loss_vs_compute.png", lambda p: plot_loss_vs_compute(table, study, p, level)))
    if not jobs:
        raise ValueError("scaling plot: nothing to draw; give a run table (loss vs lr / batch / compute) and/or a "
                         "laws file with hyperparameter or loss laws")
    paths = []
    for name, draw in jobs:
        draw(out_dir / name)
        paths.append(out_dir / name)
    return paths
