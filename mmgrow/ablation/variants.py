"""What an ablation varies: named variants (a YAML file), a grid (``--vary``) and keys set on every run (``--set``).

Every change is a *dotted key* of the recipe (``model.mixer``, ``trainer.max_steps``, ``data.dataset_args``)
mapped to a value; a value may be a mapping (``model.mixer: {class_path: mamba2, init_args: {headdim: 16}}``),
which replaces the recipe's value the way ``mmgrow fit --model.mixer '{...}'`` does. The variants file::

    full: {}                                  # the base recipe itself
    sliding_window:
      model.mixer: {class_path: sliding_window, init_args: {window: 64}}
    mamba2:
      model.mixer: {class_path: mamba2, init_args: {headdim: 16, d_state: 16}}

Names are directory names (letters, digits, ``_ - . +``); the first variant is the reference of
``--match-params``. Keys must start with a recipe section (:data:`SECTIONS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SECTIONS = ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path")
"""The top-level sections of an ``mmgrow fit`` recipe a key may start with."""

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SAFE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
BUDGET_KEYS = ("trainer.max_steps", "data.batch_size")
"""Keys that change a run's token budget: a variant that sets one is warned about."""


@dataclass
class AblationSpec:
    """Variants x grid x seeds, and the keys every run gets. ``vary`` keeps the command line's order."""

    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"base": {}})
    vary: dict[str, list[Any]] = field(default_factory=dict)
    set: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])

    def warnings(self) -> list[str]:
        """One line per variant key that changes the token budget (:data:`BUDGET_KEYS`: its runs do not get the
        base's budget) or that ``--vary`` / ``--set`` override (the variant's value is never used)."""
        lines = []
        for name, overrides in self.variants.items():
            for key, value in overrides.items():
                if key in self.vary or key in self.set:
                    option = "--vary" if key in self.vary else "--set"
                    lines.append(f"variant {name!r} sets {key} = {value!r}, but {option} {key} overrides it")
                elif key in BUDGET_KEYS:
                    lines.append(f"variant {name!r} sets {key} = {value!r}: not the same budget as the other "
                                 "variants")
        return lines


def check_key(key: Any, where: str) -> str:
    """``key`` if it is a dotted key under a recipe section, else a ValueError naming ``where`` it came from."""
    if not isinstance(key, str) or not _SAFE_KEY.match(key):
        raise ValueError(f"{where}: {key!r} is not a dotted recipe key (e.g. model.mixer, trainer.max_steps)")
    section = key.split(".", 1)[0]
    if section not in SECTIONS:
        raise ValueError(f"{where}: unknown recipe section {section!r} in key {key!r}; "
                         f"keys start with one of {list(SECTIONS)}")
    return key


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ValueError(f"{what} name {name!r} is not a safe directory name: use letters, digits and _ - . + "
                         "(starting with a letter or digit)")
    return name


def parse_variants(data: Any, source: str = "variants") -> dict[str, dict[str, Any]]:
    """The variants mapping (module docstring) checked: names, keys, sections; ``None`` values mean ``{}``."""
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f"{source}: must be a non-empty mapping of variant name -> mapping of dotted keys, "
                         f"got {type(data).__name__}")
    variants: dict[str, dict[str, Any]] = {}
    for name, overrides in data.items():
        check_name(name, f"{source}: variant")
        overrides = {} if overrides is None else overrides
        if not isinstance(overrides, dict):
            # a user's file: reported as a bad value (ValueError), like every other one
            message = f"{source}: variant {name!r} must map dotted keys to values ({{}} for the base recipe)"
            raise ValueError(f"{message}, got {overrides!r}")  # noqa: TRY004
        for key in overrides:
            check_key(key, f"{source}: variant {name!r}")
            if key == "seed_everything":
                raise ValueError(f"{source}: variant {name!r} sets seed_everything; seeds come from --seeds so every "
                                 "variant runs with the same ones")
        variants[name] = dict(overrides)
    return variants


def read_variants(path: str | Path) -> dict[str, dict[str, Any]]:
    from mmgrow.checks import read_yaml

    return parse_variants(read_yaml(path, "variants file"), str(path))


def _split_assignment(text: str, option: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise ValueError(f"{option} {text!r}: expected KEY=VALUE, e.g. {option} model.dim=64")
    return check_key(key.strip(), f"{option} {text!r}"), value


def scalar(text: str, option: str) -> Any:
    """A command-line value read as YAML (``64`` -> 64, ``1e-3`` -> 0.001, ``null`` -> None, ``{a: 1}`` -> dict)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{option}: {text!r} is not a YAML value ({exc})") from exc
    # YAML 1.1 reads 1e-3 as a string; a number is what was meant
    if isinstance(value, str):
        try:
            return float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
        except ValueError:
            return value
    return value


def parse_vary(items: list[str]) -> dict[str, list[Any]]:
    """``["model.dim=32,64", "model.depth=1,2"]`` -> ``{"model.dim": [32, 64], "model.depth": [1, 2]}``."""
    vary: dict[str, list[Any]] = {}
    for item in items:
        key, values = _split_assignment(item, "--vary")
        if key in vary:
            raise ValueError(f"--vary {key} given twice; list all its values once: --vary {key}=V1,V2")
        texts = [v.strip() for v in values.split(",")]
        if not all(texts):
            raise ValueError(f"--vary {item!r}: empty value; expected KEY=V1,V2,...")
        parts = [scalar(t, f"--vary {key}") for t in texts]
        if len({repr(p) for p in parts}) < len(parts):
            raise ValueError(f"--vary {key}: a value is listed twice in {values!r}")
        if key == "seed_everything":
            raise ValueError("--vary seed_everything: use --seeds")
        for p in parts:
            check_name(f"x{p}", f"--vary {key} value {p!r} (part of a run")
        vary[key] = parts
    return vary


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["trainer.max_steps=100"]`` -> ``{"trainer.max_steps": 100}`` (a key given twice: the last wins)."""
    out: dict[str, Any] = {}
    for item in items:
        key, value = _split_assignment(item, "--set")
        if key == "seed_everything":
            raise ValueError("--set seed_everything: use --seeds")
        out[key] = scalar(value, f"--set {key}")
    return out


def parse_seeds(text: str | None, default: int) -> list[int]:
    """``"3"`` -> [0, 1, 2]; ``"0,3"`` -> [0, 3]; None -> ``[default]`` (the recipe's seed_everything)."""
    if text is None:
        return [default]
    parts = [p.strip() for p in str(text).split(",")]
    if not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ValueError(f"--seeds {text!r}: expected a count K (seeds 0..K-1) or a comma list of seeds, e.g. 0,3")
    if len(parts) == 1:
        k = int(parts[0])
        if k < 1:
            raise ValueError(f"--seeds {text!r}: the count must be at least 1")
        return list(range(k))
    seeds = [int(p) for p in parts]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"--seeds {text!r} lists a seed twice")
    return seeds
