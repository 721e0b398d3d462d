"""MMDataModule: attributes for links, batch shapes / dtypes, task mixing, determinism, errors."""

import pytest
import torch

from mmgrow.batch import TokenBatch
from mmgrow.data.datamodule import MMDataModule


def small(**kw):
    args = {"num_train": 12, "num_val": 6, "batch_size": 4, "dataset_args": {"frames": 2, "size": 16}}
    args.update(kw)
    return MMDataModule(**args)


def test_attributes_exist_after_init():
    dm = small()
    assert set(dm.codecs) == {"text", "video"}
    assert dm.vocab == {"text": dm.codecs["text"].vocab_size, "video": dm.codecs["video"].vocab_size}
    assert dm.token_space.to_dict() == dm.vocab and dm.builder.token_space is dm.token_space
    assert dm.hparams.batch_size == 4


def test_val_batches_match_the_builder_and_alternate_tasks():
    dm = small(tasks=["text_to_video", "video_to_text"])
    batches = list(dm.val_dataloader())
    assert [b.input_ids.shape[0] for b in batches] == [4, 2]
    rows = [(b, r) for b in batches for r in range(b.input_ids.shape[0])]
    for index, (batch, r) in enumerate(rows):
        assert isinstance(batch, TokenBatch)
        task = dm.tasks[index % 2]
        seq = dm.builder.build(task.segments(dm.val_set[index]))
        n = len(seq)
        assert torch.equal(batch.input_ids[r, :n], seq.input_ids)
        assert torch.equal(batch.loss_mask[r, :n], seq.loss_mask)
        assert torch.equal(batch.block_ids[r, :n], seq.block_ids)
        assert (batch.segment_ids[r, n:] == -1).all() and (batch.segment_ids[r, :n] == 0).all()
        # the target is the video for even rows (text_to_video), the caption for odd rows
        target_modality = batch.modality_ids[r][batch.loss_mask[r] > 0].unique().tolist()
        assert target_modality == [dm.token_space.index("video" if index % 2 == 0 else "text")]
    b = batches[0]
    assert b.input_ids.shape[1] == int((b.segment_ids >= 0).sum(1).max())  # padded to the longest row
    for name in ("input_ids", "modality_ids", "positions", "segment_ids", "block_ids"):
        assert getattr(b, name).dtype == torch.long
    assert b.loss_mask.dtype == torch.float32 and b.example_weight.dtype == torch.float32
    assert int(b.input_ids.max()) < dm.token_space.total


def test_train_loader_is_shuffled_and_deterministic_with_seed():
    def ids(seed):
        return [b.input_ids for b in small(seed=seed).train_dataloader()]

    a, b, c = ids(0), ids(0), ids(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))
    dm = small(seed=0)
    first = next(iter(dm.train_dataloader())).input_ids
    in_order = next(iter(dm.val_dataloader()))
    assert first.shape[0] == 4 and in_order.input_ids.shape[0] == 4


def test_fixed_seq_len_and_codec_args():
    dm = small(seq_len=200, codec_args={"video": {"grid": 4}})
    batch = next(iter(dm.val_dataloader()))
    assert batch.input_ids.shape == (4, 200)
    assert dm.codecs["video"].grid == 4
    video_tokens = (batch.modality_ids[0][batch.segment_ids[0] >= 0] == 1).sum()
    assert video_tokens == dm.codecs["video"].num_tokens(2)
    with pytest.raises(ValueError, match="does not fit seq_len=50"):
        next(iter(small(seq_len=50).val_dataloader()))


def test_heldout_prompts():
    dm = small()
    prompts = dm.heldout_prompts()
    assert prompts and all(cap == f"a {m['colour']} {m['shape']} moves {m['motion']}" for cap, m in prompts)
    assert [cap for cap, _ in prompts] == dm.train_set.heldout_captions()


def test_transfer_batch_to_device_keeps_a_token_batch():
    dm = small()
    batch = next(iter(dm.val_dataloader()))
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert isinstance(moved, TokenBatch) and moved.input_ids.device.type == "meta"
    assert moved.input_ids.shape == batch.input_ids.shape
    # Lightning's generic mover also handles the dataclass (used if the hook is bypassed)
    from lightning.fabric.utilities.apply_func import move_data_to_device

    assert isinstance(move_data_to_device(batch, torch.device("meta")), TokenBatch)


def test_errors():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; known datasets: .*shapes"):
        small(dataset="mnist")
    with pytest.raises(Exception, match="unknown tasks plugin 'captioning'"):
        small(tasks=["captioning"])
    with pytest.raises(ValueError, match=r"task 'text_to_video' needs codecs for \['video'\]"):
        small(codecs={"text": "bytes"})
    with pytest.raises(ValueError, match=r"codec_args given for \['audio'\]"):
        small(codec_args={"audio": {}})
    with pytest.raises(ValueError, match="tasks must be a non-empty list"):
        small(tasks="text_to_video")


def test_stage_options_reach_every_split_through_dataset_args():
    stage = {"frames": 2, "size": 16, "shapes": ["square", "cross"], "colours": ["red", "green", "blue"],
             "captions": "detailed"}
    dm = small(dataset_args=stage)
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        assert ds.shapes == ("square", "cross") and ds.colours == ("red", "green", "blue") and ds.captions == "detailed"
    assert set(dm.test_set.heldout) == {("square", "red", "left"), ("cross", "blue", "up")}
    text = dm.token_space.index("text")
    for loader, ds in ((dm.val_dataloader(), dm.val_set), (dm.test_dataloader(), dm.test_set)):
        batch = next(iter(loader))
        for r in range(batch.input_ids.shape[0]):
            ids = batch.input_ids[r][(batch.modality_ids[r] == text) & (batch.segment_ids[r] >= 0)]
            caption = dm.codecs["text"].decode(ids - dm.token_space.offset("text"))
            assert caption == ds[r].text and ", one cell per frame for 2 frames, starting at the " in caption
            assert ds[r].meta["shape"] in stage["shapes"] and ds[r].meta["colour"] in stage["colours"]
    assert [cap for cap, _ in dm.heldout_prompts()] == dm.train_set.heldout_captions()
    with pytest.raises(ValueError, match=r"unknown: \['hexagon'\]"):
        small(dataset_args={"shapes": ["hexagon"]})
