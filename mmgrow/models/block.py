"""One pre-norm residual block: a sequence mixer, an optional gated memory, then a SwiGLU MLP.

.. math::

    x \\leftarrow x + \\operatorname{mixer}(\\operatorname{norm}_1(x), \\text{ctx}, \\text{state}), \\qquad
    x \\leftarrow \\operatorname{GatedMemory}(x) \\;\\text{(optional)}, \\qquad
    x \\leftarrow x + \\operatorname{MLP}(\\operatorname{norm}_2(x))

The gated memory (:class:`~mmgrow.models.gated_memory.GatedMemory`) adds
``tanh(alpha) * memory(norm(x))`` and, when bidirectional, the same over the time-reversed row with
its own gate. Later branches (cross-attention on ``ctx.condition``, adaLN-Zero modulation from
``ctx.timestep``) slot in before the MLP, each adding its output projection to
:meth:`Block.residual_outputs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmgrow.layers.mlp import SwiGLU
from mmgrow.layers.norm import RMSNorm
from mmgrow.models.gated_memory import GatedMemory
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
                 mlp_chunk: int | None = None, memory: GatedMemory | None = None) -> None:
        super().__init__()
        if not isinstance(mixer, SequenceMixer):
            raise TypeError(f"Block: mixer must be a mmgrow.protocols.SequenceMixer, got {type(mixer).__name__}")
        if mixer.dim != dim:
            raise ValueError(f"Block: mixer {type(mixer).__name__} has dim {mixer.dim}, expected {dim}")
        if memory is not None and not isinstance(memory, GatedMemory):
            raise TypeError(f"Block: memory must be a GatedMemory branch, got {type(memory).__name__}")
        self.dim = dim
        self.norm1 = RMSNorm(dim, eps=norm_eps)
        self.mixer = mixer
        self.memory = memory
        self.norm2 = RMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden, chunk=mlp_chunk)

    @property
    def supports_state(self) -> bool:
        return self.mixer.supports_state and (self.memory is None or self.memory.supports_state)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> MixerState:
        mixer_state = self.mixer.init_state(batch_size, device, dtype)
        if self.memory is None:
            return mixer_state
        return BlockState(mixer_state, self.memory.init_state(batch_size, device, dtype))

    def forward(self, x: Tensor, ctx: SeqContext, state: MixerState | None = None) -> tuple[Tensor, MixerState | None]:
        mixer_state, memory_state = state, None
        if self.memory is not None and state is not None:
            if not isinstance(state, BlockState):
                raise MixerCapabilityError(f"Block: a block with a memory branch needs a BlockState, got "
                                           f"{type(state).__name__} (use Block.init_state / UnifiedModel.init_states)")
            mixer_state, memory_state = state.mixer, state.memory
        mixed, new_state = self.mixer(self.norm1(x), ctx, mixer_state)
        x = x + mixed
        if self.memory is not None:
            x, new_memory_state = self.memory(x, ctx, memory_state)
            if state is not None:
                new_state = BlockState(new_state, new_memory_state)
        # (cross-attention and adaLN branches go here)
        x = x + self.mlp(self.norm2(x))
        return x, new_state

    def residual_outputs(self) -> list[nn.Linear]:
        """Every projection that writes into the residual stream: the mixer's, the memory's, the MLP's."""
        memory = self.memory.residual_outputs() if self.memory is not None else []
        return [*self.mixer.residual_outputs(), *memory, *self.mlp.residual_outputs()]
