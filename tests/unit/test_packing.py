"""Masked sequence packing (mmgrow.data.packing): rows, fields, model equivalence and loss equivalence.

The model-level tests run every registered mixer and memory layer that declares ``supports_segments``
(capabilities from the class, no name lists) inside a small UnifiedModel in float64: a packed row
must give, at every example's tokens, the hidden states and the parameter gradients of the examples
run one per row (positions restarted).
"""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch

import mmgrow
from mmgrow.data.collate import pad_collate
from mmgrow.data.packing import PackingConfig, counted_targets, pack_collate, pack_rows
from mmgrow.data.sequence import EncodedSequence, SequenceBuilder
from mmgrow.models.unified import UnifiedModel
from mmgrow.objectives.autoregressive import AutoregressiveObjective
from mmgrow.protocols import Segment

DIM = 32


def _builder() -> SequenceBuilder:
    return SequenceBuilder({"text": mmgrow.create("tokenizers", "bytes"),
                            "video": mmgrow.create("tokenizers", "pixels", grid=2)})


def _video(frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, 4, 4, 3), generator=g, dtype=torch.uint8)


def _examples() -> list[EncodedSequence]:
    """Mixed lengths and roles: a caption -> video, a video -> caption, a short text answer."""
    b = _builder()
    return [
        b.build([Segment("text", "a red bar", "input"), Segment("video", _video(3, 0), "target")]),
        b.build([Segment("video", _video(2, 1), "input"), Segment("text", "blue", "target")]),
        b.build([Segment("text", "q?", "input"), Segment("text", "yes", "target")]),
        b.build([Segment("text", "a long caption of a green cross", "input"), Segment("video", _video(1, 2), "target")]),
    ]


# ------------------------------------------------------------------ rows


@pytest.mark.parametrize("algorithm", ["first_fit", "greedy"])
def test_pack_rows_places_every_example_once_within_the_length(algorithm: str) -> None:
    rng = random.Random(0)
    for _ in range(200):
        L = rng.randint(4, 40)
        lengths = [rng.randint(1, L) for _ in range(rng.randint(1, 30))]
        rows = pack_rows(lengths, L, algorithm)
        placed = sorted(i for row in rows for i in row)
        assert placed == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= L for row in rows)
        assert all(row == sorted(row) for row in rows)  # input order kept within a row
        if algorithm == "greedy":  # next fit: rows are consecutive runs, closed only when the next does not fit
            flat = [i for row in rows for i in row]
            assert flat == list(range(len(lengths)))
            for row, nxt in itertools.pairwise(rows):
                assert sum(lengths[i] for i in row) + lengths[nxt[0]] > L
        else:  # first fit: an example opens a new row only when no earlier row has room
            for r, row in enumerate(rows):
                first = row[0]
                for earlier in rows[:r]:
                    used = sum(lengths[i] for i in earlier if i < first)
                    assert used + lengths[first] > L


def test_first_fit_back_fills_and_greedy_does_not() -> None:
    assert pack_rows([5, 4, 3], 8, "first_fit") == [[0, 2], [1]]
    assert pack_rows([5, 4, 3], 8, "greedy") == [[0], [1, 2]]


def test_too_long_example_and_bad_config_are_named() -> None:
    with pytest.raises(ValueError, match="an example of 9 tokens does not fit a row of length 8"):
        pack_rows([3, 9], 8)
    with pytest.raises(ValueError, match="mode must be one of"):
        PackingConfig(16, mode="zigzag")
    with pytest.raises(ValueError, match="length must be an int >= 2"):
        PackingConfig.from_config({"length": 0})
    with pytest.raises(ValueError, match="unknown keys"):
        PackingConfig.from_config({"length": 8, "lenght": 9})
    with pytest.raises(ValueError, match="`length`"):
        PackingConfig.from_config({"mode": "masked"})
    assert PackingConfig.from_config(None) is None


def test_masked_fields_restart_per_example() -> None:
    seqs = _examples()
    L = max(len(s) for s in seqs) + 8
    batch = pack_collate(seqs, PackingConfig(L, weighting="token"))
    rows = pack_rows([len(s) for s in seqs], L)
    assert batch.input_ids.shape == (len(rows), L)
    for r, members in enumerate(rows):
        start, blocks_seen = 0, set()
        for seg, i in enumerate(members):
            s, span = seqs[i], slice(start, start + len(seqs[i]))
            assert torch.equal(batch.input_ids[r, span], s.input_ids)
            assert torch.equal(batch.positions[r, span], torch.arange(len(s)))
            assert bool((batch.segment_ids[r, span] == seg).all())
            assert torch.equal(batch.loss_mask[r, span], s.loss_mask)
            blk = batch.block_ids[r, span]
            assert torch.equal(blk >= 0, s.block_ids >= 0)
            ids = set(blk[blk >= 0].tolist())
            assert not ids & blocks_seen  # no two examples of a row share a block
            blocks_seen |= ids
            start += len(s)
        assert bool((batch.segment_ids[r, start:] == -1).all()) and float(batch.example_weight[r, start:].sum()) == 0


def test_naive_concatenates_and_cuts() -> None:
    seqs = _examples()
    L = 24
    batch = pack_collate(seqs, PackingConfig(L, mode="naive"))
    stream = torch.cat([s.input_ids for s in seqs])
    total = stream.numel()
    assert batch.input_ids.shape[0] == -(-total // L)
    assert torch.equal(batch.input_ids.flatten()[:total], stream)
    real = batch.segment_ids >= 0
    assert int(real.sum()) == total and bool((batch.segment_ids[real] == 0).all())
    assert torch.equal(batch.positions[0], torch.arange(L))
    assert bool((batch.example_weight[real] == 1).all())


# ------------------------------------------------------------------ model equivalence


def _segment_plugins() -> list:
    cases = []
    for kind in ("mixers", "memory"):
        for name in mmgrow.available(kind):
            cls = mmgrow.load_plugin(kind, name)
            if cls.supports_segments:
                cases.append(pytest.param(kind, name, id=f"{kind}-{name}"))
    return cases


def _model(kind: str, name: str) -> UnifiedModel:
    cls = mmgrow.load_plugin(kind, name)
    factory = functools.partial(cls, **cls.conformance_kwargs())
    space = _builder().token_space
    torch.manual_seed(0)
    if kind == "mixers":
        model = UnifiedModel(token_space=space, dim=DIM, depth=2, mixer=factory)
    else:  # a memory branch on full attention, gate opened so the memory matters
        model = UnifiedModel(token_space=space, dim=DIM, depth=2, memory=factory,
                             memory_placement={"gate_init": 0.5})
    return model.double()


@pytest.mark.parametrize(("kind", "name"), _segment_plugins())
def test_packed_row_equals_each_example_alone_forward_and_backward(kind: str, name: str) -> None:
    model = _model(kind, name)
    objective = AutoregressiveObjective(token_space=model.token_space)
    seqs = _examples()
    packed = pack_collate(seqs, PackingConfig(sum(len(s) for s in seqs[:2]) + 3))
    assert int(packed.segment_ids.max()) >= 1, "the test needs a row holding several examples"
    probe = torch.randn(*packed.input_ids.shape, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    out = model(packed.input_ids, objective.context(packed)).hidden
    (out * probe * (packed.segment_ids >= 0)[..., None]).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    rows = pack_rows([len(s) for s in seqs], packed.input_ids.shape[1])
    alone_grads: dict[str, torch.Tensor] = {}
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            n = len(seqs[i])
            single = pad_collate([seqs[i]])
            hidden = model(single.input_ids, objective.context(single)).hidden
            torch.testing.assert_close(hidden[0], out[r, start:start + n].detach(), rtol=1e-9, atol=1e-9,
                                       msg=f"{name}: example {i} in row {r} differs from running it alone")
            (hidden[0] * probe[r, start:start + n]).sum().backward()
            start += n
    alone_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert alone_grads.keys() == packed_grads.keys()
    for n, grad in packed_grads.items():
        torch.testing.assert_close(grad, alone_grads[n], rtol=1e-8, atol=1e-10, msg=f"{name}: grad of {n}")


# ------------------------------------------------------------------ loss equivalence


def _loss(model, objective, batch):
    model.zero_grad()
    loss, metrics = objective.loss(model(batch.input_ids, objective.context(batch)), batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, metrics


@pytest.mark.parametrize("weighting", ["token", "example"])
def test_packed_loss_equals_padded_loss_with_the_same_weights(weighting: str) -> None:
    model = _model("mixers", "full")
    objective = AutoregressiveObjective(token_space=model.token_space)
    seqs = _examples()
    packed = pack_collate(seqs, PackingConfig(sum(len(s) for s in seqs[:2]) + 3, weighting=weighting))
    padded = pad_collate(seqs, weighting=weighting)
    lp, gp, _ = _loss(model, objective, packed)
    lu, gu, _ = _loss(model, objective, padded)
    torch.testing.assert_close(lp, lu, rtol=1e-10, atol=1e-12)
    for n, grad in gp.items():
        torch.testing.assert_close(grad, gu[n], rtol=1e-8, atol=1e-12)


def _per_example_mean_ce(model, objective, seq: EncodedSequence) -> tuple[str, float]:
    """(target modality, mean CE over the example's own counted targets), the example run alone."""
    single = pad_collate([seq])
    _, metrics = objective.loss(model(single.input_ids, objective.context(single)), single)
    (modality,) = [m for m in model.token_space.modalities if float(metrics[f"tokens_{m}"]) > 0]
    return modality, float(metrics[f"loss_{modality}"])


def test_example_weighting_makes_every_example_count_equally() -> None:
    """A 3-frame video target and a 4-character answer: with ``weighting: example`` each modality's
    loss is the plain mean over examples of their own mean CE, and the total is LWM's 0.5/0.5."""
    model = _model("mixers", "full")
    objective = AutoregressiveObjective(token_space=model.token_space)
    seqs = _examples()
    packed = pack_collate(seqs, PackingConfig(max(len(s) for s in seqs) * 2, weighting="example"))
    with torch.no_grad():
        loss, metrics = objective.loss(model(packed.input_ids, objective.context(packed)), packed)
        per = [_per_example_mean_ce(model, objective, s) for s in seqs]
    expected = {}
    for modality in {m for m, _ in per}:
        values = [ce for m, ce in per if m == modality]
        expected[modality] = sum(values) / len(values)
        # example_weight is float32 in a TokenBatch: 1/n_e carries a ~1e-8 relative rounding
        assert float(metrics[f"loss_{modality}"]) == pytest.approx(expected[modality], rel=1e-7)
    assert float(loss) == pytest.approx(sum(expected.values()) / len(expected), rel=1e-7)
    assert counted_targets(seqs[0]) > 3 * counted_targets(seqs[2])  # long and short examples really differ


def test_each_modality_gets_exactly_its_weight_whatever_its_token_count() -> None:
    """100x more video targets than text targets in one packed row: each modality still contributes its
    weight (LWM's 0.5 * (vision + text) by default, 0.75 / 0.25 with weights 3 : 1)."""
    b = _builder()
    video_example = b.build([Segment("text", "x", "input"), Segment("video", _video(64, 5), "target")])
    text_example = b.build([Segment("text", "y", "input"), Segment("text", "a", "target")])
    model = _model("mixers", "full")
    packed = pack_collate([video_example, text_example], PackingConfig(len(video_example) + len(text_example)))
    for weights, expected in ((None, (0.5, 0.5)), ({"video": 3.0, "text": 1.0}, (0.75, 0.25))):
        objective = AutoregressiveObjective(weights, token_space=model.token_space)
        with torch.no_grad():
            loss, metrics = objective.loss(model(packed.input_ids, objective.context(packed)), packed)
        assert float(metrics["tokens_video"]) >= 100 * float(metrics["tokens_text"])
        mix = expected[0] * float(metrics["loss_video"]) + expected[1] * float(metrics["loss_text"])
        assert float(loss) == pytest.approx(mix, rel=1e-12)


def test_naive_packing_differs_from_masked() -> None:
    """Naive rows attend across example boundaries: the second example's hidden states change."""
    model = _model("mixers", "full")
    objective = AutoregressiveObjective(token_space=model.token_space)
    seqs = _examples()[:2]
    L = len(seqs[0]) + len(seqs[1])
    masked = pack_collate(seqs, PackingConfig(L))
    naive = pack_collate(seqs, PackingConfig(L, mode="naive"))
    assert torch.equal(masked.input_ids, naive.input_ids)
    with torch.no_grad():
        hm = model(masked.input_ids, objective.context(masked)).hidden
        hn = model(naive.input_ids, objective.context(naive)).hidden
    n0 = len(seqs[0])
    torch.testing.assert_close(hm[0, :n0], hn[0, :n0], rtol=1e-10, atol=1e-12)  # the first example sees the same
    assert float((hm[0, n0:] - hn[0, n0:]).abs().max()) > 1e-3


# ------------------------------------------------------------------ per-example conditions


class HashEncoder:
    """Deterministic stand-in for a frozen text encoder: one ``[len(text), 8]`` embedding per text."""

    latent_dim = 8

    def encode(self, texts):
        S = max(len(t) for t in texts)
        emb = torch.zeros(len(texts), S, self.latent_dim)
        mask = torch.zeros(len(texts), S, dtype=torch.bool)
        for i, t in enumerate(texts):
            g = torch.Generator().manual_seed(sum(map(ord, t)))
            emb[i, :len(t)] = torch.randn(len(t), self.latent_dim, generator=g)
            mask[i, :len(t)] = True
        return emb, mask


def test_packed_rows_with_conditions_equal_each_example_alone() -> None:
    from mmgrow.data.collate import ConditionedSequence, pack_collate_with_condition, pad_collate_with_condition

    space = _builder().token_space
    torch.manual_seed(0)
    model = UnifiedModel(token_space=space, dim=DIM, depth=2, cross_attention={"cond_dim": 8}).double()
    objective = AutoregressiveObjective(token_space=space)
    seqs = _examples()
    texts = ["a red bar", None, "q", "a long caption of a green cross"]  # the second example has no condition
    items = [ConditionedSequence(s, t) for s, t in zip(seqs, texts)]
    L = sum(len(s) for s in seqs[:3]) + 2
    packed = pack_collate_with_condition(items, PackingConfig(L), HashEncoder())
    assert int(packed.segment_ids.max()) >= 2 and packed.condition_segment_ids is not None
    packed.condition = packed.condition.double()
    out = model(packed.input_ids, objective.context(packed)).hidden
    for r, members in enumerate(pack_rows([len(s) for s in seqs], L)):
        start = 0
        for i in members:
            single = pad_collate_with_condition([items[i]], HashEncoder())
            single.condition = single.condition.double()
            alone = model(single.input_ids, objective.context(single)).hidden[0]
            n = len(seqs[i])
            torch.testing.assert_close(out[r, start:start + n], alone, rtol=1e-9, atol=1e-9,
                                       msg=f"example {i} (condition {texts[i]!r}) differs from running it alone")
            start += n


def test_naive_packing_refuses_conditions_and_flow_matching_refuses_packed_rows() -> None:
    from mmgrow.data.collate import ConditionedSequence, pack_collate_with_condition
    from mmgrow.objectives.flow_matching import FlowMatchingObjective

    seqs = _examples()
    with pytest.raises(ValueError, match="mode: masked"):
        pack_collate_with_condition([ConditionedSequence(s, "x") for s in seqs], PackingConfig(64, mode="naive"),
                                    HashEncoder())
    model = _model("mixers", "full")
    packed = pack_collate(seqs, PackingConfig(sum(len(s) for s in seqs)))
    with pytest.raises(ValueError, match="one time t per row"):
        FlowMatchingObjective(token_space=model.token_space).step(model, packed)


def test_a_named_condition_on_packed_conditioned_rows_is_refused() -> None:
    from mmgrow.data.collate import ConditionedSequence, pack_collate_with_condition

    space = _builder().token_space
    model = UnifiedModel(token_space=space, dim=DIM, depth=1, cross_attention={"cond_dim": 8, "source": "llm"})
    seqs = _examples()[:2]
    packed = pack_collate_with_condition([ConditionedSequence(s, "x") for s in seqs],
                                         PackingConfig(sum(len(s) for s in seqs)), HashEncoder())
    objective = AutoregressiveObjective(token_space=space)
    ctx = objective.context(packed, conditions={"llm": (packed.condition, None)})
    with pytest.raises(ValueError, match="named condition 'llm' has no per-example ids"):
        model(packed.input_ids, ctx)
