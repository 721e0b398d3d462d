"""The loss and gradients of a context-parallel step equal the single-process ones (float64, gloo).

Every rank of a ``cp = 2`` group runs :func:`context_parallel_loss` on the same batch (rows of odd
length, so the step pads them; packed examples, padding, two modalities, zero loss-mask entries and
uneven example weights) and must report the loss and metrics of the whole batch; its gradients,
summed over the ranks and divided by the world size (what DDP does), must equal the gradients of
one process on the whole batch. Mixers: a per-token one that reads positions (so only the loss's
reduction and the sharding of context and targets are tested) and the real ``ring`` attention
(reference: the same weights run as ``blockwise`` on one process). A 4-process run builds the
``(dp, cp) = (2, 2)`` mesh with :class:`ContextParallelStrategy` itself, feeds each data-parallel
rank its own batch and checks the gradients against the mean over both batches.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mmgrow.batch import TokenBatch
from mmgrow.objectives.autoregressive import AutoregressiveObjective
from mmgrow.parallel.context_batch import context_parallel_loss, pad_to_multiple, require_context_parallel_mixers
from mmgrow.protocols import ContextParallel, MixerCapabilityError, SeqContext, SequenceMixer
from mmgrow.testing.distributed import run_distributed
from mmgrow.tokenspace import TokenSpace

SIZES = {"text": 11, "video": 7}
SPACE = TokenSpace.from_dict(SIZES)
TOL = 1e-10


class PositionalPerTokenMixer(SequenceMixer):
    """``y_t = tanh(W x_t) * (1 + 0.1 * position_t)``: no token mixing, but wrong positions show."""

    supports_segments = True
    supports_context_parallel = True

    def __init__(self, *, dim: int, layer_idx: int = 0) -> None:
        super().__init__(dim=dim, layer_idx=layer_idx)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx: SeqContext, state=None):
        self.check_context(x, ctx)
        return torch.tanh(self.proj(x)) * (1 + 0.1 * ctx.positions[..., None].to(x.dtype)), None


def make_batch(seed: int, length: int = 13) -> TokenBatch:
    """Row 0: two packed examples then padding; row 1: one example then padding; mixed modalities."""
    g = torch.Generator().manual_seed(seed)
    cut, end0, end1 = 5, length - 2, length - 3
    seg = torch.full((2, length), -1)
    seg[0, :cut], seg[0, cut:end0], seg[1, :end1] = 0, 1, 0
    mods = (torch.rand(2, length, generator=g) < 0.6).long()  # 1 = video
    local = torch.where(mods == 0, torch.randint(0, SIZES["text"], seg.shape, generator=g),
                        torch.randint(0, SIZES["video"], seg.shape, generator=g))
    ids = torch.where(seg < 0, 0, local + mods * SPACE.offset("video"))
    mods = torch.where(seg < 0, 0, mods)
    positions = torch.zeros_like(seg)
    for b in range(2):
        for t in range(1, length):
            positions[b, t] = positions[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    positions = torch.where(seg < 0, 0, positions)
    loss_mask = (torch.rand(2, length, generator=g) < 0.8).float() * (seg >= 0)
    weight = torch.where(seg == 1, 0.5, 2.0) * (seg >= 0)
    return TokenBatch(input_ids=ids, modality_ids=mods, positions=positions, segment_ids=seg,
                      block_ids=torch.full_like(seg, -1), loss_mask=loss_mask, example_weight=weight.float())


def with_conditions(batch: TokenBatch, seed: int) -> TokenBatch:
    """``batch`` with per-example conditions: row 0's two packed examples get 3 and 2 conditioning tokens
    (``condition_segment_ids`` 0 0 0 1 1), row 1's example gets 2 (and 3 padding slots)."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(seed)
    condition = torch.randn(2, 5, COND_DIM, generator=g, dtype=torch.float64)
    segments = torch.tensor([[0, 0, 0, 1, 1], [0, 0, -1, -1, -1]])
    return replace(batch, condition=condition, condition_mask=segments >= 0, condition_segment_ids=segments)


COND_DIM = 4


def make_model(mixer: str):
    from mmgrow.layers.blockwise import BlockwiseAttention
    from mmgrow.layers.ring import RingAttention
    from mmgrow.models.unified import UnifiedModel

    conditioned = mixer.endswith("+cond")
    mixer = mixer.removesuffix("+cond")
    factory = {"per_token": PositionalPerTokenMixer, "ring": RingAttention, "blockwise": BlockwiseAttention}[mixer]
    if mixer != "per_token":
        factory = _with_tiles(factory)
    torch.manual_seed(0)
    extra = {"cross_attention": {"cond_dim": COND_DIM, "num_heads": 2}} if conditioned else {}
    return UnifiedModel(token_space=SIZES, dim=16, depth=2, mixer=factory, **extra).double()


def _with_tiles(cls):
    def build(*, dim, layer_idx):
        return cls(dim=dim, layer_idx=layer_idx, num_heads=2, query_block=3, key_block=4)
    return build


def reference(mixer: str, batch: TokenBatch):
    """Single process, whole batch: ``(loss, metrics, grads)`` (ring runs as blockwise without ``cp``)."""
    model = make_model(mixer.replace("ring", "blockwise"))
    obj = AutoregressiveObjective().bind(SPACE)
    loss, metrics = obj.loss(model(batch.input_ids, obj.context(batch)), batch)
    loss.backward()
    return loss.detach(), metrics, [p.grad.clone() for p in model.parameters()]


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _compare_metrics(got: dict, want: dict) -> float:
    assert set(got) == set(want), (sorted(got), sorted(want))
    return max(abs(float(got[k]) - float(want[k])) for k in want)


def _step(mixer: str, batch: TokenBatch, cp: ContextParallel):
    """One context-parallel step; returns loss, metrics, DDP-averaged grads and the shard's tokens."""
    model = make_model(mixer)
    obj = AutoregressiveObjective().bind(SPACE)
    loss, metrics, tokens = context_parallel_loss(model, obj, batch, cp)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for g in grads:  # DDP: all-reduce over every rank, divided by the world size
        dist.all_reduce(g)
        g /= dist.get_world_size()
    return loss.detach(), metrics, grads, tokens


def _cp2_worker(rank: int, world_size: int) -> list[dict]:
    group = dist.new_group(list(range(world_size)))
    results = []
    for mixer, layout in (("per_token", "zigzag"), ("per_token", "contiguous"), ("ring", "zigzag"),
                          ("ring", "contiguous"), ("ring+cond", "zigzag")):
        batch = make_batch(seed=1)
        if mixer.endswith("+cond"):  # packed rows with per-example conditions: the condition stays whole
            batch = with_conditions(batch, seed=2)
        cp = ContextParallel(group=group, rank=rank, world_size=world_size, layout=layout)
        loss, metrics, grads, tokens = _step(mixer, batch, cp)
        ref_loss, ref_metrics, ref_grads = reference(mixer, batch)
        total_tokens = tokens.clone()
        dist.all_reduce(total_tokens, group=group)
        results.append({"case": f"{mixer}/{layout}", "loss": float(loss), "loss_diff": abs(float(loss - ref_loss)),
                        "metric_diff": _compare_metrics(metrics, ref_metrics), "grad_diff": _max_diff(grads, ref_grads),
                        "grad_scale": max(float(g.abs().max()) for g in ref_grads),
                        "tokens": int(total_tokens), "ref_tokens": batch.num_tokens})
    return results


def _dp2_cp2_worker(rank: int, world_size: int) -> dict:
    from lightning.fabric.plugins.environments import LightningEnvironment

    from mmgrow.parallel.strategy import ContextParallelStrategy

    os.environ["LOCAL_RANK"] = str(rank)  # one node of 4 "devices": LightningEnvironment reads this
    strategy = ContextParallelStrategy(context_parallel=2, parallel_devices=[torch.device("cpu")] * world_size,
                                       cluster_environment=LightningEnvironment())
    strategy.setup_distributed()  # the default group exists already: this builds the (dp, cp) mesh only
    cp = strategy.context_parallel_handle
    sampler = strategy.distributed_sampler_kwargs
    batches = [make_batch(seed=10), make_batch(seed=11, length=15)]
    batch = batches[sampler["rank"]]
    loss, metrics, grads, _ = _step("ring", batch, cp)
    refs = [reference("ring", b) for b in batches]
    mean_grads = [(a + b) / 2 for a, b in zip(refs[0][2], refs[1][2])]
    return {"cp_rank": cp.rank, "cp_size": cp.world_size, "sampler": sampler,
            "mesh": strategy.device_mesh.mesh.tolist(), "loss_diff": abs(float(loss - refs[sampler["rank"]][0])),
            "metric_diff": _compare_metrics(metrics, refs[sampler["rank"]][1]), "grad_diff": _max_diff(grads, mean_grads)}


def test_two_rank_context_parallel_loss_and_gradients_equal_single_process():
    results = run_distributed(_cp2_worker, 2, timeout=240)
    for rank_results in results:
        for r in rank_results:
            assert r["loss_diff"] <= TOL, r
            assert r["metric_diff"] <= TOL, r
            assert r["grad_diff"] <= TOL * max(1.0, r["grad_scale"]), r
            assert r["tokens"] == r["ref_tokens"], r  # every token counted once over the group
    # both ranks report the same (global) loss, and the cases differ from one another
    assert [r["loss"] for r in results[0]] == [r["loss"] for r in results[1]]
    assert len({round(r["loss"], 6) for r in results[0][:4:2]}) == 2
    assert round(results[0][4]["loss"], 6) != round(results[0][2]["loss"], 6)  # the condition reaches the loss


@pytest.mark.slow  # 4 processes: ~30 s on 2 cores
def test_dp2_cp2_mesh_sampler_and_ddp_averaged_gradients():
    results = run_distributed(_dp2_cp2_worker, 4, timeout=240)
    assert [(r["sampler"]["rank"], r["cp_rank"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["sampler"]["num_replicas"] == 2 and r["cp_size"] == 2 for r in results)
    assert results[0]["mesh"] == [[0, 1], [2, 3]]
    for r in results:
        assert r["loss_diff"] <= TOL and r["metric_diff"] <= TOL and r["grad_diff"] <= TOL, r


# --------------------------------------------------------------------------------------------------
# single-process pieces
# --------------------------------------------------------------------------------------------------


def test_padding_changes_neither_loss_nor_gradients():
    batch = make_batch(seed=3)
    padded = pad_to_multiple(batch, 8)
    assert padded.input_ids.shape[1] == 16 and pad_to_multiple(padded, 8) is padded
    assert padded.num_tokens == batch.num_tokens and float(padded.loss_mask[:, 13:].sum()) == 0
    a, ma, ga = reference("ring", batch)
    b, mb, gb = reference("ring", padded)
    assert abs(float(a - b)) <= TOL and _compare_metrics(ma, mb) <= TOL and _max_diff(ga, gb) <= TOL


def test_unsupported_mixer_is_named_and_ring_suggested():
    from mmgrow.layers.attention import FullAttention
    from mmgrow.models.unified import UnifiedModel

    model = UnifiedModel(token_space=SIZES, dim=16, depth=2, mixer=[PositionalPerTokenMixer, FullAttention])
    with pytest.raises(MixerCapabilityError, match=r"FullAttention \(layer 1\).*class_path: ring"):
        require_context_parallel_mixers(model)
    require_context_parallel_mixers(make_model("ring"))


def test_strategy_sizes_and_sampler():
    from lightning.fabric.plugins.environments import LightningEnvironment

    from mmgrow.parallel.strategy import ContextParallelStrategy

    def strategy(devices: int, **kw):
        s = ContextParallelStrategy(parallel_devices=[torch.device("cpu")] * devices,
                                    cluster_environment=LightningEnvironment(), **kw)
        s.set_world_ranks()
        return s

    with pytest.raises(ValueError, match="world size 3 .* not divisible by context_parallel=2"):
        strategy(3, context_parallel=2)._check_sizes()
    assert strategy(4, context_parallel=2).distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}
    assert strategy(4).distributed_sampler_kwargs == {"num_replicas": 4, "rank": 0}  # cp = 1: DDP's
    assert strategy(4, context_parallel=None).context_parallel == 4
    assert strategy(4, context_parallel=2).context_parallel_handle is None  # built in setup_distributed
    with pytest.raises(ValueError, match="layout must be one of"):
        ContextParallelStrategy(layout="spiral")
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["context_parallel"]["strategy"] is ContextParallelStrategy
