"""An attribute probe for moving-shapes clips: which shape, colour and motion a video shows.

The automatic judge of generated toy videos (the stand-in for the human raters and CLIP models of
the papers): a small conv net trained on real shapes clips (``benchmarks/train_probe.py``) that
reads a clip ``uint8 [N, F, H, W, 3]`` and returns logits for each attribute of
:mod:`mmgrow.data.synthetic.shapes`. Its penultimate features also serve as the embedding of a
Fréchet distance between sets of clips (:mod:`mmgrow.evaluation.video_metrics`).

Architecture. Frames are area-averaged to the ``grid x grid`` drawing cells (exact for shapes
videos, which are constant per cell), so the probe reads 32 x 32 clips and 8 x 8 decoded codec
output alike. Every pair of consecutive frames becomes one 9-channel cell image
``[x_t, x_{t+1}, x_{t+1} - x_t]`` (the difference marks where the object arrives and leaves, i.e.
its motion), three 3 x 3 convolutions map it to features, a max over cells makes them
position-invariant, and the mean over the ``F - 1`` pairs makes them length-invariant::

    h = mean_t max_cells conv(conv(conv(pair_t)))      [N, 2 * width]
    features = GELU(W h + b)                           [N, hidden]     (penultimate layer)
    logits[attribute] = head_attribute(features)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgrow.data.synthetic.shapes import BACKGROUND, MOTIONS, SHAPES
from mmgrow.tokenizers.pixels import DEFAULT_PALETTE

DEFAULT_PROBE_DIR = Path(__file__).resolve().parents[2] / "pretrained" / "shapes_probe"
"""Where the shipped probe lives in a source checkout (written by ``benchmarks/train_probe.py``)."""

ALL_COLOURS: tuple[str, ...] = tuple(c for c in DEFAULT_PALETTE if c != BACKGROUND)
"""Every colour a shapes object can have: the palette without the background."""


class AttributeProbe(nn.Module):
    """Clip ``uint8 [N, F, H, W, 3]`` (``F >= 2``, ``H`` and ``W`` multiples of ``grid``) -> logits.

    Args:
        grid: drawing cells per side; frames are averaged to ``grid x grid`` cells first.
        width: channels of the first two convolutions (the third has ``2 * width``).
        hidden: size of the penultimate layer (:attr:`num_features`).
        colours: colour names the probe tells apart (default: every non-background palette colour).
    """

    def __init__(self, grid: int = 8, width: int = 32, hidden: int = 64, colours: Sequence[str] | None = None) -> None:
        super().__init__()
        for name, value in (("grid", grid), ("width", width), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AttributeProbe: {name} must be a positive int, got {value!r}")
        colours = list(ALL_COLOURS if colours is None else colours)
        unknown = [c for c in colours if c not in ALL_COLOURS]
        if unknown or len(set(colours)) != len(colours) or len(colours) < 2:
            raise ValueError(f"AttributeProbe: colours must be >= 2 distinct names from {list(ALL_COLOURS)}, got "
                             f"{colours}")
        self.grid, self.width, self.hidden, self.colours = grid, width, hidden, colours
        self.labels: dict[str, tuple[str, ...]] = {"shape": tuple(SHAPES), "colour": tuple(colours),
                                                   "motion": tuple(MOTIONS)}
        """Class names per attribute, in logit order."""
        self.convs = nn.Sequential(
            nn.Conv2d(9, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(),
        )
        self.penultimate = nn.Linear(2 * width, hidden)
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(names)) for name, names in self.labels.items()})

    @property
    def num_features(self) -> int:
        """Width of :meth:`features` (what torchmetrics' Fréchet distance reads)."""
        return self.hidden

    def config(self) -> dict:
        """Constructor arguments that rebuild this probe (``model.yaml``)."""
        return {"grid": self.grid, "width": self.width, "hidden": self.hidden, "colours": list(self.colours)}

    def cells(self, clips: Tensor) -> Tensor:
        """``uint8 [N, F, H, W, 3]`` -> float ``[N, F, 3, grid, grid]`` in ``[0, 1]`` (area average per cell)."""
        if not isinstance(clips, Tensor) or clips.dtype != torch.uint8 or clips.dim() != 5 or clips.shape[-1] != 3:
            raise ValueError(f"AttributeProbe expects uint8 clips [N, F, H, W, 3], got "
                             f"{getattr(clips, 'dtype', type(clips).__name__)} {tuple(getattr(clips, 'shape', ()))}")
        n, f, h, w, _ = clips.shape
        if f < 2:
            raise ValueError(f"AttributeProbe needs F >= 2 frames per clip to see motion, got F={f}")
        if h % self.grid or w % self.grid:
            raise ValueError(f"AttributeProbe: frame size {h}x{w} is not a multiple of grid={self.grid}")
        weight = self.penultimate.weight
        x = clips.to(weight.device, weight.dtype).div(255.0).permute(0, 1, 4, 2, 3).reshape(n * f, 3, h, w)
        x = F.avg_pool2d(x, (h // self.grid, w // self.grid))
        return x.reshape(n, f, 3, self.grid, self.grid)

    def features(self, clips: Tensor) -> Tensor:
        """``uint8 [N, F, H, W, 3]`` -> ``[N, hidden]``, the penultimate layer (module docstring)."""
        x = self.cells(clips)
        n, f = x.shape[:2]
        pairs = torch.cat([x[:, :-1], x[:, 1:], x[:, 1:] - x[:, :-1]], dim=2)  # [N, F-1, 9, g, g]
        h = self.convs(pairs.flatten(0, 1)).amax(dim=(-2, -1))  # [N (F-1), 2 width]
        h = h.reshape(n, f - 1, -1).mean(dim=1)
        return F.gelu(self.penultimate(h))

    def forward(self, clips: Tensor) -> dict[str, Tensor]:
        """``{"shape": [N, 4], "colour": [N, len(colours)], "motion": [N, 4]}`` logits."""
        feats = self.features(clips)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, clips: Tensor, batch_size: int = 512) -> list[dict[str, str]]:
        """The most likely ``{"shape", "colour", "motion"}`` names of each clip (eval mode, no grad)."""
        was_training = self.training
        self.eval()
        try:
            out: list[dict[str, str]] = []
            for chunk in clips.split(batch_size):
                logits = self(chunk)
                best = {name: value.argmax(-1).tolist() for name, value in logits.items()}
                out += [{name: self.labels[name][best[name][i]] for name in self.labels} for i in range(len(chunk))]
            return out
        finally:
            self.train(was_training)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``model.safetensors`` + ``model.yaml`` (``{"probe": {"class_path", "init_args"}}``)."""
        from mmgrow.rundir import save_model

        spec = {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": self.config()}
        return save_model(self, {"probe": spec}, out_dir)


def load_probe(path: str | Path | None = None) -> AttributeProbe:
    """The probe saved in ``path`` (default :data:`DEFAULT_PROBE_DIR`), in eval mode with frozen weights."""
    import yaml

    from mmgrow.rundir import CONFIG_NAME, CheckpointError, load_weights_into

    path = Path(DEFAULT_PROBE_DIR if path is None else path)
    config = path / CONFIG_NAME
    if not config.exists():
        raise CheckpointError(f"no probe at {path}: {CONFIG_NAME} not found (create one with "
                              "`python benchmarks/train_probe.py`)")
    spec = (yaml.safe_load(config.read_text()) or {}).get("probe")
    if not isinstance(spec, dict) or spec.get("class_path") != f"{AttributeProbe.__module__}.AttributeProbe":
        raise CheckpointError(f"{config} does not describe an AttributeProbe (expected a 'probe' entry with "
                              f"class_path {AttributeProbe.__module__}.AttributeProbe), got {spec!r}")
    probe = AttributeProbe(**spec.get("init_args", {}))
    load_weights_into(probe, path)
    probe.eval().requires_grad_(False)
    return probe
