"""Attribute combinations of the embedded generators: which names are drawn, which triples are held out.

A generator draws one name per axis (shape, colour, motion; pitch, waveform, pattern). Some full
combinations are *held out*: they never occur in ``"train"`` / ``"val"`` while each of their names
does, so ``split="heldout"`` measures compositional generalisation. Both rules live here so every
generator states them, and its errors, the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product


def choose_names(owner: str, what: str, chosen: Sequence[str] | None, default: tuple[str, ...],
                 allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """``chosen`` checked against ``allowed`` (default: ``default``), or ``default`` when None.

    Raises ``TypeError`` for a bare string and ``ValueError`` for unknown, repeated or no names,
    listing the valid ones."""
    allowed = default if allowed is None else allowed
    if chosen is None:
        return default
    if isinstance(chosen, str):
        raise TypeError(f"{owner}: {what} must be a list of names, got the string {chosen!r}")
    values = tuple(chosen)
    bad = [v for v in values if v not in allowed]
    if bad or not values or len(set(values)) != len(values):
        unknown = f" (unknown: {bad})" if bad else ""
        raise ValueError(f"{owner}: {what} must be distinct names from the valid ones: {', '.join(allowed)}; "
                         f"got {list(values)}{unknown}")
    return values


def split_combinations(owner: str, axes: dict[str, tuple[str, ...]], default_heldout: Sequence[tuple[str, ...]],
                       heldout: Sequence[Sequence[str]] | None) -> tuple[tuple[tuple[str, ...], ...],
                                                                        tuple[tuple[str, ...], ...]]:
    """``(seen, heldout)`` combinations over ``axes`` (``{plural axis name: chosen names}``, in order).

    ``heldout`` None keeps the ``default_heldout`` triples that use only chosen names; given ones must.
    Every chosen name must still occur in a seen combination (or it would never be trained on)."""
    everything = list(product(*axes.values()))
    if heldout is None:
        held = [c for c in default_heldout if c in everything]
    else:
        held = [tuple(c) for c in heldout]
        for c in held:
            if c not in everything:
                outside = ", ".join(f"{name}={list(values)}" for name, values in axes.items())
                raise ValueError(f"{owner}: held-out combination {c} uses a name outside {outside}")
    seen = tuple(c for c in everything if c not in held)
    for axis, values in enumerate(axes.values()):
        missing = [v for v in values if not any(c[axis] == v for c in seen)]
        if missing:
            raise ValueError(f"{owner}: {missing} would never appear in training; every part of a held-out "
                             "combination must also occur in a seen combination")
    return seen, tuple(held)
