"""VectorQuantizer: nearest codes vs a float64 brute force, straight-through gradients, the EMA
equations on a hand-sized example, dead-code restarts, perplexity/usage and input errors."""

import math

import pytest
import torch

from mmgrow.tokenizers.vector_quantizer import USAGE_DECAY, VectorQuantizer


def brute_force_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """[M, C], [K, C] -> [M]: nearest code by explicit float64 distances, first index on ties."""
    out = []
    for row in z.double():
        dists = [float(((row - e.double()) ** 2).sum()) for e in codebook]
        out.append(min(range(len(dists)), key=lambda k: (dists[k], k)))
    return torch.tensor(out)


def initialised_vq(num_codes=32, code_dim=8, dtype=torch.float64, seed=0, **kw) -> VectorQuantizer:
    torch.manual_seed(seed)
    vq = VectorQuantizer(num_codes, code_dim, **kw).to(dtype)
    vq.initialised.fill_(True)  # keep the random codebook (no data-dependent init)
    return vq


def test_codes_and_quantized_match_float64_brute_force():
    vq = initialised_vq().eval()
    z = torch.randn(3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = vq(z)
    expected = brute_force_codes(z.reshape(-1, 8), vq.codebook).reshape(3, 5)
    assert out.codes.dtype == torch.int64 and out.codes.shape == (3, 5)
    assert torch.equal(out.codes, expected)
    assert torch.equal(out.quantized, vq.codebook[expected])
    assert torch.equal(vq.lookup(expected), vq.codebook[expected])


def test_float32_codes_agree_with_float64_wherever_the_nearest_code_is_clear():
    vq = initialised_vq(dtype=torch.float32).eval()
    z = torch.randn(400, 8, generator=torch.Generator().manual_seed(2))
    codes = vq(z).codes
    d = ((z.double()[:, None] - vq.codebook.double()[None]) ** 2).sum(-1)
    top2 = d.topk(2, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4
    assert clear.float().mean() > 0.95  # the check below covers almost every row
    assert torch.equal(codes[clear], d.argmin(-1)[clear])


def test_straight_through_gradient_is_identity_and_commitment_gradient_matches():
    vq = initialised_vq(beta=0.3).eval()
    z = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, 8, dtype=torch.float64)
    out = vq(z)
    (out.quantized * weights).sum().backward()
    assert torch.equal(z.grad, weights)  # d quantized / d z = I
    z.grad = None
    out = vq(z)
    out.loss.backward()
    q = vq.codebook[out.codes]
    expected = 2 * 0.3 * (z.detach() - q) / z.numel()  # d/dz beta * mean((z - sg(q))^2)
    torch.testing.assert_close(z.grad, expected, rtol=1e-12, atol=1e-15)
    assert len(list(vq.parameters())) == 0  # an EMA codebook gets no gradient at all


def test_codebook_learned_by_gradient_without_ema():
    vq = initialised_vq(num_codes=4, code_dim=3, ema_decay=None, beta=0.25).eval()
    z = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = vq(z)
    out.loss.backward()
    codes = brute_force_codes(z, vq.codebook.detach())
    expected = torch.zeros_like(vq.codebook)
    for row, k in zip(z, codes.tolist()):  # d/de_k mean((sg(z) - e_k)^2) summed over the rows using k
        expected[k] += 2 * (vq.codebook.detach()[k] - row) / z.numel()
    torch.testing.assert_close(vq.codebook.grad, expected, rtol=1e-12, atol=1e-15)
    q = vq.codebook.detach()[codes]
    loss_ref = 1.25 * ((z - q) ** 2).mean()  # commitment (beta) + codebook term, equal values
    torch.testing.assert_close(out.loss.detach(), loss_ref, rtol=1e-12, atol=0)


def test_ema_update_follows_the_equations_on_a_tiny_example():
    gamma, eps = 0.8, 1e-5
    vq = VectorQuantizer(3, 2, ema_decay=gamma, dead_code_threshold=0.0, eps=eps).double().train()
    vq.initialised.fill_(True)
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    cluster = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    sums = torch.tensor([[0.05, -0.02], [0.33, 0.01], [0.0, 0.19]], dtype=torch.float64)
    vq.codebook.copy_(codebook)
    vq.cluster_size.copy_(cluster)
    vq.embed_sum.copy_(sums)
    z = torch.tensor([[0.1, 0.1], [0.9, 0.2], [1.2, -0.1], [0.2, 0.8], [-0.1, 0.0]], dtype=torch.float64)
    vq(z)
    # hand-written reference: assignments 0, 1, 1, 2, 0
    m = 5
    n = [2 / m, 2 / m, 1 / m]
    s = [[(0.1 - 0.1) / m, (0.1 + 0.0) / m], [(0.9 + 1.2) / m, (0.2 - 0.1) / m], [0.2 / m, 0.8 / m]]
    new_n = [gamma * cluster[i].item() + (1 - gamma) * n[i] for i in range(3)]
    new_m = [[gamma * sums[i, j].item() + (1 - gamma) * s[i][j] for j in range(2)] for i in range(3)]
    total = sum(new_n)
    smoothed = [(new_n[i] + eps) / (total + 3 * eps) * total for i in range(3)]
    new_e = [[new_m[i][j] / smoothed[i] for j in range(2)] for i in range(3)]
    torch.testing.assert_close(vq.cluster_size, torch.tensor(new_n, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(vq.embed_sum, torch.tensor(new_m, dtype=torch.float64), rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(vq.codebook, torch.tensor(new_e, dtype=torch.float64), rtol=1e-14, atol=1e-16)


def test_eval_mode_changes_no_statistics():
    vq = initialised_vq(num_codes=8, code_dim=4).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(50, 4, dtype=torch.float64))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


def test_first_training_batch_initialises_the_codebook_from_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4).double().train()
    z = torch.randn(40, 4, dtype=torch.float64) + 5.0
    vq(z)
    assert bool(vq.initialised)
    # every code sits at (or, after the EMA step, next to) one distinct batch vector; before the init
    # the random normal codebook is ~5 away from all of them
    dist = torch.cdist(vq.codebook, z).min(dim=1).values
    assert float(dist.max()) < 0.5


def test_dead_codes_are_restarted_from_batch_vectors():
    gamma, threshold = 0.5, 0.05
    vq = VectorQuantizer(4, 2, ema_decay=gamma, dead_code_threshold=threshold).double().train()
    vq.initialised.fill_(True)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0], [-50.0, 50.0]], dtype=torch.float64))
    vq.embed_sum.copy_(vq.codebook / 4)
    g = torch.Generator().manual_seed(4)

    def batch():
        centres = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)[torch.arange(8) % 2]
        return centres + 0.05 * torch.randn(8, 2, dtype=torch.float64, generator=g)

    # codes 2 and 3 are never nearest: usage 1/4 -> 1/8 -> 1/16 (> 0.05) -> 1/32 (< 0.05, restart)
    for _ in range(2):
        vq(batch())
    far = torch.tensor([[50.0, 50.0], [-50.0, 50.0]], dtype=torch.float64)
    assert float((vq.codebook[2:] - far).abs().max()) < 0.1  # only Laplace smoothing moved them
    torch.testing.assert_close(vq.cluster_size[2:], torch.full((2,), 1 / 16, dtype=torch.float64))
    last = batch()
    vq(last)
    for k in (2, 3):
        assert any(torch.equal(vq.codebook[k], row) for row in last), f"code {k} was not restarted at a batch row"
    assert not torch.equal(vq.codebook[2], vq.codebook[3])  # rows drawn without replacement
    share = 1 / 4  # uniform share: the usage fractions summed to 1 before the restart
    torch.testing.assert_close(vq.cluster_size[2:], torch.full((2,), share, dtype=torch.float64))
    assert bool((vq.cluster_size >= threshold).all())
    torch.testing.assert_close(vq.embed_sum[2:], vq.codebook[2:] * share)
    # live codes were updated by the EMA only (near their clusters), not restarted
    assert float((vq.codebook[0] - torch.tensor([0.0, 0.0], dtype=torch.float64)).abs().max()) < 0.2
    assert float((vq.codebook[1] - torch.tensor([1.0, 1.0], dtype=torch.float64)).abs().max()) < 0.2


def test_perplexity_and_usage_of_a_known_assignment():
    vq = initialised_vq(num_codes=4, code_dim=2).eval()
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=torch.float64))
    z = vq.codebook[torch.tensor([0, 0, 0, 1, 1, 2])]  # p = (1/2, 1/3, 1/6, 0)
    out = vq(z)
    p = [3 / 6, 2 / 6, 1 / 6]
    expected = math.exp(-sum(pi * math.log(pi) for pi in p))
    assert abs(float(out.perplexity) - expected) < 1e-6
    assert float(out.usage) == 0.75


def test_errors_name_the_problem():
    vq = VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        vq(torch.randn(3, 5))
    with pytest.raises(IndexError, match=r"\[0, 8\)"):
        vq.lookup(torch.tensor([0, 8]))
    with pytest.raises(TypeError, match="integer codes"):
        vq.lookup(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(8, 4, ema_decay=1.0)
    with pytest.raises(ValueError, match="num_codes"):
        VectorQuantizer(0, 4)


def test_usage_is_tracked_without_ema_to_find_dead_codes():
    vq = initialised_vq(num_codes=4, code_dim=2, ema_decay=None, dead_code_threshold=0.0).train()
    vq.codebook.data.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=torch.float64))
    z = vq.codebook.detach()[torch.tensor([0, 0, 0, 1])]  # usage (3/4, 1/4, 0, 0)
    vq(z)
    expected = USAGE_DECAY * 0.25 + (1 - USAGE_DECAY) * torch.tensor([0.75, 0.25, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(vq.cluster_size, expected, rtol=1e-14, atol=0)
    vq.dead_code_threshold = 0.249  # codes 2 and 3 (usage 0.2475) are dead now, 0 and 1 are not
    vq(z)
    assert torch.equal(vq.codebook[:2].detach(), torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64))
    for k in (2, 3):
        assert any(torch.equal(vq.codebook[k].detach(), row) for row in z)
