"""Per-task evaluation: agrees with the independent video-QA scorer, averages task scores, refuses
unscorable tasks, renders the documented table, and what ``fit`` reports equals ``mmgrow evaluate tasks``."""

import json
from typing import ClassVar

import pytest
import torch

from mmgrow.data.sequence import SequenceBuilder
from mmgrow.data.synthetic.shapes import ShapesDataset
from mmgrow.data.video_qa import VideoQA
from mmgrow.evaluation.qa import video_qa_accuracy
from mmgrow.evaluation.tasks import decode_targets, evaluate_task, split_target, tasks_table
from mmgrow.models.unified import UnifiedModel
from mmgrow.objectives.autoregressive import AutoregressiveObjective
from mmgrow.protocols import Segment, Task
from mmgrow.tokenizers.pixels import PixelTokenizer
from mmgrow.tokenizers.text import ByteTokenizer


def tiny():
    torch.manual_seed(0)
    builder = SequenceBuilder({"text": ByteTokenizer(), "video": PixelTokenizer(grid=4)})
    model = UnifiedModel(token_space=builder.token_space, dim=32, depth=1).eval()
    return builder, model, AutoregressiveObjective().bind(model.token_space)


def test_batched_decoding_equals_decoding_each_example_alone():
    builder, model, objective = tiny()
    torch.manual_seed(1)
    for p in model.parameters():  # a sharper random model, so predictions differ between examples
        p.data.mul_(8)
    ds = ShapesDataset(num_samples=12, frames=2, size=16, grid=4, seed=3, split="val")
    task = VideoQA()
    examples = [split_target(task, ds[i]) for i in range(12)]
    assert len({len(builder.build(p)) for p, _ in examples}) > 1  # several prompt lengths: several groups
    batched = decode_targets(model, objective, builder, examples, batch_size=64)
    alone = decode_targets(model, objective, builder, examples, batch_size=1)
    assert batched == alone and len(set(batched)) > 1
    ours = evaluate_task(model, objective, builder, task, ds, 12)
    theirs = video_qa_accuracy(model, objective, builder, ds)
    assert ours["samples"] == theirs["samples"] == 12 and ours["accuracy"] == theirs["accuracy"]


class Echo(Task):
    """Scores 1 when the decoded text equals a fixed string: averages are checked exactly."""

    name: ClassVar[str] = "echo"
    modalities = ("text",)
    target_modalities = ("text",)
    scored = True

    def segments(self, sample):
        return [Segment("text", "q", "input"), Segment("text", sample.text, "target")]

    def score(self, prediction, sample, target):
        self.seen.append((prediction, target.raw))
        out = {"accuracy": float(sample.meta["index"] % 2)}
        if sample.meta["index"] < 2:
            out["rare"] = 1.0  # reported by two samples only: averaged over those two
        return out


def test_metrics_are_averaged_over_the_samples_reporting_them():
    builder, model, objective = tiny()
    task = Echo()
    task.seen = []
    ds = ShapesDataset(num_samples=5, frames=2, size=16, grid=4)

    class Indexed:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            s = ds[i]
            s.meta = {**s.meta, "index": i}
            return s

    result = evaluate_task(model, objective, builder, task, Indexed(), num_samples=4)
    assert result == {"task": "echo", "samples": 4, "accuracy": 0.5, "rare": 1.0}
    assert [t for _, t in task.seen] == [ds[i].text for i in range(4)]
    assert all(isinstance(p, str) for p, _ in task.seen)


def test_a_task_whose_target_is_not_last_is_refused():
    class Backwards(Echo):
        def segments(self, sample):
            return [Segment("text", "a", "target"), Segment("text", "q", "input")]

    with pytest.raises(ValueError, match="do not end in exactly one target"):
        split_target(Backwards(), ShapesDataset(num_samples=1, frames=2, size=16, grid=4)[0])


def test_table_is_the_documented_markdown():
    results = {"val": {"qa": {"task": "video_qa", "samples": 8, "accuracy": 0.5}},
               "heldout": {"box": {"task": "grounding", "samples": 4, "iou": 0.25, "accuracy": 0.0}}}
    assert tasks_table(results) == (
        "| split | source | task | samples | accuracy | iou |\n"
        "|---|---|---|---:|---:|---:|\n"
        "| val | qa | video_qa | 8 | 0.500 | - |\n"
        "| heldout | box | grounding | 4 | 0.000 | 0.250 |\n")


RECIPE = """
seed_everything: 0
trainer: {{accelerator: cpu, max_steps: 4, val_check_interval: 4, check_val_every_n_epoch: null,
          limit_val_batches: 1, log_every_n_steps: 2, default_root_dir: {root}, enable_progress_bar: false}}
model: {{dim: 32, depth: 1, lr: 3.0e-3, warmup_steps: 1}}
data:
  sources: [{{name: cap, task: video_to_text}}, {{name: qa, task: video_qa}}]
  codec_args: {{video: {{grid: 4}}}}
  dataset_args: {{frames: 2, size: 16, grid: 4}}
  num_train: 16
  num_val: 6
  batch_size: 4
"""


def test_fit_reports_per_task_metrics_equal_to_evaluate_tasks(tmp_path):
    from mmgrow.__main__ import main

    root = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(root=root))
    assert main(["fit", "--config", str(recipe)]) == 0
    summary = json.loads((root / "summary.json").read_text())["tasks"]
    assert set(summary) == {"val", "heldout"} and list(summary["val"]) == ["qa"]  # video_to_text is not scored
    assert summary["val"]["qa"]["samples"] == 6
    assert (root / "tasks.md").read_text() == tasks_table(summary)
    assert main(["evaluate", "tasks", "--checkpoint", str(root), "--samples", "6", "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "tasks.json").read_text()) == summary
