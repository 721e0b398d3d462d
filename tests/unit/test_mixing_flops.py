"""FLOPs per token that know the mixer: each mixer's ``mixing_flops`` against a hand computation and, for the
chunked ops (SSD, gated delta rule, TTT dual form), against ``torch.utils.flop_counter.FlopCounterMode`` run on
the op's forward; the model total ``6 N + 3 sum mixing_flops`` (memory branches twice when bidirectional)."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmgrow.layers.attention import FullAttention
from mmgrow.layers.blockwise import BlockwiseAttention
from mmgrow.layers.gated_deltanet import GatedDeltaNet
from mmgrow.layers.local import LocalAttention
from mmgrow.layers.mamba2 import Mamba2
from mmgrow.layers.sliding_window import SlidingWindowAttention
from mmgrow.layers.ttt import TTTMLP, TTTLinear
from mmgrow.models.gated_memory import GatedMemory
from mmgrow.ops.gated_delta import gated_delta_chunked, gated_delta_chunked_flops
from mmgrow.ops.ssd import ssd_chunked, ssd_chunked_flops
from mmgrow.ops.ttt_dual import ttt_dual
from mmgrow.ops.ttt_inner import InnerParams, inner_shapes
from mmgrow.training.scaling_record import flops_per_token, model_flops_per_token, split_parameters

ROOT = Path(__file__).resolve().parents[2]
F64 = torch.float64


def _counted(fn) -> int:
    """FLOPs of the matmuls ``fn`` runs (FlopCounterMode counts mm/bmm/matmul, a multiply-add = 2)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------
# attention family: hand computations


def test_attention_keeps_kaplans_term_and_windows_cut_it():
    full = FullAttention(dim=32, num_heads=4)  # d_attn = 4 * 8 = 32
    assert full.mixing_flops(100) == 2 * 100 * 32  # 6400
    wide = FullAttention(dim=32, num_heads=4, head_dim=16)  # inner width 64, not dim
    assert wide.mixing_flops(100) == 2 * 100 * 64  # 12800
    assert BlockwiseAttention(dim=32, num_heads=4).mixing_flops(100) == 6400  # same attention, other kernel
    window = SlidingWindowAttention(dim=32, num_heads=4, window=16)
    assert window.mixing_flops(100) == 2 * 16 * 32  # 1024: the window, not the row
    assert window.mixing_flops(10) == 2 * 10 * 32  # 640: a row shorter than the window
    assert LocalAttention(dim=32, num_heads=4).mixing_flops(100) is None  # block length comes with the data


# ------------------------------------------------------------------------------------------------
# chunked ops: hand computation, then the FLOP counter on the op itself (it has no parameter matmuls)


def test_ssd_formula_by_hand_and_against_the_flop_counter():
    # H=4, P=8, G=2, N=6, Q=16, S=40 -> padded 48: per token (48/40) [4 (2*16*8 + 4*6*8) + 2*2*16*6]
    #   = 1.2 * (4 * 448 + 384) = 1.2 * 2176 = 2611.2
    assert ssd_chunked_flops(40, 4, 8, 6, 2, 16) == pytest.approx(2611.2, rel=1e-12)
    g = torch.Generator().manual_seed(0)
    Bt, T, H, P, G, N = 2, 40, 4, 8, 2, 6
    x = torch.randn(Bt, T, H, P, generator=g, dtype=F64)
    dt, A = torch.rand(Bt, T, H, generator=g, dtype=F64), -torch.rand(H, generator=g, dtype=F64)
    B, C = torch.randn(Bt, T, G, N, generator=g, dtype=F64), torch.randn(Bt, T, G, N, generator=g, dtype=F64)
    for Q in (16, 64):  # padded chunks, and one chunk shortened to the row (Q = min(64, 40))
        measured = _counted(lambda q=Q: ssd_chunked(x, dt, A, B, C, chunk_size=q)) / (Bt * T)
        # exact: the formula counts the same matmuls, padding included
        assert measured == pytest.approx(ssd_chunked_flops(T, H, P, N, G, Q), rel=1e-12)


def test_gated_delta_formula_by_hand_and_against_the_flop_counter():
    # H=4, K=8, V=12, L=16, S=40 -> padded 48: (48/40) 4 [4*16*8 + 2*16*12 + 6*8*12 + 15*20]
    #   = 1.2 * 4 * (512 + 384 + 576 + 300) = 1.2 * 4 * 1772 = 8505.6
    assert gated_delta_chunked_flops(40, 4, 8, 12, 16) == pytest.approx(8505.6, rel=1e-12)
    g = torch.Generator().manual_seed(1)
    Bt, T, H, K, V, L = 2, 40, 4, 8, 12, 16
    q, k = (torch.randn(Bt, T, H, K, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(Bt, T, H, V, generator=g, dtype=F64)
    gate, beta = -torch.rand(Bt, T, H, generator=g, dtype=F64), torch.rand(Bt, T, H, generator=g, dtype=F64)
    measured = _counted(lambda: gated_delta_chunked(q, k, v, gate, beta, chunk_size=L)) / (Bt * T)
    # FlopCounterMode does not count the triangular solve: the formula minus the solve term L (L-1) (K+V)
    # per chunk and head (here 1.2 * 4 * 300 = 1440) must equal the counter exactly
    solve = 1.2 * H * (L - 1) * (K + V)
    assert measured == pytest.approx(gated_delta_chunked_flops(T, H, K, V, L) - solve, rel=1e-12)
    assert solve / gated_delta_chunked_flops(T, H, K, V, L) < 0.2  # the uncounted part is the smaller one


def _ttt_counted(kind: str, T: int, H: int, d: int, b: int) -> float:
    g = torch.Generator().manual_seed(2)
    shapes = inner_shapes(kind, d)
    params = InnerParams([0.1 * torch.randn(H, i, o, generator=g, dtype=F64) for i, o in shapes],
                         [torch.zeros(H, o, dtype=F64) for _, o in shapes], torch.ones(H, d, dtype=F64),
                         torch.zeros(H, d, dtype=F64))
    q, k, target = (torch.randn(1, H, T, d, generator=g, dtype=F64) for _ in range(3))
    lr = torch.full((1, H, T), 0.1, dtype=F64)
    return _counted(lambda: ttt_dual(q, k, target, lr, torch.ones(T, dtype=F64), params, mini_batch_size=b)) / T


@pytest.mark.parametrize("layer_cls,kind,hand", [
    # H=2, d=8, b=4, S=10 -> padded 12: Linear (12/10) 2 (4*4*8 + 6*64) = 1.2 * 2 * 512 = 1228.8
    (TTTLinear, "linear", 1228.8),
    # MLP (12/10) 2 (20*4*8 + 56*64) = 1.2 * 2 * 4224 = 10137.6
    (TTTMLP, "mlp", 10137.6),
])
def test_ttt_formula_by_hand_and_against_the_flop_counter(layer_cls, kind, hand):
    layer = layer_cls(dim=16, num_heads=2, mini_batch_size=4)  # head dim 8
    assert layer.mixing_flops(10) == pytest.approx(hand, rel=1e-12)
    # the dual op's matmuls, counted: equal to the formula (both count the same matmuls, padding included)
    assert _ttt_counted(kind, 10, 2, 8, 4) == pytest.approx(hand, rel=1e-12)
    assert _ttt_counted(kind, 32, 2, 8, 4) == pytest.approx(layer.mixing_flops(32), rel=1e-12)


def test_mamba2_and_gated_deltanet_layers_use_their_op_counts():
    m = Mamba2(dim=16, d_state=8, headdim=8, expand=2, chunk_size=16)  # d_inner 32: 4 heads of 8, 1 group
    # S=20 -> Q=16, padded 32: (32/20) [4 (2*16*8 + 4*8*8) + 1*2*16*8] = 1.6 * (4*512 + 256) = 3686.4
    assert m.mixing_flops(20) == pytest.approx(3686.4, rel=1e-12)
    gdn = GatedDeltaNet(dim=16, num_heads=2, head_dim=8, chunk_size=8)
    K, V = gdn.head_k_dim, gdn.head_v_dim
    assert gdn.mixing_flops(8) == pytest.approx(2 * (4 * 8 * K + 2 * 8 * V + 6 * K * V + 7 * (K + V)), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# model totals


class _Blocks(nn.Module):
    def __init__(self, *mixers: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(mixers)


def test_all_attention_model_gives_kaplans_six_n_plus_six_l_s_d():
    model = _Blocks(FullAttention(dim=32, num_heads=4), FullAttention(dim=32, num_heads=4))
    n, _ = split_parameters(model)
    count = model_flops_per_token(model, n, 64)
    assert count.per_token == flops_per_token(n, depth=2, context=64, dim=32) == 6 * n + 6 * 2 * 64 * 32
    assert not count.partial


def test_bidirectional_memory_counts_twice_shared_mixers_once_and_unknowns_flag_partial():
    ttt = TTTLinear(dim=16, num_heads=2, mini_batch_size=4)
    one = ttt.mixing_flops(12)  # 2 (4*4*8 + 6*64) = 1024
    assert one == 1024
    forward_only = _Blocks(GatedMemory(16, ttt))
    both_ways = _Blocks(GatedMemory(16, TTTLinear(dim=16, num_heads=2, mini_batch_size=4), bidirectional=True))
    assert model_flops_per_token(forward_only, 0, 12).per_token == 3 * 1024
    assert model_flops_per_token(both_ways, 0, 12).per_token == 3 * 2 * 1024
    attn = FullAttention(dim=16, num_heads=2)
    shared = _Blocks(attn, attn)  # one module reached twice: counted once
    assert model_flops_per_token(shared, 0, 12).per_token == 3 * 2 * 12 * 16
    mixed = _Blocks(LocalAttention(dim=16, num_heads=2), attn)
    count = model_flops_per_token(mixed, 100, 12)
    assert count.per_token == 6 * 100 + 3 * 2 * 12 * 16 and count.partial and count.unknown == ["blocks.0"]


def test_summary_of_a_tiny_fit_carries_the_mixer_aware_count(tmp_path):
    from mmgrow.training.cli import build_cli

    cli = build_cli(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), "--model.dim", "32",
                     "--model.depth", "2", "--model.mixer", "{class_path: sliding_window, init_args: {window: 5}}",
                     "--data.num_train", "16", "--data.num_val", "4", "--data.dataset_args", "{frames: 2, size: 32}",
                     "--data.codec_args", "{video: {grid: 4}}", "--data.batch_size", "4", "--trainer.max_steps", "2",
                     "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                     "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(tmp_path)])
    s = json.loads((tmp_path / "summary.json").read_text())
    non_emb, _ = split_parameters(cli.model.model)
    windows = [m for m in cli.model.model.modules() if isinstance(m, SlidingWindowAttention)]
    assert len(windows) == 2 and s["seq_len"] > 5
    d_attn = windows[0].num_heads * windows[0].head_dim
    assert s["flops_per_token"] == 6 * non_emb + 3 * 2 * (2 * 5 * d_attn)  # the window, not the row
    assert s["flops_per_token"] < flops_per_token(non_emb, 2, s["seq_len"], 32)
    assert s["flops_per_token_partial"] is False and s["flops"] == s["flops_per_token"] * s["tokens_seen"]


def test_unified_model_counts_block_mixers_and_bidirectional_memory_branches():
    from mmgrow.models.unified import UnifiedModel

    model = UnifiedModel(token_space={"text": 50}, dim=16, depth=3,
                         mixer=lambda dim, layer_idx: FullAttention(dim=dim, layer_idx=layer_idx, num_heads=2),
                         memory=lambda dim, layer_idx: TTTLinear(dim=dim, layer_idx=layer_idx, num_heads=2,
                                                                 mini_batch_size=4, flavour="video"),
                         memory_placement={"layers": [0, -1], "bidirectional": True})
    n, _ = split_parameters(model)
    # S = 12: attention 2*12*16 = 384 per block (3 blocks); TTT-Linear 2 (4*4*8 + 6*64) = 1024 per pass,
    # 2 passes in each of 2 branches -> 6 N + 3 (3*384 + 4*1024) = 6 N + 3 * 5248
    assert model_flops_per_token(model, n, 12).per_token == 6 * n + 3 * 5248
