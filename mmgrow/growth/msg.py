"""Masked structural growth (MSG; Yao et al., ICLR 2024, arXiv 2305.02869): new structures whose
outputs are multiplied by a :class:`~mmgrow.models.growth_mask.GrowthMask` that starts at 0.

.. math::

    \\text{depth:}\\quad x \\leftarrow x + m \\cdot f_{\\text{branch}}(x) \\;\\text{for every branch of a new block};
    \\qquad \\text{width:}\\quad h \\leftarrow h \\odot \\operatorname{where}(\\text{is\\_new}, m, 1)

At ``m = 0`` a new structure contributes exactly ``0 * (finite) = 0`` **whatever its weights**, so
preservation does not depend on the initialisation; a callback
(:class:`~mmgrow.training.growth_ramp.GrowthMaskRamp`, ``steps = ramp_steps``) then raises ``m``
linearly to 1.

- **Depth** (``depth`` new blocks): each is a ``copy.deepcopy`` of a neighbour, its weights re-drawn
  by the model's own initialisation rule (:func:`mmgrow.models.unified.initialise`: linear and
  embedding weights ``N(0, init_std)``, biases 0, norms 1, modules with ``init_weights`` their own)
  under ``torch.manual_seed(seed)`` in a forked RNG when ``init="random"``, or kept as the copy when
  ``init="copy"``; ``block.growth_mask = GrowthMask.whole(0)`` scales all its branches. Placement as
  :class:`~mmgrow.growth.depth.InsertDepthGrowth` (``insert``: after blocks ``ceil((j+1) L / n) - 1``;
  ``prefix``: copies of the first ``n`` blocks first; ``suffix``: copies of the last ``n`` at the
  end). Bit-exact: ``x + 0 * y == x``.
- **FFN / heads** (``ffn`` units, ``heads`` query heads per block of ``layers``): fresh units from
  :meth:`~mmgrow.layers.mlp.SwiGLU.add_hidden` / :meth:`~mmgrow.layers.attention.FullAttention.add_kv_groups`
  (``N(0, init_std)`` from ``torch.Generator().manual_seed(seed)``, blocks in order, FFN first)
  behind the layer's ``hidden_mask`` / ``head_mask``. Heads grow in whole key/value groups
  (``heads`` a multiple of ``H // Hk``). Not bit-exact: the zeroed channels still sit inside the
  ``W_down`` / ``out_proj`` matmul, whose reduction order changes with ``K`` (MKL's float32 GEMM
  rounds differently with 4 extra zero columns at ``K = 256``, float64 with 1 at ``K = 16``).
  Measured ``max|y' - y| / max|y|`` on the final hidden states in float32 (D 32-128, depth 2-6, GQA,
  q/k/v biases, full, sliding-window and blockwise attention, 2-core MKL CPU): at most ``4.7e-7``
  (float64: ``1.1e-15``); :attr:`MaskedGrowth.tolerance` is ``1e-5`` like Net2Net's. Different seeds
  give bit-identical outputs at ``m = 0`` (the products are exactly 0 either way).

Width growth runs first, on the blocks ``layers`` names (indices of the model as given); then depth
copies neighbours *as widened* (their masks included). A report says ``"exact"`` for depth-only
growth and ``"tolerance"`` once a width grows.

**Gradients at m = 0.** The mask multiplies the new structures' outputs, so at ``m = 0`` every new
parameter (a new block's, the new rows/columns of a widened one) gets an exactly zero gradient;
training moves them once the ramp leaves 0 (step ``start_step + 1``).

**Growing again.** A layer whose mask is at 1 (ramp finished) gets a fresh mask with only the new
units marked; at 0 (not ramped, e.g. when a model is rebuilt for loading) the old and new new units
share it; in between the growth is refused (one ramp value cannot serve two schedules). The masks
are buffers, so the loaded checkpoint restores their ``is_new`` and value.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mmgrow.growth.base import GrowthError, NewParameters, backbone_of, check_layers, renumber_layers
from mmgrow.growth.depth import PLACEMENTS, InsertDepthGrowth
from mmgrow.growth.width import check_count, head_groups
from mmgrow.models.backbone import Backbone
from mmgrow.models.block import Block
from mmgrow.models.growth_mask import GrowthMask
from mmgrow.models.unified import initialise
from mmgrow.protocols import GrowthReport, GrowthStrategy

INITS = ("random", "copy")


def grown_mask(old: nn.Module | None, n_old: int, n_new: int, device: torch.device) -> GrowthMask:
    """A mask at 0 over ``n_old + n_new`` units, the last ``n_new`` new; units of ``old`` stay new
    only while ``old`` is still at 0 (its ramp not begun)."""
    if old is not None and float(old.value) == 0.0:
        prior = old.is_new[:n_old].cpu()
    else:
        prior = torch.zeros(n_old, dtype=torch.bool)
    return GrowthMask(torch.cat((prior, torch.ones(n_new, dtype=torch.bool))), 0.0).to(device)


def check_mask_settled(mask: nn.Module | None, where: str, owner: str) -> None:
    """Refuse to grow behind a mask caught mid-ramp (``0 < m < 1``)."""
    if mask is not None and 0.0 < float(mask.value) < 1.0:
        raise GrowthError(f"{owner}: {where} has a growth mask at {float(mask.value):g}, mid-ramp; finish its ramp "
                          "(value 1) before growing it again")


class MaskedGrowth(GrowthStrategy):
    """Add blocks, FFN units and/or attention heads behind growth masks at 0 (MSG).

    Args:
        depth: new blocks.
        ffn: new hidden units per block of ``layers``.
        heads: new query heads per block of ``layers`` (a multiple of its ``H // Hk``).
        layers: blocks to widen (None = all; indices of the model before this growth).
        placement: ``"insert"`` (after evenly spaced blocks), ``"prefix"`` or ``"suffix"``.
        ramp_steps: steps over which :class:`~mmgrow.training.growth_ramp.GrowthMaskRamp` raises the
            masks from 0 to 1 (read by the training code; not used by :meth:`apply`).
        init: ``"random"`` (re-draw a new block's weights) or ``"copy"`` (keep the neighbour's).
        seed: seeds the new weights.
        init_std: standard deviation of new weights.
    """

    preserves = "tolerance"
    tolerance = 1e-5

    def __init__(self, depth: int = 0, ffn: int = 0, heads: int = 0, layers: list[int] | None = None,
                 placement: str = "insert", ramp_steps: int = 1000, init: str = "random", seed: int = 0,
                 init_std: float = 0.02) -> None:
        name = type(self).__name__
        self.depth = check_count(depth, name, "depth")
        self.ffn = check_count(ffn, name, "ffn")
        self.heads = check_count(heads, name, "heads")
        if depth == ffn == heads == 0:
            raise GrowthError(f"{name}: depth, ffn and heads are all 0; nothing to grow")
        if placement not in PLACEMENTS:
            raise GrowthError(f"{name}: placement must be one of {PLACEMENTS}, got {placement!r}")
        if init not in INITS:
            raise GrowthError(f"{name}: init must be one of {INITS}, got {init!r}")
        if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 1:
            raise GrowthError(f"{name}: ramp_steps must be a positive int, got {ramp_steps!r}")
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std > 0:
            raise GrowthError(f"{name}: init_std must be a positive float, got {init_std!r}")
        self.layers = None if layers is None else list(layers)
        self.placement = placement
        self.ramp_steps = ramp_steps
        self.init = init
        self.seed = int(seed)
        self.init_std = float(init_std)

    @classmethod
    def conformance_kwargs(cls) -> dict:
        """Settings every mixer kind supports (head growth needs an attention mixer)."""
        return {"depth": 1, "ffn": 8}

    def apply(self, model: nn.Module) -> GrowthReport:
        name = type(self).__name__
        backbone = backbone_of(model)
        chosen = check_layers(self.layers, backbone.depth, name) if self.ffn or self.heads else []
        blocks = [backbone.blocks[i] for i in chosen]
        # Check everything before touching anything, so a refused growth leaves the model as it was.
        groups = [head_groups(b, i, self.heads, name, "add_kv_groups") if self.heads else 0
                  for i, b in zip(chosen, blocks, strict=True)]
        for i, b in zip(chosen, blocks, strict=True):
            if self.ffn:
                check_mask_settled(b.mlp.hidden_mask, f"block {i}'s MLP", name)
            if self.heads:
                check_mask_settled(b.mixer.head_mask, f"block {i}'s attention", name)
        with NewParameters(model) as new:
            self._widen(blocks, groups)
            if self.depth:
                self._deepen(backbone)
        width = bool(self.ffn or self.heads)
        notes = (f"MSG: +{self.depth} blocks ({self.placement}, init={self.init}), blocks {chosen} +{self.ffn} FFN "
                 f"units, +{self.heads} query heads; masks at 0, ramp them over {self.ramp_steps} steps "
                 "(GrowthMaskRamp)")
        return GrowthReport(new_parameters=new.names, preserves="tolerance" if width else "exact", notes=notes)

    def _widen(self, blocks: list[Block], groups: list[int]) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        for block, n_groups in zip(blocks, groups, strict=True):
            if self.ffn:
                mlp, old = block.mlp, block.mlp.hidden_mask
                n_old = mlp.hidden
                mlp.add_hidden(self.ffn, init_std=self.init_std, generator=generator)
                mlp.hidden_mask = grown_mask(old, n_old, self.ffn, mlp.w_down.weight.device)
            if n_groups:
                mixer, old = block.mixer, block.mixer.head_mask
                n_old = mixer.num_heads * mixer.head_dim
                mixer.add_kv_groups(n_groups, init_std=self.init_std, generator=generator)
                n_new = mixer.num_heads * mixer.head_dim - n_old
                mixer.head_mask = grown_mask(old, n_old, n_new, mixer.out_proj.weight.device)

    def _deepen(self, backbone: Backbone) -> None:
        old = list(backbone.blocks)
        plan = InsertDepthGrowth(self.depth, self.placement).plan(len(old))  # the same layout as insert_depth
        devices = sorted({p.device.index or 0 for p in backbone.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            backbone.blocks = nn.ModuleList(self._new_block(old[i]) if is_copy else old[i] for i, is_copy in plan)
        renumber_layers(backbone)

    def _new_block(self, source: Block) -> Block:
        block = copy.deepcopy(source)
        for p in block.parameters():
            p.grad = None
        if self.init == "random":
            with torch.no_grad():
                initialise(block, self.init_std)
        device = next(iter(block.parameters())).device
        block.growth_mask = GrowthMask.whole(0.0).to(device)
        return block
