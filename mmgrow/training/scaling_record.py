"""What a scaling-law fit needs from a run, as ``summary.json`` fields (see ``docs/scaling.md``).

* ``non_embedding_parameters`` / ``embedding_parameters``: the model's parameters split as Kaplan et al.
  count them: the tables of ``nn.Embedding`` modules (token, modality and position tables) are embedding
  parameters, everything else (blocks, latent projections, heads, timestep MLP) is ``N``;
* ``batch_size_tokens``: training tokens per optimiser step, ``tokens_seen / global_step`` (exact for
  fixed-length rows such as video clips, the mean otherwise; gradient accumulation and data-parallel ranks
  included because both counts are global);
* ``lr`` (the peak learning rate) and ``lr_schedule`` (``kind`` ``"constant"`` when ``min_lr_ratio`` is 1 or
  the run has no step limit, else ``"cosine"``; ``warmup_steps``; ``min_lr_ratio``): hyperparameter laws
  hold for the schedule they were fitted on;
* ``flops_per_token = 6 N + 6 L S D`` (Kaplan's training FLOPs per token: ``2N`` forward and ``4N`` backward
  for the weights, plus the attention scores over a context of ``S`` tokens -- the longest training row -- in
  each of ``L`` blocks of width ``D``; a cross-attention's short condition is left out) and
  ``flops = flops_per_token * tokens_seen``. The laws' own compute convention is ``C = 6 N T``
  (:class:`mmgrow.scaling.units.Units`); this field is the finer count for plots and budgets.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def split_parameters(model: nn.Module) -> tuple[int, int]:
    """``(non_embedding, embedding)`` parameter counts of ``model`` (shared tensors counted once)."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    seen: set[int] = set()
    non_embedding = embedding = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embedding_ids:
            embedding += p.numel()
        else:
            non_embedding += p.numel()
    return non_embedding, embedding


def flops_per_token(non_embedding: int, depth: int, context: int, dim: int) -> float:
    """Training FLOPs per token, ``6 N + 6 L S D`` (module docstring)."""
    return 6.0 * non_embedding + 6.0 * depth * context * dim


def scaling_fields(model: nn.Module, hparams: Any, tokens: int, steps: int, context: int,
                   max_steps: int | None) -> dict[str, Any]:
    """The ``summary.json`` fields of the module docstring. ``hparams``: the LightningModule's hyperparameters
    (``lr``, ``warmup_steps``, ``min_lr_ratio``, ``dim``, ``depth`` where it has them)."""
    non_embedding, embedding = split_parameters(model)
    get = hparams.get if hasattr(hparams, "get") else (lambda k, d=None: getattr(hparams, k, d))
    lr = get("lr")
    min_ratio = get("min_lr_ratio")
    constant = min_ratio is None or float(min_ratio) == 1.0 or not max_steps or max_steps < 0
    dim, depth = get("dim"), get("depth")
    per_token = flops_per_token(non_embedding, depth, context, dim) if dim and depth else 6.0 * non_embedding
    return {
        "non_embedding_parameters": int(non_embedding),
        "embedding_parameters": int(embedding),
        "batch_size_tokens": tokens / steps if steps > 0 else None,
        "lr": None if lr is None else float(lr),
        "lr_schedule": {"kind": "constant" if constant else "cosine", "warmup_steps": get("warmup_steps"),
                        "min_lr_ratio": None if min_ratio is None else float(min_ratio)},
        "flops_per_token": per_token,
        "flops": per_token * tokens,
    }
