"""The gated memory branch of a block (DESIGN.md §3.3; TTT-video, Dalal et al. 2025, arXiv 2504.05298).

.. math::

    x \\leftarrow x + \\tanh(\\alpha_{\\rightarrow}) \\odot m(\\operatorname{norm}(x)), \\qquad
    x \\leftarrow x + \\tanh(\\alpha_{\\leftarrow}) \\odot
        \\operatorname{flip}\\big(m(\\operatorname{norm}(\\operatorname{flip}(x)))\\big) \\quad\\text{(bidirectional)}

``m`` is any sequence mixer run as a scan (a TTT memory, Mamba-2, Gated DeltaNet ...); the reversed
pass uses the *same* parameters and its own gate, and acts on the output of the forward residual, as
TTT-video's sequence-modelling block does. ``alpha`` is a learned vector per channel initialised to
``gate_init`` (0.1: the branch starts small and the pretrained function barely moves; 0: the block is
exactly the block without the branch, for function-preserving growth). With ``modality_gates = M``
there is one gate vector per modality (``ctx.modality_ids`` picks it; TTT-video gates text and video
tokens separately).

**What each pass sees.** A pass is a scan over the row in its direction: packed segments are
honoured; bidirectional blocks, windows and local blocks describe the *attention* mask and are not
handed to the memory. A scan mixer (``causal_only``) gets a causal context; a memory that is itself
non-causal inside its chunks (TTT's video flavour) gets the model's context as it is. A
bidirectional branch in a causal model would see the future, so it raises.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from mmgrow.layers.norm import RMSNorm
from mmgrow.layers.reverse import reverse_context, reverse_time
from mmgrow.protocols import MaskSpec, MemoryLayer, MixerCapabilityError, MixerState, SeqContext, SequenceMixer


@dataclass
class MemoryPlacement:
    """Where and how a model's memory branches sit (``model.memory_placement`` in recipes).

    layers: block indices that get a branch (None = every block; negative indices count from the end).
    gate_init: initial gate value (None = the memory class's ``gate_init``, 0.1).
    bidirectional: add the reversed pass (non-causal models only).
    modality_gates: gate vectors per branch, picked by ``ctx.modality_ids``.
    """

    layers: list[int] | None = None
    gate_init: float | None = None
    bidirectional: bool = False
    modality_gates: int = 1

    def chosen(self, depth: int) -> set[int]:
        """The block indices in ``[0, depth)`` that get a branch."""
        if self.layers is None:
            return set(range(depth))
        out = set()
        for i in self.layers:
            if not isinstance(i, int) or not -depth <= i < depth:
                raise ValueError(f"MemoryPlacement.layers: {i!r} is not a block index of a {depth}-block model")
            out.add(i % depth)
        return out


class GatedMemory(nn.Module):
    """``x [B, T, D] -> (x + gated memory output(s) [B, T, D], memory state or None)``.

    Args:
        dim: model width.
        memory: the mixer run as the memory (any :class:`SequenceMixer`; usually a :class:`MemoryLayer`).
        gate_init: initial value of every gate entry (None: the memory class's ``gate_init``, 0.1 by default).
        bidirectional: add the reversed pass with its own gate.
        modality_gates: number of gate vectors, indexed by ``ctx.modality_ids`` (1 = one for all tokens).
        norm_eps: epsilon of the branch's RMSNorm.
    """

    def __init__(self, dim: int, memory: SequenceMixer, gate_init: float | None = None, bidirectional: bool = False,
                 modality_gates: int = 1, norm_eps: float = 1e-6) -> None:
        super().__init__()
        if not isinstance(memory, SequenceMixer):
            raise TypeError(f"GatedMemory: memory must be a SequenceMixer, got {type(memory).__name__}")
        if memory.dim != dim:
            raise ValueError(f"GatedMemory: memory {type(memory).__name__} has dim {memory.dim}, expected {dim}")
        if not isinstance(modality_gates, int) or modality_gates < 1:
            raise ValueError(f"GatedMemory: modality_gates must be a positive int, got {modality_gates!r}")
        if gate_init is None:
            gate_init = memory.gate_init if isinstance(memory, MemoryLayer) else MemoryLayer.gate_init
        self.dim = dim
        self.bidirectional = bidirectional
        self.gate_init = float(gate_init)
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.memory = memory
        self.gate = nn.Parameter(torch.full((modality_gates, dim), self.gate_init))
        self.gate_reverse = nn.Parameter(torch.full((modality_gates, dim), self.gate_init)) if bidirectional else None

    def extra_repr(self) -> str:
        return f"gate_init={self.gate_init}, bidirectional={self.bidirectional}, modality_gates={self.gate.shape[0]}"

    def mixing_flops(self, seq_len: int) -> float | None:
        """The memory's :meth:`~mmgrow.protocols.SequenceMixer.mixing_flops`, twice when bidirectional (the
        reversed pass runs the same memory over the whole row again); None when the memory's is unknown."""
        one = self.memory.mixing_flops(seq_len)
        return None if one is None else one * (2 if self.bidirectional else 1)

    @property
    def supports_state(self) -> bool:
        """A forward-only branch decodes with its memory's state; a bidirectional one cannot."""
        return self.memory.supports_state and not self.bidirectional

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> MixerState:
        if self.bidirectional:
            raise MixerCapabilityError("GatedMemory: a bidirectional memory has no decoding state (its reversed "
                                       "pass needs the whole row)")
        return self.memory.init_state(batch_size, device, dtype)

    def reset_gates(self) -> None:
        """Gates back to ``gate_init`` (the model's generic init must not touch them)."""
        with torch.no_grad():
            self.gate.fill_(self.gate_init)
            if self.gate_reverse is not None:
                self.gate_reverse.fill_(self.gate_init)

    # ---------------------------------------------------------------------------------------------

    def scan_context(self, ctx: SeqContext) -> SeqContext:
        """The context one pass of the memory sees (see the module docstring)."""
        if self.bidirectional and ctx.mask.causal:
            raise MixerCapabilityError("GatedMemory: bidirectional=True needs a non-causal context (ctx.mask.causal "
                                       "is True: the reversed pass would let tokens see the future)")
        causal = ctx.mask.causal or self.memory.causal_only
        return replace(ctx, block_ids=None, mask=MaskSpec(causal=causal))

    def _gate(self, gate: Tensor, ctx: SeqContext, dtype: torch.dtype) -> Tensor:
        """``tanh(alpha)`` as ``[D]`` (one gate) or ``[B, T, D]`` (one per modality)."""
        if gate.shape[0] == 1:
            return torch.tanh(gate[0]).to(dtype)
        if ctx.modality_ids is None:
            raise ValueError(f"GatedMemory: modality_gates={gate.shape[0]} needs ctx.modality_ids")
        ids = ctx.modality_ids
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= gate.shape[0]):
            raise ValueError(f"GatedMemory: ctx.modality_ids span [{int(ids.min())}, {int(ids.max())}], outside the "
                             f"{gate.shape[0]} modality gates")
        return torch.tanh(gate)[ids].to(dtype)

    def forward(self, x: Tensor, ctx: SeqContext, state: MixerState | None = None
                ) -> tuple[Tensor, MixerState | None]:
        if state is not None and self.bidirectional:
            raise MixerCapabilityError("GatedMemory: a bidirectional memory cannot continue from a state")
        scan_ctx = self.scan_context(ctx)
        out, new_state = self.memory(self.norm(x), scan_ctx, state)
        x = x + self._gate(self.gate, ctx, x.dtype) * out
        if self.gate_reverse is not None:
            back, _ = self.memory(self.norm(reverse_time(x)), reverse_context(scan_ctx))
            x = x + self._gate(self.gate_reverse, ctx, x.dtype) * reverse_time(back)
        return x, new_state

    def residual_outputs(self) -> list[nn.Linear]:
        return self.memory.residual_outputs()
