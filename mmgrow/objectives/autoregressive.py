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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgrow.batch import TokenBatch
from mmgrow.protocols import PAD_SEGMENT, MaskSpec, ModelOutput, Objective, SeqContext
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
        ``timestep``, ``cp`` ...); a ``mask=`` in it must be causal.
        """
        mask = extra.pop("mask", None) or MaskSpec(causal=True)
        if not mask.causal:
            raise ValueError("AutoregressiveObjective needs a causal mask; got MaskSpec(causal=False), which "
                             "would let position t-1 see its own target t")
        seg = batch.segment_ids
        return SeqContext(positions=batch.positions, segment_ids=None if single_example_rows(seg) else seg,
                          block_ids=None, modality_ids=batch.modality_ids, mask=mask, **extra)

    # ------------------------------------------------------------------ loss

    def loss(self, output: ModelOutput, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted next-token cross-entropy (module docstring equation) and metrics.

        ``output.hidden [B, T, D]``; ``output.logits(h [N, D], modality) -> [N, V_modality]``.
        Metrics (detached 0-d tensors): ``loss``; per modality of the token space ``tokens_<m>`` (number
        of targets) and, when ``tokens_<m> > 0``, ``loss_<m>`` (``L_m``) and ``acc_<m>`` (unweighted
        top-1 accuracy over its targets).
        """
        space = self.token_space
        hidden = output.hidden
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(batch.input_ids.shape):
            raise ValueError(f"output.hidden must be [B, T, D] with [B, T] = {tuple(batch.input_ids.shape)} "
                             f"(the batch), got {tuple(hidden.shape)}")
        targets = target_mask(batch)[:, 1:]               # [B, T-1]: target t+1 predicted at t
        prev_hidden = hidden[:, :-1]                      # [B, T-1, D]
        next_ids = batch.input_ids[:, 1:]
        next_modality = batch.modality_ids[:, 1:]
        token_weight = (batch.loss_mask * batch.example_weight)[:, 1:]
        stray = targets & ((next_modality < 0) | (next_modality >= len(space.modalities)))
        if bool(stray.any()):
            raise ValueError(f"targets have modality_ids outside [0, {len(space.modalities)}) "
                             f"(token space {space.modalities}): {sorted(set(next_modality[stray].tolist()))}")

        terms: list[tuple[float, Tensor]] = []
        metrics: dict[str, Tensor] = {}
        for index, modality in enumerate(space.modalities):
            sel = targets & (next_modality == index)
            count = int(sel.sum())
            metrics[f"tokens_{modality}"] = torch.tensor(float(count))
            if count == 0:
                continue
            local = space.to_local(next_ids[sel], modality)
            size = space.size(modality)
            if int(local.min()) < 0 or int(local.max()) >= size:
                raise ValueError(f"targets marked as {modality!r} (modality_ids == {index}) have global ids outside "
                                 f"[{space.offset(modality)}, {space.offset(modality) + size}); "
                                 "modality_ids and input_ids disagree")
            logits = output.logits(prev_hidden[sel], modality)
            if tuple(logits.shape) != (count, size):
                raise ValueError(f"output.logits(h, {modality!r}) returned {tuple(logits.shape)}, expected "
                                 f"[{count}, {size}] (one row per target, the modality's vocabulary)")
            # float32 at least: a bf16 log-softmax over a large vocabulary loses the small probabilities
            ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), local,
                                 reduction="none")
            w = token_weight[sel].to(ce.dtype)
            total_w = w.sum()
            with torch.no_grad():
                metrics[f"acc_{modality}"] = (logits.argmax(-1) == local).float().mean()
            if float(total_w) <= 0:  # every target of this modality has zero example weight
                continue
            loss_m = (w * ce).sum() / total_w
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
                 generator: torch.Generator | None = None) -> Tensor:
        """Sample ``max_new_tokens`` tokens of ``modality`` after ``prompt_ids``.

        ``prompt_ids [B, T0]`` global ids (``T0 >= 1``), ``modality_ids [B, T0]`` (default: derived
        from the ids with the model's token space). Returns ``[B, max_new_tokens]`` int64 **local** ids
        of ``modality``. With ``model.supports_state`` the prompt is prefilled once with states from
        ``model.init_states`` and each new token is a ``T == 1`` step carrying the states (positions
        continue from the prompt); otherwise the whole prefix is re-run every step (same result,
        quadratic cost). Step ``k``: logits of the modality head at the last position; disallowed ids
        of ``constraint(k)`` set to ``-inf``; then greedy argmax (``greedy=True``), or ``top_k``
        filtering and sampling from ``softmax(logits / temperature)`` with ``generator``.
        The model runs in eval mode (restored afterwards) without gradients.
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
            out = model(ids, self._decode_context(mods, 0), states=states)
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
                    out = model(next_ids, self._decode_context(new_modality, start), states=out.states)
                else:
                    ids = torch.cat([ids, next_ids], dim=1)
                    mods = torch.cat([mods, new_modality], dim=1)
                    out = model(ids, self._decode_context(mods, 0), states=None)
            return torch.stack(generated, dim=1)
        finally:
            model.train(was_training)

    @staticmethod
    def _decode_context(modality_ids: Tensor, start: int) -> SeqContext:
        """Context of tokens at positions ``start .. start+T-1``: one example per row, causal."""
        batch_size, length = modality_ids.shape
        positions = torch.arange(start, start + length, device=modality_ids.device).expand(batch_size, length)
        return SeqContext(positions=positions.contiguous(), modality_ids=modality_ids, mask=MaskSpec(causal=True))

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
