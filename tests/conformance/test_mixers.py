"""Every registered mixer and memory layer (built-in or pip-installed) against the conformance suite.

The second half checks the suite itself: deliberately broken mixers must fail exactly the check that
targets their bug, and a correct toy mixer must pass everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import mmgrow
from mmgrow.protocols import GrowthStrategy, MixerState, SeqContext, SequenceMixer, Tokenizer
from mmgrow.testing.conformance import mixer_checks, run_checks


def _registry_cases() -> list:
    cases = []
    for kind in ("mixers", "memory"):
        for name in mmgrow.available(kind):
            try:
                cls = mmgrow.load_plugin(kind, name)
            except Exception:  # noqa: BLE001 - reported by the "load" case below
                cases.append(pytest.param(kind, name, "load", id=f"{kind}-{name}-load"))
                continue
            for check_name, _ in mixer_checks(cls):
                cases.append(pytest.param(kind, name, check_name, id=f"{kind}-{name}-{check_name}"))
    return cases


@pytest.mark.parametrize(("kind", "name", "check_name"), _registry_cases())
def test_registered_plugin(kind: str, name: str, check_name: str) -> None:
    cls = mmgrow.load_plugin(kind, name)  # a broken plugin fails here with its PluginLoadError
    dict(mixer_checks(cls))[check_name]()


def test_full_attention_is_registered_and_gets_every_check() -> None:
    assert "full" in mmgrow.available("mixers")
    names = [n for n, _ in mixer_checks(mmgrow.load_plugin("mixers", "full"))]
    assert names == ["shapes_and_dtype", "no_future_leakage", "packed_equals_separate", "state_split_equals_one_pass",
                     "decode_equals_prefill", "gradients_finite_nonzero", "gradcheck",
                     "residual_outputs_zero_the_output", "unsupported_features_raise"]


# --------------------------------------------------------------------------------------------------
# The suite catches bugs: a toy recurrent mixer, correct and broken
# --------------------------------------------------------------------------------------------------


@dataclass
class SumState(MixerState):
    total: Tensor    # [B, D] running sum of the current segment
    segment: Tensor  # [B] segment id of that sum (-2 = nothing seen)


class RunningSum(SequenceMixer):
    """``y_t = W_o tanh(sum of W_i x_j over j <= t in t's segment)``: causal, packable, stateful."""

    supports_state = True
    supports_segments = True
    reverse = False         # bug: runs right-to-left (sees the future)
    ignore_segments = False  # bug: claims segments but sums across them
    forget_state = False     # bug: drops the carried sum

    def __init__(self, *, dim: int, layer_idx: int = 0) -> None:
        super().__init__(dim=dim, layer_idx=layer_idx)
        self.proj_in = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, dim)

    def init_state(self, batch_size, device, dtype) -> SumState:
        return SumState(torch.zeros(batch_size, self.dim, device=device, dtype=dtype),
                        torch.full((batch_size,), -2, device=device, dtype=torch.long))

    def forward(self, x, ctx, state=None):
        self.check_context(x, ctx)
        B, T, _ = x.shape
        v = self.proj_in(x)
        seg = ctx.segment_ids if ctx.segment_ids is not None and not self.ignore_segments else \
            torch.zeros(B, T, dtype=torch.long)
        carried = state if state is not None and not self.forget_state else self.init_state(B, x.device, x.dtype)
        total, current = carried.total, carried.segment
        order = range(T - 1, -1, -1) if self.reverse else range(T)
        outs = [None] * T
        for t in order:
            same = (seg[:, t] == current)[:, None]
            total = torch.where(same, total + v[:, t], v[:, t])
            current = seg[:, t]
            outs[t] = total
        y = self.proj_out(torch.tanh(torch.stack(outs, dim=1)))
        return y, (SumState(total, current) if state is not None else None)


class ReversedSum(RunningSum):
    reverse = True


class SegmentBlindSum(RunningSum):
    ignore_segments = True


class ForgetfulSum(RunningSum):
    forget_state = True


class SilentSum(RunningSum):
    """Supports nothing beyond plain causal rows, yet swallows segment ids instead of raising."""

    supports_segments = False
    supports_state = False

    def check_context(self, x, ctx) -> None:
        pass


class DeadParameterSum(RunningSum):
    def __init__(self, *, dim: int, layer_idx: int = 0) -> None:
        super().__init__(dim=dim, layer_idx=layer_idx)
        self.unused = nn.Parameter(torch.ones(3))


class ReferencedSum(RunningSum):
    """The toy with its oracle and an extreme: the loop is its own reference."""

    def reference_forward(self, x, ctx, state=None):
        return RunningSum.forward(self, x, ctx, state)

    @classmethod
    def conformance_extremes(cls):
        return {"zero input weights": lambda m: m.proj_in.weight.zero_()}


class DriftingReference(ReferencedSum):
    """Bug: the fast path drifts from its oracle by 1e-7 (an approximation passed off as exact)."""

    def forward(self, x, ctx, state=None):
        y, new_state = super().forward(x, ctx, state)
        return y * (1 + 1e-7), new_state


class _WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):  # bug: pretends tanh has slope 0.99 everywhere
        return grad * 0.99

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass


class WrongBackwardSum(RunningSum):
    def forward(self, x, ctx, state=None):
        return super().forward(_WrongBackward.apply(x), ctx, state)


class OverflowingExtreme(ReferencedSum):
    @classmethod
    def conformance_extremes(cls):
        return {"huge input weights": lambda m: m.proj_in.weight.fill_(1e308)}


def _failed(cls: type) -> set[str]:
    return {r.name for r in run_checks("mixers", cls) if not r.passed}


def test_correct_toy_mixer_passes_everything() -> None:
    results = run_checks("mixers", RunningSum)
    assert [r.name for r in results if not r.passed] == []
    assert {r.name for r in results} >= {"packed_equals_separate", "state_split_equals_one_pass",
                                         "decode_equals_prefill", "unsupported_features_raise"}


@pytest.mark.parametrize(("cls", "expected"), [
    (ReversedSum, "no_future_leakage"),
    (SegmentBlindSum, "packed_equals_separate"),
    (ForgetfulSum, "state_split_equals_one_pass"),
    (ForgetfulSum, "decode_equals_prefill"),
    (SilentSum, "unsupported_features_raise"),
    (DeadParameterSum, "gradients_finite_nonzero"),
])
def test_suite_catches_broken_mixer(cls: type, expected: str) -> None:
    assert expected in _failed(cls)


def test_reference_and_extremes_pass_for_a_correct_toy() -> None:
    results = run_checks("mixers", ReferencedSum)
    assert [r.name for r in results if not r.passed] == []
    assert {"reference_equals_fast", "gate_extremes", "gradcheck"} <= {r.name for r in results}


@pytest.mark.parametrize(("cls", "expected"), [
    (DriftingReference, "reference_equals_fast"),
    (WrongBackwardSum, "gradcheck"),
    (OverflowingExtreme, "gate_extremes"),
])
def test_suite_catches_wrong_maths(cls: type, expected: str) -> None:
    assert expected in _failed(cls)


def test_failure_message_names_the_problem() -> None:
    by_name = {r.name: r for r in run_checks("mixers", SilentSum)}
    assert "segment_ids" in by_name["unsupported_features_raise"].message
    by_name = {r.name: r for r in run_checks("mixers", DeadParameterSum)}
    assert "unused" in by_name["gradients_finite_nonzero"].message


def test_capabilities_choose_the_checks() -> None:
    names = {n for n, _ in mixer_checks(SilentSum)}
    assert "packed_equals_separate" not in names and "decode_equals_prefill" not in names
    assert "no_future_leakage" in names and "unsupported_features_raise" in names


# --------------------------------------------------------------------------------------------------
# Other kinds: attribute checks
# --------------------------------------------------------------------------------------------------


class ByteTok(Tokenizer):
    modality = "text"
    kind = "discrete"
    vocab_size = 256

    def encode(self, raw: str) -> Tensor:
        return torch.tensor(list(raw.encode()), dtype=torch.long)

    def decode(self, tokens: Tensor) -> str:
        return bytes(tokens.tolist()).decode()

    @classmethod
    def conformance_sample(cls) -> str:
        return "hello, world"


class UpperTok(ByteTok):
    def decode(self, tokens: Tensor) -> str:
        return super().decode(tokens).upper()


class NoVocabTok(ByteTok):
    vocab_size = 0


class NoApplyGrowth(GrowthStrategy):
    preserves = "exact"


def test_tokenizer_checks() -> None:
    assert all(r.passed for r in run_checks("tokenizers", ByteTok))
    assert {r.name for r in run_checks("tokenizers", UpperTok) if not r.passed} == {"tokenizer_round_trip"}
    assert "tokenizer_attributes" in {r.name for r in run_checks("tokenizers", NoVocabTok) if not r.passed}


def test_other_kinds_check_contract_attributes() -> None:
    results = {r.name: r for r in run_checks("growth", NoApplyGrowth)}
    assert not results["growth_contract"].passed and "apply" in results["growth_contract"].message
    assert not results["growth_keeps_its_promise_ar"].passed  # apply() raises NotImplementedError
    [result] = run_checks("mixers", ByteTok)
    assert result.name == "subclass" and not result.passed


def test_run_checks_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown plugin kind 'mixer'"):
        run_checks("mixer", RunningSum)


def test_checks_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_checks("mixers", RunningSum)
    assert torch.equal(torch.rand(3), expected)


def test_stateful_toy_mixer_contract_is_real() -> None:
    """Sanity of the toy itself: packing really changes its output (else the packed check is vacuous)."""
    mixer = RunningSum(dim=4).double()
    x = torch.randn(1, 6, 4, dtype=torch.float64)
    plain = SeqContext.simple(1, 6)
    packed = SeqContext(positions=plain.positions, segment_ids=torch.tensor([[0, 0, 0, 1, 1, 1]]))
    assert not torch.allclose(mixer(x, plain)[0], mixer(x, packed)[0])
