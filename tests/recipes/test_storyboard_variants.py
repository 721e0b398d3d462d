"""The storyboard recipe takes a memory layer or another mixer by one YAML line (issue 5)."""

import pytest
import torch

from mmgrow.training.cli import build_cli

RECIPE = "recipes/ttt_video/storyboard_cpu.yaml"
VARIANTS = {
    "local": [],
    "full": ["--model.mixer.class_path", "full"],
    "sliding_window": ["--model.mixer.class_path", "sliding_window", "--model.mixer.init_args.window", "16"],
    "ttt_mlp": ["--model.memory.class_path", "ttt_mlp"],
    "mamba2": ["--model.memory.class_path", "mamba2"],
    "gated_deltanet": ["--model.memory.class_path", "gated_deltanet"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_storyboard_recipe_variant_trains_a_step(variant, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    cli = build_cli(["--config", RECIPE, "--data.codec_args", "{video: {}}", "--data.num_train", "4",
                     "--data.num_val", "2", "--data.batch_size", "2", "--model.depth", "1",
                     "--data.dataset_args", "{scenes: 2, segments_per_scene: 1, segment_frames: 2, size: 32, grid: 8}", "--trainer.default_root_dir", str(tmp_path),
                     *VARIANTS[variant]], run=False)
    module, dm = cli.model, cli.datamodule
    module.configure_model()
    with torch.no_grad():  # DiT heads start at zero, which would leave every other gradient exactly zero
        for p in module.model.heads.parameters():
            p.normal_(0, 0.1)
    batch = next(iter(dm.train_dataloader()))
    assert int(batch.block_ids.max()) >= 0 and batch.latents is not None  # segments as blocks, latents present
    loss, metrics = module.objective.step(module.model, batch)
    loss.backward()
    assert torch.isfinite(loss) and float(metrics["tokens_video"]) > 0
    blocks = module.model.blocks
    if variant in ("ttt_mlp", "mamba2", "gated_deltanet"):
        assert all(b.memory is not None for b in blocks)
        # the memory branch is in the graph: its gate receives a gradient
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for b in blocks for p in b.memory.parameters())
    else:
        assert all(b.memory is None for b in blocks)
    assert type(blocks[0].mixer).__name__ == {"local": "LocalAttention", "full": "FullAttention",
                                               "sliding_window": "SlidingWindowAttention"}.get(
        variant, "LocalAttention")
