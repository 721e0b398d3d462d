"""The extension surface of mmgrow: the base classes every plugin kind implements.

Seven kinds, one entry-point group each (``mmgrow.<kind>``):

==============  ===============================  ==========================================
kind            base class                       what it does
==============  ===============================  ==========================================
``mixers``      :class:`SequenceMixer`           token mixing along the sequence (attention,
                                                 SSMs, linear attention ...)
``memory``      :class:`MemoryLayer`             test-time-training memory, gated into a block
``tokenizers``  :class:`Tokenizer`               modality codec: raw media <-> token ids
``growth``      :class:`GrowthStrategy`          model surgery between training stages
``objectives``  :class:`Objective`               loss + sampler over a :class:`ModelOutput`
``tasks``       :class:`Task`                    raw :class:`Sample` -> list of :class:`Segment`
``datasets``    :class:`Dataset`                 random access to raw :class:`Sample` s (a
                                                 generator, a folder of media files ...)
==============  ===============================  ==========================================

Every plugin class carries ``mmgrow_api`` (a version specifier such as ``">=1,<2"``) naming the
plugin-API versions it was written against; :data:`PLUGIN_API` is the version this host implements.
Capabilities are class attributes on the plugin (``supports_state``, ``supports_segments`` ...),
never lists kept elsewhere. This module imports only torch and the standard library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

PLUGIN_API = "1.0"
"""Version of the plugin contract implemented by this mmgrow. Plugins declare ``mmgrow_api``."""

KINDS = ("tokenizers", "mixers", "memory", "growth", "objectives", "tasks", "datasets")

NO_BLOCK = -1
"""``block_ids`` value of a token that belongs to no bidirectional block (e.g. a text token)."""

PAD_SEGMENT = -1
"""``segment_ids`` value of a padding token: it sees nothing and nothing sees it."""


class MixerCapabilityError(ValueError):
    """A mixer was handed a :class:`SeqContext` feature it cannot honour (never silently ignored)."""


# --------------------------------------------------------------------------------------------------
# Masks and sequence context
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskSpec:
    """How tokens of one row may attend to each other: one rule, honoured by every attention backend.

    With query ``i`` and key ``j`` of the same row, key ``j`` is visible when all of these hold:

    * **segments**: ``segment_ids[i] == segment_ids[j]`` and neither is :data:`PAD_SEGMENT`;
    * **causality** (``causal=True``): ``j <= i`` (index order), *or* ``i`` and ``j`` are in the
      same bidirectional block (``block_ids[i] == block_ids[j] != NO_BLOCK``). With
      ``causal=False`` every pair passes this test;
    * **window** (``window=W``): ``|positions[i] - positions[j]| < W``. Positions, not indices, so
      the rule survives KV caches and sequence sharding;
    * **local blocks** (``local=True``, the TTT-video "local attention over segments"): a query
      inside a block (``block_ids[i] != NO_BLOCK``) sees only its own block, bidirectionally, plus,
      with ``shared_prefix=True``, the tokens outside every block (``NO_BLOCK``, e.g. the text)
      that the causality rule allows. Queries outside every block follow the rules above.

    A query row with no visible key produces a zero output (never NaN).
    """

    causal: bool = True
    window: int | None = None
    local: bool = False
    shared_prefix: bool = False

    def __post_init__(self) -> None:
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"MaskSpec.window must be a positive int or None, got {self.window!r}")
        if self.shared_prefix and not self.local:
            raise ValueError("MaskSpec.shared_prefix only means something with local=True")


@dataclass
class ContextParallel:
    """Handle of the context-parallel (sequence-sharded) process group, if any.

    ``layout`` is ``"contiguous"`` (rank r holds tokens ``[r*T/W, (r+1)*T/W)``) or ``"zigzag"``
    (rank r holds chunks ``r`` and ``2W-1-r`` of ``2W`` equal chunks, balancing causal work).
    """

    group: Any
    rank: int
    world_size: int
    layout: Literal["contiguous", "zigzag"] = "zigzag"


@dataclass
class SeqContext:
    """Everything a mixer needs to know about the sequence besides the hidden states.

    Built once per batch (see :meth:`SeqContext.from_batch`) and shared by all layers.

    Shapes (``B`` batch, ``T`` tokens):
        positions:    ``[B, T]`` int64, position of each token within its packed example (restarts
                      at 0 per segment); RoPE and window masks use it.
        segment_ids:  ``[B, T]`` int64 or None (= one segment per row); :data:`PAD_SEGMENT` = padding.
        block_ids:    ``[B, T]`` int64 or None (= no blocks); equal ids >= 0 form a bidirectional block.
        modality_ids: ``[B, T]`` int64 or None; index into the model's modality list.
        mask:         the :class:`MaskSpec`.
        condition:    ``[B, S, C]`` conditioning tokens (e.g. text embeddings) or None.
        condition_mask: ``[B, S]`` bool, True = valid conditioning token, or None.
        condition_segment_ids: ``[B, S]`` int64 or None: the packed example (segment id) each token of
                      ``condition`` belongs to (``-1`` = none). When given, a token with
                      ``segment_ids[b, t] = e`` (0 when ``segment_ids`` is None) attends only to the
                      condition tokens of example ``e``. None = every token sees the row's whole condition.
        timestep:     ``[B, C]`` timestep embedding for diffusion (adaLN-Zero modulation reads it; an
                      adaLN-single model puts the shared ``[B, 6 D]`` projection here) or None.
        conditions:   further named conditions ``{name: (tokens [B, S, C], mask [B, S] or None)}``
                      (ModelGrow's second text condition next to ``condition``), or None.
        cp:           :class:`ContextParallel` or None.
    """

    positions: Tensor
    segment_ids: Tensor | None = None
    block_ids: Tensor | None = None
    modality_ids: Tensor | None = None
    mask: MaskSpec = field(default_factory=MaskSpec)
    condition: Tensor | None = None
    condition_mask: Tensor | None = None
    condition_segment_ids: Tensor | None = None
    timestep: Tensor | None = None
    conditions: dict[str, tuple[Tensor, Tensor | None]] | None = None
    cp: ContextParallel | None = None

    _PER_TOKEN: ClassVar[tuple[str, ...]] = ("positions", "segment_ids", "block_ids", "modality_ids")

    def __post_init__(self) -> None:
        if self.positions.dim() != 2:
            raise ValueError(f"SeqContext.positions must be [B, T], got shape {tuple(self.positions.shape)}")
        for name in self._PER_TOKEN[1:]:
            value = getattr(self, name)
            if value is not None and value.shape != self.positions.shape:
                raise ValueError(
                    f"SeqContext.{name} has shape {tuple(value.shape)}, expected {tuple(self.positions.shape)} "
                    "(the shape of positions)"
                )

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def seq_len(self) -> int:
        return self.positions.shape[1]

    @classmethod
    def simple(
        cls, batch_size: int, seq_len: int, *, device: torch.device | str | None = None,
        causal: bool = True, window: int | None = None, offset: int = 0,
    ) -> SeqContext:
        """A context for unpacked rows: positions ``offset .. offset+T-1``, no segments or blocks."""
        pos = torch.arange(offset, offset + seq_len, device=device).expand(batch_size, seq_len)
        return cls(positions=pos.contiguous(), mask=MaskSpec(causal=causal, window=window))

    def slice(self, start: int, end: int) -> SeqContext:
        """The context of tokens ``[start, end)`` (for chunked prefill or step decoding)."""
        kw = {n: (getattr(self, n)[:, start:end] if getattr(self, n) is not None else None) for n in self._PER_TOKEN}
        return replace(self, **kw)

    def condition_source(self, name: str | None = None) -> tuple[Tensor, Tensor | None]:
        """``(tokens [B, S, C], mask [B, S] or None)`` of the condition ``name`` (None = :attr:`condition`)."""
        if name is None:
            if self.condition is None:
                raise ValueError("SeqContext.condition is None, but a cross-attention branch reads it; pass "
                                 "condition=[B, S, C] conditioning tokens (e.g. text-encoder embeddings)")
            return self.condition, self.condition_mask
        if not self.conditions or name not in self.conditions:
            have = sorted(self.conditions) if self.conditions else []
            raise ValueError(f"SeqContext.conditions has no entry {name!r} (have {have}); a cross-attention branch "
                             f"with source={name!r} reads it")
        return self.conditions[name]


# --------------------------------------------------------------------------------------------------
# Plugin base
# --------------------------------------------------------------------------------------------------


class Plugin:
    """Mixin carrying the metadata every plugin class declares."""

    mmgrow_api: ClassVar[str] = ">=1,<2"
    """Plugin-API versions this class targets (PEP 440 specifier against :data:`PLUGIN_API`)."""

    @classmethod
    def conformance_checks(cls) -> list[Callable[[], None]]:
        """Extra self-checks run by ``mmgrow plugins check``; each raises on failure. Default: none."""
        return []


# --------------------------------------------------------------------------------------------------
# 3.1 Sequence mixers
# --------------------------------------------------------------------------------------------------


@dataclass
class MixerState:
    """Base of the small, typed per-layer decoding state a mixer returns (KV window, recurrent
    matrix, conv tail, ...). Subclasses are dataclasses of tensors; no global layer-indexed cache."""


class SequenceMixer(Plugin, nn.Module):
    """Mixes information along the sequence: ``y[b, t] = f(x[b, :], ctx)`` for the allowed tokens.

    Construction is keyword-only: ``Mixer(dim=..., layer_idx=..., **hparams)``; recipes give the
    hparams, the backbone supplies ``dim`` and ``layer_idx``.

    Contract of :meth:`forward` (checked for every registered mixer by the conformance suite):

    * ``x [B, T, D]`` -> ``y [B, T, D]``, same dtype and device;
    * a causal context (``ctx.mask.causal``) never lets ``y[:, t]`` depend on ``x[:, t' > t]``
      (except within a bidirectional block when ``supports_blocks``);
    * with ``supports_segments``: a packed row equals running each segment as its own row;
    * with ``supports_state``: running ``x[:, :t]`` then ``x[:, t:]`` with the returned state equals
      one pass over ``x``, and token-by-token decoding (``T == 1`` steps) equals prefill;
    * a context feature the mixer cannot honour raises :class:`MixerCapabilityError`.
    """

    causal_only: ClassVar[bool] = False
    """True when the mixer cannot run with ``ctx.mask.causal == False``."""
    supports_state: ClassVar[bool] = False
    """True when :meth:`init_state` and stateful (chunked / step) forward work."""
    supports_segments: ClassVar[bool] = False
    """True when packed rows (``ctx.segment_ids``) are honoured."""
    supports_blocks: ClassVar[bool] = False
    """True when bidirectional blocks (``ctx.block_ids``) are honoured."""
    supports_window: ClassVar[bool] = False
    """True when ``ctx.mask.window`` is honoured."""
    supports_context_parallel: ClassVar[bool] = False
    """True when the mixer runs on a sequence sharded over ``ctx.cp``."""

    def __init__(self, *, dim: int, layer_idx: int = 0) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{type(self).__name__}: dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.layer_idx = layer_idx

    def forward(self, x: Tensor, ctx: SeqContext, state: MixerState | None = None) -> tuple[Tensor, MixerState | None]:
        raise NotImplementedError

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> MixerState:
        """An empty decoding state (nothing seen yet). Only when ``supports_state``."""
        raise MixerCapabilityError(f"{type(self).__name__} does not support stateful decoding (supports_state=False)")

    def state_size(self, seq_len: int) -> int:
        """Number of state elements per example after ``seq_len`` tokens (KV cache grows, SSMs don't)."""
        return 0

    def mixing_flops(self, seq_len: int) -> float | None:
        """FORWARD FLOPs per token of the token mixing that the parameter matmuls do not already count, for a
        row of ``seq_len`` tokens; None = unknown (this default).

        Convention: a multiply-add is 2 FLOPs; the parameter matmuls are ``2`` FLOPs per parameter per token
        (counted by ``6 N`` in :func:`mmgrow.training.scaling_record.model_flops_per_token`); training costs
        ``3 x`` forward (backward = 2 x forward), so a model's training FLOPs per token are
        ``6 N + 3 * sum(mixing_flops)``. Elementwise work (gates, norms, softmax, decays) is not counted,
        and what a mixer's kernel computes is counted in full: a causal mask is not halved (as Kaplan et al.
        2020, whose attention term ``2 n_ctx d_attn`` per layer this generalises). Each mixer states its
        equation in its own ``mixing_flops``:

        ==========================  ======================================================================
        full / blockwise / ring     ``2 S d_attn`` (Kaplan's term; ``d_attn = num_heads * head_dim``)
        sliding window ``W``        ``2 min(W, S) d_attn``
        local (block-diagonal)      None: the block length comes with the data, not the layer
        Mamba-2 (SSD, chunk ``Q``)  ``(S'/S) [H (2 Q P + 4 N P) + G 2 Q N]``, ``Q = min(chunk, S)``
        Gated DeltaNet (chunk L)    ``(S'/S) H [4 L K + 2 L V + 6 K V + (L - 1)(K + V)]``
        TTT (mini-batch ``b``)      ``(S'/S) H sum_l [2 b (d_in + d_out) + 6 d_in d_out (+ 2 d_in d_out, l > 0)]``
        ==========================  ======================================================================

        (``S'`` = ``S`` rounded up to whole chunks / mini-batches: the padding is computed too.)
        """
        return None

    def residual_outputs(self) -> list[nn.Linear]:
        """The output projections that write into the residual stream (zeroed by growth strategies)."""
        return []

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        """Hyperparameters the conformance suite adds when it builds a small instance
        (``cls(dim=32, layer_idx=0, **conformance_kwargs())``), e.g. to exercise GQA. Default: none."""
        return {}

    # Optional hooks (looked up with hasattr, so a plugin defines only what it has):
    #
    # ``init_weights(self, init_std: float)``: the model calls it instead of applying its generic
    #   normal(0, init_std) init to the mixer's parameters (SSMs and TTT layers need structured
    #   initialisations: decay rates, step sizes, initial inner weights).
    #
    # ``reference_forward(self, x, ctx, state=None) -> (y, state)``: the same layer (same parameters)
    #   with its sequence mixing computed by a plain per-token loop, the float64 oracle. When defined,
    #   the conformance suite checks that ``forward`` equals it (outputs, returned state, gradients).
    #
    # ``conformance_extremes(cls) -> dict[str, Callable[[mixer], None]]`` (classmethod): named
    #   in-place parameter settings that push gates to their extremes (decay exactly 1, decay -> 0,
    #   write strength 0 ...); the suite checks outputs and gradients stay finite there and, with
    #   ``reference_forward``, still equal the reference.

    def check_context(self, x: Tensor, ctx: SeqContext) -> None:
        """Validate ``x`` against ``ctx`` and this mixer's capabilities; raise a named error."""
        check_mixer_input(self, x, ctx)


def check_mixer_input(mixer: SequenceMixer, x: Tensor, ctx: SeqContext) -> None:
    """Shared validation: shapes, dtype, and context features the mixer's attributes do not claim."""
    name = type(mixer).__name__
    if x.dim() != 3 or x.shape[-1] != mixer.dim:
        raise ValueError(f"{name}: expected x of shape [B, T, {mixer.dim}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point x, got dtype {x.dtype}")
    weights = {p.dtype for p in mixer.parameters() if p.is_floating_point()}
    if weights and x.dtype not in weights and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} (layer {mixer.layer_idx}): x has dtype {x.dtype} but the layer's parameters are "
                        f"{', '.join(sorted(str(d) for d in weights))}; cast the input (x.to(...)) or the model "
                        "(model.to(dtype)) so they agree")
    if tuple(ctx.positions.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{name}: ctx.positions is {tuple(ctx.positions.shape)} but x is {tuple(x.shape)}; "
                         "expected [B, T] matching x")
    if not ctx.mask.causal and mixer.causal_only:
        raise MixerCapabilityError(f"{name} is causal-only but ctx.mask.causal is False")
    if ctx.segment_ids is not None and not mixer.supports_segments:
        raise MixerCapabilityError(f"{name} cannot honour ctx.segment_ids (packed rows); use a mixer with "
                                   "supports_segments=True or unpacked batches")
    if ctx.block_ids is not None and not mixer.supports_blocks and bool((ctx.block_ids != NO_BLOCK).any()):
        raise MixerCapabilityError(f"{name} cannot honour ctx.block_ids (bidirectional blocks)")
    if ctx.mask.window is not None and not mixer.supports_window:
        raise MixerCapabilityError(f"{name} cannot honour ctx.mask.window={ctx.mask.window}")
    if ctx.cp is not None and ctx.cp.world_size > 1 and not mixer.supports_context_parallel:
        raise MixerCapabilityError(f"{name} does not support context parallelism (world size {ctx.cp.world_size})")


MixerFactory = Callable[..., SequenceMixer]
"""What a recipe's ``mixer:`` entry becomes: called as ``factory(dim=..., layer_idx=...)`` by keyword
(mixer constructors are keyword-only; jsonargparse's partials forward positionals as positionals)."""


# --------------------------------------------------------------------------------------------------
# 3.3 Memory layers
# --------------------------------------------------------------------------------------------------


class MemoryLayer(SequenceMixer):
    """A test-time-training memory: the mixer contract, plus how the block gates it.

    The block computes ``x + tanh(alpha) * memory(norm(x))`` with ``alpha`` initialised to
    ``gate_init`` (and, when ``bidirectional``, a second pass over the time-reversed sequence with
    its own gate). A memory layer may also be used directly as a block's mixer.
    """

    gate_init: ClassVar[float] = 0.1


# --------------------------------------------------------------------------------------------------
# 3.4 Tokenizers (modality codecs)
# --------------------------------------------------------------------------------------------------


class Tokenizer(Plugin, nn.Module):
    """A modality codec: raw media <-> tokens (``kind="discrete"``) or latents (``"continuous"``).

    Discrete codecs encode one item to a 1-D int64 tensor of ids in ``[0, vocab_size)``, special
    tokens included. ``special_tokens`` maps names (``"eof"``, ``"eov"``, ``"bos"`` ...) to ids: the
    codec declares them; nothing else hard-codes them. ``block_ids(tokens)`` says which tokens form
    bidirectional blocks (one per frame for video); the default is none. Learned codecs implement
    :meth:`loss` so the same loop can train them.
    """

    modality: ClassVar[str] = "text"
    kind: ClassVar[Literal["discrete", "continuous"]] = "discrete"
    vocab_size: int = 0
    latent_dim: int = 0
    special_tokens: dict[str, int]

    def encode(self, raw: Any) -> Tensor:
        raise NotImplementedError

    def decode(self, tokens: Tensor) -> Any:
        raise NotImplementedError

    def block_ids(self, tokens: Tensor) -> Tensor:
        """``[N]`` int64 block id per token (:data:`NO_BLOCK` where none)."""
        return torch.full(tokens.shape[:1], NO_BLOCK, dtype=torch.long)

    def generation_prefix(self) -> Tensor:
        """``[P]`` local ids that open an item the model is asked to generate (``bos``, ``bov`` ...),
        appended to a prompt before sampling. Default: none."""
        return torch.empty(0, dtype=torch.long)

    def generation_length(self, tokens: Tensor) -> int:
        """How many of the sampled ``tokens [N]`` (after the prefix) belong to the item: up to and
        including the codec's end token, if one was sampled. Default: all of them."""
        return int(tokens.shape[0])

    def loss(self, raw: Any) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} is not a learned codec")


def length_through_first(tokens: Tensor, end_id: int) -> int:
    """Length of ``tokens [N]`` up to and including the first ``end_id`` (``N`` when there is none):
    the usual :meth:`Tokenizer.generation_length` of a codec with an end token."""
    ends = (tokens == end_id).nonzero()
    return int(ends[0, 0]) + 1 if len(ends) else int(tokens.shape[0])


# --------------------------------------------------------------------------------------------------
# 3.5 Growth
# --------------------------------------------------------------------------------------------------


@dataclass
class GrowthReport:
    """What a growth step did.

    new_parameters: names (in ``model.named_parameters()``) of parameters the step created.
    preserves: the guarantee of *this* application (``"exact"``, ``"tolerance"`` or ``"none"``); it may
        be weaker than the class's :attr:`GrowthStrategy.preserves` when the configuration gives it
        up (e.g. a memory gate initialised above 0).
    notes: a human-readable summary (logged by the training module and ``mmgrow grow``).
    """

    new_parameters: list[str]
    preserves: Literal["exact", "tolerance", "none"]
    notes: str = ""


class GrowthStrategy(Plugin):
    """Surgery on a single-device model between training stages (DESIGN.md §3.5).

    A strategy is built from its configuration (``Strategy(**init_args)``, ``class_path`` +
    ``init_args`` in YAML) and applied with ``apply(model) -> GrowthReport``. ``model`` is a
    :class:`~mmgrow.models.unified.UnifiedModel` or a bare :class:`~mmgrow.models.backbone.Backbone`.

    ``preserves`` states the guarantee tested by the growth conformance tests with the default
    configuration: ``"exact"`` (outputs bit-identical before/after, float32 and float64),
    ``"tolerance"`` (within :attr:`tolerance`, relative to the output's scale) or ``"none"``.
    Strategies act on modules through ``residual_outputs()`` and the layers' own hooks, never on
    state-dict key strings.

    **Replay.** The grown architecture is stored as the base model's config plus the list of
    strategies applied (``model.yaml: growth``); loading rebuilds the base, re-applies each strategy
    and then loads the weights. So :meth:`apply` must build the same *structure* whenever it is given
    the same structure and arguments, and every constructor argument must be kept as an attribute of
    the same name (:meth:`init_args` reads them back).
    """

    preserves: ClassVar[Literal["exact", "tolerance", "none"]] = "exact"
    tolerance: ClassVar[float] = 0.0
    """Bound on ``max|y_after - y_before| / max|y_before|`` for ``preserves == "tolerance"`` in float32."""

    def apply(self, model: nn.Module) -> GrowthReport:
        raise NotImplementedError

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this strategy (its ``init_args`` in YAML)."""
        import inspect

        names = [n for n, p in inspect.signature(type(self).__init__).parameters.items()
                 if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return {n: getattr(self, n) for n in names}


# --------------------------------------------------------------------------------------------------
# 3.6 Objectives
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelOutput:
    """What the model hands an objective.

    hidden: ``[B, T, D]`` final hidden states (after the final norm).
    logits: ``logits(hidden_sel [N, D], modality: str) -> [N, V_modality]`` — the modality's head.
    states: per-layer mixer states after the forward, when decoding.
    """

    hidden: Tensor
    logits: Callable[[Tensor, str], Tensor]
    states: list[Any] | None = None


class Objective(Plugin):
    """A training objective with its own sampler.

    ``loss(output, batch) -> (scalar loss, metrics dict of floats/0-d tensors)``;
    ``generate(model, prompt, ...)`` samples continuations with the mixers' states.
    The training loop calls :meth:`step`; an objective that must change the model's inputs first
    (flow matching noises the latents and embeds a timestep) overrides it.
    """

    def context(self, batch: Any) -> SeqContext:
        """The :class:`SeqContext` the model runs ``batch`` with (default: the batch's own)."""
        return batch.context()

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """One training / evaluation step: ``loss(model(batch.input_ids, context(batch)), batch)``.

        A batch with ``latents [B, T, C]`` (continuous *inputs*: image / audio features before text
        targets) hands them to the model as ``latents=``; without them the model is called as before."""
        latents = getattr(batch, "latents", None)
        extra = {} if latents is None else {"latents": latents}
        return self.loss(model(batch.input_ids, self.context(batch), **extra), batch)

    def loss(self, output: ModelOutput, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def generate(self, model: nn.Module, prompt: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# Data tasks
# --------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One raw example: media by modality name (``{"video": uint8 [F, H, W, 3]}``), a text, metadata."""

    media: dict[str, Any]
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Segment:
    """A piece of a training sequence: which codec encodes it and whether it is predicted.

    ``block``: None (default) keeps the codec's own bidirectional blocks (one per video frame ...).
    An int groups segments: every token of every segment of one sample with the same ``block``
    forms one bidirectional block, whatever the codecs say (a storyboard's fixed-length video
    segment together with its text, so ``local`` attention sees exactly that group).
    """

    modality: str
    raw: Any
    role: Literal["input", "target"] = "input"
    block: int | None = None


class Task(Plugin):
    """Turns a :class:`Sample` into ordered :class:`Segment` s (captioning, text-to-video, QA ...).

    ``modalities``: every modality its segments use (the data module checks it has their codecs);
    ``target_modalities``: the ones it trains the model to generate (sample writers use it).

    ``prompt_template``: the instruction its examples put before the target, with ``{field}``
    placeholders (documented and tested as golden strings; empty for a task without one).
    ``scored``: True when :meth:`score` gives a meaningful per-task metric; the task evaluation
    (:mod:`mmgrow.evaluation.tasks`) then decodes the example's last segment (its one target)
    greedily after the other segments and scores the prediction.
    """

    name: ClassVar[str] = ""
    modalities: ClassVar[Sequence[str]] = ()
    target_modalities: ClassVar[Sequence[str]] = ()
    prompt_template: ClassVar[str] = ""
    scored: ClassVar[bool] = False

    def segments(self, sample: Sample) -> list[Segment]:
        raise NotImplementedError

    def condition_text(self, sample: Sample, segments: list[Segment]) -> str | None:
        """The text that conditions this example through the data module's condition encoder
        (cross-attention), or None. Default: its first text *input* segment (the caption of
        ``text_to_video``); an example whose text is only a target gets none (no leaked answer)."""
        return next((s.raw for s in segments if s.modality == "text" and s.role == "input" and isinstance(s.raw, str)),
                    None)

    def score(self, prediction: Any, sample: Sample, target: Segment) -> dict[str, float]:
        """Metrics in ``[0, 1]`` of the model's decoded ``prediction`` of ``target`` (the last segment
        of ``segments(sample)``). Default: exact match of text, ``{"accuracy": 1.0}`` when
        ``str(prediction).strip() == target.raw`` else ``{"accuracy": 0.0}``."""
        return {"accuracy": float(str(prediction).strip() == target.raw)}


# --------------------------------------------------------------------------------------------------
# 3.7 Datasets
# --------------------------------------------------------------------------------------------------

DATASET_SPLITS = ("train", "val", "heldout")
"""The splits every dataset accepts (``heldout``: what the dataset sets aside for generalisation
probes; a dataset without such a notion documents what it returns)."""


class Dataset(Plugin, torch.utils.data.Dataset):
    """Random access to raw :class:`Sample` s; tasks turn them into segments.

    Contract (checked by ``mmgrow plugins check``):

    * built as ``cls(num_samples: int, seed: int = 0, split: str = "train", **dataset_args)`` with
      ``split`` in :data:`DATASET_SPLITS`; ``len(ds)`` is at most ``num_samples`` (a generator has
      exactly that many, a folder may hold fewer);
    * ``ds[i]`` is a :class:`Sample` whose ``media`` keys are among :attr:`modalities`, the same
      for the same ``(seed, split, i)`` in any process (DataLoader workers decode independently);
      an index outside ``[-len, len)`` raises ``IndexError``;
    * :attr:`skipped` lists the inputs left out, ``{"path": str, "reason": str}`` each (empty for
      generators); the run summary reports them;
    * optionally ``heldout_prompts() -> list[(text, meta)]`` for sample writers.
    """

    name: ClassVar[str] = ""
    modalities: ClassVar[Sequence[str]] = ()
    """Media keys its samples carry (``"video"``, ``"audio"``, ``"image"`` ...)."""

    skipped: list[dict[str, str]]

    def __init__(self, num_samples: int, seed: int = 0, split: str = "train") -> None:
        self.num_samples, self.seed, self.split = num_samples, seed, split
        self.skipped = []

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        raise NotImplementedError
