"""``mmgrow grow --from RUN --growth SPEC [--growth SPEC ...] --out DIR``: grow a trained model offline.

Loads ``model.safetensors`` + ``model.yaml`` (replaying any earlier growth), applies the strategies
in order, checks the function on a random probe (printed and stored), and writes a new
``model.safetensors`` + ``model.yaml`` (base config + the whole growth history) into ``--out``,
plus ``growth_report.json``. A later ``mmgrow fit`` starts from it with ``model.init_from: DIR``.

A ``--growth`` value is YAML: ``'{class_path: insert_depth, init_args: {count: 2}}'``, a bare
registered name (``stack``), or the path of a YAML file holding one spec or a list of them.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import yaml

from mmgrow.checks import read_utf8
from mmgrow.cli_text import plain_text


def parse_growth(value: str) -> list[dict[str, Any]]:
    """One ``--growth`` value -> a list of ``{class_path, init_args}`` specs."""
    path = Path(value)
    is_file = path.suffix in (".yaml", ".yml", ".json") and path.exists()
    text = read_utf8(path, f"--growth file {value}") if is_file else value
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"--growth {value!r} is not valid YAML: {exc}") from exc
    specs = spec if isinstance(spec, list) else [spec]
    out = []
    for s in specs:
        if isinstance(s, str):
            s = {"class_path": s}
        if not isinstance(s, dict) or "class_path" not in s:
            raise ValueError(f"--growth {value!r}: each entry needs a class_path (a registered growth name or an "
                             f"import path), got {s!r}")
        out.append({"class_path": s["class_path"], "init_args": dict(s.get("init_args") or {})})
    return out


def grow_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmgrow grow", description=plain_text(__doc__.split("\n\n")[0]))
    parser.add_argument("--from", dest="source", required=True, help="model.safetensors or a run directory")
    parser.add_argument("--growth", action="append", required=True, help="growth spec (YAML) or a YAML file; repeat")
    parser.add_argument("--out", required=True, help="output directory for the grown model")
    parser.add_argument("--seed", type=int, default=0, help="seed for new parameters and the probe")
    args = parser.parse_args(argv)

    import torch

    from mmgrow.growth.base import apply_growth, spec_of, strategy_from_spec
    from mmgrow.growth.check import output_change
    from mmgrow.rundir import read_model_config, save_model
    from mmgrow.training.export import load_model

    # Bad input raises before any work (reported in one line by mmgrow.cli_errors.run_command).
    source = Path(args.source)
    out = Path(args.out)
    if out.resolve() == (source if source.is_dir() else source.parent).resolve():
        raise ValueError(f"--out {out} is the source's directory; write the grown model elsewhere")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; give a directory for model.safetensors and model.yaml")
    specs = [s for v in args.growth for s in parse_growth(v)]
    strategies = [strategy_from_spec(s, f"--growth[{i}]") for i, s in enumerate(specs)]
    config = dict(read_model_config(source))
    model = load_model(source)
    before = copy.deepcopy(model)
    torch.manual_seed(args.seed)
    params_before = sum(p.numel() for p in model.parameters())
    reports = apply_growth(model, strategies)
    change = output_change(before, model, seed=args.seed)
    config["growth"] = list(config.get("growth") or []) + [spec_of(s) for s in strategies]
    save_model(model, config, out)
    summary = {
        "source": str(source), "parameters_before": params_before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
        "reports": [{"strategy": spec_of(s), "preserves": r.preserves, "notes": r.notes,
                     "new_parameters": r.new_parameters} for s, r in zip(strategies, reports, strict=True)],
        "output_change": change,
    }
    (out / "growth_report.json").write_text(json.dumps(summary, indent=2))
    for r in reports:
        print(f"{r.notes} [{r.preserves}; {len(r.new_parameters)} new tensors]")
    print(f"parameters {summary['parameters_before']:,} -> {summary['parameters_after']:,}; output change on a random "
          f"probe: max |dy| = {change['max_abs']:.3g} (relative {change['relative']:.3g})")
    print(f"written {out / 'model.safetensors'} and model.yaml")
    return 0
