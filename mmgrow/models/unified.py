"""The one model every recipe trains: shared token embedding -> backbone -> final norm -> heads.

Continuous modalities (``continuous={"video": C}``, a DiT on video latents) take one id of the token
space (their *latent slot*) and add ``Linear(C, D)(latents)`` to that slot's embedding at their
positions; their head is a zero-initialised ``Linear(D, C)`` (:class:`~mmgrow.models.timestep.LatentHead`)
that predicts a velocity instead of logits. With ``modulation`` the model also owns the timestep
embedding (:meth:`UnifiedModel.embed_timestep`, which the flow-matching objective puts into
``ctx.timestep``) and DiT's modulated final norm.

Inputs are *global* ids of a :class:`~mmgrow.tokenspace.TokenSpace` (``offset(modality) + local id``),
embedded by one table over all ``token_space.total`` ids. Outputs are per-modality heads
(``nn.Linear(dim, size(modality), bias=False)``) predicting *local* ids of that modality, so text and
vision logits never compete in one softmax (LWM keeps its heads apart the same way).

Initialisation: every ``nn.Linear`` and ``nn.Embedding`` weight ~ ``N(0, init_std)``, every bias 0,
norm gains 1. A module that needs its own initialisation (a mixer's SSM decay rates, an adaLN-Zero
projection that must start at 0 ...) defines ``init_weights(init_std: float)``; the model calls it
instead of applying the default to that module and its children. A branch with gates (memory,
cross-attention) defines ``reset_gates()``; its other parameters get the default.

UnIVAL options (``docs/unival.md``):

* ``input_encoders={modality: {"class_path": ..., "init_args": {...}}}``: a continuous modality whose
  codec ships a trainable encoder (a timm CNN / ViT over images) reads its latents through it
  instead of the plain ``Linear(C, D)``. The encoder is built as ``cls(dim=D, latent_dim=C,
  **init_args)`` and maps one item's latents ``[M, n, C] -> [M, n, D]`` (``n = tokens_per_item``);
  the model gathers the modality's positions row-major (each item a whole run of ``n`` positions),
  runs the encoder and scatters ``[M * n, D]`` back, added to the latent slot's embedding.
* ``modality_embeddings=True``: a learned type embedding per modality,
  ``x_t += E_type[modality(t)]`` (``nn.Embedding(num_modalities, D)``, default init).
* ``head="shared"``: one ``nn.Linear(D, token_space.total)`` over every global id (UnIVAL's single
  vocabulary); the objective's cross-entropy then takes the softmax over all ids (:attr:`shared_head`).
  ``logits(h, m)`` still returns the modality's slice ``W[off_m : off_m + V_m] h``. Continuous
  modalities keep their :class:`~mmgrow.models.timestep.LatentHead` in both modes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mmgrow.layers.norm import RMSNorm
from mmgrow.models.backbone import Backbone
from mmgrow.models.cross_condition import CrossAttentionConfig
from mmgrow.models.gated_memory import MemoryPlacement
from mmgrow.models.modulation import ModulationConfig
from mmgrow.models.timestep import FinalModulation, LatentHead, TimestepEmbedding
from mmgrow.protocols import MixerCapabilityError, MixerFactory, MixerState, ModelOutput, SeqContext
from mmgrow.tokenspace import TokenSpace

HEADS = ("per_modality", "shared")
"""``UnifiedModel(head=...)``: a head per modality (LWM) or one head over the whole token space (UnIVAL)."""


def initialise(module: nn.Module, init_std: float) -> None:
    """The model's initialisation rule (module docstring) applied to ``module`` and its children;
    growth uses it for the branches it adds, so they start as if the model had been built with them."""
    if initialise_own(module, init_std):
        return  # its submodules are its business
    for child in module.children():
        initialise(child, init_std)


def initialise_own(module: nn.Module, init_std: float) -> bool:
    """The rule for ``module``'s own parameters only; True when the module initialised its whole subtree
    itself (``init_weights``). Meta-device materialisation calls it module by module."""
    if callable(getattr(module, "init_weights", None)):
        module.init_weights(init_std)
        return True
    if callable(getattr(module, "reset_gates", None)):
        module.reset_gates()  # gates back to gate_init; the rest below
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=init_std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
    return False


def _zero_touch(module: nn.Module) -> Tensor | float:
    """``0 * sum`` of ``module``'s trainable parameters: exactly zero, but in the autograd graph."""
    params = [p.sum() for p in module.parameters() if p.requires_grad]
    return torch.stack(params).sum() * 0.0 if params else 0.0


class UnifiedModel(nn.Module):
    """``input_ids [B, T]`` (global ids) + :class:`SeqContext` -> :class:`ModelOutput`.

    Args:
        token_space: ``{modality: vocab_size}`` in offset order, or a :class:`TokenSpace`.
        dim: model width ``D``.
        depth: number of blocks.
        mixer: a mixer factory, a list cycled over layers, or None (FullAttention, 4 heads).
        mlp_ratio: SwiGLU hidden size = ``ceil(mlp_ratio * dim)`` rounded up to a multiple of 8
            (8/3 matches the parameters of a 4x GELU MLP).
        norm_eps: RMSNorm epsilon.
        mlp_chunk: run each MLP over this many tokens at a time with recomputation (blockwise
            feed-forward; None = the whole sequence at once).
        init_std: standard deviation of the normal init of linear and embedding weights.
        memory: factory of a memory layer added as a gated branch (TTT, or any mixer), or None.
        memory_placement: which blocks get it, gate init, bidirectional, per-modality gates
            (:class:`~mmgrow.models.gated_memory.MemoryPlacement` or a dict of its fields).
        cross_attention: cross-attention branches on ``ctx.condition``
            (:class:`~mmgrow.models.cross_condition.CrossAttentionConfig` or a dict), or None.
        modulation: adaLN modulation from ``ctx.timestep``
            (:class:`~mmgrow.models.modulation.ModulationConfig` or a dict), or None. The model then
            has a :class:`~mmgrow.models.timestep.TimestepEmbedding` to ``cond_dim`` and a modulated
            final norm.
        continuous: ``{modality: latent_dim}`` of the continuous modalities (each must be in the
            token space, where it holds its latent slot), or None.
        input_encoders: ``{modality: {"class_path", "init_args"}}`` trainable encoders of continuous
            modalities (module docstring); class paths are imported only when trusted (:mod:`mmgrow.trust`).
        modality_embeddings: add a learned embedding of each position's modality to its input.
        head: ``"per_modality"`` (default) or ``"shared"`` (:data:`HEADS`; module docstring).
    """

    def __init__(self, *, token_space: dict[str, int] | TokenSpace, dim: int = 256, depth: int = 4,
                 mixer: MixerFactory | Sequence[MixerFactory] | None = None, mlp_ratio: float = 8 / 3,
                 norm_eps: float = 1e-6, init_std: float = 0.02, mlp_chunk: int | None = None,
                 memory: MixerFactory | None = None, memory_placement: MemoryPlacement | dict | None = None,
                 cross_attention: CrossAttentionConfig | dict | None = None,
                 modulation: ModulationConfig | dict | None = None,
                 continuous: dict[str, int] | None = None, input_encoders: dict[str, dict] | None = None,
                 modality_embeddings: bool = False, head: str = "per_modality") -> None:
        super().__init__()
        if isinstance(token_space, dict):
            token_space = TokenSpace.from_dict(token_space)
        if not isinstance(token_space, TokenSpace):
            raise TypeError(f"UnifiedModel: token_space must be a dict or TokenSpace, got {type(token_space).__name__}")
        for m in token_space.modalities:
            if not m or "." in m:
                raise ValueError(f"UnifiedModel: modality name {m!r} cannot name a head (empty or contains '.')")
        if init_std <= 0:
            raise ValueError(f"UnifiedModel: init_std must be positive, got {init_std}")
        if head not in HEADS:
            raise ValueError(f"UnifiedModel: head must be one of {HEADS}, got {head!r}")
        if not isinstance(modality_embeddings, bool):
            raise TypeError(f"UnifiedModel: modality_embeddings must be a bool, got {modality_embeddings!r}")
        self.token_space = token_space
        self.dim = dim
        self.init_std = init_std
        self.embed = nn.Embedding(token_space.total, dim)
        self.backbone = Backbone(dim, depth, mixer, mlp_ratio=mlp_ratio, norm_eps=norm_eps, mlp_chunk=mlp_chunk,
                                 memory=memory, memory_placement=memory_placement,
                                 cross_attention=cross_attention, modulation=modulation)
        self.norm = RMSNorm(dim, eps=norm_eps)
        continuous = dict(continuous or {})
        for m, width in continuous.items():
            if m not in token_space.modalities:
                raise ValueError(f"UnifiedModel: continuous modality {m!r} is not in the token space "
                                 f"{token_space.modalities} (it needs one id there: its latent slot)")
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"UnifiedModel: continuous[{m!r}] must be a positive latent width, got {width!r}")
        self.continuous = continuous
        self.input_encoder_specs = build_input_encoder_specs(input_encoders, continuous)
        self.input_encoders = nn.ModuleDict({m: build_input_encoder(m, spec, dim, continuous[m])
                                             for m, spec in self.input_encoder_specs.items()})
        # A modality read through its encoder gets no plain Linear: an unused parameter would break DDP.
        self.latent_in = nn.ModuleDict({m: nn.Linear(c, dim) for m, c in continuous.items()
                                        if m not in self.input_encoders})
        self.modality_embedding = nn.Embedding(len(token_space.modalities), dim) if modality_embeddings else None
        self.head_kind = head
        self.vocab_head = nn.Linear(dim, token_space.total, bias=False) if head == "shared" else None
        self.heads = nn.ModuleDict({m: LatentHead(dim, continuous[m]) if m in continuous else
                                    nn.Linear(dim, n, bias=False) for m, n in token_space.sizes
                                    if m in continuous or head == "per_modality"})
        self.timestep_embedding: TimestepEmbedding | None = None
        self.final_modulation: FinalModulation | None = None
        if self.backbone.blocks and self.blocks[0].modulation is not None:
            mod = self.blocks[0].modulation
            cond_dim = mod.cond_dim if isinstance(getattr(mod, "cond_dim", None), int) else dim
            self.timestep_embedding = TimestepEmbedding(cond_dim, width=mod.timestep_width)
            self.final_modulation = FinalModulation(dim, mod.timestep_width)
        self.reset_parameters()

    # ---------------------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights and zero biases; modules with ``init_weights`` do their own."""
        initialise(self, self.init_std)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.blocks

    @property
    def modalities(self) -> list[str]:
        return self.token_space.modalities

    @property
    def shared_head(self) -> bool:
        """True when discrete modalities share one head over all global ids (``head="shared"``): the
        autoregressive objective then takes its softmax over the whole token space (:meth:`vocabulary_logits`)."""
        return self.vocab_head is not None

    @property
    def supports_state(self) -> bool:
        """True when every block (its mixer and memory branch) can decode with a state."""
        return all(block.supports_state for block in self.blocks)

    # ---------------------------------------------------------------------------------------------

    def _check_inputs(self, input_ids: Tensor, ctx: SeqContext) -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"UnifiedModel: input_ids must be a tensor, got {type(input_ids).__name__}")
        if input_ids.dtype != torch.long:
            raise TypeError(f"UnifiedModel: input_ids must be int64 (torch.long), got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"UnifiedModel: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if tuple(input_ids.shape) != tuple(ctx.positions.shape):
            raise ValueError(f"UnifiedModel: input_ids is {tuple(input_ids.shape)} but ctx.positions is "
                             f"{tuple(ctx.positions.shape)}; expected the same [B, T]")
        total = self.token_space.total
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= total):
            raise ValueError(f"UnifiedModel: input_ids must lie in [0, {total}) (global ids of the token space "
                             f"{self.token_space.to_dict()}), got range [{int(input_ids.min())}, {int(input_ids.max())}]")

    def forward(self, input_ids: Tensor, ctx: SeqContext, states: Sequence[MixerState] | None = None,
                latents: Tensor | None = None) -> ModelOutput:
        """``input_ids [B, T]`` int64 global ids -> ``ModelOutput(hidden [B, T, D], logits, states)``.

        With ``states`` (from :meth:`init_states` or a previous call) every mixer continues from its
        state and the new states are returned; otherwise ``states`` is None. ``latents [B, T, C]``
        carries the values of continuous positions (module docstring); required when the sequence
        holds any. A modulated model reads ``ctx.timestep`` (:meth:`embed_timestep`).
        """
        self._check_inputs(input_ids, ctx)
        x = self.embed(input_ids)
        modality = None
        if latents is not None:
            modality = ctx.modality_ids if ctx.modality_ids is not None else self.token_space.modality_of(input_ids)
            self._check_latents_are_read(modality, latents)
        if self.continuous or self.modality_embedding is not None:
            if modality is None:
                modality = ctx.modality_ids if ctx.modality_ids is not None else self.token_space.modality_of(input_ids)
            if self.modality_embedding is not None:
                x = x + self.modality_embedding(modality)
            if self.continuous:
                x = self._add_latents(x, input_ids, modality, latents)
        x, new_states = self.backbone(x, ctx, states)
        hidden = self.norm(x)
        if self.final_modulation is not None:
            if ctx.timestep is None:
                raise ValueError("UnifiedModel: the model is modulated (a DiT) but ctx.timestep is None; pass "
                                 "ctx.timestep = model.embed_timestep(t) for timesteps t [B] in [0, 1]")
            hidden = self.final_modulation(hidden, ctx.timestep)
        return ModelOutput(hidden=hidden, logits=self.logits, states=new_states)

    def _check_latents_are_read(self, modality: Tensor, latents: Tensor) -> None:
        """Non-zero ``latents`` at a position whose modality the model does not read as continuous would be
        dropped without a trace (a model built without ``continuous=data.continuous``): a named error."""
        if latents.dim() != 3 or tuple(latents.shape[:2]) != tuple(modality.shape):
            raise ValueError(f"UnifiedModel: latents must be float [B, T, C] with [B, T] = {tuple(modality.shape)}, "
                             f"got {tuple(latents.shape)}")
        read = torch.zeros_like(modality, dtype=torch.bool)
        for m in self.continuous:
            read |= modality == self.token_space.index(m)
        stray = (latents != 0).any(dim=-1) & ~read
        if bool(stray.any()):
            names = sorted({self.token_space.modalities[int(i)] for i in modality[stray].unique()})
            raise ValueError(f"UnifiedModel: latents carry values at {names} positions, but the model reads latents "
                             f"only for its continuous modalities {sorted(self.continuous)}; build it with "
                             "continuous=data.continuous (the CLI links it; by hand: "
                             "MMGrowModule(vocab=dm.vocab, continuous=dm.continuous, ...))")

    def _add_latents(self, x: Tensor, input_ids: Tensor, modality: Tensor, latents: Tensor | None) -> Tensor:
        """``x [B, T, D] + sum_m [modality(t) = m] in_m(latents[..., :C_m])`` with ``in_m`` the plain
        ``Linear(C_m, D)`` or, for a modality with an input encoder, the encoder over whole items."""
        for m in self.continuous:
            here = modality == self.token_space.index(m)  # [B, T]
            if not bool(here.any()):
                # Absent from this batch (audio before its fine-tune ...): its input weights still join the
                # graph, with an exact zero, so data parallelism gets a (zero) gradient for every parameter
                # each step instead of needing find_unused_parameters.
                x = x + _zero_touch(self.input_encoders[m] if m in self.input_encoders else self.latent_in[m])
                continue
            width = self.continuous[m]
            if latents is None or latents.dim() != 3 or tuple(latents.shape[:2]) != tuple(input_ids.shape) \
                    or latents.shape[2] < width:
                raise ValueError(f"UnifiedModel: the sequence holds continuous {m!r} positions, so latents must be "
                                 f"float [B, T, >= {width}] with [B, T] = {tuple(input_ids.shape)}, got "
                                 f"{None if latents is None else tuple(latents.shape)}")
            if m in self.input_encoders:
                x = x + self._encode_items(m, here, latents[..., :width].to(x.dtype))
            else:
                x = x + here[..., None].to(x.dtype) * self.latent_in[m](latents[..., :width].to(x.dtype))
        return x

    def _encode_items(self, modality: str, here: Tensor, latents: Tensor) -> Tensor:
        """``[B, T, D]``: the encoder's output at ``here [B, T]`` positions, zeros elsewhere.

        The positions of each row are taken in order and cut into items of ``n = tokens_per_item``
        consecutive positions (a codec writes an item as one contiguous run), so ``latents[here]
        [M * n, C] -> [M, n, C] -> encoder -> [M, n, D] -> [M * n, D]`` and back in the same order."""
        encoder = self.input_encoders[modality]
        n = int(encoder.tokens_per_item)
        per_row = here.sum(dim=1)
        if bool((per_row % n != 0).any()):
            raise ValueError(f"UnifiedModel: input encoder of {modality!r} reads whole items of tokens_per_item={n} "
                             f"positions, but rows hold {per_row.tolist()} {modality!r} positions (not multiples of "
                             f"{n}); keep every item whole in a row (no truncation inside an item)")
        values = latents[here]                                              # [M * n, C], row-major
        out = encoder(values.reshape(-1, n, values.shape[-1]))              # [M, n, D]
        if tuple(out.shape) != (values.shape[0] // n, n, self.dim):
            raise ValueError(f"UnifiedModel: input encoder of {modality!r} returned {tuple(out.shape)}, expected "
                             f"[{values.shape[0] // n}, {n}, {self.dim}] ([M, tokens_per_item, dim])")
        out = out.reshape(-1, self.dim).to(latents.dtype)
        return torch.zeros(*here.shape, self.dim, dtype=out.dtype, device=out.device).masked_scatter(
            here[..., None].expand(*here.shape, self.dim), out)

    def embed_timestep(self, t: Tensor) -> Tensor:
        """``t [B]`` in ``[0, 1]`` -> ``[B, W]``, the ``ctx.timestep`` the modulated blocks read."""
        if self.timestep_embedding is None:
            raise ValueError("UnifiedModel.embed_timestep: the model has no modulation (set model.modulation, "
                             "e.g. {kind: adaln_zero, cond_dim: 128}, to build a DiT)")
        return self.timestep_embedding(t)

    def logits(self, hidden: Tensor, modality: str) -> Tensor:
        """``hidden [..., D] -> [..., V_modality]`` logits over the *local* ids of ``modality`` (for a
        continuous modality: its prediction ``[..., C]``)."""
        if modality in self.heads:
            return self.heads[modality](hidden)
        if self.vocab_head is None or modality not in self.token_space.modalities:
            raise KeyError(f"UnifiedModel has no head for modality {modality!r}; modalities: {self.modalities}")
        # The shared head's rows of this modality: sampling from them is sampling restricted to it.
        offset = self.token_space.offset(modality)
        return nn.functional.linear(hidden, self.vocab_head.weight[offset: offset + self.token_space.size(modality)])

    def vocabulary_logits(self, hidden: Tensor) -> Tensor:
        """``hidden [..., D] -> [..., token_space.total]`` logits over every global id (shared head only)."""
        if self.vocab_head is None:
            raise ValueError("UnifiedModel.vocabulary_logits: the model has a head per modality (head='per_modality'); "
                             "logits over all ids need head='shared'")
        return self.vocab_head(hidden)

    def init_states(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> list[MixerState]:
        """One empty decoding state per layer."""
        states = []
        for i, block in enumerate(self.blocks):
            if not block.supports_state:
                raise MixerCapabilityError(f"UnifiedModel: layer {i} ({type(block.mixer).__name__}"
                                           f"{' with a memory branch' if block.memory is not None else ''}) does not "
                                           "support stateful decoding")
            states.append(block.init_state(batch_size, device, dtype))
        return states

    def residual_outputs(self) -> list[nn.Linear]:
        """Output projections of every residual branch, block by block."""
        return self.backbone.residual_outputs()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``exclude_embeddings`` leaves out the embedding table and the heads (the
        non-embedding ``N`` of scaling laws)."""
        skip = set()
        if exclude_embeddings:
            tables = [self.embed, self.heads, self.vocab_head, self.modality_embedding]
            skip = {id(p) for t in tables if t is not None for p in t.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)


def build_input_encoder_specs(specs: dict[str, dict] | None, continuous: dict[str, int]) -> dict[str, dict]:
    """Checked, plain copies of ``input_encoders`` (what ``model.yaml`` stores)."""
    out: dict[str, dict] = {}
    for m, spec in (specs or {}).items():
        if m not in continuous:
            raise ValueError(f"UnifiedModel: input_encoders[{m!r}] given, but {m!r} is not a continuous modality "
                             f"(continuous: {sorted(continuous)}); an input encoder reads a continuous codec's latents")
        if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str) \
                or not isinstance(spec.get("init_args") or {}, dict):
            raise TypeError(f"UnifiedModel: input_encoders[{m!r}] must be {{'class_path': str, 'init_args': dict}}, "
                            f"got {spec!r}")
        out[m] = {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}
    return out


def build_input_encoder(modality: str, spec: dict, dim: int, latent_dim: int) -> nn.Module:
    """``cls(dim=dim, latent_dim=latent_dim, **init_args)`` for a trusted ``class_path`` (it may come from a
    file: :func:`mmgrow.trust.trusted_class` checks it before importing), with a positive ``tokens_per_item``."""
    from mmgrow.trust import trusted_class

    cls = trusted_class(spec["class_path"], nn.Module, f"input_encoders[{modality!r}].class_path")
    encoder = cls(dim=dim, latent_dim=latent_dim, **spec["init_args"])
    n = getattr(encoder, "tokens_per_item", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TypeError(f"UnifiedModel: input encoder {spec['class_path']} of {modality!r} must set tokens_per_item "
                        f"to a positive int (latent rows per item), got {n!r}")
    return encoder
