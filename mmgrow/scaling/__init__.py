"""Scaling laws for video diffusion transformers (and any mmgrow recipe): sweep, fit, predict, allocate.

* :mod:`~mmgrow.scaling.units` -- the units stored beside every law's constants;
* :mod:`~mmgrow.scaling.laws` -- the law forms (power laws in (N, T) or compute, loss laws) and
  compute-optimal allocation; :mod:`~mmgrow.scaling.presets` -- published constants, labelled;
* :mod:`~mmgrow.scaling.fitting`, :mod:`~mmgrow.scaling.optimum`, :mod:`~mmgrow.scaling.isoflop` --
  log-log least squares, Huber + variable projection, per-cell optima between grid points, bootstrap;
* :mod:`~mmgrow.scaling.table` and :mod:`~mmgrow.scaling.study` -- runs in, ``laws.json`` out, predictions;
* :mod:`~mmgrow.scaling.sweep` -- expand a recipe over sizes, learning rates, batch sizes and budgets.

Light on import: numpy and scipy only where a function needs them.
"""
