"""Ablations: one base recipe, named variants (and grids, seeds), trained with the same data and budget."""
