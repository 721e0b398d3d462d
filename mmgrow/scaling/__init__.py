"""Scaling laws for video diffusion transformers (and any mmgrow recipe): sweep, fit, predict, allocate.

* :mod:`~mmgrow.scaling.units` -- the units stored beside every law's constants;
* :mod:`~mmgrow.scaling.laws` -- the law forms (power laws in (N, T) or compute, loss laws) and
  compute-optimal allocation; :mod:`~mmgrow.scaling.presets` -- published constants, labelled;
* :mod:`~mmgrow.scaling.fitting` (:mod:`~mmgrow.scaling.loss_fit`, :mod:`~mmgrow.scaling.fit_result`,
  :mod:`~mmgrow.scaling.columns`), :mod:`~mmgrow.scaling.optimum`, :mod:`~mmgrow.scaling.isoflop` -- log-log
  least squares, Huber + variable projection, per-cell optima between grid points, bootstrap, Approach 2;
* :mod:`~mmgrow.scaling.table` and :mod:`~mmgrow.scaling.study` -- runs in, ``laws.json`` out, predictions;
  :mod:`~mmgrow.scaling.plots` -- the figures;
* :mod:`~mmgrow.scaling.grid`, :mod:`~mmgrow.scaling.sweep`, :mod:`~mmgrow.scaling.size`,
  :mod:`~mmgrow.scaling.launch` -- expand a recipe over sizes, learning rates, batch sizes and budgets; run it
  here or write a SLURM / torchrun launcher;
* :mod:`~mmgrow.scaling.cli` / :mod:`~mmgrow.scaling.sweep_cli` -- ``mmgrow scaling sweep|fit|predict|plot``.

Not imported by ``import mmgrow``; numpy and scipy are imported by the modules that need them.
"""
