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
* ``flops_per_token = 6 N + 3 sum_mixers mixing_flops(S)`` (:func:`model_flops_per_token`: ``2N`` forward and
  ``4N`` backward for the weights, plus 3 x each sequence mixer's forward token-mixing FLOPs,
  :meth:`~mmgrow.protocols.SequenceMixer.mixing_flops`, over a row of ``S`` tokens -- the longest training
  row; memory branches included, twice when bidirectional; a cross-attention's short condition is left
  out). For an all-attention model this is Kaplan's ``6 N + 6 L S D`` (:func:`flops_per_token`). A mixer
  whose count is unknown (local attention) adds 0 and sets ``flops_per_token_partial: true``.
  ``flops = flops_per_token * tokens_seen``. The laws' own compute convention is ``C = 6 N T``
  (:class:`mmgrow.scaling.units.Units`); this field is the finer count for plots and budgets.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


class FlopsCount(NamedTuple):
    """Training FLOPs per token and the mixers (module paths) whose mixing FLOPs are unknown (counted as 0)."""

    per_token: float
    unknown: list[str]

    @property
    def partial(self) -> bool:
        return bool(self.unknown)


def mixing_flops_per_token(model: nn.Module, seq_len: int) -> tuple[float, list[str]]:
    """``(sum of forward mixing FLOPs per token, unknown module paths)`` over the modules of ``model`` that
    declare ``mixing_flops(seq_len)`` (sequence mixers, gated memory branches). A module that declares it is
    counted as a whole (a memory branch's own count includes its mixer, twice when bidirectional) and its
    children are not visited again; a module shared by several parents is counted once."""
    total, unknown, seen = 0.0, [], set()

    def visit(module: nn.Module, path: str) -> None:
        nonlocal total
        if id(module) in seen:
            return
        seen.add(id(module))
        count = getattr(module, "mixing_flops", None)
        if callable(count):
            value = count(seq_len)
            if value is None:
                unknown.append(path or type(module).__name__)
            else:
                total += float(value)
            return
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return total, unknown


def model_flops_per_token(model: nn.Module, non_embedding: int, seq_len: int) -> FlopsCount:
    """Training FLOPs per token ``6 N + 3 sum mixing_flops(seq_len)`` (module docstring; unknown mixers add 0)."""
    mixing, unknown = mixing_flops_per_token(model, seq_len)
    return FlopsCount(6.0 * non_embedding + 3.0 * mixing, unknown)


def scaling_fields(model: nn.Module, hparams: Any, tokens: int, steps: int, context: int,
                   max_steps: int | None) -> dict[str, Any]:
    """The ``summary.json`` fields of the module docstring. ``hparams``: the LightningModule's hyperparameters
    (``lr``, ``warmup_steps``, ``min_lr_ratio`` where it has them); ``context``: the longest training row."""
    non_embedding, embedding = split_parameters(model)
    get = hparams.get if hasattr(hparams, "get") else (lambda k, d=None: getattr(hparams, k, d))
    lr = get("lr")
    min_ratio = get("min_lr_ratio")
    constant = min_ratio is None or float(min_ratio) == 1.0 or not max_steps or max_steps < 0
    count = model_flops_per_token(model, non_embedding, context)
    return {
        "non_embedding_parameters": int(non_embedding),
        "embedding_parameters": int(embedding),
        "batch_size_tokens": tokens / steps if steps > 0 else None,
        "lr": None if lr is None else float(lr),
        "lr_schedule": {"kind": "constant" if constant else "cosine", "warmup_steps": get("warmup_steps"),
                        "min_lr_ratio": None if min_ratio is None else float(min_ratio)},
        "flops_per_token": count.per_token,
        "flops_per_token_partial": count.partial,
        "flops": count.per_token * tokens,
    }
