"""Activation checkpointing and ``compile_blocks`` change memory and speed, never the numbers.

Single process. Each model (ring / blockwise / full attention; a recurrent mixer with a memory branch)
is built twice from one seed; one copy gets :func:`mmgrow.parallel.activation_checkpoint.checkpoint_blocks`.
In float64 the loss and every parameter gradient must agree to 1e-12 (recomputation replays the same
kernels on the same inputs, so only summation-order noise could differ -- and it does not), and the
bytes autograd keeps for the backward (counted with ``torch.autograd.graph.saved_tensors_hooks``) must
drop. ``compile_blocks`` is checked against eager in float32 (see ``COMPILE_RTOL``).
"""

from __future__ import annotations

import copy

import pytest
import torch

from mmgrow.batch import TokenBatch

SIZES = {"text": 11, "video": 7}
LENGTH = 16
TOL = 1e-12

MIXERS = {
    "ring": {"class_path": "ring", "init_args": {"num_heads": 2, "query_block": 4, "key_block": 4}},
    "blockwise": {"class_path": "blockwise", "init_args": {"num_heads": 2, "query_block": 4, "key_block": 4}},
    "full": {"class_path": "full", "init_args": {"num_heads": 2}},
    "gated_deltanet+memory": {"class_path": "gated_deltanet", "init_args": {"num_heads": 2}},
}
MEMORY = {"gated_deltanet+memory": {"class_path": "ttt_linear"}}


def make_batch(seed: int, rows: int = 2) -> TokenBatch:
    """``rows`` rows of two packed examples each (segment boundary at 7), random modalities, a few
    masked-out targets."""
    from mmgrow.tokenspace import TokenSpace

    space = TokenSpace.from_dict(SIZES)
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(rows, LENGTH, dtype=torch.long)
    seg[:, 7:] = 1
    mods = (torch.rand(rows, LENGTH, generator=g) < 0.5).long()
    local = torch.where(mods == 0, torch.randint(0, SIZES["text"], seg.shape, generator=g),
                        torch.randint(0, SIZES["video"], seg.shape, generator=g))
    ids = local + mods * space.offset("video")
    positions = torch.cat([torch.arange(7), torch.arange(LENGTH - 7)]).expand(rows, -1).clone()
    loss_mask = (torch.rand(rows, LENGTH, generator=g) < 0.9).float()
    loss_mask[:, 0] = 0
    return TokenBatch(input_ids=ids, modality_ids=mods, positions=positions, segment_ids=seg,
                      block_ids=torch.full_like(seg, -1), loss_mask=loss_mask, example_weight=torch.ones(rows, LENGTH))


def make_model(name: str, dtype: torch.dtype = torch.float64):
    from mmgrow.models.factories import factory_from_spec
    from mmgrow.models.unified import UnifiedModel

    torch.manual_seed(0)
    memory = factory_from_spec(MEMORY[name]) if name in MEMORY else None
    return UnifiedModel(token_space=SIZES, dim=16, depth=2, mixer=factory_from_spec(MIXERS[name]),
                        memory=memory).to(dtype)


def loss_grads_saved(model, batch) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients, and the bytes of every distinct tensor autograd saved during the forward."""
    from mmgrow.objectives.autoregressive import AutoregressiveObjective

    objective = AutoregressiveObjective()
    objective.bind(model.token_space)
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # views of one storage (and parameters saved by several ops) count once
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = objective.step(model, batch)[0]
    loss.backward()
    params = {n for n, _ in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == params, sorted(params - set(grads))
    return float(loss.detach()), grads, sum(kept.values())


@pytest.mark.parametrize("name", list(MIXERS))
def test_checkpointing_keeps_float64_gradients_and_saves_memory(name):
    from mmgrow.parallel.activation_checkpoint import checkpoint_blocks

    batch = make_batch(1)
    plain = make_model(name)
    checkpointed = copy.deepcopy(plain)
    assert checkpoint_blocks(checkpointed) == 2
    loss_ref, grads_ref, saved_ref = loss_grads_saved(plain, batch)
    loss, grads, saved = loss_grads_saved(checkpointed, batch)
    assert abs(loss - loss_ref) <= TOL * abs(loss_ref), (loss, loss_ref)
    scale = max(float(g.abs().max()) for g in grads_ref.values())
    assert scale > 1e-4  # the gradients are not trivially zero
    worst = max(float((grads[n] - grads_ref[n]).abs().max()) for n in grads_ref)
    assert worst <= TOL * scale, (name, worst)
    # measured 0.10 (attention) and 0.010 (gated_deltanet + ttt_linear memory) of the plain model's saved bytes:
    # each block keeps only its [B, T, D] input instead of everything inside it
    assert saved < 0.25 * saved_ref, (name, saved, saved_ref)


def test_checkpointing_is_off_without_grad_and_with_decoding_state():
    """Inference (no grad) and stateful decoding run the plain forward: nothing to recompute."""
    from mmgrow.parallel.activation_checkpoint import checkpoint_blocks

    model = make_model("full")
    checkpoint_blocks(model)
    block = model.blocks[0]
    x = torch.randn(1, 4, 16, dtype=torch.float64, requires_grad=True)
    calls = []
    original = block._forward

    def spy(*args):
        calls.append(torch.is_grad_enabled())
        return original(*args)

    block._forward = spy
    from mmgrow.protocols import SeqContext

    ctx = SeqContext(positions=torch.arange(4)[None])
    y, _ = block(x, ctx)
    y.sum().backward()
    assert calls == [True, True], calls  # forward + recompute in backward
    calls.clear()
    with torch.no_grad():
        block(x, ctx)
    assert calls == [False], calls
    calls.clear()
    state = block.init_state(1, "cpu", torch.float64)
    y, new_state = block(x, ctx, state)
    y.sum().backward()
    assert calls == [True] and new_state is not None, calls  # decoding: plain forward, the state comes back


# float32 eps is 1.2e-7; aot_eager decomposes ops (e.g. RMSNorm, SwiGLU) into primitives whose sums run in
# another order. Measured: loss identical, gradients within 2.6e-7 of the largest gradient (ring, gated_deltanet
# + memory, full; inductor: 5.9e-8). 2e-6 (about 16 ulp at the gradient scale) leaves room, while a wrong
# gradient (a dropped branch, a detached input) is off by O(1).
COMPILE_RTOL = 2e-6


def _compiled_vs_eager(name: str, options: dict, checkpoint: bool = False) -> tuple[float, float, int]:
    from mmgrow.parallel.activation_checkpoint import checkpoint_blocks
    from mmgrow.parallel.parallelize import ParallelPlan, parallelize

    batch = make_batch(3)
    eager = make_model(name, torch.float32)
    compiled = copy.deepcopy(eager)
    done = parallelize(compiled, ParallelPlan(activation_checkpointing=checkpoint, compile_blocks=options))
    if checkpoint:
        checkpoint_blocks(eager)
    loss_ref, grads_ref, _ = loss_grads_saved(eager, batch)
    loss, grads, _ = loss_grads_saved(compiled, batch)
    scale = max(float(g.abs().max()) for g in grads_ref.values())
    worst = max(float((grads[n] - grads_ref[n]).abs().max()) for n in grads_ref) / scale
    return abs(loss - loss_ref) / abs(loss_ref), worst, done.get("compiled_blocks", 0)


@pytest.mark.parametrize("name,checkpoint", [("ring", False), ("gated_deltanet+memory", True)])
def test_compile_blocks_matches_eager_float32(name, checkpoint):
    """aot_eager: the compile path (dynamo capture, AOT autograd) without needing a C++ compiler; with
    activation checkpointing too (parallelize's order: checkpoint, then compile)."""
    torch._dynamo.reset()
    loss_rel, grad_rel, blocks = _compiled_vs_eager(name, {"backend": "aot_eager"}, checkpoint)
    assert blocks == 2
    assert loss_rel <= COMPILE_RTOL and grad_rel <= COMPILE_RTOL, (name, loss_rel, grad_rel)
    # the blocks really went through dynamo (an option that silently stayed eager would pass the check above)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


@pytest.mark.slow
def test_compile_blocks_inductor_matches_eager_float32():
    """``compile_blocks: true`` = inductor: C++ kernels generated and built here (about 30 s on a loaded CPU)."""
    torch._dynamo.reset()
    loss_rel, grad_rel, blocks = _compiled_vs_eager("full", True)
    assert blocks == 2
    assert loss_rel <= COMPILE_RTOL and grad_rel <= COMPILE_RTOL, (loss_rel, grad_rel)


@pytest.mark.parametrize("value,expected", [(False, None), (None, None), (True, {}),
                                            ({"backend": "aot_eager", "dynamic": False},
                                             {"backend": "aot_eager", "dynamic": False})])
def test_compile_options_accepts_bool_or_compile_kwargs(value, expected):
    from mmgrow.parallel.compile import compile_options

    assert compile_options(value) == expected


def test_compile_options_rejects_typos_and_other_types():
    from mmgrow.parallel.compile import compile_options

    with pytest.raises(ValueError, match=r"unknown torch.compile argument\(s\) \['backnd'\]"):
        compile_options({"backnd": "aot_eager"})
    with pytest.raises(TypeError, match="true/false or a mapping"):
        compile_options("inductor")
