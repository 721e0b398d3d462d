"""Decoding with the KV cache sharded over a context-parallel group (2 and 3 gloo CPU processes).

Oracle: the same float64 ``UnifiedModel`` (two ring-attention layers, GQA, tiles smaller than a
shard) decoding in ONE process with the ordinary :class:`~mmgrow.layers.attention.KVCache` (no
``ctx.cp``: the layer is plain blockwise attention), greedy. Each world size is launched once; every
rank loops over the cases (both layouts x causal / sliding window x prompt lengths that need padding
or not) and returns, per case, the largest logit difference from the oracle at every step, whether
the greedy tokens equal the oracle's (and ``objective.generate``'s on the plain model), whether all
ranks returned identical tokens and logits, and its cache slice sizes. The tests assert those.

A prompt no single rank could hold cannot be tested by memory here; instead every rank's cache is
checked to hold exactly its shard's real prompt tokens plus its share of the new ones (fewest-first),
never the whole prompt.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.distributed as dist

from mmgrow.layers.attention import FullAttention, KVCache
from mmgrow.layers.ring import RingAttention
from mmgrow.models.unified import UnifiedModel
from mmgrow.objectives.autoregressive import AutoregressiveObjective
from mmgrow.ops.attention_ref import dense_attention
from mmgrow.ops.blockwise import TilePlan, forward_tiles
from mmgrow.ops.ring_decode import ShardedKVCache, merge_over_ranks, sharded_decode_attention
from mmgrow.ops.token_meta import TokenMeta, tile_mask
from mmgrow.parallel.context_decode import generate_context_parallel
from mmgrow.parallel.sharding import shard, shard_context, shard_indices, shard_multiple
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, ContextParallel, MaskSpec, MixerCapabilityError, SeqContext
from mmgrow.testing.distributed import run_distributed

VOCAB = {"text": 29}
NEW_TOKENS = 6
BATCH = 2
TOL = 1e-10
CASES = [  # (layout, mask, prompt length)
    ("zigzag", MaskSpec(), 21), ("contiguous", MaskSpec(), 21), ("zigzag", MaskSpec(), 24),
    ("zigzag", MaskSpec(window=5), 21), ("contiguous", MaskSpec(window=7), 22),
    ("zigzag", MaskSpec(), 2),  # W = 3: rank 2's shard is all padding, so its slice starts empty
]


def _model(block: int = 3) -> UnifiedModel:
    """Two ring layers (GQA); ``block``-query x ``block + 1``-key tiles (smaller than a shard by default)."""
    torch.manual_seed(0)
    factory = functools.partial(RingAttention, num_heads=4, num_kv_heads=2, query_block=block, key_block=block + 1)
    model = UnifiedModel(token_space=VOCAB, dim=16, depth=2, mixer=factory, init_std=0.3).double()
    return model.eval()


def _prompt(T0: int) -> torch.Tensor:
    return torch.randint(0, VOCAB["text"], (BATCH, T0), generator=torch.Generator().manual_seed(T0))


def _reference(model: UnifiedModel, prompt: torch.Tensor, mask: MaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return _reference_n(model, prompt, NEW_TOKENS, mask)


@torch.no_grad()
def _reference_n(model: UnifiedModel, prompt: torch.Tensor, new_tokens: int, mask: MaskSpec | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding in one process with the ordinary KV cache: ``(tokens [B, N], logits [B, N, V])``."""
    mask = MaskSpec() if mask is None else mask
    B, T0 = prompt.shape
    states = model.init_states(B, "cpu", torch.float64)
    assert all(isinstance(s, KVCache) for s in states)
    out = model(prompt, SeqContext(positions=torch.arange(T0).expand(B, T0), mask=mask), states=states)
    tokens, logits = [], []
    for step in range(new_tokens):
        step_logits = out.logits(out.hidden[:, -1], "text")
        logits.append(step_logits)
        tokens.append(step_logits.argmax(-1))
        if step < new_tokens - 1:
            ctx = SeqContext(positions=torch.full((B, 1), T0 + step), mask=mask)
            out = model(tokens[-1][:, None], ctx, states=out.states)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def _expected_sizes(T0: int, world_size: int, layout: str) -> list[int]:
    """Real prompt tokens of each rank's shard, then the fed new tokens (all but the last) fewest-first."""
    T = T0 + (-T0 % shard_multiple(world_size, layout))
    sizes = [int((shard_indices(T, world_size, r, layout) < T0).sum()) for r in range(world_size)]
    for _ in range(NEW_TOKENS - 1):
        sizes[min(range(world_size), key=lambda r: (sizes[r], r))] += 1
    return sizes


def _worker(rank: int, world_size: int) -> list[dict]:
    model = _model()
    objective = AutoregressiveObjective().bind(VOCAB)
    results = []
    for layout, mask, T0 in CASES:
        prompt = _prompt(T0)
        ref_tokens, ref_logits = _reference(model, prompt, mask)
        plain_tokens = objective.generate(model, prompt, modality="text", max_new_tokens=NEW_TOKENS, greedy=True)
        cp = ContextParallel(group=None, rank=rank, world_size=world_size, layout=layout)
        res = generate_context_parallel(model, objective, prompt, cp, modality="text", max_new_tokens=NEW_TOKENS,
                                        greedy=True, mask=None if mask == MaskSpec() else mask, return_details=True)
        # identical on every rank: gather the logits and compare bitwise
        parts = [torch.empty_like(res.logits) for _ in range(world_size)]
        dist.all_gather(parts, res.logits.contiguous())
        caches = list(res.states)
        results.append({
            "case": (layout, mask.window, T0),
            "step_err": (res.logits - ref_logits).abs().amax(dim=(0, 2)).tolist(),
            "tokens_equal": bool(torch.equal(res.tokens, ref_tokens)),
            "plain_equal": bool(torch.equal(plain_tokens, ref_tokens)) if mask == MaskSpec() else True,
            "ranks_identical": all(torch.equal(p, parts[0]) for p in parts),
            "cache_types": sorted({type(c).__name__ for c in caches}),
            "sizes": [list(c.sizes) for c in caches],
            "local": [[c.size, c.k.shape[2], c.v.shape[2], c.index.shape[1]] for c in caches],
            "indices": [sorted(c.index[0].tolist()) for c in caches],
            "seen": [c.seen for c in caches],
        })
    results.append(_layer_cases(rank, world_size))
    # sampling with a different RNG seed on every rank: all ranks still decode group rank 0's samples
    prompt = _prompt(21)
    cp = ContextParallel(group=None, rank=rank, world_size=world_size)
    sampled = generate_context_parallel(model, objective, prompt, cp, modality="text", max_new_tokens=NEW_TOKENS,
                                        temperature=2.0, generator=torch.Generator().manual_seed(100 + rank))
    rank0 = objective.generate(model, prompt, modality="text", max_new_tokens=NEW_TOKENS, temperature=2.0,
                               generator=torch.Generator().manual_seed(100))
    mine = objective.generate(model, prompt, modality="text", max_new_tokens=NEW_TOKENS, temperature=2.0,
                              generator=torch.Generator().manual_seed(100 + rank))
    results.append({"sampled": sampled.tolist(), "rank0_seed": rank0.tolist(), "own_seed": mine.tolist()})
    return results


@torch.no_grad()
def _layer_cases(rank: int, world_size: int) -> dict:
    """One ring layer on a packed prompt (3 documents, a bidirectional block across shard boundaries,
    padding at the end), then 3 replicated tokens continuing the last document: the largest difference
    from the same layer with the ordinary KV cache in one process, prefill and decode outputs, per mask."""
    errors = {}
    for name, mask in (("causal", MaskSpec()), ("window 6", MaskSpec(window=6))):
        torch.manual_seed(3)
        layer = RingAttention(dim=16, num_heads=4, num_kv_heads=2, query_block=3, key_block=4).double().eval()
        B, T, D = 2, 24, 16
        seg = torch.tensor([0] * 9 + [1] * 10 + [2] * 3 + [PAD_SEGMENT] * 2).expand(B, T)
        pos = torch.cat([torch.arange(9), torch.arange(10), torch.arange(3), torch.zeros(2, dtype=torch.long)])
        blk = torch.full((T,), NO_BLOCK)
        blk[6:13] = 4
        ctx = SeqContext(positions=pos.expand(B, T), segment_ids=seg, block_ids=blk.expand(B, T), mask=mask)
        x = torch.randn(B, T, D, dtype=torch.float64)
        steps = [torch.randn(B, 1, D, dtype=torch.float64) for _ in range(3)]
        step_ctx = [SeqContext(positions=torch.full((B, 1), 3 + i), segment_ids=torch.full((B, 1), 2), mask=mask)
                    for i in range(len(steps))]

        ref, state = layer(x, ctx, layer.init_state(B, "cpu", torch.float64))
        ref_steps = []
        for i, xs in enumerate(steps):
            y, state = layer(xs, step_ctx[i], state)
            ref_steps.append(y)
        cp = ContextParallel(group=None, rank=rank, world_size=world_size, layout="zigzag")
        got, state = layer(shard(x, world_size, rank, "zigzag"), shard_context(ctx, cp),
                           layer.init_state(B, "cpu", torch.float64, cp=cp))
        err = float((got - shard(ref, world_size, rank, "zigzag")).abs().max())
        for i, xs in enumerate(steps):
            y, state = layer(xs, step_ctx[i], state)
            err = max(err, float((y - ref_steps[i]).abs().max()))
        errors[name] = (err, state.size, list(state.sizes))
    return errors


@functools.cache
def _run(world_size: int) -> list[list[dict]]:
    return run_distributed(_worker, world_size, timeout=180)


def _long_prompt_worker(rank: int, world_size: int, T0: int, new_tokens: int) -> dict:
    """Greedy decoding of a long prompt (128-token tiles); this rank's cached K/V bytes per layer."""
    model = _model(128)
    cp = ContextParallel(group=None, rank=rank, world_size=world_size)
    res = generate_context_parallel(model, AutoregressiveObjective().bind(VOCAB), _prompt(T0), cp, modality="text",
                                    max_new_tokens=new_tokens, greedy=True, return_details=True)
    # then as 2 context-parallel groups of 2 (a (dp=2, cp=2) layout), each decoding its own prompt
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    sub = ContextParallel(group=groups[rank // 2], rank=rank % 2, world_size=2, layout="contiguous")
    prompt = _prompt(13 + rank // 2)
    sub_tokens = generate_context_parallel(model, AutoregressiveObjective().bind(VOCAB), prompt, sub, modality="text",
                                           max_new_tokens=new_tokens, temperature=3.0,
                                           generator=torch.Generator().manual_seed(rank))
    return {"bytes": [c.k.nbytes + c.v.nbytes for c in res.states], "sizes": list(res.states[0].sizes),
            "tokens": res.tokens.tolist(), "sub_tokens": sub_tokens.tolist()}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_decode_matches_single_process_kv_cache(world_size):
    per_rank = _run(world_size)
    for case_idx, case in enumerate(per_rank[0][:len(CASES)]):
        for rank, results in enumerate(per_rank):
            got = results[case_idx]
            assert got["case"] == case["case"]
            assert max(got["step_err"]) <= TOL, (world_size, rank, got["case"], got["step_err"])
            assert got["tokens_equal"], (world_size, rank, got["case"])
            assert got["plain_equal"], (world_size, rank, got["case"])
            assert got["ranks_identical"], (world_size, rank, got["case"])
        print(world_size, case["case"], f"max logit error {max(case['step_err']):.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_caches_only_its_shard_and_share_of_new_tokens(world_size):
    per_rank = _run(world_size)
    for case_idx, (layout, _, T0) in enumerate(CASES):
        expected = _expected_sizes(T0, world_size, layout)
        stream = T0 + (-T0 % shard_multiple(world_size, layout)) + NEW_TOKENS - 1
        union = [set() for _ in range(2)]
        for rank, results in enumerate(per_rank):
            got = results[case_idx]
            assert got["cache_types"] == ["ShardedKVCache"], got["cache_types"]
            for layer in range(2):
                assert got["sizes"][layer] == expected, (world_size, got["case"], got["sizes"], expected)
                assert got["local"][layer] == [expected[rank]] * 4, (world_size, rank, got["case"], got["local"])
                assert expected[rank] < T0 + NEW_TOKENS - 1, "a rank holds the whole context"
                if T0 > NEW_TOKENS * world_size:
                    assert expected[rank] < T0, "a rank holds as many tokens as the prompt"
                assert got["seen"][layer] == stream
                assert not union[layer] & set(got["indices"][layer]), "a token is cached on two ranks"
                union[layer] |= set(got["indices"][layer])
        T = T0 + (-T0 % shard_multiple(world_size, layout))
        real = set(range(T0)) | set(range(T, T + NEW_TOKENS - 1))  # the padding is not cached anywhere
        assert union == [real, real], (world_size, layout, T0)
        assert max(expected) <= math.ceil((T0 + NEW_TOKENS - 1) / world_size) + 1, expected


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_sampling_ranks_decode_group_rank_0s_tokens(world_size):
    per_rank = [results[len(CASES) + 1] for results in _run(world_size)]
    assert all(r["sampled"] == per_rank[0]["sampled"] for r in per_rank)
    assert per_rank[0]["sampled"] == per_rank[0]["rank0_seed"]
    # the seeds differ enough that a rank left to its own RNG would have decoded something else
    assert any(r["own_seed"] != r["sampled"] for r in per_rank[1:])


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_layer_sharded_cache_with_documents_blocks_and_window(world_size):
    per_rank = [results[len(CASES)] for results in _run(world_size)]
    for rank, cases in enumerate(per_rank):
        for name, (err, size, sizes) in cases.items():
            assert err <= TOL, (world_size, rank, name, err)
            assert size == sizes[rank] and sum(sizes) == 22 + 3, (name, sizes)  # the 2 padding tokens dropped


@pytest.mark.slow
def test_long_prompt_cache_bytes_per_rank():
    """T0 = 1021 over 4 ranks (zigzag, padded to 1024): each rank caches a quarter of the K/V bytes of the
    single-process cache, and the decoded tokens equal single-process decoding. Then the same 4 processes as
    two groups of 2 (``cp.group`` a sub-group, as under a (dp, cp) mesh), sampling with per-rank seeds."""
    T0, new, W = 1021, 9, 4
    per_rank = run_distributed(_long_prompt_worker, W, T0, new, timeout=240)
    model = _model(128)
    ref_tokens, _ = _reference_n(model, _prompt(T0), new)
    whole = 2 * BATCH * 2 * 4 * (T0 + new - 1) * 8  # k and v, [B, Hk=2, S, hd=4] float64, per layer
    for rank, got in enumerate(per_rank):
        assert got["tokens"] == ref_tokens.tolist()
        assert sum(got["sizes"]) == T0 + new - 1
        for layer_bytes in got["bytes"]:
            assert layer_bytes == 2 * BATCH * 2 * 4 * got["sizes"][rank] * 8
            assert layer_bytes <= whole / W + 2 * BATCH * 2 * 4 * 8, (layer_bytes, whole)
    # sub-groups: each group follows its own group rank 0 (global ranks 0 and 2), whose seed decides
    for group_rank0 in (0, 2):
        prompt = _prompt(13 + group_rank0 // 2)
        expected = AutoregressiveObjective().bind(VOCAB).generate(
            model, prompt, modality="text", max_new_tokens=new, temperature=3.0,
            generator=torch.Generator().manual_seed(group_rank0))
        assert per_rank[group_rank0]["sub_tokens"] == per_rank[group_rank0 + 1]["sub_tokens"] == expected.tolist()
    print(f"K/V bytes per layer: single process {whole}, per rank {[g['bytes'][0] for g in per_rank]} "
          f"(sizes {per_rank[0]['sizes']})")


# ------------------------------------------------------------------------------------ single process


def test_merge_over_ranks_equals_attention_over_the_union():
    torch.manual_seed(1)
    B, H, Hk, T, S, hd = 2, 4, 2, 3, 17, 8
    q = torch.randn(B, H, T, hd, dtype=torch.float64)
    k, v = torch.randn(B, Hk, S, hd, dtype=torch.float64), torch.randn(B, Hk, S, hd, dtype=torch.float64)
    keys = TokenMeta(torch.arange(S).expand(B, S), torch.arange(S).expand(B, S))
    queries = TokenMeta(torch.arange(S - T, S).expand(B, T), torch.arange(S - T, S).expand(B, T))
    spec = MaskSpec(window=6)  # the first slice below then holds no visible key: an empty partial
    expected, expected_lse = dense_attention(q, k, v, tile_mask(queries, keys, spec))
    cuts = [0, 5, 6, 12, S]  # uneven slices, one of a single key
    outs, lses = zip(*(forward_tiles(q, k[:, :, a:b], v[:, :, a:b], TilePlan(queries, keys.slice(a, b), spec, 2, 3),
                                     1 / math.sqrt(hd)) for a, b in itertools.pairwise(cuts)))
    assert bool(torch.isinf(lses[0]).all())
    out, lse = merge_over_ranks(torch.stack(outs), torch.stack(lses))
    assert float((out - expected).abs().max()) <= 1e-12
    assert float((lse - expected_lse).abs().max()) <= 1e-12


def test_non_context_parallel_mixer_is_refused():
    cp = ContextParallel(group=None, rank=0, world_size=2)
    torch.manual_seed(0)
    ring = functools.partial(RingAttention, num_heads=4, num_kv_heads=2)
    full = functools.partial(FullAttention, num_heads=4, num_kv_heads=2)
    model = UnifiedModel(token_space=VOCAB, dim=16, depth=2, mixer=[ring, full]).double()
    with pytest.raises(MixerCapabilityError, match=r"these have not: FullAttention \(layer 1\); use"):
        generate_context_parallel(model, AutoregressiveObjective().bind(VOCAB), _prompt(8), cp, modality="text",
                                  max_new_tokens=2, greedy=True)


def _cache(sizes: tuple[int, ...], local: int, seen: int) -> ShardedKVCache:
    cp = ContextParallel(group=None, rank=0, world_size=len(sizes))
    kv = torch.zeros(1, 2, local, 4, dtype=torch.float64)
    ids = torch.zeros(1, local, dtype=torch.long)
    return ShardedKVCache(kv, kv.clone(), ids, ids.clone(), ids.clone(), ids.clone(), sizes, seen, cp)


def test_cache_size_mismatch_is_a_named_error():
    q = torch.zeros(1, 4, 1, 4, dtype=torch.float64)
    meta = TokenMeta(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="cache size mismatch on rank 0: it holds 3 tokens but .* says 4"):
        sharded_decode_attention(q, meta, _cache((4, 4), 3, 8), MaskSpec())
    with pytest.raises(ValueError, match="sizes for 3 ranks, but its group has world size 2"):
        cache = _cache((3, 3), 3, 8)
        cache.sizes = (3, 3, 3)
        sharded_decode_attention(q, meta, cache, MaskSpec())
    with pytest.raises(ValueError, match="cache size mismatch: 6 tokens cached over the group but only 5 seen"):
        sharded_decode_attention(q, meta, _cache((3, 3), 3, 5), MaskSpec())


def test_fewest_cached_tokens_get_the_new_ones_ties_to_lowest_rank():
    assert _cache((5, 4, 4), 5, 13).next_owner() == 1
    assert _cache((4, 4, 4), 4, 12).next_owner() == 0
    cache = _cache((4, 3), 4, 7)
    k = torch.ones(1, 2, 1, 4, dtype=torch.float64)
    meta = TokenMeta(*(torch.full((1, 1), 7, dtype=torch.long) for _ in range(4)))
    after = cache.append(k, k, meta)  # rank 1 has fewer: this rank (0) keeps its slice, only the counts move
    assert after.sizes == (4, 4) and after.size == 4 and after.seen == 8
    after = after.append(k, k, meta)  # tie: rank 0 takes it
    assert after.sizes == (5, 4) and after.size == 5 and float(after.k[0, 0, -1, 0]) == 1.0


def test_sharded_chunk_on_a_filled_cache_is_refused():
    layer = RingAttention(dim=16, num_heads=4, num_kv_heads=2).double()
    cp = ContextParallel(group=None, rank=0, world_size=2)
    x = torch.zeros(1, 4, 16, dtype=torch.float64)
    ctx = SeqContext(positions=torch.arange(4).expand(1, 4), cp=cp)
    with pytest.raises(MixerCapabilityError, match="can only prefill an empty cache, but this one has seen 6"):
        layer(x, ctx, _cache((3, 3), 3, 6))
    filled = layer(x, SeqContext(positions=torch.arange(4).expand(1, 4)), layer.init_state(1, "cpu", torch.float64))[1]
    with pytest.raises(MixerCapabilityError, match="has seen 4 tokens"):
        layer(x, ctx, filled)  # an ordinary cache that already holds tokens
    assert isinstance(layer.init_state(1, "cpu", torch.float64, cp=cp), ShardedKVCache)
    assert isinstance(layer.init_state(1, "cpu", torch.float64), KVCache)
