"""One pre-norm residual block: a sequence mixer, an optional gated memory, an optional
cross-attention, then a SwiGLU MLP.

.. math::

    x \\leftarrow x + g_1 \\odot \\operatorname{mixer}(\\operatorname{mod}_1(\\operatorname{norm}_1(x)), \\text{ctx}, \\text{state}),
    \\qquad x \\leftarrow \\operatorname{GatedMemory}(x) \\;\\text{(optional)},

    x \\leftarrow x + \\operatorname{CrossAttn}(x, \\text{ctx}) \\;\\text{(optional)}, \\qquad
    x \\leftarrow x + g_2 \\odot \\operatorname{MLP}(\\operatorname{mod}_2(\\operatorname{norm}_2(x)))

Without modulation ``mod_k`` is the identity and ``g_k = 1`` (the LLaMA block). With adaLN
(:mod:`mmgrow.models.modulation`) ``mod_k(h) = h (1 + s_k) + b_k`` and ``g_k`` come from
``ctx.timestep`` (the DiT block). The gated memory
(:class:`~mmgrow.models.gated_memory.GatedMemory`) adds ``tanh(alpha) * memory(norm(x))`` (and the
reversed pass); the cross-attention branch
(:class:`~mmgrow.models.cross_condition.CrossAttentionBranch`) reads ``ctx.condition`` and is ungated
unless configured otherwise, as in DiT / Open-Sora; a block may hold several (one per condition
source, e.g. ModelGrow's second, LLM-embedding condition), applied in order.

Every branch declares its output projections (:meth:`Block.residual_outputs`): zeroing them makes
the block exactly the identity, whatever the modulation, which is how depth growth inserts blocks.
A block added by masked structural growth also carries a :class:`~mmgrow.models.growth_mask.GrowthMask`
(``growth_mask``) that scales every branch's contribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmgrow.layers.mlp import SwiGLU
from mmgrow.layers.norm import RMSNorm
from mmgrow.models.cross_condition import CrossAttentionBranch
from mmgrow.models.gated_memory import GatedMemory
from mmgrow.models.growth_mask import GrowthMask
from mmgrow.models.modulation import modulate
from mmgrow.protocols import MixerCapabilityError, MixerState, SeqContext, SequenceMixer


@dataclass
class BlockState(MixerState):
    """Decoding state of a block with a memory branch: the mixer's and the memory's."""

    mixer: MixerState
    memory: MixerState


class Block(nn.Module):
    """``x [B, T, D] -> (x [B, T, D], new state or None)``; the state is the mixer's, or a
    :class:`BlockState` when the block has a memory branch."""

    def __init__(self, dim: int, mixer: SequenceMixer, mlp_hidden: int, norm_eps: float = 1e-6,
                 mlp_chunk: int | None = None, memory: GatedMemory | None = None,
                 cross_attention: CrossAttentionBranch | None = None, modulation: nn.Module | None = None) -> None:
        """``cross_attention``: the block's first cross-attention branch (growth can append more to
        :attr:`cross_attentions`, e.g. a second condition)."""
        super().__init__()
        if not isinstance(mixer, SequenceMixer):
            raise TypeError(f"Block: mixer must be a mmgrow.protocols.SequenceMixer, got {type(mixer).__name__}")
        if mixer.dim != dim:
            raise ValueError(f"Block: mixer {type(mixer).__name__} has dim {mixer.dim}, expected {dim}")
        if memory is not None and not isinstance(memory, GatedMemory):
            raise TypeError(f"Block: memory must be a GatedMemory branch, got {type(memory).__name__}")
        if cross_attention is not None and not isinstance(cross_attention, CrossAttentionBranch):
            raise TypeError(f"Block: cross_attention must be a CrossAttentionBranch, got {type(cross_attention).__name__}")
        self.dim = dim
        self.norm1 = RMSNorm(dim, eps=norm_eps)
        self.mixer = mixer
        self.memory = memory
        self.cross_attentions = nn.ModuleList([cross_attention] if cross_attention is not None else [])
        self.norm2 = RMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden, chunk=mlp_chunk)
        self.modulation = modulation
        self.growth_mask: GrowthMask | None = None
        # Recompute this block in the backward instead of keeping its activations (see
        # mmgrow.parallel.activation_checkpoint); a plain attribute, so state-dict names do not change.
        self.activation_checkpointing = False

    @property
    def supports_state(self) -> bool:
        return self.mixer.supports_state and (self.memory is None or self.memory.supports_state)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> MixerState:
        mixer_state = self.mixer.init_state(batch_size, device, dtype)
        if self.memory is None:
            return mixer_state
        return BlockState(mixer_state, self.memory.init_state(batch_size, device, dtype))

    def forward(self, x: Tensor, ctx: SeqContext, state: MixerState | None = None) -> tuple[Tensor, MixerState | None]:
        if self.activation_checkpointing and state is None and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            # non-reentrant: keeps the RNG state for dropout and works with FSDP2 and ctx as an argument
            return checkpoint(self._forward, x, ctx, None, use_reentrant=False)
        return self._forward(x, ctx, state)

    def _forward(self, x: Tensor, ctx: SeqContext, state: MixerState | None) -> tuple[Tensor, MixerState | None]:
        mixer_state, memory_state = state, None
        if self.memory is not None and state is not None:
            if not isinstance(state, BlockState):
                raise MixerCapabilityError(f"Block: a block with a memory branch needs a BlockState, got "
                                           f"{type(state).__name__} (use Block.init_state / UnifiedModel.init_states)")
            mixer_state, memory_state = state.mixer, state.memory
        mod = self.modulation(ctx) if self.modulation is not None else None  # [B, 2, 3, D]
        mixed, new_state = self.mixer(self._modulated(self.norm1(x), mod, 0), ctx, mixer_state)
        x = x + self._gated(mixed, mod, 0)
        if self.memory is not None:
            with_memory, new_memory_state = self.memory(x, ctx, memory_state)
            x = x + self._masked(with_memory - x) if self.growth_mask is not None else with_memory
            if state is not None:
                new_state = BlockState(new_state, new_memory_state)
        for branch in self.cross_attentions:
            x = x + self._masked(branch(x, ctx))
        x = x + self._gated(self.mlp(self._modulated(self.norm2(x), mod, 1)), mod, 1)
        return x, new_state

    @staticmethod
    def _modulated(h: Tensor, mod: Tensor | None, branch: int) -> Tensor:
        return h if mod is None else modulate(h, mod[:, branch, 0], mod[:, branch, 1])

    def _gated(self, out: Tensor, mod: Tensor | None, branch: int) -> Tensor:
        if mod is not None:
            out = mod[:, branch, 2, None, :].to(out.dtype) * out
        return self._masked(out)

    def _masked(self, out: Tensor) -> Tensor:
        return out if self.growth_mask is None else self.growth_mask(out)

    def branches(self) -> dict[str, nn.Module]:
        """The residual branches present in this block, by attribute name, in forward order."""
        named = {"mixer": self.mixer, "memory": self.memory,
                 **{f"cross_attention.{i}": b for i, b in enumerate(self.cross_attentions)}, "mlp": self.mlp}
        return {name: branch for name, branch in named.items() if branch is not None}

    def residual_outputs(self) -> list[nn.Linear]:
        """Every projection that writes into the residual stream: the mixer's, the memory's, the
        cross-attention's (weight and bias), the MLP's."""
        return [lin for branch in self.branches().values() for lin in branch.residual_outputs()]
