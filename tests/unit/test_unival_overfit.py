"""A tiny mixed-task model (UnIVAL options: one shared head, modality-type embeddings) learns 16 examples of
every task -- image captioning, image QA, image-text matching, grounding, video QA, audio captioning, audio
QA and plain text -- in one token space with image, location, video, audio (continuous log-mel input) and
text, and the per-task evaluation then scores those examples as learned (exact match, caption attributes,
IoU). The end-to-end check that the tasks, codecs, model options, objective and evaluation fit together."""

import pytest
import torch

from mmgrow.data.datamodule import MMDataModule
from mmgrow.data.mixture_sampler import BatchKey
from mmgrow.evaluation.tasks import evaluate_task
from mmgrow.models.unified import UnifiedModel
from mmgrow.objectives.autoregressive import AutoregressiveObjective

SCENES = {"size": 16, "grid": 4, "max_objects": 1}
SHAPES = {"frames": 2, "size": 8, "grid": 4, "random_start": False}
TONES = {"seconds": 0.1}
STEPS = 200
TASKS = [("image_caption", "scenes", SCENES), ("image_qa", "scenes", SCENES), ("image_text_match", "scenes", SCENES),
         ("grounding", "scenes", SCENES), ("video_qa", "shapes", SHAPES), ("audio_caption", "tones", TONES),
         ("audio_qa", "tones", TONES), ("text_lm", "scenes", SCENES)]


@pytest.mark.slow
def test_a_tiny_multitask_model_learns_16_examples_of_every_task():
    torch.manual_seed(0)
    dm = MMDataModule(
        codecs={"text": "bytes", "image": "image_pixels", "location": "locations", "video": "pixels",
                "audio": "spectrogram"},
        codec_args={"image": {"grid": 4}, "location": {"num_bins": 5}, "video": {"grid": 4}},
        sources=[{"name": t, "task": t, "dataset": d, "dataset_args": a} for t, d, a in TASKS],
        num_train=16, num_val=4, batch_size=8)
    builder = dm.batch_builder("train")
    items = tuple((s, i) for s in range(len(TASKS)) for i in range(16))
    batch = builder[BatchKey(-1, None, items)]  # all 128 examples, one padded batch
    model = UnifiedModel(token_space=dm.token_space, dim=64, depth=2, continuous=dm.continuous,
                         modality_embeddings=True, head="shared")
    objective = AutoregressiveObjective().bind(model.token_space)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(STEPS):
        loss, metrics = objective.step(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05, metrics
    model.eval()
    for (name, _, _), task, dataset in zip(TASKS, dm.tasks, dm.source_sets["train"]):
        if not task.scored:
            continue
        result = evaluate_task(model, objective, dm.builder, task, dataset, 16)
        assert result["samples"] == 16
        assert result["accuracy"] >= 0.9, (name, result)
        if "iou" in result:
            assert result["iou"] >= 0.9, (name, result)
        if "attributes" in result:
            assert result["attributes"] >= 0.9, (name, result)
