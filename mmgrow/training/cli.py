"""``mmgrow fit|validate|test|predict --config recipe.yaml``: a LightningCLI subclass.

What it adds to LightningCLI:

* registry names work wherever a ``class_path`` is expected (``class_path: full``, or
  ``mixers:full`` when a name exists in several kinds): they are rewritten to import paths before
  parsing, so recipes stay short and the saved ``config.yaml`` still carries full paths;
* two modes, chosen by the recipe: without a ``class_path`` in its ``model:`` section the model is
  :class:`~mmgrow.training.module.MMGrowModule` and the data :class:`~mmgrow.data.datamodule.MMDataModule`
  (their arguments given directly); with one, both ``model:`` and ``data:`` are ``class_path`` +
  ``init_args`` (e.g. :class:`~mmgrow.training.codec_module.CodecModule` training a codec on
  :class:`~mmgrow.data.media_datamodule.MediaDataModule`). Overrides work the same way in both
  modes (jsonargparse reads ``--data.num_train 32`` as ``--data.init_args.num_train 32`` in the second);
* ``data.vocab`` and ``data.continuous`` are linked into ``model.vocab`` / ``model.continuous`` at
  instantiation (the codecs decide the vocabulary and latent widths), for model classes that take them;
* a run directory: ``trainer.default_root_dir`` (default ``runs/<recipe name>``) receives
  ``config.yaml``, ``metrics.csv`` (+ TensorBoard under ``tb/`` when installed), ``checkpoints/``
  (resumable, ``last.ckpt``, every 100 steps: :mod:`~mmgrow.training.checkpointing`), and the evidence
  callbacks' files (weights, summary, samples, plots), sealed by ``manifest.json`` (:mod:`mmgrow.rundir`);
  ``validate``/``test``/``predict`` write their own ``config.yaml`` and metrics into a new
  ``<run>/eval/<subcommand>-<n>/`` and leave the training records alone (:func:`evaluation_dir`);
* a divergence guard (:mod:`~mmgrow.training.divergence`): a non-finite loss or gradient stops the run
  with a diagnosis and exit status 3.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mmgrow import registry
from mmgrow.checks import read_yaml
from mmgrow.trust import check_config


def _rewrite_class_paths(node: Any) -> Any:
    """Replace registry names in ``class_path`` values by import paths (recursively)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "class_path" and isinstance(v, str):
                out[k] = resolve_class_path(v)
            else:
                out[k] = _rewrite_class_paths(v)
        return out
    if isinstance(node, list):
        return [_rewrite_class_paths(v) for v in node]
    return node


def resolve_class_path(value: str) -> str:
    """``"full"`` / ``"mixers:full"`` -> ``"mmgrow.layers.attention.FullAttention"``; dotted paths and
    unknown bare names (jsonargparse resolves imported class names itself) pass through.

    A registered plugin's class, however named, is loaded here through the registry's checks (kind
    base, ``mmgrow_api``): jsonargparse would import it without them."""
    path = _resolve_name(value)
    if "." in path:
        registry.load_import_path(path)
    return path


def _resolve_name(value: str) -> str:
    kind, sep, name = value.partition(":")
    if sep:
        return registry.import_path(kind, name)
    if "." in value:
        return value
    kinds = registry.find_kinds(value)
    if not kinds:
        import difflib

        names = sorted({n for k in registry.KINDS for n in registry.available(k)})
        close = difflib.get_close_matches(value, names, n=3, cutoff=0.75)
        if close:
            raise ValueError(f"unknown plugin name {value!r} in class_path; did you mean "
                             f"{', '.join(repr(c) for c in close)}? (or give a full import path)")
        return value
    if len(kinds) > 1:
        raise ValueError(f"class_path {value!r} is registered in several kinds ({', '.join(kinds)}); "
                         f"write it as '<kind>:{value}', e.g. '{kinds[0]}:{value}'")
    return registry.import_path(kinds[0], value)


def rewrite_argv(argv: list[str]) -> list[str]:
    """Resolve registry names in ``--config`` files and ``...class_path`` options of ``argv``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, inline = arg.partition("=")
        if key in ("--config", "-c"):
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
            i += 1 if eq else 2
            if value is None:
                out.append(arg)
                continue
            out += ["--config", _rewrite_config_file(value)]
            continue
        if key.endswith("class_path"):
            if eq:
                out.append(f"{key}={resolve_class_path(inline)}")
            else:
                out.append(arg)
                if i + 1 < len(argv):
                    out.append(resolve_class_path(argv[i + 1]))
                    i += 1
            i += 1
            continue
        out.append(f"{key}={_rewrite_inline_spec(inline)}" if eq and key.startswith("--") else _rewrite_inline_spec(arg))
        i += 1
    return out


def _rewrite_inline_spec(value: str) -> str:
    """Registry names in a YAML flow value given on the command line (``--model.mixer '{class_path:
    gated_deltanet}'`` or a list of such specs) -> import paths; any other value passes through unchanged."""
    if "class_path" not in value or not value.lstrip().startswith(("{", "[")):
        return value
    try:
        spec = yaml.safe_load(value)
    except yaml.YAMLError:
        return value  # jsonargparse reports the bad value itself
    if not isinstance(spec, (dict, list)):
        return value
    return yaml.safe_dump(_rewrite_class_paths(spec), default_flow_style=True, sort_keys=False).strip()


def _rewrite_config_file(value: str) -> str:
    path = Path(value)
    cfg = read_yaml(path, "config file", f"config {value}")
    if cfg is None:
        raise ValueError(f"config {value} is empty (no settings); a recipe needs at least trainer.max_steps or "
                         "max_epochs and the model/data sections it changes (see recipes/quickstart.yaml)")
    if not isinstance(cfg, dict):
        raise TypeError(f"{value} must hold a mapping at the top level (fit/trainer/model/data ...), "
                         f"got {type(cfg).__name__}")
    check_sections(cfg, value)
    new = _rewrite_class_paths(cfg)
    check_config(new, value)  # a config file is data: untrusted import paths fail here, before any import
    trainer = new.setdefault("trainer", {}) if isinstance(new.get("trainer", {}), dict) else None
    if trainer is not None and not trainer.get("default_root_dir"):
        trainer["default_root_dir"] = str(Path("runs") / path.stem)
    return yaml.safe_dump(new, sort_keys=False)


SECTIONS = ("trainer", "model", "data")
"""Top-level recipe keys whose value must be a mapping (or absent / null). ``optimizer`` and
``lr_scheduler`` are not among them: jsonargparse takes a class name there too (``optimizer: Adam``)."""


def check_sections(cfg: dict[str, Any], source: str) -> None:
    """``model: 5`` and the like fail here with the section's name, not inside jsonargparse."""
    for key in SECTIONS:
        section = cfg.get(key)
        if section is not None and not isinstance(section, dict):
            raise TypeError(f"{source}: section {key!r} must be a mapping of arguments (e.g. 'dim: 128', or "
                            f"'class_path' + 'init_args'), got {type(section).__name__} {section!r}")


BOUND_KEYS = ("max_steps", "max_epochs", "max_time", "fast_dev_run")


def check_fit_is_bounded(trainer: Any) -> None:
    """``fit`` must be told when to stop: Lightning's default (1000 epochs) is, in practice, a run that never ends."""
    get = trainer.get if hasattr(trainer, "get") else (lambda k, d=None: d)
    steps = get("max_steps", -1)
    if (steps is not None and steps != -1) or any(get(k) not in (None, False) for k in BOUND_KEYS[1:]):
        return
    raise ValueError("trainer.max_steps is not set (nor max_epochs, max_time or fast_dev_run): the run would not "
                     "stop; set e.g. --trainer.max_steps 1000 or trainer: {max_steps: 1000} in the recipe")


LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


def check_ckpt_path(ckpt_path: Any) -> None:
    """A ``--ckpt_path`` file must be a readable checkpoint before any model is built (Lightning would fail
    with a bare ``EOFError`` / ``IndexError`` on an empty or truncated file after setup)."""
    if not isinstance(ckpt_path, (str, Path)):
        return
    text = str(ckpt_path)
    if text in LIGHTNING_CKPT_KEYWORDS or text.startswith("registry:") or "://" in text:
        return
    from mmgrow.rundir import check_checkpoint_file

    check_checkpoint_file(ckpt_path, what="--ckpt_path")


DATA_TO_MODEL_LINKS: tuple[tuple[str, str], ...] = (("vocab", "vocab"), ("continuous", "continuous"),
                                                    ("input_encoders", "input_encoders"))
"""``(data attribute, model argument)`` pairs linked at instantiation when the model class takes the argument."""


def model_class_path(argv: list[str]) -> str | None:
    """The ``class_path`` given for the model by ``--config`` texts or ``--model[.class_path]`` options
    of a rewritten ``argv`` (the last one wins); None when the recipe gives the model's arguments directly."""
    found: str | None = None
    i = 0
    while i < len(argv):
        key, eq, inline = argv[i].partition("=")
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        step = 1 if eq else 2
        if key in ("--config", "-c") and value is not None:
            cfg = yaml.safe_load(value)  # rewrite_argv put the recipe's YAML text here
            model = cfg.get("model") if isinstance(cfg, dict) else None
            if isinstance(model, dict) and isinstance(model.get("class_path"), str):
                found = model["class_path"]
        elif key in ("--model", "--model.class_path") and value is not None:
            if key == "--model" and value.lstrip().startswith("{"):  # --model '{class_path: ..., init_args: ...}'
                spec = yaml.safe_load(value)
                value = spec.get("class_path") if isinstance(spec, dict) else None
            found = value or found
        else:
            step = 1
        i += step
    return found


def _model_arguments(class_path: str | None) -> set[str]:
    """Constructor argument names of the model class (MMGrowModule without a class_path); empty when
    the class cannot be imported (jsonargparse then reports the bad class_path itself)."""
    import inspect

    if class_path is None:
        from mmgrow.training.module import MMGrowModule as cls
    else:
        import importlib

        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return set()
    try:
        return set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return set()


def _make_cli_class(links: list[tuple[str, str]]):
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
    from lightning.pytorch.cli import LightningCLI

    import mmgrow.parallel.model_parallel
    import mmgrow.parallel.strategy  # noqa: F401 - registers the "context_parallel" strategy name
    from mmgrow.training.callbacks import ExportWeights, PlotMetrics, RunSummary
    from mmgrow.training.checkpointing import StepCheckpoint
    from mmgrow.training.curriculum import Curriculum
    from mmgrow.training.divergence import DivergenceGuard
    from mmgrow.training.progress import StepProgressBar
    from mmgrow.training.samples import GenerateCaptions, GenerateSamples
    from mmgrow.training.task_callback import TaskEvaluation

    class MMGrowCLI(LightningCLI):
        """LightningCLI with mmgrow's links, run directory and evidence callbacks."""

        def add_arguments_to_parser(self, parser) -> None:
            prefix = "model.init_args." if self.subclass_mode_model else "model."
            for attribute, argument in links:
                parser.link_arguments(f"data.{attribute}", prefix + argument, apply_on="instantiate")

        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            # Right after parsing: Lightning itself reads --ckpt_path next (for its hyperparameters).
            subcommand = self.config.get("subcommand")
            config = self.config.get(subcommand, self.config) if subcommand else self.config
            if subcommand == "fit":
                check_fit_is_bounded(config.get("trainer") or {})
            if subcommand is not None:
                check_ckpt_path(config.get("ckpt_path"))

        def instantiate_trainer(self, **kwargs: Any):
            cfg = self._get(self.config_init, "trainer", default={})
            run = cfg.get("default_root_dir") or str(Path("runs") / "default")
            root = evaluation_dir(run, self.subcommand)
            # An evaluation's checkpoint callback keeps pointing at the run's checkpoints (it saves nothing),
            # so the state restored from --ckpt_path matches it.
            self._checkpoint_dir = str(Path(run) / "checkpoints") if root != run else None
            kwargs.setdefault("default_root_dir", root)
            if cfg.get("logger") in (None, True):
                kwargs["logger"] = default_loggers(root)
            return super().instantiate_trainer(**kwargs)

        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
            # Evidence callbacks are always on; a recipe that lists one (or another of the same
            # kind, e.g. a TQDM progress bar) configures it instead.
            have = [type(c) for c in list(config.get("callbacks") or []) + list(callbacks)]
            wanted: list[tuple[type, Callable[[], Callback]]] = [
                (c, c) for c in (RunSummary, ExportWeights, PlotMetrics, GenerateSamples, GenerateCaptions)]
            wanted.append((DivergenceGuard, DivergenceGuard))
            wanted.append((Curriculum, Curriculum))  # RoPE theta / lr scale per curriculum stage; no-op without one
            wanted.append((TaskEvaluation, TaskEvaluation))  # per-task metrics; no-op without scored tasks
            if config.get("enable_checkpointing", True) is not False:
                # last.ckpt every 100 steps and at every epoch end, including the one max_steps cuts short:
                # the final state whatever the validation schedule (resumable, equal to model.safetensors).
                wanted.append((ModelCheckpoint, lambda: StepCheckpoint(dirpath=getattr(self, "_checkpoint_dir", None))))
            if config.get("enable_progress_bar", True) is not False:
                wanted.append((ProgressBar, StepProgressBar))
            for kind, make in wanted:
                if not any(issubclass(t, kind) for t in have):
                    callbacks.append(make())
            return super()._instantiate_trainer(with_atomic_checkpoints(config), callbacks)

    return MMGrowCLI


EVALUATION_SUBCOMMANDS = ("validate", "test", "predict")


def evaluation_dir(root: str, subcommand: str | None) -> str:
    """Where a subcommand writes its config and metrics: ``fit`` the run directory ``root`` itself; an
    evaluation (validate/test/predict) a new ``<root>/eval/<subcommand>-<n>`` (the first free ``n``), so it
    never overwrites the training records (``config.yaml``, ``metrics.csv``) that ``fit`` left in ``root``."""
    if subcommand not in EVALUATION_SUBCOMMANDS:
        return root
    n = 0
    while (Path(root) / "eval" / f"{subcommand}-{n}").exists():
        n += 1
    return str(Path(root) / "eval" / f"{subcommand}-{n}")


def with_atomic_checkpoints(config: dict[str, Any]) -> dict[str, Any]:
    """Trainer arguments with :class:`~mmgrow.training.checkpointing.AtomicCheckpointIO` among the
    plugins, unless the recipe gives a checkpoint writer of its own."""
    from lightning.fabric.plugins import CheckpointIO

    from mmgrow.training.checkpointing import AtomicCheckpointIO

    plugins = config.get("plugins")
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in plugins):
        return config
    return {**config, "plugins": [*plugins, AtomicCheckpointIO()]}


def default_loggers(root: str) -> list:
    """CSV metrics in the run root (earlier runs' rows kept: :mod:`mmgrow.training.metrics_csv`), plus
    TensorBoard under ``tb/`` when it is installed."""
    from mmgrow.training.metrics_csv import RunCSVLogger

    loggers = [RunCSVLogger(save_dir=root, name="", version="")]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return loggers
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers.append(TensorBoardLogger(save_dir=root, name="tb", version=""))
    return loggers


def build_cli(args: list[str] | None = None, run: bool = True):
    """Build (and by default run) the CLI. ``args`` without the ``mmgrow`` program name."""
    return _build_rewritten(rewrite_argv(list(sys.argv[1:] if args is None else args)), run)


def _build_rewritten(argv: list[str], run: bool):
    """The CLI over arguments whose registry names are already resolved (see :func:`rewrite_argv`)."""
    from mmgrow.data.datamodule import MMDataModule
    from mmgrow.training.module import MMGrowModule
    from mmgrow.training.quiet import silence_dependency_noise

    silence_dependency_noise()

    class_path = model_class_path(argv)
    arguments = _model_arguments(class_path)
    cls = _make_cli_class([(a, m) for a, m in DATA_TO_MODEL_LINKS if m in arguments])
    if class_path is None:
        classes: dict[str, Any] = {"model_class": MMGrowModule, "datamodule_class": MMDataModule}
    else:  # any LightningModule / LightningDataModule, each given by class_path + init_args
        classes = {"model_class": None, "datamodule_class": None}
    # LightningCLI warns when it gets `args` while sys.argv also holds arguments; ours *are* sys.argv
    # after the registry-name rewrite. sys.argv itself must stay: DDP's launcher re-runs it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return cls(
            **classes,
            args=argv,
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "mmgrow",
                           "description": "mmgrow: train and evaluate unified multimodal models from YAML recipes."},
        )


def cli_main(argv: list[str] | None = None) -> int:
    """Console entry: recipe errors found before parsing (missing file, unknown plugin name, not a
    mapping) print one line and exit 2, like jsonargparse's own errors; a diverged run prints its
    diagnosis in one line and exits 3; the rest propagate."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = rewrite_argv(args)
    except (OSError, ValueError, TypeError, registry.PluginError) as exc:  # UntrustedClassError is a ValueError
        print(f"mmgrow: error: {exc}", file=sys.stderr)
        return 2
    from mmgrow.training.divergence import DIVERGED_EXIT_CODE, DivergenceError

    try:
        _build_rewritten(argv, run=True)
    except DivergenceError as exc:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) == 0:  # every rank stops at the same step; one line is enough
            print(f"mmgrow: error: {exc}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    return 0
