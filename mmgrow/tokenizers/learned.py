"""Base of the learned codecs (VQ video tokens, continuous video latents, audio codecs).

A learned codec is a :class:`~mmgrow.protocols.Tokenizer` with trainable weights. The same training
loop fits it through :meth:`LearnedCodec.loss`; afterwards a run directory holds its weights and the
arguments that rebuild it, written by :func:`mmgrow.rundir.save_model`::

    model.safetensors                      the codec's state_dict
    model.yaml                             {"codec": {"class_path": "<module>.<Class>", "init_args": {...}}}

A data pipeline then builds the codec with ``checkpoint=<run dir>``: the constructor ends with
:meth:`LearnedCodec.load_checkpoint`, which checks the stored ``init_args`` against the codec's own
:meth:`LearnedCodec.codec_config`, loads the weights strictly and freezes the codec (``eval()``,
no gradients), so tokens do not change while a model trains on them.

This module imports only torch, yaml and :mod:`mmgrow.rundir` (no Lightning).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, ClassVar

import yaml
from torch import Tensor

from mmgrow.protocols import Tokenizer
from mmgrow.rundir import CONFIG_NAME, CheckpointError, load_weights_into

CODEC_CONFIG_KEY = "codec"
"""Key of ``model.yaml`` that holds ``{"class_path", "init_args"}`` of a codec run."""


class LearnedCodec(Tokenizer):
    """A tokenizer with weights: trained with :meth:`loss`, loaded frozen with :meth:`load_checkpoint`.

    Subclasses keep every constructor argument as a same-named attribute (:meth:`codec_config`
    reads them back) and take ``checkpoint: str | None = None`` as their last argument; when it is
    given, their constructor ends with ``self.load_checkpoint(checkpoint)``.

    Class attributes:
        learned: always True (the data module asks it before building a codec from a checkpoint).
        raw_batch_dims: number of dims of ONE raw item (video ``uint8 [F, H, W, 3]`` -> 4, audio
            ``float [N]`` -> 1); :meth:`loss` and :meth:`reconstruct` take one more (the batch).
    """

    learned: ClassVar[bool] = True
    raw_batch_dims: ClassVar[int] = 0
    frozen: bool = False
    """True after :meth:`load_checkpoint` (or :meth:`freeze`): ``train()`` keeps it in eval mode."""

    # ---------------------------------------------------------------------------------------------
    # training contract (implemented by subclasses)
    # ---------------------------------------------------------------------------------------------

    def loss(self, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch`` of raw items (``[B, *raw]``) -> (training loss, detached 0-d metrics).

        Codebook EMA updates, dead-code restarts and running statistics change only when
        ``self.training``."""
        raise NotImplementedError

    def reconstruct(self, batch: Tensor) -> Tensor:
        """Encode and decode a batch without gradients; same shape and dtype as ``batch``."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------
    # configuration and checkpoints
    # ---------------------------------------------------------------------------------------------

    def codec_config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this codec (``checkpoint`` excluded), read back
        from the same-named attributes."""
        params = inspect.signature(type(self).__init__).parameters
        names = [n for n, p in params.items()
                 if n not in ("self", "checkpoint") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing = [n for n in names if not hasattr(self, n)]
        if missing:
            raise AttributeError(f"{type(self).__name__} does not keep constructor argument(s) {missing} as "
                                 "attributes; LearnedCodec.codec_config needs every one of them")
        return {n: getattr(self, n) for n in names}

    def class_path(self) -> str:
        """``"<module>.<Class>"`` written into ``model.yaml`` beside :meth:`codec_config`."""
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def export_config(self) -> dict[str, Any]:
        """The ``model.yaml`` content of a codec run: ``{"codec": {"class_path", "init_args"}}``."""
        return {CODEC_CONFIG_KEY: {"class_path": self.class_path(), "init_args": self.codec_config()}}

    def load_checkpoint(self, path: str | Path) -> None:
        """Load weights from a codec run directory (or its ``model.safetensors``) and freeze.

        When ``model.yaml`` sits next to the weights and holds ``{"codec": {...}}``, its class and
        ``init_args`` must equal this codec's; a difference is a :class:`CheckpointError` naming the
        keys. Weights load strictly: missing, unexpected or mis-shaped tensors are named.
        """
        path = Path(path)
        self._check_stored_config(path)
        load_weights_into(self, path)
        self.freeze()

    def _check_stored_config(self, path: Path) -> None:
        config_path = (path if path.is_dir() else path.parent) / CONFIG_NAME
        if not config_path.exists():
            return
        try:
            stored = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as exc:
            raise CheckpointError(f"{config_path} is not valid YAML: {exc}") from exc
        codec = stored.get(CODEC_CONFIG_KEY) if isinstance(stored, dict) else None
        if not isinstance(codec, dict):
            return  # a model.yaml of something else (e.g. a UnifiedModel run): weights decide
        name = type(self).__name__
        stored_class = codec.get("class_path")
        if stored_class is not None and stored_class != self.class_path():
            raise CheckpointError(f"{config_path} describes a {stored_class}, not a {self.class_path()}; "
                                  f"load it with the codec it was trained as")
        stored_args = _plain(codec.get("init_args") or {})
        own_args = _plain(self.codec_config())
        differing = sorted(k for k in set(stored_args) | set(own_args)
                           if stored_args.get(k, _ABSENT) != own_args.get(k, _ABSENT))
        if differing:
            detail = ", ".join(f"{k}: checkpoint {stored_args.get(k, '<absent>')!r} vs codec "
                               f"{own_args.get(k, '<absent>')!r}" for k in differing)
            raise CheckpointError(f"{name}: init_args of {config_path} differ from this codec's ({detail}); "
                                  "build the codec with the arguments it was trained with")

    # ---------------------------------------------------------------------------------------------
    # freezing
    # ---------------------------------------------------------------------------------------------

    def freeze(self) -> LearnedCodec:
        """Eval mode and no gradients, kept through later ``train()`` calls (a frozen codec inside a
        training module must not update its codebook or statistics)."""
        self.frozen = True
        self.requires_grad_(False)
        return super().train(False)

    def unfreeze(self) -> LearnedCodec:
        """Undo :meth:`freeze` (to fine-tune a loaded codec)."""
        self.frozen = False
        self.requires_grad_(True)
        return self

    def train(self, mode: bool = True) -> LearnedCodec:
        return super().train(mode and not self.frozen)


_ABSENT = object()


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so a config compares equal to its YAML round trip."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
