"""The decision kernel against the press's torch expression (Triton's interpreter on a CPU)."""

import pytest
import torch

from kvsweep.engine.scorers import H2OScorer
from kvsweep.kernels import decisions, entry_scores

from conftest import KERNEL_DEVICE as DEVICE

pytestmark = pytest.mark.skipif(decisions.triton is None, reason="Triton is not installed")


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
    decisions.evict_decided(
        state[:, :, lo:hi], scores_state[:, :, lo:hi], *(a.to(DEVICE) if torch.is_tensor(a) else a for a in args)
    )
    assert torch.equal(state[:, :, lo:hi].cpu(), expected)
    assert torch.equal(state[:, :, :lo], before[:, :, :lo]) and torch.equal(state[:, :, hi:], before[:, :, hi:])


def test_the_kernels_are_used_on_a_gpu_only_for_what_they_fit():
    """`supports` is `fits` on a GPU; `fits` names what each kernel handles, on any device."""
    evicted = torch.zeros(1, 2, 5, dtype=torch.bool)
    slots = torch.arange(3)
    assert not decisions.supports(evicted, torch.zeros(1, 2, 5))  # CPU
    assert not entry_scores.supports(torch.zeros(1, 2, 5), torch.zeros(1, 2, 3), slots)  # CPU
    entry = torch.zeros(1, 2, 5)
    assert entry_scores.fits(entry, torch.zeros(1, 2, 3, dtype=torch.bfloat16), slots)
    assert not entry_scores.fits(entry, torch.zeros(1, 2, 4), slots)  # one score a slot
    assert not entry_scores.fits(entry.double(), torch.zeros(1, 2, 3), slots)  # a float32 state
    assert not entry_scores.fits(entry, torch.zeros(1, 3, 3), slots)  # the state's heads
    assert decisions.fits(evicted, torch.zeros(1, 2, 5))
    assert not decisions.fits(evicted, torch.zeros(1, 2, 5, dtype=torch.bfloat16))
    assert not decisions.fits(evicted, torch.zeros(1, 1, 5))
    if torch.cuda.is_available():
        assert not entry_scores.fits(entry.cuda(), torch.zeros(1, 2, 3, device="cuda"), slots)  # slots on the CPU
        assert entry_scores.supports(entry.cuda(), torch.zeros(1, 2, 3, device="cuda"), slots.cuda())
        assert decisions.supports(evicted.cuda(), torch.zeros(1, 2, 5, device="cuda"))


@pytest.mark.parametrize("threshold", [0.7, float("-inf")])
def test_h2o_scores_in_the_kernel_match_the_scorer(threshold):
    """`mean_over_queries`: the kernel divides the attention received by the queries that attended
    (`H2OScorer.score`: received / max(tokens_after - position, 1)) before comparing. Sums whose
    mean lies at the threshold, padding slots (-1: tokens_after + 1 queries) and a document
    with no tokens. The rounding of the division matters on a GPU only: under the interpreter
    every float32 division rounds to nearest (`TRITON_INTERPRET=0` runs it on the card)."""
    generator = torch.Generator().manual_seed(8)
    batch, kv_heads, capacity, lo, hi = 3, 2, 400, 21, 333
    state = torch.rand(batch, kv_heads, capacity, generator=generator) < 0.1
    position = torch.arange(capacity).repeat(batch, 1)
    position[torch.rand(batch, capacity, generator=generator) < 0.1] = -1
    tokens_before, tokens_after = torch.tensor([120, 0, 260]), torch.tensor([248, 0, 261])
    n_queries = tokens_after[:, None] - position
    received = torch.rand(batch, kv_heads, capacity, generator=generator) * 1.4 * n_queries.clamp(min=1)[:, None]
    received[:, :, ::5] = torch.tensor(0.7, dtype=torch.float32) * n_queries.clamp(min=1)[:, None, ::5]
    scores = H2OScorer().score(None, None, None, None, received[:, :, lo:hi], {"n_queries": n_queries[:, lo:hi]})
    args = (position[:, lo:hi], tokens_before, tokens_after, 2, 16, threshold)
    expected = torch_decisions(state[:, :, lo:hi], scores, *args)
    assert (expected != state[:, :, lo:hi]).any() or threshold == float("-inf")
    state, received = state.to(DEVICE), received.to(DEVICE)
    decisions.evict_decided(
        state[:, :, lo:hi], received[:, :, lo:hi], *(a.to(DEVICE) if torch.is_tensor(a) else a for a in args),
        mean_over_queries=True,
    )  # fmt: skip
    assert torch.equal(state[:, :, lo:hi].cpu(), expected)


def test_entry_scores_are_stored_at_the_query_slots_as_float32():
    """`store_entry_scores` does what `index_copy_` of the float32 scores does: bf16 scores of a
    transposed view (as KVzap's surrogate returns them), more slots than a block, nothing else
    written."""
    generator = torch.Generator().manual_seed(9)
    batch, kv_heads, capacity, q_len = 2, 3, 700, 300
    entry = torch.rand(batch, kv_heads, capacity, generator=generator)
    new = torch.randn(batch, q_len, kv_heads, generator=generator).to(torch.bfloat16).transpose(1, 2)
    slots = torch.arange(350, 350 + q_len)
    expected = entry.clone().index_copy_(2, slots, new.float())
    entry = entry.to(DEVICE)
    entry_scores.store_entry_scores(entry, new.to(DEVICE), slots.to(DEVICE))
    assert torch.equal(entry.cpu(), expected)
