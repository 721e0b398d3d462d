"""What a user sees of one tiny run: evaluation commands leave the run's training records alone and the
saved config replays; the progress bar counts steps of max_steps; no message from inside a dependency
that the user cannot act on (Lightning's advertisements, torch's LeafSpec deprecation)."""

import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mmgrow.training.cli import build_cli
from mmgrow.training.progress import StepProgressBar
from mmgrow.training.quiet import LIGHTNING_INFO_LOGGER

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.dim", "32", "--model.depth", "1", "--data.num_train", "32", "--data.num_val", "8",
        "--data.batch_size", "16", "--data.dataset_args", "{frames: 2, size: 32}", "--data.codec_args",
        "{video: {grid: 4}}", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1"]


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 5-step fit (2 batches per epoch, so the run crosses epochs) with the progress bar on."""
    d = tmp_path_factory.mktemp("run")
    handler = _Messages()
    logger = logging.getLogger(LIGHTNING_INFO_LOGGER)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli = build_cli(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), *TINY,
                             "--trainer.max_steps", "5", "--trainer.val_check_interval", "2",
                             "--trainer.default_root_dir", str(d)])
    finally:
        logger.removeHandler(handler)
    return d, cli, [w for w in caught], handler.messages


def test_progress_bar_shows_steps_of_max_steps(tiny_run):
    _, cli, _, _ = tiny_run
    bars = [c for c in cli.trainer.callbacks if isinstance(c, StepProgressBar)]
    assert len(bars) == 1
    bar = bars[0]
    train = [t for t in bar.progress.tasks if t.description.strip().endswith("Step")]
    assert len(train) == 1, [t.description for t in bar.progress.tasks]  # one task across the epochs
    assert (train[0].completed, train[0].total) == (5, 5)
    assert train[0].speed is not None and train[0].speed > 0


def test_progress_bar_description_and_total():
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=250, max_epochs=-1, num_training_batches=7)
    assert bar.total_train_batches == 250 and bar._get_train_description(3).strip() == "Step"
    bar._trainer = SimpleNamespace(max_steps=-1, max_epochs=4, num_training_batches=7)  # epoch-based: Lightning's
    assert bar.total_train_batches == 7 and bar._get_train_description(3).strip() == "Epoch 3/3"


def test_no_message_a_user_cannot_act_on(tiny_run):
    _, _, warned, logged = tiny_run
    # DeprecationWarnings raised in dependencies (jsonargparse's about Lightning's calls) are hidden by
    # Python's default filters; every other warning would reach the user's terminal.
    shown = [f"{w.category.__name__}: {w.message}" for w in warned if not issubclass(w.category, DeprecationWarning)]
    assert not shown, shown
    assert not [m for m in logged if "Tip" in m or "litlogger" in m or "litmodels" in m], logged


def test_evaluation_leaves_the_training_records_alone(tiny_run):
    d, _, _, _ = tiny_run
    config, metrics = (d / "config.yaml").read_bytes(), (d / "metrics.csv").read_bytes()
    assert len(metrics.splitlines()) > 2  # the training steps were logged
    common = ["--config", str(d / "config.yaml"), "--ckpt_path", str(d / "checkpoints/last.ckpt"),
              "--trainer.enable_progress_bar", "false"]
    val = build_cli(["validate", *common])
    build_cli(["test", *common])
    build_cli(["validate", *common])
    assert (d / "config.yaml").read_bytes() == config and (d / "metrics.csv").read_bytes() == metrics
    assert sorted(p.name for p in (d / "eval").iterdir()) == ["test-0", "validate-0", "validate-1"]
    for name in ("validate-0", "test-0"):
        assert (d / "eval" / name / "config.yaml").is_file() and (d / "eval" / name / "metrics.csv").is_file()
    assert "val/loss" in (d / "eval" / "validate-0" / "metrics.csv").read_text().splitlines()[0]
    assert yaml.safe_load((d / "eval" / "validate-0" / "config.yaml").read_text())["ckpt_path"]
    assert float(val.trainer.callback_metrics["val/loss"]) > 0


def test_saved_config_replays_with_fit(tiny_run, tmp_path):
    d, _, _, _ = tiny_run
    cli = build_cli(["fit", "--config", str(d / "config.yaml"), "--trainer.max_steps", "1",
                     "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step == 1
    replayed, original = (yaml.safe_load((p / "config.yaml").read_text()) for p in (tmp_path, d))
    assert replayed["model"] == original["model"] and replayed["data"] == original["data"]
