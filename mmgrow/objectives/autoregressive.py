"""Next-token prediction over a shared token space, with per-modality loss weighting and a sampler.

Loss (LWM, "World Model on Million-Length Video and Language", §1.3 of the data reference). For
every *target* position ``t`` of a row (``loss_mask[t] > 0``, same packed example as ``t-1``, not
padding) the hidden state at ``t-1`` predicts the **local** id of token ``t`` with the output head of
token ``t``'s modality ``m(t)``:

.. math::

    \\mathrm{CE}_t = -\\log \\operatorname{softmax}(W_{m(t)} h_{t-1})[y_t - \\mathrm{off}_{m(t)}]

    L_m = \\frac{\\sum_{t: m(t)=m} w_t\\,\\mathrm{CE}_t}{\\sum_{t: m(t)=m} w_t},
    \\qquad w_t = \\mathrm{loss\\_mask}_t \\cdot \\mathrm{example\\_weight}_t

    L = \\frac{\\sum_{m \\in P} \\lambda_m L_m}{\\sum_{m \\in P} \\lambda_m}

where ``P`` is the set of modalities with at least one target of positive weight in the batch and
``lambda_m`` the modality weight. The weighting rule (see :class:`AutoregressiveObjective`):
modalities get weight 1 unless ``modality_weights`` says otherwise, so by default every modality
present contributes the same share, whatever its token count -- LWM's ``0.5 * (vision + text)``.

With a shared head (a model with ``shared_head = True``, UnIVAL's single vocabulary) the softmax runs
over every global id instead, ``CE_t = -log softmax(W h_{t-1})[y_t]``, so the modalities compete;
``L_m`` and the weights are unchanged (grouped by the target's modality). Accuracy is then top-1 over
all ids. Continuous modalities keep their own heads.

Targets are per predicting position. :func:`next_token_targets` turns a batch into ``[B, T]``
tensors aligned with the position that predicts them (``t`` carries token ``t+1``'s id, modality,
weight and whether it is a target; the last column is never one). The loss consumes only those and
the hidden states of the same positions, so it does not care how the sequence is split: under
context parallelism (:class:`~mmgrow.protocols.ContextParallel`) the targets are computed on the
whole sequence and sharded with it, although the next token of a shard's last token lives on
another rank. One code path serves both cases.

Reduction under context parallelism. Every ``L_m`` is a ratio of sums over tokens, which are split
over the ``W`` ranks of the group. Each rank sums its own numerators ``sum w_t CE_t`` and
denominators ``sum w_t`` (and target counts, correct predictions); the numerators go through a
*differentiable* all-reduce (:func:`mmgrow.parallel.context_batch.sum_over_group`), the rest through
a plain one. So every rank computes, and reports, the global ``L`` and metrics of the whole sequence.
Gradients: the all-reduce's backward sums the upstream gradient over the group, so each rank's
backward carries ``W`` times the gradient of the global ``L`` with respect to its own tokens; data
parallelism then averages over all ``dp * W`` ranks, which leaves the sum over the ``W`` ranks of
one sequence averaged over the ``dp`` sequences -- exactly the gradient of the mean of the
per-sequence losses, as without context parallelism (``tests/unit/test_context_parallel_loss.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgrow.batch import TokenBatch
from mmgrow.protocols import PAD_SEGMENT, ContextParallel, MaskSpec, ModelOutput, Objective, SeqContext
from mmgrow.tokenspace import TokenSpace

Constraint = Callable[[int], Tensor]
"""``constraint(k) -> bool [V]`` or ``[B, V]``: local ids of the modality allowed at generation step k."""


def _as_token_space(token_space: TokenSpace | Mapping[str, int]) -> TokenSpace:
    if isinstance(token_space, TokenSpace):
        return token_space
    if isinstance(token_space, Mapping):
        return TokenSpace.from_dict(dict(token_space))
    raise TypeError(f"token_space must be a TokenSpace or a dict {{modality: vocab_size}}, got {type(token_space).__name__}")


def target_mask(batch: TokenBatch) -> Tensor:
    """``[B, T]`` bool: token ``t`` is a next-token target predicted from ``t-1``.

    True where ``loss_mask[t] > 0``, ``t >= 1``, token ``t`` is not padding and ``t-1`` belongs to the
    same packed example -- so the first token of an example is never predicted from the previous
    example's last token, and nothing is predicted from or into padding. Column 0 is always False.
    """
    seg = batch.segment_ids
    same_example = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != PAD_SEGMENT)
    targets = (batch.loss_mask[:, 1:] > 0) & same_example
    return torch.cat([torch.zeros_like(targets[:, :1]), targets], dim=1)


@dataclass
class NextTokenTargets:
    """What position ``t`` of each row must predict, aligned with ``t`` (all ``[B, T]``).

    ids:      int64 global id of token ``t+1`` (0 in the last column).
    modality: int64 modality index of token ``t+1`` (0 in the last column).
    weight:   float ``loss_mask[t+1] * example_weight[t+1]`` (0 in the last column).
    valid:    bool, token ``t+1`` is a target predicted from ``t`` (:func:`target_mask` shifted left
              by one); the last column is always False.

    Every field is per token along dim 1, so sharding the sequence shards the targets with it.
    """

    ids: Tensor
    modality: Tensor
    weight: Tensor
    valid: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.valid.shape)


def _shift_left(x: Tensor, fill: float | bool) -> Tensor:
    """``[B, T] -> [B, T]``: ``out[:, t] = x[:, t+1]``, the last column ``fill``."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], fill)], dim=1)


def next_token_targets(batch: TokenBatch) -> NextTokenTargets:
    """The per-position next-token targets of ``batch`` (see :class:`NextTokenTargets`)."""
    return NextTokenTargets(ids=_shift_left(batch.input_ids, 0), modality=_shift_left(batch.modality_ids, 0),
                            weight=_shift_left(batch.loss_mask * batch.example_weight, 0.0),
                            valid=_shift_left(target_mask(batch), False))


def shared_vocabulary(output: ModelOutput) -> tuple[Callable[[Tensor], Tensor], set[str]] | None:
    """``(vocabulary_logits, continuous modalities)`` when the model behind ``output.logits`` declares
    ``shared_head = True`` (one head over all global ids), else None. The capability is read from the
    model that owns the ``logits`` method, so the loss needs no extra argument."""
    owner = getattr(output.logits, "__self__", None)
    if not getattr(owner, "shared_head", False):
        return None
    return owner.vocabulary_logits, set(getattr(owner, "continuous", {}) or {})


def single_example_rows(segment_ids: Tensor) -> bool:
    """Whether every row of ``segment_ids [B, T]`` is one example followed only by right padding."""
    real = segment_ids != PAD_SEGMENT
    one_segment = ((segment_ids == segment_ids[:, :1]) | ~real).all()
    padding_is_a_suffix = (real[:, 1:] <= real[:, :-1]).all()  # no real token after a padding token
    return bool(real[:, 0].all() and one_segment and padding_is_a_suffix)


class AutoregressiveObjective(Objective):
    """Next-token cross-entropy with per-modality weights (LWM) and a stateful sampler.

    Weighting rule. ``modality_weights`` maps modality names to non-negative *relative* weights
    ``lambda_m``; a modality not listed has weight 1 (``None`` = every modality weight 1). The total is
    the ``lambda``-weighted mean of the per-modality losses over the modalities that have targets in
    the batch: a weighted modality without targets is dropped and the remaining weights are
    renormalised, so the loss scale does not jump when a batch happens to hold no text. Hence the
    default gives LWM's ``0.5 * (L_vision + L_text)`` for a text + video batch (and 1/3 each with
    image, video and text), and ``{"video": 3, "text": 1}`` gives 0.75 / 0.25. Weight 0 removes a
    modality from the loss (its metrics are still reported). Note that LWM pools image and video
    into one "vision" loss; here every modality of the token space has its own term.

    The per-token weight ``w_t = loss_mask_t * example_weight_t`` (LWM's masks are 0/1; packing
    re-weights examples through ``example_weight``).

    The token space (needed to turn global target ids into local ids of each head) is not part of
    :class:`~mmgrow.protocols.ModelOutput`; pass it as ``token_space=`` or call :meth:`bind` (the
    training module binds ``model.token_space`` once the model is built). :meth:`generate` reads it
    from the model.
    """

    supports_context_parallel = True
    """:meth:`targets` + :meth:`loss_on_targets` train on a sequence sharded over ``cp.group`` (module docstring)."""

    loss_is_nll_nats = True
    """The loss is a negative log-likelihood per target token in nats (a weighted mean of cross-entropies), so
    validation also logs it in bits per token (``loss / ln 2``, :class:`~mmgrow.training.module.MMGrowModule`)."""

    def __init__(self, modality_weights: dict[str, float] | None = None, *,
                 token_space: TokenSpace | Mapping[str, int] | None = None) -> None:
        weights = dict(modality_weights or {})
        for name, w in weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
                raise ValueError(f"modality_weights[{name!r}] must be a finite number >= 0, got {w!r}")
        self.modality_weights = {str(k): float(v) for k, v in weights.items()}
        self._token_space: TokenSpace | None = None
        if token_space is not None:
            self.bind(token_space)

    # ------------------------------------------------------------------ configuration

    def bind(self, token_space: TokenSpace | Mapping[str, int]) -> AutoregressiveObjective:
        """Attach the model's token space (returns ``self``). Weighted names must be modalities of it."""
        space = _as_token_space(token_space)
        unknown = sorted(set(self.modality_weights) - set(space.modalities))
        if unknown:
            raise ValueError(f"modality_weights names {unknown}, which are not in the token space "
                             f"{space.modalities}")
        self._token_space = space
        return self

    @property
    def token_space(self) -> TokenSpace:
        if self._token_space is None:
            raise RuntimeError("AutoregressiveObjective is not bound to a token space: call "
                               "objective.bind(model.token_space) or pass token_space= to the constructor")
        return self._token_space

    def weight(self, modality: str) -> float:
        """Relative weight ``lambda_m`` of ``modality`` (1 unless configured)."""
        return self.modality_weights.get(modality, 1.0)

    def context(self, batch: TokenBatch, **extra) -> SeqContext:
        """The :class:`SeqContext` for training on ``batch``.

        Causal mask; ``segment_ids`` kept when a row is packed (several examples) or padded anywhere
        but at its end. A row holding one example followed by right padding needs none: under a
        causal mask a real token never sees the padding after it, and no target comes from padding
        (:func:`target_mask`). Dropping them lets mixers without segment support train on padded
        batches and lets attention use its unmasked causal kernel. Modality ids are kept;
        ``block_ids`` are always dropped -- a bidirectional frame block would let position ``t-1``
        see token ``t`` and leak the target. ``extra`` goes to :class:`SeqContext` (``condition``,
        ``timestep``, ``cp`` ...); a ``mask=`` in it must be causal. The batch's own ``condition`` /
        ``condition_mask`` (caption embeddings from the data module) are passed on when it has them and
        ``extra`` gives none; a model without cross-attention never reads them.
        """
        condition = getattr(batch, "condition", None)
        if condition is not None:
            extra.setdefault("condition", condition)
            extra.setdefault("condition_mask", getattr(batch, "condition_mask", None))
            extra.setdefault("condition_segment_ids", getattr(batch, "condition_segment_ids", None))
        mask = extra.pop("mask", None) or MaskSpec(causal=True)
        if not mask.causal:
            raise ValueError("AutoregressiveObjective needs a causal mask; got MaskSpec(causal=False), which "
                             "would let position t-1 see its own target t")
        seg = batch.segment_ids
        return SeqContext(positions=batch.positions, segment_ids=None if single_example_rows(seg) else seg,
                          block_ids=None, modality_ids=batch.modality_ids, mask=mask, **extra)

    # ------------------------------------------------------------------ loss

    def targets(self, batch: TokenBatch) -> NextTokenTargets:
        """Per-position targets of the whole ``batch`` (computed before any sequence sharding)."""
        return next_token_targets(batch)

    def loss(self, output: ModelOutput, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted next-token cross-entropy (module docstring equation) and metrics.

        ``output.hidden [B, T, D]``; ``output.logits(h [N, D], modality) -> [N, V_modality]``.
        Metrics (detached 0-d tensors): ``loss``; per modality of the token space ``tokens_<m>`` (number
        of targets) and, when ``tokens_<m> > 0``, ``loss_<m>`` (``L_m``) and ``acc_<m>`` (unweighted
        top-1 accuracy over its targets).
        """
        hidden = output.hidden
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(batch.input_ids.shape):
            raise ValueError(f"output.hidden must be [B, T, D] with [B, T] = {tuple(batch.input_ids.shape)} "
                             f"(the batch), got {tuple(hidden.shape)}")
        return self.loss_on_targets(output, next_token_targets(batch))

    def check_targets(self, targets: NextTokenTargets) -> None:
        """Raise ``ValueError`` when a valid target's modality is not in the token space or its id is
        outside its modality's range. Under context parallelism this runs on the whole batch before
        sharding, so every rank of the group raises together instead of one rank leaving the others
        waiting in a collective."""
        space = self.token_space
        valid, modality_ids = targets.valid, targets.modality
        stray = valid & ((modality_ids < 0) | (modality_ids >= len(space.modalities)))
        if bool(stray.any()):
            raise ValueError(f"targets have modality_ids outside [0, {len(space.modalities)}) "
                             f"(token space {space.modalities}): {sorted(set(modality_ids[stray].tolist()))}")
        for index, modality in enumerate(space.modalities):
            sel = valid & (modality_ids == index)
            if not bool(sel.any()):
                continue
            local = space.to_local(targets.ids[sel], modality)
            size = space.size(modality)
            if int(local.min()) < 0 or int(local.max()) >= size:
                raise ValueError(f"targets marked as {modality!r} (modality_ids == {index}) have global ids outside "
                                 f"[{space.offset(modality)}, {space.offset(modality) + size}); "
                                 "modality_ids and input_ids disagree")

    def loss_on_targets(self, output: ModelOutput, targets: NextTokenTargets,
                        cp: ContextParallel | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`loss` from per-position ``targets`` aligned with ``output.hidden [B, T, D]``.

        With ``cp`` (world size > 1) ``hidden`` and ``targets`` are this rank's shard of the
        sequence; the sums behind every ``L_m`` and metric are reduced over ``cp.group`` so the
        loss and metrics are those of the whole sequence on every rank (module docstring: why the
        gradients come out right). Every rank of the group must call this with the same modalities.
        """
        space = self.token_space
        hidden = output.hidden
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != targets.shape:
            raise ValueError(f"output.hidden must be [B, T, D] with [B, T] = {targets.shape} "
                             f"(the targets), got {tuple(hidden.shape)}")
        self.check_targets(targets)
        valid, next_modality = targets.valid, targets.modality

        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # the sums, as the CE: float32 at least
        shared = shared_vocabulary(output)
        # Per modality: sum w*CE (differentiable), sum w, number of targets, correct top-1 predictions.
        numerators: list[Tensor] = []
        stats: list[Tensor] = []
        for index, modality in enumerate(space.modalities):
            sel = valid & (next_modality == index)
            count = int(sel.sum())
            if count == 0:
                # An empty sum still tied to the graph: under context parallelism every rank must
                # run the all-reduce's backward, whether or not it holds targets of this modality.
                numerators.append(hidden[:0].sum().to(acc_dtype))
                stats.append(torch.zeros(3, dtype=torch.float64, device=hidden.device))
                continue
            if shared is not None and modality not in shared[1]:
                # One softmax over every global id: the modalities compete (shared head, module docstring).
                local, size = targets.ids[sel], space.total
                logits = shared[0](hidden[sel])
            else:
                local = space.to_local(targets.ids[sel], modality)
                size = space.size(modality)
                logits = output.logits(hidden[sel], modality)
            if tuple(logits.shape) != (count, size):
                raise ValueError(f"output.logits(h, {modality!r}) returned {tuple(logits.shape)}, expected "
                                 f"[{count}, {size}] (one row per target, the modality's vocabulary)")
            # float32 at least: a bf16 log-softmax over a large vocabulary loses the small probabilities
            ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), local,
                                 reduction="none")
            w = targets.weight[sel].to(ce.dtype)
            numerators.append((w * ce).sum().to(acc_dtype))
            with torch.no_grad():
                hits = (logits.argmax(-1) == local).sum()
            stats.append(torch.stack([w.sum().detach().double(), torch.tensor(float(count), dtype=torch.float64,
                                                                             device=w.device), hits.double()]))
        numerator = torch.stack(numerators)                 # [M]
        stat = torch.stack(stats)                           # [M, 3] float64 (exact counts): sum w, count, hits
        if cp is not None and cp.world_size > 1:
            import torch.distributed as dist

            from mmgrow.parallel.context_batch import sum_over_group

            numerator = sum_over_group(numerator, cp.group)
            dist.all_reduce(stat, group=cp.group)

        terms: list[tuple[float, Tensor]] = []
        metrics: dict[str, Tensor] = {}
        for index, (modality, (total_w, count, _)) in enumerate(zip(space.modalities, stat.tolist())):
            metrics[f"tokens_{modality}"] = torch.tensor(float(count))
            if count == 0:
                continue
            metrics[f"acc_{modality}"] = stat[index, 2].float() / stat[index, 1].float()
            if total_w <= 0:  # every target of this modality has zero example weight
                continue
            loss_m = numerator[index] / stat[index, 0].to(acc_dtype)
            metrics[f"loss_{modality}"] = loss_m.detach()
            if self.weight(modality) > 0:
                terms.append((self.weight(modality), loss_m))

        if terms:
            norm = sum(lam for lam, _ in terms)
            loss = sum(lam / norm * loss_m for lam, loss_m in terms)
        else:  # nothing to learn from in this batch: a zero that still has a graph, so backward() works
            loss = hidden.sum() * 0.0
        # Every modality head joins the graph, on zero rows (exactly 0, no FLOPs): DDP expects a
        # gradient for every parameter each step, and a batch often lacks some modality's targets
        # (text-to-video never predicts text); without this DDP would need find_unused_parameters.
        for modality in space.modalities:
            loss = loss + output.logits(hidden[:0, 0], modality).sum()
        metrics["loss"] = loss.detach()
        return loss, metrics

    # ------------------------------------------------------------------ sampler

    @torch.no_grad()
    def generate(self, model: nn.Module, prompt_ids: Tensor, *, modality: str, max_new_tokens: int,
                 modality_ids: Tensor | None = None, temperature: float = 1.0, top_k: int | None = None,
                 greedy: bool = False, constraint: Constraint | None = None,
                 generator: torch.Generator | None = None, condition: Tensor | None = None,
                 condition_mask: Tensor | None = None, latents: Tensor | None = None) -> Tensor:
        """Sample ``max_new_tokens`` tokens of ``modality`` after ``prompt_ids``.

        ``prompt_ids [B, T0]`` global ids (``T0 >= 1``), ``modality_ids [B, T0]`` (default: derived
        from the ids with the model's token space). Returns ``[B, max_new_tokens]`` int64 **local** ids
        of ``modality``. With ``model.supports_state`` the prompt is prefilled once with states from
        ``model.init_states`` and each new token is a ``T == 1`` step carrying the states (positions
        continue from the prompt); otherwise the whole prefix is re-run every step (same result,
        quadratic cost). Step ``k``: logits of the modality head at the last position; disallowed ids
        of ``constraint(k)`` set to ``-inf``; then greedy argmax (``greedy=True``), or ``top_k``
        filtering and sampling from ``softmax(logits / temperature)`` with ``generator``.
        The model runs in eval mode (restored afterwards) without gradients. ``condition [B, S, C]``
        and ``condition_mask [B, S]`` (text-encoder embeddings of the prompt) are handed to every
        step's context, for models with cross-attention branches. ``latents [B, T0, C]`` are the values
        of the prompt's continuous positions (image / audio features read as inputs); the prefill reads
        them, and the sampled tokens are discrete, so re-run steps append zero rows and stateful steps
        pass none.
        """
        space: TokenSpace = _as_token_space(model.token_space)
        if modality not in space.modalities:
            raise KeyError(f"modality {modality!r} is not in the model's token space {space.modalities}")
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1 or prompt_ids.dtype != torch.long:
            raise ValueError(f"prompt_ids must be int64 [B, T0] with T0 >= 1, got {prompt_ids.dtype} "
                             f"{tuple(prompt_ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not greedy and not (temperature > 0):
            raise ValueError(f"temperature must be > 0 when sampling (use greedy=True for argmax), got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        batch_size, prompt_len = prompt_ids.shape
        if modality_ids is None:
            modality_ids = space.modality_of(prompt_ids)
        elif tuple(modality_ids.shape) != (batch_size, prompt_len):
            raise ValueError(f"modality_ids must be [B, T0] = {(batch_size, prompt_len)}, got {tuple(modality_ids.shape)}")
        if latents is not None and (latents.dim() != 3 or tuple(latents.shape[:2]) != (batch_size, prompt_len)
                                    or not latents.is_floating_point()):
            raise ValueError(f"latents must be float [B, T0, C] with [B, T0] = {(batch_size, prompt_len)} (the "
                             f"prompt), got {latents.dtype} {tuple(latents.shape)}")
        if max_new_tokens == 0:
            return prompt_ids.new_zeros(batch_size, 0)

        device = prompt_ids.device
        offset, index = space.offset(modality), space.index(modality)
        new_modality = torch.full((batch_size, 1), index, dtype=torch.long, device=device)
        was_training = model.training
        model.eval()
        try:
            stateful = bool(getattr(model, "supports_state", False))
            ids, mods = prompt_ids, modality_ids.to(device)
            states = None
            if stateful:
                param = next(model.parameters())
                states = model.init_states(batch_size, device, param.dtype)
            cond = {"condition": condition, "condition_mask": condition_mask}
            lat = None if latents is None else latents.to(device)
            extra = {} if lat is None else {"latents": lat}
            out = model(ids, self._decode_context(mods, 0, **cond), states=states, **extra)
            generated = []
            for step in range(max_new_tokens):
                logits = out.logits(out.hidden[:, -1], modality)          # [B, V]
                token = self._pick(logits, step, constraint, greedy, temperature, top_k, generator)
                generated.append(token)
                if step == max_new_tokens - 1:
                    break
                next_ids = (token + offset)[:, None]
                if stateful:
                    if out.states is None:
                        raise RuntimeError(f"{type(model).__name__}.supports_state is True but its forward returned "
                                           "no states; cannot decode step by step")
                    start = prompt_len + step
                    out = model(next_ids, self._decode_context(new_modality, start, **cond), states=out.states)
                else:
                    ids = torch.cat([ids, next_ids], dim=1)
                    mods = torch.cat([mods, new_modality], dim=1)
                    if lat is not None:  # the new token is discrete: a zero row
                        lat = torch.cat([lat, lat.new_zeros(batch_size, 1, lat.shape[2])], dim=1)
                        extra = {"latents": lat}
                    out = model(ids, self._decode_context(mods, 0, **cond), states=None, **extra)
            return torch.stack(generated, dim=1)
        finally:
            model.train(was_training)

    @staticmethod
    def _decode_context(modality_ids: Tensor, start: int, condition: Tensor | None = None,
                        condition_mask: Tensor | None = None) -> SeqContext:
        """Context of tokens at positions ``start .. start+T-1``: one example per row, causal."""
        batch_size, length = modality_ids.shape
        positions = torch.arange(start, start + length, device=modality_ids.device).expand(batch_size, length)
        return SeqContext(positions=positions.contiguous(), modality_ids=modality_ids, mask=MaskSpec(causal=True),
                          condition=condition, condition_mask=condition_mask)

    @staticmethod
    def _pick(logits: Tensor, step: int, constraint: Constraint | None, greedy: bool, temperature: float,
              top_k: int | None, generator: torch.Generator | None) -> Tensor:
        """``[B, V]`` logits -> ``[B]`` chosen local ids (constraint, then greedy / temperature + top-k)."""
        logits = logits.float()
        if constraint is not None:
            allowed = torch.as_tensor(constraint(step), device=logits.device)
            if allowed.dtype != torch.bool or allowed.shape not in (logits.shape[1:], logits.shape):
                raise ValueError(f"constraint({step}) must return a bool tensor of shape [{logits.shape[1]}] or "
                                 f"{list(logits.shape)}, got {allowed.dtype} {list(allowed.shape)}")
            if not bool(allowed.expand_as(logits).any(-1).all()):
                raise ValueError(f"constraint({step}) allows no token for at least one row")
            logits = logits.masked_fill(~allowed, float("-inf"))
        if greedy:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
