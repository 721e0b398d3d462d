"""Weight interpolation of runs of one architecture ("model soups"): the logic behind ``mmgrow merge``.

For runs ``theta_1 .. theta_k`` (each a ``{tensor name: tensor}`` state dict) and weights ``w_i >= 0``
with ``sum_i w_i = 1``, every floating-point tensor of the merge is

    theta[name] = cast_{dtype(name)}( sum_i  w_i * float64(theta_i[name]) )

computed in float64 whatever the stored dtype (so bf16 / fp16 / fp32 runs lose nothing to the sum)
and cast back to the tensor's own dtype. Guarantees (tested):

* a tensor equal in every run is copied unchanged (a convex combination of equal values is that
  value), so merging a run with itself is bit-identical in every dtype;
* weights ``(1, 0)`` / ``(0, 1)`` give the endpoints exactly (``1 * x + 0 * y == x`` in float64 for
  finite ``y``; non-finite weights files are refused);
* non-floating tensors (integer buffers, step counters) must be equal across the runs: there is no
  meaningful average of them, so a difference is an error naming the tensor.

**Same architecture** means the same ``model.yaml`` (token space, sizes, mixer, growth history ...;
a grown model and one built at the grown size directly differ in ``growth`` and are refused) and,
after each model is rebuilt with its growth replayed, the same tensor names, shapes and dtypes.
Differences are reported by name (:func:`config_differences`, :func:`state_differences`), at most
:data:`MAX_LISTED` of them plus a count.

This module needs only torch and :mod:`mmgrow.rundir`; building the models (growth replay) is done
lazily through :func:`mmgrow.training.export.load_model`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmgrow.rundir import (
    CONFIG_NAME,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    atomic_write_bytes,
    check_run,
    read_model_config,
    save_model,
    seal_run,
    strict_json,
)

MAX_LISTED = 10
"""How many differing keys or tensors an architecture error lists before ``... and N more``."""
SUM_TOLERANCE = 1e-6
"""``|sum(weights) - 1|`` allowed without ``--normalize``."""
MERGE_RECORD = "merge.json"
RECIPE_NAME = "config.yaml"


class MergeError(ValueError):
    """Runs that cannot be merged (different architectures, a missing tensor, bad weights)."""

    exit_code = 2  # a user error: ``mmgrow: error: <message>``, exit 2 (mmgrow.cli_errors)


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


# -- weights -----------------------------------------------------------------------------------------------
def parse_weights(text: str, count: int) -> list[float]:
    """``"w1,w2,..."`` -> floats; exactly ``count`` of them, each a number (checked by :func:`check_weights`)."""
    parts = [p.strip() for p in str(text).split(",")]
    values = []
    for part in parts:
        try:
            values.append(float(part))
        except ValueError:
            example = ",".join([format(1 / max(count, 1), ".3g")] * count)
            raise MergeError(f"--weights {text!r}: {part!r} is not a number; expected {count} comma-separated "
                             f"numbers such as {example}") from None
    if len(values) != count:
        raise MergeError(f"--weights {text!r} gives {len(values)} weights for {count} runs; give one weight per run")
    return values


def check_weights(weights: Sequence[float] | None, count: int, normalize: bool = False) -> list[float]:
    """The merge weights: equal (``1/count``) when None; otherwise ``count`` finite numbers ``>= 0`` that
    sum to 1 within :data:`SUM_TOLERANCE`, or, with ``normalize``, any such numbers with a positive sum,
    divided by it. Errors name the offending weight or the sum."""
    if count < 1:
        raise MergeError("no runs to merge")
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise MergeError(f"{len(weights)} weights for {count} runs; give one weight per run")
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise MergeError(f"weight {i + 1} is {w}; every weight must be a finite number >= 0")
    total = math.fsum(weights)
    if normalize:
        if total <= 0:
            raise MergeError(f"the weights sum to {total}; --normalize needs a positive sum")
        return [w / total for w in weights]
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise MergeError(f"the weights {weights} sum to {total!r}, not 1 (tolerance {SUM_TOLERANCE:g}); "
                         "fix them or pass --normalize to divide by the sum")
    return weights


# -- architecture --------------------------------------------------------------------------------------------
def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two model configs differ (``growth``, ``mixer.init_args.num_heads``, ``token_space``
    entries ...); a list differing in length or content is named at the list itself."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out: list[str] = []
        for key in [*a, *(k for k in b if k not in a)]:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(f"{name} (only in {'the first' if key in a else 'the second'})")
            else:
                out.extend(config_differences(a[key], b[key], name))
        return out
    return [] if a == b else [f"{prefix or '<config>'}: {a!r} vs {b!r}"]


def state_differences(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> list[str]:
    """Tensor names whose presence, shape or dtype differ between two state dicts, each with why."""
    out = [f"{k} (missing in the second)" for k in a if k not in b]
    out += [f"{k} (missing in the first)" for k in b if k not in a]
    for k in a:
        if k in b and (a[k].shape != b[k].shape or a[k].dtype != b[k].dtype):
            out.append(f"{k}: {tuple(a[k].shape)} {a[k].dtype} vs {tuple(b[k].shape)} {b[k].dtype}")
    return out


def check_same_architecture(labels: Sequence[str], configs: Sequence[Mapping[str, Any]],
                            states: Sequence[Mapping[str, Tensor]] | None = None) -> None:
    """Raise :class:`MergeError` naming the differing config keys (and, when given, tensors) of the first
    run that differs from ``labels[0]``."""
    for i in range(1, len(configs)):
        diff = config_differences(configs[0], configs[i])
        if diff:
            raise MergeError(f"{labels[i]} has a different architecture from {labels[0]}: {CONFIG_NAME} differs in "
                             f"{len(diff)} key(s): {_listed(diff)}")
        if states is not None:
            diff = state_differences(states[0], states[i])
            if diff:
                raise MergeError(f"{labels[i]} has a different architecture from {labels[0]}: {len(diff)} tensor(s) "
                                 f"differ: {_listed(diff)}")


# -- the merge ----------------------------------------------------------------------------------------------
def merge_state_dicts(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float],
                      labels: Sequence[str] | None = None) -> dict[str, Tensor]:
    """``{name: sum_i w_i theta_i[name]}`` (module docstring: float64 sum, cast back; equal tensors copied;
    non-float tensors must be equal). ``states`` must share names, shapes and dtypes
    (:func:`check_same_architecture`); ``weights`` are used as given (see :func:`check_weights`)."""
    if len(states) != len(weights) or not states:
        raise MergeError(f"{len(weights)} weights for {len(states)} state dicts")
    labels = list(labels or [f"run {i + 1}" for i in range(len(states))])
    diff = [d for s in states[1:] for d in state_differences(states[0], s)]
    if diff:
        raise MergeError(f"the state dicts differ: {_listed(diff)}")
    merged: dict[str, Tensor] = {}
    for name, first in states[0].items():
        tensors = [s[name].detach().cpu() for s in states]
        if all(torch.equal(first.detach().cpu(), t) for t in tensors[1:]):
            merged[name] = tensors[0].clone()  # exact: also for dtypes where the float64 round trip would not be
            continue
        if not first.is_floating_point():
            odd = next(i for i, t in enumerate(tensors) if not torch.equal(tensors[0], t))
            raise MergeError(f"tensor {name!r} ({first.dtype}) differs between {labels[0]} and {labels[odd]}; "
                             "non-floating tensors cannot be averaged and must be equal in every run")
        total = torch.zeros(first.shape, dtype=torch.float64)
        for w, t in zip(weights, tensors, strict=True):
            total += float(w) * t.to(torch.float64)
        merged[name] = total.to(first.dtype)
    return merged


# -- run directories -----------------------------------------------------------------------------------------
@dataclass
class MergeSource:
    """One run to merge: its directory, ``model.yaml`` content and the rebuilt model (weights loaded)."""

    path: Path
    config: dict[str, Any]
    model: nn.Module


def load_sources(paths: Sequence[str | Path]) -> list[MergeSource]:
    """Read and check the runs: each a completed save (:func:`mmgrow.rundir.check_run`) with finite weights;
    configs compared before any model is built, then each model rebuilt with its growth replayed
    (a tensor missing from a run's weights is named with the run) and the tensors compared."""
    from mmgrow.training.export import load_model

    if len(paths) < 2:
        raise MergeError(f"give at least two runs to merge, got {len(paths)}")
    labels = [str(p) for p in paths]
    for p in paths:
        if not Path(p).is_dir():
            raise MergeError(f"{p} is not a directory; give run directories of `mmgrow fit` (or model directories) "
                             f"holding {WEIGHTS_NAME} and {CONFIG_NAME}")
        check_run(p)
    configs = [dict(read_model_config(p)) for p in paths]
    check_same_architecture(labels, configs)
    models = [load_model(p) for p in paths]
    # load_model has checked each run's weights against its own config (a missing tensor is named with the
    # run) and for NaN / inf; what is left is that the rebuilt models agree with each other.
    states = [m.state_dict() for m in models]
    check_same_architecture(labels, configs, states)
    return [MergeSource(Path(p), c, m) for p, c, m in zip(paths, configs, models, strict=True)]


def merge_sources(sources: Sequence[MergeSource], weights: Sequence[float]) -> dict[str, Tensor]:
    """:func:`merge_state_dicts` of the sources' models."""
    return merge_state_dicts([s.model.state_dict() for s in sources], weights, [str(s.path) for s in sources])


def prepare_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse an existing file, a directory that is one of the inputs, or (without ``force``) a non-empty one."""
    if out.exists() and not out.is_dir():
        raise MergeError(f"--out {out} is an existing file; give a directory")
    if any(out.resolve() == Path(p).resolve() for p in inputs):
        raise MergeError(f"--out {out} is one of the runs being merged; write the merge elsewhere")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MergeError(f"--out {out} exists and is not empty; choose a new directory or pass --force to overwrite")


def write_merged(sources: Sequence[MergeSource], weights: Sequence[float], merged: Mapping[str, Tensor], out: Path,
                 normalized: bool = False) -> Path:
    """Write the merged model into ``out`` as a sealed run directory; return the path of its ``manifest.json``.
    The first source's model receives the merged weights (no second copy of the model is made):

    ``model.safetensors`` + ``model.yaml`` (the common config), ``merge.json`` (``runs`` as absolute paths,
    ``weights``, ``normalized``, ``tensors``, ``parameters``) and, when the first run has one, its
    ``config.yaml`` (the recipe, so ``mmgrow generate`` / ``evaluate`` load the merge like a run); each file
    written atomically, ``manifest.json`` last."""
    model = sources[0].model
    model.load_state_dict(dict(merged))
    save_model(model, sources[0].config, out)  # removes an older manifest first (rundir.begin_save)
    record = {"runs": [str(s.path.resolve()) for s in sources], "weights": [float(w) for w in weights],
              "normalized": bool(normalized), "tensors": len(merged),
              "parameters": sum(p.numel() for p in model.parameters())}
    atomic_write_bytes(out / MERGE_RECORD, strict_json(record))
    names = [WEIGHTS_NAME, CONFIG_NAME, MERGE_RECORD]
    recipe = sources[0].path / RECIPE_NAME
    if recipe.is_file():
        atomic_write_bytes(out / RECIPE_NAME, recipe.read_bytes())
        names.append(RECIPE_NAME)
    elif (out / RECIPE_NAME).exists():  # left by an earlier --force target: it is not this merge's recipe
        (out / RECIPE_NAME).unlink()
    seal_run(out, names)
    return out / MANIFEST_NAME


__all__ = ["MAX_LISTED", "MergeError", "MergeSource", "check_same_architecture", "check_weights", "config_differences",
           "load_sources", "merge_sources", "merge_state_dicts", "parse_weights", "prepare_output",
           "state_differences", "write_merged"]
