"""Trainable input encoders of continuous codecs: :class:`TimmImageEncoder` (UnIVAL's CNN / ViT image encoder).

A continuous codec may ship an encoder that the model trains with it (``codec.input_encoder_spec()``;
:class:`~mmgrow.models.unified.UnifiedModel` ``input_encoders``). The contract: built as
``cls(dim=D, latent_dim=C, **init_args)``, it maps one batch of items' latents ``[M, n, C]`` to
``[M, n, D]`` and says ``tokens_per_item = n``. Here the latents are the codec's lossless packing of
a normalised image (:class:`~mmgrow.tokenizers.timm_image.TimmImageCodec`), so the encoder first
reassembles the image and then runs a timm network on it::

    latents [M, n, C] -> flat [M, n*C][:, :3HW] -> image [M, 3, H, W]
        -> timm forward_features -> CNN [M, F, h, w] -> [M, h*w, F]   (n = h*w)
                                    ViT [M, P + n, F] -> [M, n, F]    (P = num_prefix_tokens dropped)
        -> Linear(F, D) -> [M, n, D]

timm is imported when an encoder or codec is built, never by ``import mmgrow``; no weights are
downloaded (``pretrained=False``), local weights come from ``weights=`` (a state dict file).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Normalisation used when the timm model has no ``pretrained_cfg`` mean / std."""


def create_timm_model(model_name: str, model_args: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(model_name, pretrained=False, num_classes=0, **model_args)`` (no download)."""
    import timm

    args = dict(model_args or {})
    for key in ("pretrained", "num_classes"):
        if key in args:
            raise ValueError(f"timm model_args must not set {key!r}: the encoder always builds pretrained=False "
                             "(load local weights with weights=) and num_classes=0 (features, no classifier)")
    try:
        return timm.create_model(model_name, pretrained=False, num_classes=0, **args)
    except RuntimeError as exc:  # timm's "Unknown model (...)"
        raise ValueError(f"timm cannot build model_name={model_name!r}: {exc}") from exc


def feature_tokens(features: Tensor, num_prefix_tokens: int) -> Tensor:
    """timm ``forward_features`` output -> tokens ``[M, n, F]``: a CNN map ``[M, F, h, w]`` row-major
    (``n = h*w``), a ViT sequence ``[M, T, F]`` without its ``num_prefix_tokens`` class / register tokens."""
    if features.dim() == 4:
        return features.flatten(2).transpose(1, 2)
    if features.dim() == 3:
        return features[:, num_prefix_tokens:]
    raise ValueError(f"timm forward_features returned shape {tuple(features.shape)}; expected a CNN map "
                     "[M, F, h, w] or a token sequence [M, T, F]")


def normalisation(net: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per RGB channel: the model's ``pretrained_cfg`` when it has them, else ImageNet's."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


@torch.no_grad()
def probe(net: nn.Module, image_size: int) -> tuple[int, int]:
    """``(n, F)``: feature tokens and feature width the net makes of one ``image_size`` square image
    (one forward of a zeros image in eval mode; BatchNorm cannot run a single image in training)."""
    was_training = net.training
    net.eval()
    try:
        tokens = feature_tokens(net.forward_features(torch.zeros(1, 3, image_size, image_size)),
                                int(getattr(net, "num_prefix_tokens", 0) or 0))
    finally:
        net.train(was_training)
    return int(tokens.shape[1]), int(tokens.shape[2])


def packed_width(image_size: int, tokens: int) -> int:
    """``C = ceil(3 * H * W / n)``: the latent width that holds a normalised image in ``n`` rows."""
    return math.ceil(3 * image_size * image_size / tokens)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``'d state dict (``.pt`` / ``.pth``; read with
    ``weights_only=True``: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TimmImageEncoder: weights file {str(path)!r} does not exist (expected a "
                                ".safetensors or .pt state dict of the timm model)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"TimmImageEncoder: {str(path)!r} does not hold a state dict (name -> tensor)")
    return state


class TimmImageEncoder(nn.Module):
    """Image latents ``[M, n, C]`` (a :class:`~mmgrow.tokenizers.timm_image.TimmImageCodec` packing) ->
    ``[M, n, dim]`` through a timm network and a linear projection (module docstring).

    Args:
        dim: model width ``D``; latent_dim: ``C`` (supplied by the model).
        model_name: any timm model name (``resnet18`` default; ``test_resnet`` / ``test_vit`` are tiny).
        image_size: ``H = W`` of the images.
        frozen: keep the timm network fixed (``requires_grad=False``, always in eval mode: BatchNorm
            statistics do not move); the projection still trains.
        weights: a local ``.safetensors`` / ``.pt`` state dict of the timm model built with
            ``num_classes=0``, loaded strictly.
        model_args: extra ``timm.create_model`` keyword arguments (``{img_size: 32}`` for a ViT ...).
    """

    def __init__(self, dim: int, latent_dim: int, model_name: str = "resnet18", image_size: int = 32,
                 frozen: bool = False, weights: str | None = None, model_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"TimmImageEncoder: image_size must be a positive int, got {image_size!r}")
        self.model_name, self.image_size, self.frozen = model_name, image_size, bool(frozen)
        self.net = create_timm_model(model_name, model_args)
        if weights is not None:
            self.load_net_weights(weights)
        self.num_prefix_tokens = int(getattr(self.net, "num_prefix_tokens", 0) or 0)
        self.tokens_per_item, features = probe(self.net, image_size)
        need = packed_width(image_size, self.tokens_per_item)
        if latent_dim < need:
            raise ValueError(f"TimmImageEncoder: latent_dim={latent_dim} cannot hold a {image_size}x{image_size} "
                             f"image in {self.tokens_per_item} rows; expected >= ceil(3*H*W/n) = {need}")
        self.latent_dim = latent_dim
        self.proj = nn.Linear(features, dim)
        self.restore_frozen()

    def restore_frozen(self) -> None:
        """With ``frozen``: the timm network's parameters get ``requires_grad=False`` and it goes to eval mode
        (the training module calls this again after its ``train_parameters`` policy set every parameter)."""
        if self.frozen:
            self.net.requires_grad_(False)
            self.net.eval()

    def load_net_weights(self, path: str | Path) -> None:
        """Load a state dict file into the timm network; missing or unexpected keys are a ``ValueError``."""
        state = load_state_dict_file(path)
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"TimmImageEncoder: weights {str(path)!r} do not fit timm model {self.model_name!r} "
                             f"(num_classes=0): missing keys {sorted(missing)[:8]}, unexpected keys "
                             f"{sorted(unexpected)[:8]}")

    def init_weights(self, init_std: float) -> None:
        """The model's generic init reaches only the projection; timm's own init (or loaded weights) stays."""
        nn.init.normal_(self.proj.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.proj.bias)

    def train(self, mode: bool = True) -> TimmImageEncoder:
        super().train(mode)
        if self.frozen:
            self.net.eval()  # frozen: BatchNorm / dropout stay in inference mode
        return self

    def image(self, latents: Tensor) -> Tensor:
        """``[M, n, C] -> [M, 3, H, W]``: the normalised image the codec packed (its inverse)."""
        if latents.dim() != 3 or latents.shape[1] != self.tokens_per_item or latents.shape[2] != self.latent_dim:
            raise ValueError(f"TimmImageEncoder: latents must be [M, {self.tokens_per_item}, {self.latent_dim}], got "
                             f"{tuple(latents.shape)}")
        size = self.image_size
        flat = latents.reshape(latents.shape[0], -1)[:, : 3 * size * size]
        return flat.reshape(-1, 3, size, size)

    def forward(self, latents: Tensor) -> Tensor:
        """``[M, n, C] -> [M, n, dim]``."""
        image = self.image(latents)
        tokens = feature_tokens(self.net.forward_features(image), self.num_prefix_tokens)  # [M, n, F]
        return self.proj(tokens)
