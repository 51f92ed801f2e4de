"""The decision kernel against the press's torch expression (Triton's interpreter on a CPU)."""

import pytest
import torch

from kvsweep import decision_kernel

from conftest import KERNEL_DEVICE as DEVICE

pytestmark = pytest.mark.skipif(decision_kernel.triton is None, reason="Triton is not installed")


def torch_decisions(evicted, scores, position, tokens_before, tokens_after, sinks, window, threshold):
    """`StreamingThresholdPress.forward_hook`'s torch path, on a copy."""
    deciding = (
        (position >= sinks)
        & (position >= (tokens_before - window)[:, None])
        & (position < (tokens_after - window)[:, None])
    )
    return evicted | (deciding[:, None, :] & (scores < threshold))


@pytest.mark.parametrize("threshold", [0.7, float("-inf"), float("inf")])
def test_decisions_match_the_torch_expression(threshold):
    """A slot range of a larger state (strided views), 300 slots (two blocks, the last ragged),
    padding slots, sinks, documents at different points, NaN scores, flags already set."""
    generator = torch.Generator().manual_seed(7)
    batch, kv_heads, capacity, lo, hi = 3, 2, 400, 37, 337
    state = torch.rand(batch, kv_heads, capacity, generator=generator) < 0.2
    scores_state = torch.rand(batch, kv_heads, capacity, generator=generator)
    scores_state[torch.rand(scores_state.shape, generator=generator) < 0.05] = float("nan")
    # float32(0.7) lies below 0.7: compared as a float32 number, as torch compares, it is kept;
    # compared in float64 it would be evicted.
    scores_state[0, 0, lo:hi:7] = torch.tensor(0.7, dtype=torch.float32)
    position = torch.arange(capacity).repeat(batch, 1)
    position[torch.rand(batch, capacity, generator=generator) < 0.1] = -1
    tokens_before, tokens_after = torch.tensor([100, 250, 0]), torch.tensor([228, 251, 400])
    args = (position[:, lo:hi], tokens_before, tokens_after, 4, 64, threshold)
    expected = torch_decisions(state[:, :, lo:hi], scores_state[:, :, lo:hi], *args)
    assert (expected != state[:, :, lo:hi]).any() or threshold == float("-inf")
    state, scores_state = state.to(DEVICE), scores_state.to(DEVICE)
    before = state.clone()
    decision_kernel.evict_decided(
        state[:, :, lo:hi], scores_state[:, :, lo:hi], *(a.to(DEVICE) if torch.is_tensor(a) else a for a in args)
    )
    assert torch.equal(state[:, :, lo:hi].cpu(), expected)
    assert torch.equal(state[:, :, :lo], before[:, :, :lo]) and torch.equal(state[:, :, hi:], before[:, :, hi:])


def test_the_kernel_applies_on_a_gpu_to_float32_scores_only():
    evicted = torch.zeros(1, 2, 5, dtype=torch.bool)
    assert not decision_kernel.applies(evicted, torch.zeros(1, 2, 5))  # CPU
    if torch.cuda.is_available():
        evicted = evicted.cuda()
        assert decision_kernel.applies(evicted, torch.zeros(1, 2, 5, device="cuda"))
        assert not decision_kernel.applies(evicted, torch.zeros(1, 2, 5, device="cuda", dtype=torch.bfloat16))
        assert not decision_kernel.applies(evicted, torch.zeros(1, 1, 5, device="cuda"))
