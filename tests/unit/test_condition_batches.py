"""Conditioning carried in batches: TokenBatch fields, attach_condition, MMDataModule(condition_encoder=...),
and AutoregressiveObjective.context passing the condition to the model."""

import functools

import pytest
import torch

from mmgrow.batch import TokenBatch
from mmgrow.data.collate import ConditionedSequence, attach_condition, pad_collate, pad_collate_with_condition
from mmgrow.data.datamodule import MMDataModule
from mmgrow.layers.attention import FullAttention
from mmgrow.models.unified import UnifiedModel
from mmgrow.objectives.autoregressive import AutoregressiveObjective
from mmgrow.protocols import SeqContext


class WordEncoder:
    """A tiny deterministic stand-in for a text encoder: one 3-d vector per word,
    ``[len(word), sum of its code points, index of the word]``; ``mask`` marks the words."""

    latent_dim = 3

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    @staticmethod
    def word_vectors(text: str) -> torch.Tensor:
        return torch.tensor([[len(w), sum(map(ord, w)), i] for i, w in enumerate(text.split())], dtype=torch.float32)

    def encode(self, texts):
        self.calls.append(list(texts))
        rows = [self.word_vectors(t) for t in texts]
        S = max(r.shape[0] for r in rows)
        emb, mask = torch.zeros(len(rows), S, 3), torch.zeros(len(rows), S, dtype=torch.bool)
        for b, r in enumerate(rows):
            emb[b, :len(r)], mask[b, :len(r)] = r, True
        return emb, mask


def tiny_batch(B=2, T=5, **kw):
    z = torch.zeros(B, T, dtype=torch.long)
    return TokenBatch(input_ids=z, modality_ids=z, positions=torch.arange(T).expand(B, T), segment_ids=z.clone(),
                      block_ids=z - 1, loss_mask=torch.ones(B, T), example_weight=torch.ones(B, T), **kw)


def caption_of_row(dm, batch, r):
    """The text segment of row ``r`` decoded from its token ids (independent of the data module's bookkeeping)."""
    text_index = dm.token_space.index("text")
    ids = batch.input_ids[r][(batch.modality_ids[r] == text_index) & (batch.segment_ids[r] >= 0)]
    return dm.codecs["text"].decode(ids - dm.token_space.offset("text"))


# ------------------------------------------------------------------ TokenBatch


def test_token_batch_condition_defaults_moves_and_checks():
    plain = tiny_batch()
    assert plain.condition is None and plain.condition_mask is None
    moved = plain.to("meta")
    assert moved.condition is None and moved.input_ids.device.type == "meta"
    ctx = plain.context()
    assert ctx.condition is None and ctx.condition_mask is None

    cond, mask = torch.randn(2, 3, 4), torch.tensor([[True, True, False], [True, False, False]])
    b = tiny_batch(condition=cond, condition_mask=mask)
    m = b.to("meta")
    assert m.condition.device.type == "meta" and m.condition.shape == (2, 3, 4) and m.condition_mask.dtype == torch.bool
    ctx = b.context()
    assert ctx.condition is cond and ctx.condition_mask is mask
    from lightning.fabric.utilities.apply_func import move_data_to_device

    for batch in (plain, b):
        out = move_data_to_device(batch, torch.device("meta"))
        assert isinstance(out, TokenBatch) and out.input_ids.device.type == "meta"
        assert (out.condition is None) == (batch.condition is None)

    with pytest.raises(ValueError, match="condition_mask / condition_segment_ids are set but condition is None"):
        tiny_batch(condition_mask=mask)
    with pytest.raises(ValueError, match=r"condition must be \[B, S, C\] with B = 2"):
        tiny_batch(condition=torch.randn(3, 3, 4))
    with pytest.raises(TypeError, match="condition must be floating point"):
        tiny_batch(condition=torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"condition_mask has shape \(2, 2\), expected \(2, 3\)"):
        tiny_batch(condition=cond, condition_mask=mask[:, :2])
    with pytest.raises(TypeError, match="condition_mask must be bool"):
        tiny_batch(condition=cond, condition_mask=mask.float())


# ------------------------------------------------------------------ collate


def test_attach_condition_puts_each_text_on_its_row():
    enc = WordEncoder()
    batch = attach_condition(tiny_batch(B=3), ["a red bar", None, "a big blue ring moves"], enc)
    assert batch.condition.shape == (3, 5, 3) and batch.condition_mask.shape == (3, 5)  # S = the longest text
    assert torch.equal(batch.condition[0, :3], WordEncoder.word_vectors("a red bar"))
    assert torch.equal(batch.condition[2], WordEncoder.word_vectors("a big blue ring moves"))
    assert batch.condition_mask.tolist() == [[True] * 3 + [False] * 2, [False] * 5, [True] * 5]
    assert not batch.condition[1].any() and not batch.condition[0, 3:].any()
    assert enc.calls == [["a red bar", "a big blue ring moves"]]  # None rows are not encoded

    none = attach_condition(tiny_batch(B=2), [None, None], enc)
    assert none.condition.shape == (2, 1, 3) and not none.condition_mask.any()


def test_attach_condition_errors():
    enc = WordEncoder()
    packed = tiny_batch()
    packed.segment_ids[0, 3:] = 1  # two examples in row 0
    with pytest.raises(ValueError, match="use pack_collate_with_condition for packed rows"):
        attach_condition(packed, ["a", "b"], enc)
    with pytest.raises(ValueError, match="got 1 texts for a batch of 2 rows"):
        attach_condition(tiny_batch(), ["a"], enc)

    class Wide(WordEncoder):
        latent_dim = 5

    with pytest.raises(ValueError, match=r"Wide.encode must return embeddings \[2, S, 5\]"):
        attach_condition(tiny_batch(), ["a", "b"], Wide())

    class FloatMask(WordEncoder):
        def encode(self, texts):
            emb, mask = super().encode(texts)
            return emb, mask.float()

    with pytest.raises(ValueError, match="FloatMask.encode must return a bool mask"):
        attach_condition(tiny_batch(), ["a", "b"], FloatMask())


def test_pad_collate_with_condition_equals_pad_collate_plus_condition():
    dm = MMDataModule(num_train=4, num_val=4, batch_size=4, dataset_args={"frames": 2, "size": 16})
    seqs = [dm.builder.build(dm.tasks[0].segments(dm.val_set[i])) for i in range(3)]
    texts = [dm.val_set[i].text for i in range(3)]
    batch = pad_collate_with_condition([ConditionedSequence(s, t) for s, t in zip(seqs, texts)], WordEncoder())
    plain = pad_collate(seqs)
    for name in ("input_ids", "modality_ids", "positions", "segment_ids", "block_ids", "loss_mask", "example_weight"):
        assert torch.equal(getattr(batch, name), getattr(plain, name))
    expected = attach_condition(plain, texts, WordEncoder())
    assert torch.equal(batch.condition, expected.condition) and torch.equal(batch.condition_mask, expected.condition_mask)
    with pytest.raises(TypeError, match="expects ConditionedSequence items"):
        pad_collate_with_condition(seqs, WordEncoder())


# ------------------------------------------------------------------ data module


def small(**kw):
    args = {"num_train": 12, "num_val": 6, "batch_size": 4, "dataset_args": {"frames": 2, "size": 16}}
    args.update(kw)
    return MMDataModule(**args)


def test_datamodule_attaches_the_caption_of_each_row():
    enc = WordEncoder()
    dm = small(condition_encoder=enc)
    assert dm.condition_dim == 3 and "condition_encoder" not in dm.hparams
    assert small().condition_dim is None
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for batch in loader:
            assert batch.condition is not None
            for r in range(batch.input_ids.shape[0]):
                caption = caption_of_row(dm, batch, r)  # read from the row's own tokens: alignment under shuffling
                words = WordEncoder.word_vectors(caption)
                n = words.shape[0]
                assert torch.equal(batch.condition[r, :n], words), caption
                assert batch.condition_mask[r].tolist() == [True] * n + [False] * (batch.condition.shape[1] - n)
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved.condition.device.type == "meta" and moved.condition_mask.device.type == "meta"
    # without an encoder nothing changes
    assert next(iter(small().val_dataloader())).condition is None


def test_datamodule_gives_no_condition_when_the_caption_is_the_target():
    dm = small(tasks=["text_to_video", "video_to_text"], condition_encoder=WordEncoder())
    batch = next(iter(dm.val_dataloader()))  # rows alternate text_to_video, video_to_text
    for r in range(4):
        caption = dm.val_set[r].text
        if r % 2 == 0:
            n = len(caption.split())
            assert torch.equal(batch.condition[r, :n], WordEncoder.word_vectors(caption))
            assert int(batch.condition_mask[r].sum()) == n
        else:  # conditioning on the caption it must predict would leak the target
            assert not batch.condition_mask[r].any() and not batch.condition[r].any()


def test_datamodule_rejects_an_object_that_is_not_an_encoder():
    with pytest.raises(TypeError, match="condition_encoder must have latent_dim and encode"):
        small(condition_encoder=object())


def test_condition_encoder_and_dataset_args_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MMDataModule, "data")
    cfg = parser.parse_string(f"""
data:
  num_train: 8
  num_val: 6
  batch_size: 2
  dataset_args: {{frames: 2, size: 16, shapes: [ring, bar], colours: [yellow, cyan], captions: detailed}}
  condition_encoder:
    class_path: {WordEncoder.__module__}.WordEncoder
""")
    dm = parser.instantiate(cfg).data
    assert isinstance(dm.condition_encoder, WordEncoder) and dm.condition_dim == 3
    assert dm.train_set.shapes == ("ring", "bar") and dm.train_set.colours == ("yellow", "cyan")
    batch = next(iter(dm.val_dataloader()))
    caption = caption_of_row(dm, batch, 0)
    assert caption == dm.val_set[0].text and "starting at the" in caption
    assert torch.equal(batch.condition[0, :len(caption.split())], WordEncoder.word_vectors(caption))


# ------------------------------------------------------------------ objective and model


def test_objective_context_passes_the_condition():
    obj = AutoregressiveObjective()
    cond, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    ctx = obj.context(tiny_batch(condition=cond, condition_mask=mask))
    assert ctx.condition is cond and ctx.condition_mask is mask
    ctx = obj.context(tiny_batch())
    assert ctx.condition is None and ctx.condition_mask is None
    other = torch.randn(2, 1, 4)
    assert obj.context(tiny_batch(condition=cond), condition=other).condition is other  # explicit extra wins


def _model(**kw):
    torch.manual_seed(0)
    return UnifiedModel(token_space={"text": 50}, dim=32, depth=2, mixer=functools.partial(FullAttention, num_heads=4),
                        **kw).double()


def test_model_without_cross_attention_ignores_the_condition():
    model = _model().eval()
    ids = torch.randint(0, 50, (2, 7))
    cond = tiny_batch(T=7, condition=torch.randn(2, 3, 4, dtype=torch.float64)).condition
    obj = AutoregressiveObjective()
    with torch.no_grad():
        plain = model(ids, obj.context(tiny_batch(T=7))).hidden
        conditioned = model(ids, obj.context(tiny_batch(T=7, condition=cond))).hidden
    assert torch.equal(plain, conditioned)


def test_cross_attention_model_reads_the_batch_condition_and_its_mask():
    model = _model(cross_attention={"cond_dim": 4, "num_heads": 2}).eval()
    for block in model.backbone.blocks:  # the output projections start at zero: make the branch visible
        for lin in block.cross_attentions[0].residual_outputs():
            torch.nn.init.normal_(lin.weight, std=0.5)
    ids = torch.randint(0, 50, (2, 7))
    obj = AutoregressiveObjective()
    cond = torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    junk = cond.clone()
    junk[~mask] = 100.0  # masked-out conditioning tokens must not matter
    other = cond.clone()
    other[0, 0] += 1.0  # a real conditioning token of row 0 must
    with torch.no_grad():
        base = model(ids, obj.context(tiny_batch(T=7, condition=cond, condition_mask=mask))).hidden
        masked = model(ids, obj.context(tiny_batch(T=7, condition=junk, condition_mask=mask))).hidden
        changed = model(ids, obj.context(tiny_batch(T=7, condition=other, condition_mask=mask))).hidden
    torch.testing.assert_close(masked, base, rtol=1e-12, atol=1e-12)
    assert (changed[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(changed[1], base[1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="SeqContext.condition is None"):
        model(ids, SeqContext.simple(2, 7))
