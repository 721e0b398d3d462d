"""The stable 64-bit content hash behind the deterministic choices of tasks (which question, positive or
negative match, which object to ground).

``h = first 8 bytes, big endian, of SHA-256(caption, "\\n<key>=<value>" for every meta key in sorted order,
the raw bytes of media[key])``. The same sample gives the same ``h`` in every process and DataLoader
worker (no ``PYTHONHASHSEED``), and samples whose media differ spread over the values.
"""

from __future__ import annotations

import hashlib

import torch

from mmgrow.protocols import Sample


def content_hash(sample: Sample, media_key: str) -> int:
    """``h`` of ``sample`` over its ``media[media_key]`` (module docstring)."""
    h = hashlib.sha256(sample.text.encode("utf-8"))
    for key in sorted(sample.meta):
        h.update(f"\n{key}={sample.meta[key]}".encode())
    h.update(torch.as_tensor(sample.media[media_key]).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "big")
