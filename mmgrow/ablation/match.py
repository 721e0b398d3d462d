"""``--match-params``: give every variant the first variant's non-embedding parameter count by changing one width.

For each grid point the first variant is the reference with ``N* `` non-embedding parameters (exact: the model is
built from the parsed recipe, :func:`mmgrow.scaling.size.build_parsed`, and split by
:func:`~mmgrow.training.scaling_record.split_parameters`, the split ``summary.json`` records). Every other variant
gets the integer key (default ``model.dim``) ``d = k * m`` (``m`` the multiple) whose count ``N(d)`` is closest to
``N*``; the relative gap ``(N(d) - N*) / N*`` must be within the tolerance (default 0.05), else a ValueError (or,
best effort, the closest ``d`` is kept and the gap reported).

Search: ``N`` grows with ``d`` (about ``N ~ d^2``), so start from ``d0 * sqrt(N* / N(d0))`` rounded to a multiple and
step by ``m`` towards ``N*`` until the count crosses it; the closer of the two sides wins. Widths whose model fails
to build (a mixer's own divisibility rule) are skipped. Every measured count is cached in the plan
(``measured``: overrides -> count), so re-running the command builds nothing again.

A variant that sets the key itself is left alone (reported). ``--set`` of the key is an error (it fixes the width).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmgrow.ablation.plan import grid_points, layered
from mmgrow.ablation.variants import AblationSpec

MAX_STEPS = 24
"""Most widths tried per variant (a guard: the counts are monotone, so the crossing is found in a few)."""


def default_multiple(heads: list[int]) -> int:
    """The smallest multiple of ``lcm(heads)`` that is at least 8 (every head count divides the width)."""
    m = math.lcm(*heads) if heads else 1
    return m * math.ceil(8 / m)


def short_count(n: float) -> str:
    """``1_234_567`` -> ``"1.23M"``, ``21_408`` -> ``"21.4K"``, ``512`` -> ``"512"``."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def _heads(tree: Any) -> list[int]:
    """Every int under a key named ``num_heads`` in a (nested) config mapping."""
    found: list[int] = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "num_heads" and isinstance(v, int) and not isinstance(v, bool) and v > 0:
                found.append(v)
            else:
                found += _heads(v)
    elif isinstance(tree, list):
        for v in tree:
            found += _heads(v)
    return found


class Measurer:
    """Non-embedding parameters of the base recipe with overrides, cached by the overrides' JSON."""

    def __init__(self, base: Path, key: str, cache: dict[str, Any]) -> None:
        self.base, self.key, self.cache = base, key, cache

    def __call__(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """``{"params", "value" (of the key), "heads"}`` or ``{"error": message}`` when the model does not build."""
        tag = json.dumps(overrides, sort_keys=True)
        if tag not in self.cache:
            self.cache[tag] = self._measure(overrides)
        return self.cache[tag]

    def _measure(self, overrides: dict[str, Any]) -> dict[str, Any]:
        import contextlib
        import io
        import logging

        from mmgrow.scaling.size import build_parsed
        from mmgrow.scaling.sweep import cli_value
        from mmgrow.training.scaling_record import split_parameters

        args = [a for k, v in overrides.items() for a in (f"--{k}", cli_value(v))]
        quiet = io.StringIO()
        try:
            # jsonargparse reports a bad value on stderr and exits; keep that text for the message
            # (and Lightning's "Seed set" / "GPU available" lines are noise here: one model per width is built)
            with contextlib.redirect_stderr(quiet):
                logging.disable(logging.INFO)
                cli = build_parsed(self.base, args)
                module = cli.model
                if getattr(module, "model", None) is None and callable(getattr(module, "configure_model", None)):
                    module.configure_model()
                non_embedding, _ = split_parameters(module.model)
        except (ValueError, TypeError, RuntimeError, AssertionError, SystemExit) as exc:
            text = " ".join((str(exc) if not isinstance(exc, SystemExit) else quiet.getvalue()).split())
            return {"error": text[-400:] or type(exc).__name__}
        finally:
            logging.disable(logging.NOTSET)
        config = cli.config.as_dict() if hasattr(cli.config, "as_dict") else {}
        value: Any = config
        for part in self.key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return {"params": int(non_embedding), "value": value, "heads": sorted(set(_heads(config.get("model"))))}


def _model_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides that can change the model (trainer keys and the seed cannot)."""
    return {k: v for k, v in overrides.items() if not k.startswith("trainer.") and k != "seed_everything"}


def _required(result: dict[str, Any], label: str, what: str) -> dict[str, Any]:
    if "error" in result:
        raise ValueError(f"--match-params: the {what} {label!r} does not build: {result['error']}")
    return result


def match_params(base: Path, spec: AblationSpec, key: str = "model.dim", multiple: int | None = None,
                 tolerance: float = 0.05, best_effort: bool = False,
                 cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"key", "tolerance", "variants": {label: {"overrides", "params", "target", "from", "to", "relative",
    "multiple", "note"}}, "measured": cache}`` for every variant (x grid point) of ``spec`` (module docstring)."""
    if key in spec.set:
        raise ValueError(f"--match-params adjusts {key}, but --set {key}={spec.set[key]!r} fixes it for every run; "
                         "drop one of them (or choose another --match-key)")
    if not (0 < tolerance < 1):
        raise ValueError(f"--match-tolerance must lie in (0, 1), got {tolerance}")
    if multiple is not None and multiple < 1:
        raise ValueError(f"--match-multiple must be a positive integer, got {multiple}")
    measure = Measurer(base, key, {} if cache is None else cache)
    out: dict[str, Any] = {}
    names = list(spec.variants)
    for point, keys in grid_points(spec.vary):
        ref_label = f"{names[0]}/{point}" if point else names[0]
        ref_overrides = _model_overrides(layered(spec.variants[names[0]], keys, spec.set))
        ref = _required(measure(ref_overrides), ref_label, "reference variant")
        target = ref["params"]
        if target <= 0:
            raise ValueError(f"--match-params: the reference variant {ref_label!r} has no non-embedding parameters")
        out[ref_label] = {"overrides": {}, "params": target, "target": target, "from": ref["value"],
                          "to": ref["value"], "relative": 0.0, "multiple": None, "note": "reference"}
        for name in names[1:]:
            label = f"{name}/{point}" if point else name
            overrides = _model_overrides(layered(spec.variants[name], keys, spec.set))
            start = _required(measure(overrides), label, "variant")
            entry = {"overrides": {}, "params": start["params"], "target": target, "from": start["value"],
                     "to": start["value"], "relative": (start["params"] - target) / target, "multiple": None}
            if key in spec.variants[name] and key not in spec.vary:
                out[label] = {**entry, "note": f"sets {key} itself: left alone"}
                continue
            m = multiple or default_multiple(start["heads"])
            d, params = _search(measure, overrides, key, start, target, m)
            relative = (params - target) / target
            ok = abs(relative) <= tolerance
            if not ok and not best_effort:
                raise ValueError(f"--match-params: variant {label!r} cannot reach {short_count(target)} non-embedding "
                                 f"parameters within {tolerance:.1%} by moving {key} in multiples of {m}: the closest "
                                 f"is {key}={d} with {short_count(params)} ({relative:+.1%}); raise "
                                 "--match-tolerance, change --match-multiple, or pass --match-best-effort")
            out[label] = {**entry, "overrides": {key: d}, "params": params, "to": d, "relative": relative,
                          "multiple": m, "note": "matched" if ok else f"best effort: outside {tolerance:.1%}"}
    return {"key": key, "tolerance": tolerance, "variants": out, "measured": measure.cache}


def _search(measure: Measurer, overrides: dict[str, Any], key: str, start: dict[str, Any], target: int,
            m: int) -> tuple[int, int]:
    """The multiple of ``m`` whose count is closest to ``target`` (module docstring); ``(width, count)``."""
    d0 = start["value"]
    if not isinstance(d0, int) or d0 < 1:
        raise ValueError(f"--match-params: {key} is {d0!r} in this variant; it must be a positive integer width")

    def count(k: int) -> int | None:
        result = measure(layered(overrides, {key: k * m}))
        return None if "error" in result else result["params"]

    k = max(1, round(d0 * math.sqrt(target / max(1, start["params"])) / m))
    tried: dict[int, int] = {}
    # walk towards the target until the count crosses it (or the walk runs out of room)
    direction = 0
    for _ in range(MAX_STEPS):
        n = count(k)
        if n is not None:
            tried[k] = n
            step = 1 if n < target else -1
            if direction and step != direction:
                break  # crossed
            direction = step
        if n == target or k + (direction or 1) < 1:
            break
        k += direction or 1  # an unbuildable width is stepped over; before any count, look upwards
    if not tried:
        raise ValueError(f"--match-params: no multiple of {m} near {key}={d0} builds a model; set --match-multiple")
    best = min(tried, key=lambda j: (abs(tried[j] - target), j))
    return best * m, tried[best]


def format_matching(match: dict[str, Any]) -> str:
    """One line per variant: ``mamba2: model.dim 64 -> 80: N 1.23M vs target 1.20M (+2.5 %)``."""
    key = match["key"]
    lines = [f"parameter matching on {key} (non-embedding parameters, tolerance {match['tolerance']:.1%}):"]
    for label, v in match["variants"].items():
        gap = f"({100 * v['relative']:+.1f} %)"
        if v["note"] == "reference":
            lines.append(f"  {label}: {key} {v['to']}: N {short_count(v['params'])} (reference)")
        elif v["overrides"]:
            lines.append(f"  {label}: {key} {v['from']} -> {v['to']}: N {short_count(v['params'])} vs target "
                         f"{short_count(v['target'])} {gap}" + ("" if v["note"] == "matched" else f" [{v['note']}]"))
        else:
            lines.append(f"  {label}: {key} {v['to']}: N {short_count(v['params'])} vs target "
                         f"{short_count(v['target'])} {gap} [{v['note']}]")
    return "\n".join(lines)
