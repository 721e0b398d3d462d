"""Function-preserving width growth by duplicating units: Net2WiderNet (Chen, Goodfellow & Shlens 2016,
arXiv 1511.05641) as bert2BERT's FPI applies it to transformers (Chen et al. 2022, arXiv 2110.07143).

A new unit copies the *incoming* weights of a source unit ``g(j)``; the *outgoing* weights of the
source and of every copy of it are divided by the replication count ``c = 1 + #copies``:

.. math::

    y = \\sum_u W^{out}_{:, u}\\, h_u \\;=\\; \\sum_u \\sum_{i=1}^{c_u} \\frac{W^{out}_{:, u}}{c_u}\\, h_u

Two widths grow, each through a hook on its layer:

- **FFN** (``ffn`` new hidden units per chosen block): :meth:`~mmgrow.layers.mlp.SwiGLU.duplicate_hidden`
  copies ``W_gate`` and ``W_up`` rows; ``SiLU(g) * u`` of a copy equals its source's.
- **Heads** (``heads`` new query heads per chosen block):
  :meth:`~mmgrow.layers.attention.FullAttention.duplicate_kv_groups` copies whole key/value groups
  (a key/value head with its ``G = H // Hk`` query heads, q/k/v rows and biases), so ``heads`` must
  be a multiple of ``G`` and ``H % Hk`` stays 0. A copied head attends exactly like its source.

The model width ``D`` does **not** grow here: duplicating residual channels is not
function-preserving under RMSNorm (``rms`` over ``D + n`` channels with some duplicated differs from
``rms`` over ``D``), and MSG's masked norms are a different operator.

**Source units** are drawn from ``torch.Generator().manual_seed(seed)`` (CPU), consumed block by
block in increasing index, FFN before heads, each followed by its noise (if any): ``n`` new units
over ``N`` candidates are ``n // N`` fresh ``randperm(N)`` rounds plus the first ``n % N`` entries
of one more, so replication counts differ by at most one; with ``n <= N`` every source is copied
once and the division by ``c = 2`` is exact.

**Noise** (``noise_std > 0``, off by default): the outgoing columns of the replicas of one source get
``N(0, noise_std)`` noise centred over those replicas (it sums to 0), which breaks their symmetry
(different gradients) while the sum is unchanged up to rounding. The rounding error grows with the
noise relative to the weights (the replicas' terms cancel), so the report says ``"tolerance"`` only
while ``noise_std`` is at most the RMS of every outgoing weight it perturbs, and ``"none"`` beyond.

**Tolerance.** The grown model computes the same sums with more, rescaled terms inside each matmul
(BLAS blocking and reduction order change with ``K``; ``w / 3`` is inexact), so float32 outputs move
by rounding only. Measured ``max|y' - y| / max|y|`` on the final hidden states (UnifiedModel, D 32-128,
depth 2-6, full / sliding-window / blockwise attention, GQA, q/k/v biases, up to 4x replication,
2-core MKL CPU): at most ``7.8e-7`` without noise, ``9.5e-7`` with noise at the weights' RMS (and
``7.4e-6`` at 10x it); :attr:`Net2WiderGrowth.tolerance` is ``1e-5``. In float64: below ``3e-15``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mmgrow.growth.base import GrowthError, NewParameters, backbone_of, check_layers
from mmgrow.models.block import Block
from mmgrow.protocols import GrowthReport, GrowthStrategy


def check_count(value: object, owner: str, name: str) -> int:
    """``value`` as a non-negative int (not a bool), or a GrowthError naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GrowthError(f"{owner}: {name} must be an int >= 0, got {value!r}")
    return value


def balanced_sources(candidates: int, count: int, generator: torch.Generator) -> Tensor:
    """``[count]`` source indices in ``[0, candidates)``: whole ``randperm`` rounds, then part of one
    more, so each candidate is picked ``count // candidates`` or one more times."""
    rounds = [torch.randperm(candidates, generator=generator) for _ in range(count // candidates)]
    if count % candidates:
        rounds.append(torch.randperm(candidates, generator=generator)[: count % candidates])
    return torch.cat(rounds) if rounds else torch.zeros(0, dtype=torch.long)


def head_groups(block: Block, index: int, heads: int, owner: str, hook: str) -> int:
    """Key/value groups that give ``heads`` new query heads in ``block``'s mixer, after checking that
    the mixer has the head-growth ``hook`` and that ``heads`` is a whole number of groups."""
    mixer = block.mixer
    if not callable(getattr(mixer, hook, None)):
        raise GrowthError(f"{owner}: block {index}'s mixer {type(mixer).__name__} cannot grow heads (it has no "
                          f"{hook} hook); only attention mixers (FullAttention and its subclasses) support head "
                          "growth - pick attention blocks with `layers`, or set heads=0")
    group = mixer.kv_group_size
    if heads % group:
        raise GrowthError(f"{owner}: heads={heads} is not a multiple of block {index}'s key/value group size "
                          f"{group} (num_heads={mixer.num_heads}, num_kv_heads={mixer.num_kv_heads}); heads grow "
                          "in whole groups so num_heads stays a multiple of num_kv_heads")
    return heads // group


class Net2WiderGrowth(GrowthStrategy):
    """Widen the MLPs and/or attention of chosen blocks by duplicating units (Net2Net / bert2BERT-FPI).

    Args:
        ffn: new hidden units per chosen block's SwiGLU.
        heads: new query heads per chosen block's attention (a multiple of its ``H // Hk``).
        layers: block indices to widen (None = every block; negative counts from the end).
        noise_std: zero-sum symmetry-breaking noise on the replicas' outgoing weights (0 = none).
        seed: seeds the generator that picks source units and draws the noise.
    """

    preserves = "tolerance"
    tolerance = 1e-5

    def __init__(self, ffn: int = 0, heads: int = 0, layers: list[int] | None = None, noise_std: float = 0.0,
                 seed: int = 0) -> None:
        name = type(self).__name__
        self.ffn = check_count(ffn, name, "ffn")
        self.heads = check_count(heads, name, "heads")
        if ffn == 0 and heads == 0:
            raise GrowthError(f"{name}: ffn and heads are both 0; nothing to grow")
        if not isinstance(noise_std, (int, float)) or isinstance(noise_std, bool) or not noise_std >= 0:
            raise GrowthError(f"{name}: noise_std must be a float >= 0, got {noise_std!r}")
        self.layers = None if layers is None else list(layers)
        self.noise_std = float(noise_std)
        self.seed = int(seed)

    @classmethod
    def conformance_kwargs(cls) -> dict:
        """Settings every mixer kind supports (head growth needs an attention mixer)."""
        return {"ffn": 8}

    def apply(self, model: nn.Module) -> GrowthReport:
        name = type(self).__name__
        backbone = backbone_of(model)
        chosen = check_layers(self.layers, backbone.depth, name)
        blocks: Sequence[Block] = [backbone.blocks[i] for i in chosen]
        # Check every chosen block before touching any, so a refused growth leaves the model as it was.
        groups = [head_groups(b, i, self.heads, name, "duplicate_kv_groups") if self.heads else 0
                  for i, b in zip(chosen, blocks, strict=True)]
        if self.ffn:
            for i, b in zip(chosen, blocks, strict=True):
                if not callable(getattr(b.mlp, "duplicate_hidden", None)):
                    raise GrowthError(f"{name}: block {i}'s MLP {type(b.mlp).__name__} has no duplicate_hidden hook")
        # Noise above an outgoing weight's RMS makes the replicas' cancelling terms dominate the rounding.
        outgoing = ([b.mlp.w_down.weight for b in blocks] if self.ffn else []) + [
            b.mixer.out_proj.weight for b, g in zip(blocks, groups, strict=True) if g]
        loud = self.noise_std > min(float(w.detach().pow(2).mean().sqrt()) for w in outgoing)
        generator = torch.Generator().manual_seed(self.seed)
        with NewParameters(model) as new:
            for block, n_groups in zip(blocks, groups, strict=True):
                if self.ffn:
                    sources = balanced_sources(block.mlp.hidden, self.ffn, generator)
                    block.mlp.duplicate_hidden(sources, noise_std=self.noise_std, generator=generator)
                if n_groups:
                    sources = balanced_sources(block.mixer.num_kv_heads, n_groups, generator)
                    block.mixer.duplicate_kv_groups(sources, noise_std=self.noise_std, generator=generator)
        notes = (f"Net2Wider: blocks {chosen} +{self.ffn} FFN units, +{self.heads} query heads (copies, fan-out "
                 "divided by the replication count)")
        if self.noise_std:
            notes += (f"; zero-sum noise {self.noise_std:g} on the replicas' outgoing weights"
                      + (" (above their RMS: preserved only up to rounding that may exceed the tolerance)"
                         if loud else ""))
        return GrowthReport(new_parameters=new.names, preserves="none" if loud else "tolerance", notes=notes)
