"""Full softmax attention (``mixers: full``) on ``torch.nn.functional.scaled_dot_product_attention``.

.. math::

    q, k, v = x W_q, x W_k, x W_v; \\quad q, k \\leftarrow \\operatorname{RoPE}(q, k, \\text{positions});
    \\quad y = \\operatorname{softmax}\\!\\big(q k^\\top / \\sqrt{hd} + \\log M\\big) \\, v \\, W_o

The boolean mask ``M`` comes from :mod:`mmgrow.layers.masks` and honours the whole context:
causality, sliding window, bidirectional blocks and packed segments. Grouped-query attention shares
each key/value head between ``num_heads // num_kv_heads`` query heads.

**Kernels** (:meth:`FullAttention.kernel_for`). Plain causal or bidirectional contexts call SDPA
without a mask, so it can pick its flash or memory-efficient kernel. Masked contexts (segments,
windows, blocks) run FlexAttention with a block mask built once per context on CUDA
(:mod:`mmgrow.ops.flex`), and SDPA with the boolean mask elsewhere. The attention subclasses
(blockwise, sliding window, local) share this choice on CUDA and run their own algorithm
(:meth:`FullAttention.native_attend`) elsewhere. The external ``flash-attn`` package is not used
(see ``docs/attention.md``).

**Empty rows.** A query with no visible key (a padding token, or a window that excludes everything)
gets output 0. SDPA's result for an all-False row depends on the torch version and backend (NaN in
several), so such rows are unmasked before the call (any finite result) and multiplied by 0 after
it: the output and every gradient through those rows are exactly 0, on every backend.

**KV cache.** With a :class:`KVCache` the new keys/values (after RoPE) are appended and the queries
attend to cache + new tokens, with stream indices ``seen .. seen+T-1`` for the queries, so chunked
prefill and ``T == 1`` decoding reproduce one full pass whenever the chunk boundaries cut no
visibility (causal masks, and blocks not split across chunks).

**Width growth** (hooks for :mod:`mmgrow.growth`; every subclass inherits them): heads grow in whole
key/value groups (one key/value head and its ``H // Hk`` query heads, appended after the existing
ones, so ``H % Hk`` stays 0): :meth:`FullAttention.duplicate_kv_groups` copies groups (Net2Net,
function-preserving up to rounding), :meth:`FullAttention.add_kv_groups` adds fresh ones for masked
structural growth. ``head_mask`` (None by default, then free) is a ``GrowthMask`` over the
``H * hd`` channels before ``out_proj``; it multiplies new heads' outputs by the ramp value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmgrow.layers.masks import mask_from_context
from mmgrow.layers.rope import RotaryEmbedding
from mmgrow.layers.unit_growth import extend_mask, normal_like, replica_noise, set_linear
from mmgrow.ops.flex import flex_masked_attention, flex_usable
from mmgrow.ops.token_meta import TokenMeta, tile_mask
from mmgrow.protocols import NO_BLOCK, MixerCapabilityError, MixerState, SeqContext, SequenceMixer

KERNELS = ("auto", "native", "sdpa", "flex")


@dataclass
class KVCache(MixerState):
    """Keys and values of every token a :class:`FullAttention` layer has seen.

    k, v:        ``[B, Hk, S, hd]`` (keys after RoPE);
    positions:   ``[B, S]`` int64 positions of the cached keys (for the window);
    segment_ids: ``[B, S]`` int64 (0 where the context had none);
    block_ids:   ``[B, S]`` int64 (``NO_BLOCK`` where the context had none);
    seen:        tokens seen so far; the cached keys have stream indices ``seen - S .. seen - 1``
                 (``S == seen`` here; a subclass that evicts old keys keeps the indices right).
    """

    k: Tensor
    v: Tensor
    positions: Tensor
    segment_ids: Tensor
    block_ids: Tensor
    seen: int = 0

    @property
    def size(self) -> int:
        """Number of cached tokens ``S``."""
        return self.k.shape[2]

    def append(self, k: Tensor, v: Tensor, ctx: SeqContext) -> tuple[Tensor, Tensor, TokenMeta, TokenMeta]:
        """Cache + ``T`` new tokens: ``(k_all, v_all [B, Hk, S+T, hd], key facts [B, S+T], query facts [B, T])``.

        Stream indices: cached keys ``seen - S .. seen - 1``, new tokens ``seen .. seen + T - 1``;
        absent segment / block ids become 0 / ``NO_BLOCK``, as the cache stores them."""
        B, T = ctx.positions.shape
        seg = ctx.segment_ids if ctx.segment_ids is not None else torch.zeros_like(ctx.positions)
        blk = ctx.block_ids if ctx.block_ids is not None else torch.full_like(ctx.positions, NO_BLOCK)
        index = torch.arange(self.seen - self.size, self.seen + T, device=ctx.positions.device).expand(B, -1)
        keys = TokenMeta(index, torch.cat((self.positions, ctx.positions), dim=1),
                         torch.cat((self.segment_ids, seg), dim=1), torch.cat((self.block_ids, blk), dim=1))
        return (torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2), keys,
                keys.slice(self.size, self.size + T))


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, causal: bool = False,
                dropout_p: float = 0.0) -> Tensor:
    """SDPA with a ``[B, Tq, Tk]`` bool mask (or ``causal`` and no mask); empty rows give exactly 0.

    ``q [B, H, Tq, hd]``, ``k, v [B, Hk, Tk, hd]`` with ``H % Hk == 0`` -> ``[B, H, Tq, hd]``.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        # Expanded K/V rather than SDPA's enable_gqa: with an explicit mask, GQA-aware SDPA falls back
        # to the math kernel on GPU, and the copy is small next to the [Tq, Tk] mask anyway.
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
    has_key = mask.any(dim=-1, keepdim=True)  # [B, Tq, 1]
    safe_mask = mask | ~has_key
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask[:, None], dropout_p=dropout_p)
    return out * has_key[:, None].to(out.dtype)


def needs_explicit_mask(ctx: SeqContext) -> bool:
    """True unless the context is plain causal or plain bidirectional (no segments, blocks, window).

    Cached on ``ctx``: the block test reads a device tensor (a host sync), and every layer asks."""
    cached = ctx.__dict__.get("_mmgrow_needs_mask")
    if cached is None:
        has_blocks = ctx.block_ids is not None and bool((ctx.block_ids != NO_BLOCK).any())
        cached = ctx.segment_ids is not None or has_blocks or ctx.mask.window is not None
        ctx.__dict__["_mmgrow_needs_mask"] = cached
    return cached


class FullAttention(SequenceMixer):
    """Multi-head (grouped-query) softmax attention with RoPE: ``x [B, T, D] -> y [B, T, D]``.

    Args:
        dim: model width ``D``.
        layer_idx: index of the layer in the backbone.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``Hk`` (GQA; default ``H``); must divide ``H``.
        head_dim: ``hd`` (default ``D // H``; must be even for RoPE).
        rope_theta: RoPE base; changeable later through :attr:`rope_theta`.
        qkv_bias: biases on the q/k/v projections (the output projection has none).
        dropout: attention-probability dropout while training.
        kernel: ``"auto"`` (fused kernels on CUDA, the class's own algorithm elsewhere),
            ``"native"``, ``"sdpa"`` or ``"flex"``; see :meth:`kernel_for`.
    """

    supports_state = True
    supports_segments = True
    supports_blocks = True
    supports_window = True
    supports_context_parallel = False
    tensor_parallel_size = 1  # set by mmgrow.parallel.tensor_parallel when the heads are split

    def __init__(self, *, dim: int, layer_idx: int = 0, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, rope_theta: float = 10000.0, qkv_bias: bool = False,
                 dropout: float = 0.0, kernel: str = "auto") -> None:
        super().__init__(dim=dim, layer_idx=layer_idx)
        name = type(self).__name__
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"{name}: num_heads ({num_heads}) must be a positive multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"{name}: dim ({dim}) is not divisible by num_heads ({num_heads}); "
                                 "pass head_dim explicitly")
            head_dim = dim // num_heads
        if head_dim < 2 or head_dim % 2 != 0:
            raise ValueError(f"{name}: head_dim must be even (RoPE rotates pairs), got {head_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dropout = dropout
        if kernel not in KERNELS:
            raise ValueError(f"{name}: kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(num_heads * head_dim, dim, bias=False)
        self.rope = RotaryEmbedding(head_dim, theta=rope_theta)
        # Masked structural growth: a GrowthMask over the H*hd output channels (None = no cost).
        self.head_mask: nn.Module | None = None

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        """Small settings for the conformance suite: 4 query heads sharing 2 key/value heads (GQA)."""
        return {"num_heads": 4, "num_kv_heads": 2}

    @property
    def rope_theta(self) -> float:
        return self.rope.theta

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        if value <= 0:
            raise ValueError(f"rope_theta must be positive, got {value}")
        self.rope.theta = float(value)

    # ---------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, ctx: SeqContext, state: KVCache | None = None) -> tuple[Tensor, KVCache | None]:
        self.check_context(x, ctx)
        ctx = self.layer_context(ctx)
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism this rank projects H / tp query and Hk / tp key/value heads
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, k, ctx.positions)
        dropout_p = self.dropout if self.training else 0.0

        if state is None:
            new_state = None
            out = self.attend(q, k, v, ctx, dropout_p)
        else:
            out, new_state = self._attend_with_cache(q, k, v, ctx, state, dropout_p)
        out = out.transpose(1, 2).reshape(B, T, q.shape[1] * self.head_dim)
        if self.head_mask is not None:
            out = self.head_mask(out)
        return self.out_proj(out), new_state

    def layer_context(self, ctx: SeqContext) -> SeqContext:
        """The context this layer attends under; subclasses narrow it (a window, local blocks)."""
        return ctx

    def kernel_for(self, ctx: SeqContext, q: Tensor, dropout_p: float) -> str:
        """The kernel a prefill under ``ctx`` runs on.

        ``"auto"`` picks, on CUDA, FlexAttention (block mask from the token facts) for masked
        contexts and SDPA (its flash kernel) for plain causal/bidirectional ones — both fused,
        ``O(T)``-memory kernels; elsewhere the class's own algorithm (:meth:`native_attend`: SDPA
        with a boolean mask here, tiles or chunks in the subclasses). ``"native"``, ``"sdpa"`` and
        ``"flex"`` force one (``"flex"`` raises where it cannot run)."""
        if self.kernel in ("native", "sdpa"):
            return self.kernel
        masked = needs_explicit_mask(ctx)
        if masked and flex_usable(q, dropout_p):
            return "flex"
        if self.kernel == "flex":
            raise MixerCapabilityError(f"{type(self).__name__} (layer {self.layer_idx}): kernel='flex' needs CUDA "
                                       "tensors, no attention dropout and torch.nn.attention.flex_attention; use "
                                       "kernel='auto'")
        return "sdpa" if q.is_cuda and not masked else "native"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: SeqContext, dropout_p: float) -> Tensor:
        """One prefill: ``q [B, H, T, hd]``, ``k, v [B, Hk, T, hd]`` (after RoPE) -> ``[B, H, T, hd]``,
        on the kernel :meth:`kernel_for` picks."""
        kernel = self.kernel_for(ctx, q, dropout_p)
        if kernel == "flex":
            meta = TokenMeta.from_context(ctx)
            return flex_masked_attention(q, k, v, meta, meta, ctx.mask, owner=ctx)[0]
        if kernel == "native":
            return self.native_attend(q, k, v, ctx, dropout_p)
        return self.sdpa_attend(q, k, v, ctx, dropout_p)

    @staticmethod
    def sdpa_attend(q: Tensor, k: Tensor, v: Tensor, ctx: SeqContext, dropout_p: float) -> Tensor:
        """SDPA: without a mask for plain causal/bidirectional contexts (so it may use its flash or
        memory-efficient kernel), with the ``[B, T, T]`` boolean mask otherwise."""
        if needs_explicit_mask(ctx):
            return masked_sdpa(q, k, v, mask_from_context(ctx), dropout_p=dropout_p)
        return masked_sdpa(q, k, v, None, causal=ctx.mask.causal, dropout_p=dropout_p)

    def native_attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: SeqContext, dropout_p: float) -> Tensor:
        """This class's own algorithm (SDPA here; subclasses: tiles, chunks)."""
        return self.sdpa_attend(q, k, v, ctx, dropout_p)

    def _attend_with_cache(self, q: Tensor, k: Tensor, v: Tensor, ctx: SeqContext, state: KVCache,
                           dropout_p: float) -> tuple[Tensor, KVCache]:
        self._check_cache(state, k)
        k_all, v_all, keys, queries = state.append(k, v, ctx)
        out = masked_sdpa(q, k_all, v_all, tile_mask(queries, keys, ctx.mask), dropout_p=dropout_p)
        return out, KVCache(k_all, v_all, keys.positions, keys.segment_ids, keys.block_ids,
                            state.seen + ctx.positions.shape[1])

    def _check_cache(self, state: KVCache, k: Tensor) -> None:
        """A clear error when ``state`` is not a KV cache matching ``k [B, Hk, T, hd]`` in shape, dtype, device."""
        name = f"{type(self).__name__} (layer {self.layer_idx})"
        if not isinstance(state, KVCache):
            raise TypeError(f"{name}: expected a KVCache state, got {type(state).__name__}")
        expected = (k.shape[0], self.local_kv_heads, self.head_dim)
        if (state.k.shape[0], state.k.shape[1], state.k.shape[3]) != expected:
            raise ValueError(f"{name}: KV cache has shape {tuple(state.k.shape)}, expected "
                             f"[{expected[0]}, {expected[1]}, S, {expected[2]}]")
        if state.k.dtype != k.dtype or state.k.device != k.device:
            raise ValueError(f"{name}: KV cache is {state.k.dtype} on {state.k.device} but the input is {k.dtype} on "
                             f"{k.device}; build it with init_state(..., dtype=x.dtype)")

    # ---------------------------------------------------------------------------------------------

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        """An empty KV cache (``S = 0``) for ``batch_size`` rows."""
        kv = torch.empty(batch_size, self.local_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        ids = torch.empty(batch_size, 0, device=device, dtype=torch.long)
        return KVCache(k=kv, v=kv.clone(), positions=ids, segment_ids=ids.clone(), block_ids=ids.clone(), seen=0)

    @property
    def local_kv_heads(self) -> int:
        """Key/value heads this rank computes: ``Hk / tp`` under tensor parallelism, else ``Hk``."""
        return self.num_kv_heads // self.tensor_parallel_size

    def tensor_parallel_plan(self, tp: int) -> dict[str, str]:
        """Whole heads per rank: ``q, k, v`` column-split, ``out`` row-split (one all-reduce per layer).

        Needs ``Hk`` (hence ``H``) divisible by ``tp``; growth masks over heads cannot be split."""
        if self.num_kv_heads % tp != 0:
            raise ValueError(f"{type(self).__name__} (layer {self.layer_idx}): tensor_parallel={tp} must divide "
                             f"num_kv_heads={self.num_kv_heads} (each rank holds whole key/value groups)")
        if self.head_mask is not None:
            raise ValueError(f"{type(self).__name__} (layer {self.layer_idx}): a growth mask over heads cannot be "
                             "tensor-parallel; finish the growth ramp before splitting heads")
        return {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "out_proj": "rowwise"}

    def mixing_flops(self, seq_len: int) -> float:
        """Kaplan et al.'s attention term ``2 S d_attn`` per token (``S = seq_len``, ``d_attn = H * hd``; the
        scores ``q k^T`` and the weighted sum ``A v`` are ``4 S d_attn`` FLOPs computed in full, so this is
        their causal half: kept so that an all-attention model gives ``6 N + 6 L S D`` as before).
        Blockwise and ring attention compute the same attention and inherit it."""
        return 2.0 * seq_len * self.num_heads * self.head_dim

    def state_size(self, seq_len: int) -> int:
        """Elements of K and V cached per example after ``seq_len`` tokens: ``2 * Hk * hd * seq_len``
        (plus three int64 bookkeeping numbers per token: position, segment and block id)."""
        return 2 * self.num_kv_heads * self.head_dim * seq_len

    def residual_outputs(self) -> list[nn.Linear]:
        return [self.out_proj]

    # --------------------------------------------------------------------------------------------- width growth

    @property
    def kv_group_size(self) -> int:
        """Query heads per key/value head, ``G = H // Hk``; heads grow in whole groups of ``G``."""
        return self.num_heads // self.num_kv_heads

    @torch.no_grad()
    def duplicate_kv_groups(self, sources: Sequence[int] | Tensor, *, noise_std: float = 0.0,
                            generator: torch.Generator | None = None) -> None:
        """Net2WiderNet on heads: append ``n = len(sources)`` key/value groups, the new group
        ``Hk + j`` a copy of group ``sources[j]`` (its key/value head and its ``G`` query heads,
        weights and biases), so ``H -> H + n G`` and ``Hk -> Hk + n`` and ``H % Hk`` stays 0.

        A copy computes the same head outputs ``o_g [B, T, G hd]`` as its source, so dividing the
        output-projection columns of a source and of every copy of it by its replication count
        ``c_g = 1 + #{j : sources[j] = g}`` keeps ``y = sum_g o_g W_o[:, g]^T`` unchanged up to
        float rounding. With ``noise_std > 0`` replica ``i`` of a source gets ``W_o[:, g] / c_g +
        eps_i``, ``eps ~ N(0, noise_std)`` centred over the replicas (``sum_i eps_i = 0``): the
        replicas then get different gradients (symmetry broken) and the sum is still unchanged.
        Noise is drawn in float32 on the CPU from ``generator`` (the global RNG when None).

        An attached :attr:`head_mask` grows with the channels (a copy inherits its source's
        entries). KV caches built before the growth no longer fit; build new ones.
        """
        src = self._group_indices(sources)
        if src.numel() == 0:
            return
        if noise_std < 0:
            raise ValueError(f"{type(self).__name__}: noise_std must be >= 0, got {noise_std}")
        Hk, G, hd, D = self.num_kv_heads, self.kv_group_size, self.head_dim, self.dim
        groups = torch.cat((torch.arange(Hk), src))  # the source of every group after growth
        counts = torch.bincount(groups, minlength=Hk)  # replication count c_g
        for lin, rows in ((self.q_proj, G * hd), (self.k_proj, hd), (self.v_proj, hd)):
            idx = groups.to(lin.weight.device)
            bias = None if lin.bias is None else lin.bias.view(Hk, rows)[idx].reshape(-1)
            set_linear(lin, lin.weight.view(Hk, rows, D)[idx].reshape(-1, D), bias)
        w_o = self.out_proj.weight
        scale = counts[groups].to(device=w_o.device, dtype=w_o.dtype)[None, :, None]
        w_new = w_o.view(D, Hk, G * hd)[:, groups.to(w_o.device)] / scale  # [D, Hk + n, G hd]
        if noise_std > 0:
            w_new = w_new + replica_noise(w_new.shape, groups, counts, noise_std, w_o, generator)
        set_linear(self.out_proj, w_new.reshape(D, -1), None)
        if self.head_mask is not None:
            is_new = self.head_mask.is_new
            extend_mask(self.head_mask, is_new.view(Hk, G * hd)[src.to(is_new.device)].reshape(-1))
        self.num_heads += src.numel() * G
        self.num_kv_heads += src.numel()

    @torch.no_grad()
    def add_kv_groups(self, count: int, *, init_std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Append ``count`` freshly initialised key/value groups (``count`` key/value heads and
        ``count * G`` query heads): new q/k/v rows and output-projection columns
        ``~ N(0, init_std)`` (drawn in float32 on the CPU from ``generator``, the global RNG when
        None), new biases 0.

        On their own the new heads change the function. Masked structural growth puts them behind
        :attr:`head_mask` (a ``GrowthMask`` at value 0 on their channels), so they add exactly
        ``0 * o`` to the channels before ``out_proj``. An attached head_mask grows here, the new
        channels marked new; attaching one when there is none is the caller's business.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{type(self).__name__}: count must be an int >= 0, got {count!r}")
        if count == 0:
            return
        G, hd, D = self.kv_group_size, self.head_dim, self.dim
        for lin, rows in ((self.q_proj, count * G * hd), (self.k_proj, count * hd), (self.v_proj, count * hd)):
            weight = torch.cat((lin.weight, normal_like((rows, D), init_std, lin.weight, generator)))
            bias = None if lin.bias is None else torch.cat((lin.bias, lin.bias.new_zeros(rows)))
            set_linear(lin, weight, bias)
        w_o = self.out_proj.weight
        set_linear(self.out_proj, torch.cat((w_o, normal_like((D, count * G * hd), init_std, w_o, generator)), dim=1),
                    None)
        if self.head_mask is not None:
            extend_mask(self.head_mask, torch.ones(count * G * hd, dtype=torch.bool))
        self.num_heads += count * G
        self.num_kv_heads += count

    def _group_indices(self, sources: Sequence[int] | Tensor) -> Tensor:
        """``sources`` as a 1-D int64 CPU tensor of key/value group indices in ``[0, Hk)``."""
        src = torch.as_tensor(sources, dtype=torch.long).cpu().reshape(-1)
        if src.numel() and (int(src.min()) < 0 or int(src.max()) >= self.num_kv_heads):
            raise ValueError(f"{type(self).__name__} (layer {self.layer_idx}): source groups must lie in "
                             f"[0, {self.num_kv_heads}) (key/value heads), got {src.tolist()}")
        return src

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, layer_idx={self.layer_idx}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dropout={self.dropout}")
