"""H2O's Triton kernels (output and column sums) against an explicit float64 loop (Triton's interpreter on a CPU)."""

import math
import os

import pytest
import torch

from kvsweep import h2o_kernels

pytestmark = pytest.mark.skipif(
    h2o_kernels.triton is None, reason="Triton is not installed (the test extras install it on Linux x86_64)"
)
# conftest.py turns Triton's interpreter on unless TRITON_INTERPRET=0 is set.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def reference_attention(query, key, value, visible, row_weights, scaling):
    """One softmax per (batch row, query head, query) over its visible keys: the output (batch, q,
    heads, d), and for each batch row, KV head and key the sum over query heads of the group and
    queries of row weight x probability."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    out = torch.zeros(batch, q_len, heads, head_dim, dtype=torch.float64)
    received = torch.zeros(batch, kv_heads, k_len, dtype=torch.float64)
    for b in range(batch):
        for head in range(heads):
            h = head // groups
            for i in range(q_len):
                seen = [k for k in range(k_len) if visible[b, h, i, k]]
                scores = [float(query[b, head, i].double() @ key[b, h, k].double()) * scaling for k in seen]
                top = max(scores)
                total = sum(math.exp(s - top) for s in scores)
                for k, s in zip(seen, scores, strict=True):
                    received[b, h, k] += float(row_weights[b, i]) * math.exp(s - top) / total
                    out[b, i, head] += math.exp(s - top) / total * value[b, h, k].double()
    return out, received


def random_case(batch, kv_heads, groups, q_len, k_len, head_dim, seed, key_stop):
    generator = torch.Generator().manual_seed(seed)
    # Queries as the model hands them over: a (batch, q, heads, d) tensor transposed (not contiguous).
    query = torch.randn(batch, q_len, kv_heads * groups, head_dim, generator=generator).transpose(1, 2)
    # Keys: the first k_len slots of a larger cache, as the attention slices a static cache.
    key = torch.randn(batch, kv_heads, k_len + 9, head_dim, generator=generator)[:, :, :k_len]
    value = torch.randn(batch, kv_heads, k_len + 9, head_dim, generator=generator)[:, :, :k_len]
    visible = torch.rand(batch, kv_heads, q_len, k_len, generator=generator) < 0.6
    own = torch.randint(0, key_stop, (q_len,), generator=generator)
    visible[:, :, torch.arange(q_len), own] = True  # every row sees at least one key
    row_weights = (torch.rand(batch, q_len, generator=generator) < 0.8).float() / groups
    return query, key, value, visible, row_weights


@pytest.mark.parametrize(
    "batch,kv_heads,groups,q_len,k_len,head_dim,key_stop",
    [
        (1, 1, 1, 1, 1, 16, None),  # one row, one key
        (2, 2, 2, 6, 70, 16, None),  # keys beyond one block, rows within one
        (1, 2, 4, 37, 130, 32, None),  # rows beyond two blocks (148), a ragged last key block
        (2, 1, 3, 64, 64, 16, None),  # exactly three row blocks, one key block
        (2, 2, 2, 6, 200, 16, 75),  # keys from 75 on are skipped although the mask shows some
    ],
)
def test_output_and_column_sums_match_an_explicit_loop(batch, kv_heads, groups, q_len, k_len, head_dim, key_stop):
    case = random_case(batch, kv_heads, groups, q_len, k_len, head_dim, seed=k_len, key_stop=key_stop or k_len)
    query, key, value, visible, row_weights = (t.to(DEVICE) for t in case)
    scaling = head_dim**-0.5
    assert h2o_kernels.available(query)
    # The kernels add into a slice of a larger, already non-zero buffer (the layer's state).
    state = torch.full((batch, kv_heads, k_len + 5), 0.25, device=DEVICE)
    stop = None if key_stop is None else torch.tensor([key_stop], device=DEVICE)
    out = h2o_kernels.attend_and_accumulate(
        query, key, value, visible, row_weights, scaling, state[:, :, :k_len], stop
    ).cpu()
    # The output alone (every other method's attention on a GPU): the same, and nothing accumulated.
    before = state.clone()
    out_only = h2o_kernels.attend(query, key, value, visible, scaling, stop).cpu()
    assert torch.equal(out_only, out) and torch.equal(state, before)
    state = state.cpu()
    query, key, value, visible, row_weights = case
    if key_stop is not None:
        assert visible[..., key_stop:].any(), "the case must show keys that the stop hides"
        visible = visible.clone()
        visible[..., key_stop:] = False
    expected_out, expected = reference_attention(query, key, value, visible, row_weights, scaling)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[:, :, :k_len].double(), expected + 0.25, rtol=1e-5, atol=1e-6)
    assert (state[:, :, k_len:] == 0.25).all(), "wrote beyond the keys of the pass"


@pytest.mark.parametrize("kernel", ["forward", "column_sums"])
def test_every_launch_setting_gives_the_same_result(kernel):
    """Block sizes smaller and larger than the rows and keys of the case, with ragged last blocks."""
    batch, kv_heads, groups, q_len, k_len, head_dim = 1, 2, 3, 21, 150, 16
    case = random_case(batch, kv_heads, groups, q_len, k_len, head_dim, seed=5, key_stop=k_len)
    query, key, value, visible, row_weights = (t.to(DEVICE) for t in case)
    expected_out, expected = reference_attention(*case, head_dim**-0.5)
    settings = h2o_kernels.FORWARD_LAUNCHES if kernel == "forward" else h2o_kernels.COLUMN_SUMS_LAUNCHES
    for launch in settings:
        received = torch.zeros(batch, kv_heads, k_len, device=DEVICE)
        out = h2o_kernels.attend_and_accumulate(
            query, key, value, visible, row_weights, head_dim**-0.5, received, **{f"{kernel}_launch": launch}
        )
        torch.testing.assert_close(out.cpu().double(), expected_out, rtol=1e-5, atol=1e-5, msg=str(launch))
        torch.testing.assert_close(received.cpu().double(), expected, rtol=1e-5, atol=1e-6, msg=str(launch))


def test_launch_settings_follow_the_shared_memory():
    h100, a100 = 0.75 * 232448, 0.75 * 166912  # bytes a block may use, times SHARED_MEMORY_SHARE
    forward, columns = h2o_kernels.launches_within(h100, head_dim=128, element_size=2)
    assert (forward["BLOCK_M"], forward["BLOCK_N"], columns["BLOCK_N"]) == (128, 128, 128)
    forward, _ = h2o_kernels.launches_within(a100, head_dim=128, element_size=2)
    assert (forward["BLOCK_M"], forward["BLOCK_N"]) == (64, 64)
    forward, _ = h2o_kernels.launches_within(h100, head_dim=128, element_size=4)  # float32
    assert (forward["BLOCK_M"], forward["BLOCK_N"]) == (64, 32)
    assert h2o_kernels.launches_within(16 * 1024, head_dim=256, element_size=4) is None


def test_kernels_are_not_offered_where_they_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not h2o_kernels.available(torch.zeros(1, 2, 3, 16))  # CPU tensor without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert h2o_kernels.available(torch.zeros(1, 2, 3, 16))
    assert not h2o_kernels.available(torch.zeros(1, 2, 3, 24))  # head_dim not a power of two
    assert not h2o_kernels.available(torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16))  # interpreter: float32 only
