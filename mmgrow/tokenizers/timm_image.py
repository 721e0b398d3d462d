"""``timm_image``: an input-only continuous image codec whose features come from a trainable timm network.

UnIVAL feeds images to its transformer as CNN / ViT features that are trained with it. A codec runs
in the data pipeline, outside the model, so it cannot own trainable weights; instead it packs the
*normalised image* losslessly into latents and names the encoder the model builds
(:meth:`TimmImageCodec.input_encoder_spec`, :class:`~mmgrow.models.input_encoder.TimmImageEncoder`)::

    image uint8 [H, W, 3] -> x = (image / 255 - mean_c) / std_c        (per RGB channel c)
        -> channel-first [3, H, W] -> flat [3HW] -> zero-pad to n*C -> latents float32 [n, C]

    n = feature tokens timm makes of an H x W image (CNN map h*w; ViT tokens minus prefix tokens)
    C = ceil(3 * H * W / n)

``n`` and the normalisation (the model's ``pretrained_cfg`` mean / std, ImageNet's otherwise) are
found once at construction by building the timm model and running one zeros image through
``forward_features`` in eval mode (a few milliseconds for ``resnet18`` at 32 px; the net is then
dropped). So the model sees ``n`` image positions, one per timm feature token. ``decode`` is not
possible (input only): generate text about images, not images.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from mmgrow.protocols import Tokenizer

ENCODER_CLASS_PATH = "mmgrow.models.input_encoder.TimmImageEncoder"


class TimmImageCodec(Tokenizer):
    """Image ``uint8 [H, W, 3]`` -> latents ``float32 [n, C]`` for :class:`~mmgrow.models.input_encoder.TimmImageEncoder`.

    Args:
        model_name: timm model name (default ``resnet18``: 1 feature token at 32 px; ``test_vit`` with
            ``model_args: {img_size: 32}`` gives several).
        image_size: ``H = W`` of the images.
        frozen: the encoder's timm network is not trained (its projection is).
        weights: a local ``.safetensors`` / ``.pt`` state dict of the timm model (``num_classes=0``).
        model_args: extra ``timm.create_model`` keyword arguments.
    """

    modality: ClassVar[str] = "image"
    kind: ClassVar[str] = "continuous"

    def __init__(self, model_name: str = "resnet18", image_size: int = 32, frozen: bool = False,
                 weights: str | None = None, model_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        from mmgrow.models.input_encoder import create_timm_model, normalisation, packed_width, probe

        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"TimmImageCodec: image_size must be a positive int, got {image_size!r}")
        self.model_name, self.image_size, self.frozen = str(model_name), image_size, bool(frozen)
        self.weights = None if weights is None else str(weights)
        self.model_args = dict(model_args or {})
        net = create_timm_model(self.model_name, self.model_args)
        self.tokens_per_item, _ = probe(net, image_size)
        mean, std = normalisation(net)
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.latent_dim = packed_width(image_size, self.tokens_per_item)
        self.special_tokens: dict[str, int] = {}

    def normalise(self, image: Any) -> Tensor:
        """``uint8 [H, W, 3]`` -> ``float32 [3, H, W]``, ``(image / 255 - mean) / std`` per channel."""
        x = torch.as_tensor(np.asarray(image)) if not isinstance(image, Tensor) else image
        size = self.image_size
        if x.dtype != torch.uint8 or tuple(x.shape) != (size, size, 3):
            raise ValueError(f"TimmImageCodec: expected an image uint8 [{size}, {size}, 3] (image_size={size}), got "
                             f"{x.dtype} {tuple(x.shape)}")
        x = x.permute(2, 0, 1).float() / 255.0
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def encode(self, image: Any) -> Tensor:
        """``uint8 [H, W, 3]`` -> ``float32 [n, C]``: the normalised image, channel-first, in ``n`` rows."""
        flat = self.normalise(image).reshape(-1)
        n, width = self.tokens_per_item, self.latent_dim
        out = torch.zeros(n * width, dtype=torch.float32)
        out[: flat.numel()] = flat
        return out.reshape(n, width)

    def decode(self, tokens: Tensor) -> Any:
        raise NotImplementedError("TimmImageCodec is input-only: its latents feed a trainable timm encoder; "
                                  "it cannot turn model outputs back into an image")

    def input_encoder_spec(self) -> dict[str, Any]:
        """The encoder the model builds for this modality (``UnifiedModel(input_encoders=...)``)."""
        return {"class_path": ENCODER_CLASS_PATH,
                "init_args": {"model_name": self.model_name, "image_size": self.image_size, "frozen": self.frozen,
                              "weights": self.weights, "model_args": dict(self.model_args)}}
