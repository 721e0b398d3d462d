"""Continuous inputs under the autoregressive objective, and trainable input encoders of continuous codecs."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from mmgrow.data.collate import pad_collate
from mmgrow.data.sequence import SequenceBuilder
from mmgrow.models.unified import UnifiedModel
from mmgrow.objectives.autoregressive import AutoregressiveObjective
from mmgrow.protocols import MaskSpec, Segment, SeqContext, Tokenizer
from mmgrow.tokenizers.text import ByteTokenizer
from mmgrow.trust import TRUST_ENV, UntrustedClassError


class FrameFeatures(Tokenizer):
    """An audio-like continuous codec: ``float [N]`` -> ``[N // 4, 4]`` frames of 4 samples."""

    modality: ClassVar[str] = "audio"
    kind: ClassVar[str] = "continuous"

    def __init__(self) -> None:
        super().__init__()
        self.latent_dim = 4
        self.special_tokens = {}

    def encode(self, raw):
        return torch.as_tensor(raw, dtype=torch.float32).reshape(-1, 4)


class PairEncoder(nn.Module):
    """Test encoder over items of ``n = 2`` rows: row j of an item gets ``Linear(C, D)(x_j + 2 * x_other)``,
    so it sees its item partner: a wrong grouping of positions into items changes the output."""

    def __init__(self, dim: int, latent_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.tokens_per_item = 2
        self.proj = nn.Linear(latent_dim, dim)
        self.scale = scale

    def forward(self, latents):  # [M, 2, C] -> [M, 2, D]
        return self.scale * self.proj(latents + 2 * latents.flip(1))


SPEC = {"class_path": f"{__name__}.PairEncoder", "init_args": {"scale": 3.0}}


def builder() -> SequenceBuilder:
    text = ByteTokenizer()
    return SequenceBuilder({"text": text, "audio": FrameFeatures()})


def audio_caption_batch(seed: int = 0, rows: int = 3):
    """Rows ``[audio (input)] [text caption (target)]``; the caption names the sign of the audio's mean."""
    g = torch.Generator().manual_seed(seed)
    b = builder()
    seqs = []
    for i in range(rows):
        sign = 1.0 if i % 2 == 0 else -1.0
        audio = sign * (0.5 + torch.rand(8 + 8 * (i % 2), generator=g))
        seqs.append(b.build([Segment("audio", audio), Segment("text", "up" if sign > 0 else "down", "target")]))
    return b, pad_collate(seqs)


def test_step_passes_latents_and_ar_trains_on_continuous_inputs():
    torch.manual_seed(0)
    b, batch = audio_caption_batch()
    model = UnifiedModel(token_space=b.token_space, dim=32, depth=1, continuous=b.continuous)
    obj = AutoregressiveObjective().bind(model.token_space)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss, metrics = obj.step(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < 0.3 * first
    assert metrics["tokens_audio"] == 0 and metrics["tokens_text"] > 0  # audio is input only
    assert model.latent_in["audio"].weight.grad.abs().sum() > 0  # the latents reached the model
    # without the batch's latents the model refuses the continuous positions by name
    with pytest.raises(ValueError, match="continuous 'audio' positions"):
        model(batch.input_ids, obj.context(batch))


def manual_greedy(model, ids, latents, modality, steps):
    """Re-run the whole prefix each step, appending zero latent rows for the new discrete tokens."""
    space = model.token_space
    out = []
    for _ in range(steps):
        mods = space.modality_of(ids)
        ctx = SeqContext(positions=torch.arange(ids.shape[1]).expand_as(ids).contiguous(), modality_ids=mods,
                         mask=MaskSpec(causal=True))
        out_t = model(ids, ctx, latents=latents)
        token = out_t.logits(out_t.hidden[:, -1], modality).argmax(-1)
        out.append(token)
        ids = torch.cat([ids, (token + space.offset(modality))[:, None]], dim=1)
        latents = torch.cat([latents, latents.new_zeros(latents.shape[0], 1, latents.shape[2])], dim=1)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("stateful", [True, False])
def test_generate_with_latents_equals_manual_greedy_loop(stateful, monkeypatch):
    torch.manual_seed(1)
    b = builder()
    model = UnifiedModel(token_space=b.token_space, dim=16, depth=2, init_std=0.5,
                         continuous=b.continuous).eval()
    if not stateful:
        monkeypatch.setattr(UnifiedModel, "supports_state", property(lambda self: False))
    # prompt: the audio and the first text token of each row (rows of equal audio length only)
    prompt_len = 3 + 1  # 12 samples -> 3 frames, then bos
    seq = b.build([Segment("audio", torch.linspace(-1, 1, 12)), Segment("text", "up", "target")])
    seq2 = b.build([Segment("audio", torch.linspace(1, -1, 12)), Segment("text", "up", "target")])
    ids = torch.stack([seq.input_ids[:prompt_len], seq2.input_ids[:prompt_len]])
    lat = torch.stack([seq.latents[:prompt_len], seq2.latents[:prompt_len]])
    obj = AutoregressiveObjective()
    got = obj.generate(model, ids, modality="text", max_new_tokens=5, greedy=True, latents=lat)
    ref = manual_greedy(model, ids, lat, "text", 5)
    assert torch.equal(got, ref)
    # the latents matter: other audio, other continuation (a strong init makes this reliable)
    other = obj.generate(model, ids, modality="text", max_new_tokens=5, greedy=True, latents=-3 * lat)
    assert not torch.equal(got, other)
    with pytest.raises(ValueError, match=r"latents must be float \[B, T0, C\]"):
        obj.generate(model, ids, modality="text", max_new_tokens=2, latents=lat[:, :2])


def encoder_model(**kw) -> UnifiedModel:
    torch.manual_seed(2)
    return UnifiedModel(token_space={"text": 7, "audio": 1}, dim=8, depth=1, continuous={"audio": 3},
                        input_encoders={"audio": SPEC}, **kw)


def test_input_encoder_runs_on_whole_items_and_scatters_back_in_order(monkeypatch):
    monkeypatch.setenv(TRUST_ENV, __name__)
    model = encoder_model().double()
    assert "audio" not in model.latent_in and isinstance(model.input_encoders["audio"], PairEncoder)
    # row 0: text, 2 items of audio (4 positions) split by text; row 1: one item at the end
    audio = 7
    ids = torch.tensor([[1, audio, audio, 2, audio, audio], [3, 4, 5, 6, audio, audio]])
    latents = torch.randn(2, 6, 3, dtype=torch.float64) * (ids == audio)[..., None]  # zeros at discrete tokens
    ctx = SeqContext(positions=torch.arange(6).expand(2, 6).contiguous(), mask=MaskSpec(causal=True))
    model.backbone = nn.Identity()  # read the input embedding directly
    model.backbone.forward = lambda x, ctx, states: (x, None)
    model.norm = nn.Identity()
    got = model(ids, ctx, latents=latents).hidden
    enc = model.input_encoders["audio"]
    ref = model.embed(ids).clone()
    for r, pairs in ((0, [(1, 2), (4, 5)]), (1, [(4, 5)])):
        for a, b in pairs:
            item = enc(latents[r, [a, b]][None])[0]
            ref[r, a] += item[0]
            ref[r, b] += item[1]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # gradients reach the encoder
    got.sum().backward()
    assert enc.proj.weight.grad.abs().sum() > 0


def test_input_encoder_errors_are_named(monkeypatch):
    with pytest.raises(UntrustedClassError, match="refusing to import"):
        encoder_model()
    monkeypatch.setenv(TRUST_ENV, __name__)
    model = encoder_model()
    ids = torch.tensor([[1, 7, 7, 7]])  # 3 audio positions, items of 2
    ctx = SeqContext(positions=torch.arange(4)[None], mask=MaskSpec(causal=True))
    with pytest.raises(ValueError, match="tokens_per_item=2"):
        model(ids, ctx, latents=torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="not a continuous modality"):
        UnifiedModel(token_space={"text": 7, "audio": 1}, dim=8, depth=1, continuous={"audio": 3},
                     input_encoders={"text": SPEC})
    with pytest.raises(TypeError, match="class_path"):
        UnifiedModel(token_space={"text": 7, "audio": 1}, dim=8, depth=1, continuous={"audio": 3},
                     input_encoders={"audio": {"init_args": {}}})


def test_latents_the_model_would_not_read_are_a_named_error():
    """A model built without ``continuous`` (e.g. by hand, forgetting the CLI's data.continuous link) must not
    silently drop the audio features of a batch."""
    from mmgrow.models.unified import UnifiedModel
    from mmgrow.protocols import SeqContext

    space = {"text": 8, "audio": 1}
    model = UnifiedModel(token_space=space, dim=16, depth=1)
    ids = torch.tensor([[0, 8, 8, 3]])
    latents = torch.zeros(1, 4, 2)
    ctx = SeqContext.simple(1, 4)
    model(ids, ctx, latents=latents)  # all zeros: nothing is lost
    latents[0, 1:3] = 1.0
    with pytest.raises(ValueError, match=r"latents carry values at \['audio'\] positions.*continuous=data.continuous"):
        model(ids, ctx, latents=latents)
    reading = UnifiedModel(token_space=space, dim=16, depth=1, continuous={"audio": 2})
    assert reading(ids, ctx, latents=latents).hidden.shape == (1, 4, 16)


def test_an_absent_continuous_modality_still_gets_zero_gradients(monkeypatch):
    """Data parallelism needs a gradient for every trainable parameter each step: a batch without audio
    (pre-training before the audio fine-tune) must give the audio input weights exact zeros, not None,
    and leave the output unchanged."""
    from mmgrow.models import unified
    from mmgrow.protocols import SeqContext

    torch.manual_seed(0)
    space = {"text": 8, "audio": 1}
    model = unified.UnifiedModel(token_space=space, dim=16, depth=1, continuous={"audio": 2})
    ids = torch.tensor([[0, 3, 5, 2]])  # text only
    ctx = SeqContext.simple(1, 4)
    out = model(ids, ctx, latents=torch.zeros(1, 4, 2)).hidden
    with monkeypatch.context() as m:
        m.setattr(unified, "_zero_touch", lambda module: 0.0)
        untouched = model(ids, ctx, latents=torch.zeros(1, 4, 2)).hidden
    torch.testing.assert_close(out, untouched, rtol=0, atol=0)
    out.sum().backward()
    for name, p in model.latent_in.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name
