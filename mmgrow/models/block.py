"""One pre-norm residual block: a sequence mixer, then a SwiGLU MLP.

.. math::

    x \\leftarrow x + \\operatorname{mixer}(\\operatorname{norm}_1(x), \\text{ctx}, \\text{state}), \\qquad
    x \\leftarrow x + \\operatorname{MLP}(\\operatorname{norm}_2(x))

Later branches (a gated memory layer and its reversed pass, cross-attention on ``ctx.condition``,
adaLN-Zero modulation from ``ctx.timestep``) slot in between the two lines of :meth:`Block.forward`,
each adding its output projection to :meth:`Block.residual_outputs`.
"""

from __future__ import annotations

from torch import Tensor, nn

from mmgrow.layers.mlp import SwiGLU
from mmgrow.layers.norm import RMSNorm
from mmgrow.protocols import MixerState, SeqContext, SequenceMixer


class Block(nn.Module):
    """``x [B, T, D] -> (x [B, T, D], new mixer state or None)``."""

    def __init__(self, dim: int, mixer: SequenceMixer, mlp_hidden: int, norm_eps: float = 1e-6,
                 mlp_chunk: int | None = None) -> None:
        super().__init__()
        if not isinstance(mixer, SequenceMixer):
            raise TypeError(f"Block: mixer must be a mmgrow.protocols.SequenceMixer, got {type(mixer).__name__}")
        if mixer.dim != dim:
            raise ValueError(f"Block: mixer {type(mixer).__name__} has dim {mixer.dim}, expected {dim}")
        self.dim = dim
        self.norm1 = RMSNorm(dim, eps=norm_eps)
        self.mixer = mixer
        self.norm2 = RMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden, chunk=mlp_chunk)

    def forward(self, x: Tensor, ctx: SeqContext, state: MixerState | None = None) -> tuple[Tensor, MixerState | None]:
        mixed, new_state = self.mixer(self.norm1(x), ctx, state)
        x = x + mixed
        # (memory, cross-attention and adaLN branches go here)
        x = x + self.mlp(self.norm2(x))
        return x, new_state

    def residual_outputs(self) -> list[nn.Linear]:
        """Every projection that writes into the residual stream: the mixer's, then the MLP's."""
        return [*self.mixer.residual_outputs(), *self.mlp.residual_outputs()]
