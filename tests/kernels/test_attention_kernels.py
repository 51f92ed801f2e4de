"""The attention kernels (output, H2O's column sums, split keys) against an explicit float64 loop (Triton's interpreter on a CPU)."""

import itertools
import math
import types

import pytest
import torch

from kvsweep.engine import attention
from kvsweep.engine.layout import BatchLayout, KeyVisibility
from kvsweep.engine.state import LayerEviction
from kvsweep.kernels import attention as attention_kernels
from kvsweep.kernels import launches as kernel_launches

from conftest import KERNEL_DEVICE as DEVICE

pytestmark = pytest.mark.skipif(
    attention_kernels.triton is None, reason="Triton is not installed (the test extras install it on Linux x86_64)"
)


def sees(seen: KeyVisibility, b: int, h: int, i: int, k: int, key_stop: int) -> bool:
    """The rule, one key at a time: query i sees key slot k if k is before the stop and is its own
    slot, or an earlier slot holding a real token that KV head h has not evicted."""
    slot = int(seen.query_slots[i])
    if k >= key_stop:
        return False
    return k == slot or (k <= slot and int(seen.position[b, k]) >= 0 and not bool(seen.evicted[b, h, k]))


def reference_attention(query, key, value, seen, row_weights, scaling, key_stop=None):
    """One softmax per (batch row, query head, query) over its visible keys: the output (batch, q,
    heads, d), and for each batch row, KV head and key the sum over query heads of the group and
    queries of row weight x probability."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    key_stop = k_len if key_stop is None else key_stop
    groups = heads // kv_heads
    out = torch.zeros(batch, q_len, heads, head_dim, dtype=torch.float64)
    received = torch.zeros(batch, kv_heads, k_len, dtype=torch.float64)
    for b in range(batch):
        for head in range(heads):
            h = head // groups
            for i in range(q_len):
                visible = [k for k in range(k_len) if sees(seen, b, h, i, k, key_stop)]
                scores = [float(query[b, head, i].double() @ key[b, h, k].double()) * scaling for k in visible]
                top = max(scores)
                total = sum(math.exp(s - top) for s in scores)
                for k, s in zip(visible, scores, strict=True):
                    received[b, h, k] += float(row_weights[b, i]) * math.exp(s - top) / total
                    out[b, i, head] += math.exp(s - top) / total * value[b, h, k].double()
    return out, received


def random_case(batch, kv_heads, groups, q_len, k_len, head_dim, seed, key_stop):
    generator = torch.Generator().manual_seed(seed)
    # Queries as the model hands them over: a (batch, q, heads, d) tensor transposed (not contiguous).
    query = torch.randn(batch, q_len, kv_heads * groups, head_dim, generator=generator).transpose(1, 2)
    # Keys: the first k_len slots of a larger cache, as the attention slices a static cache; the
    # eviction flags and positions cover the whole cache, as a layer's state does.
    key = torch.randn(batch, kv_heads, k_len + 9, head_dim, generator=generator)[:, :, :k_len]
    value = torch.randn(batch, kv_heads, k_len + 9, head_dim, generator=generator)[:, :, :k_len]
    evicted = torch.rand(batch, kv_heads, k_len + 9, generator=generator) < 0.35
    position = torch.arange(k_len + 9).repeat(batch, 1)
    position[torch.rand(batch, k_len + 9, generator=generator) < 0.15] = -1  # padding slots
    # Query slots in no particular order, some of them at or past the stop (whose keys the rule
    # would show them): every row still sees a key before the stop.
    slots = torch.randint(0, k_len, (q_len,), generator=generator)
    seen = KeyVisibility(evicted, position, slots)
    for b, h, i in itertools.product(range(batch), range(kv_heads), range(q_len)):
        assert any(sees(seen, b, h, i, k, key_stop) for k in range(k_len)), "a row sees nothing: another seed"
    row_weights = (torch.rand(batch, q_len, generator=generator) < 0.8).float() / groups
    return query, key, value, seen, row_weights


def on(device, case):
    """The case's tensors on `device`."""
    query, key, value, seen, row_weights = case
    seen = KeyVisibility(*(t.to(device) for t in seen))
    return query.to(device), key.to(device), value.to(device), seen, row_weights.to(device)


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
    query, key, value, seen, row_weights = on(DEVICE, case)
    scaling = head_dim**-0.5
    assert attention_kernels.supports(query)
    # The kernels add into a slice of a larger, already non-zero buffer (the layer's state).
    state = torch.full((batch, kv_heads, k_len + 5), 0.25, device=DEVICE)
    stop = None if key_stop is None else torch.tensor([key_stop], device=DEVICE)
    out = attention_kernels.attend_and_accumulate(
        query, key, value, seen, row_weights, scaling, state[:, :, :k_len], stop
    ).cpu()
    # The output alone (every other method's attention on a GPU): the same, and nothing accumulated.
    before = state.clone()
    out_only = attention_kernels.attend(query, key, value, seen, scaling, stop).cpu()
    assert torch.equal(out_only, out) and torch.equal(state, before)
    state = state.cpu()
    if key_stop is not None:
        shown = (case[3].dense(k_len)[..., key_stop:]).any()
        assert shown, "the case must have rows that the rule would show keys that the stop hides"
    expected_out, expected = reference_attention(*case, scaling, key_stop)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[:, :, :k_len].double(), expected + 0.25, rtol=1e-5, atol=1e-6)
    assert (state[:, :, k_len:] == 0.25).all(), "wrote beyond the keys of the pass"


@pytest.mark.parametrize("kernel", ["forward", "column_sums"])
def test_every_launch_setting_gives_the_same_result(kernel):
    """Block sizes smaller and larger than the rows and keys of the case, with ragged last blocks."""
    batch, kv_heads, groups, q_len, k_len, head_dim = 1, 2, 3, 21, 150, 16
    case = random_case(batch, kv_heads, groups, q_len, k_len, head_dim, seed=5, key_stop=k_len)
    query, key, value, seen, row_weights = on(DEVICE, case)
    expected_out, expected = reference_attention(*case, head_dim**-0.5)
    settings = kernel_launches.FORWARD_LAUNCHES if kernel == "forward" else kernel_launches.COLUMN_SUMS_LAUNCHES
    for launch in settings:
        received = torch.zeros(batch, kv_heads, k_len, device=DEVICE)
        out = attention_kernels.attend_and_accumulate(
            query, key, value, seen, row_weights, head_dim**-0.5, received, **{f"{kernel}_launch": launch}
        )
        torch.testing.assert_close(out.cpu().double(), expected_out, rtol=1e-5, atol=1e-5, msg=str(launch))
        torch.testing.assert_close(received.cpu().double(), expected, rtol=1e-5, atol=1e-6, msg=str(launch))


def test_launch_settings_follow_the_shared_memory():
    h100, a100 = 0.75 * 232448, 0.75 * 166912  # bytes a block may use, times SHARED_MEMORY_SHARE
    forward, columns = kernel_launches.launches_within(h100, head_dim=128, element_size=2)
    assert (forward["BLOCK_M"], forward["BLOCK_N"], columns["BLOCK_N"]) == (64, 64, 64)
    forward, _ = kernel_launches.launches_within(a100, head_dim=128, element_size=2)
    assert (forward["BLOCK_M"], forward["BLOCK_N"]) == (64, 64)
    forward, _ = kernel_launches.launches_within(h100, head_dim=128, element_size=4)  # float32
    assert (forward["BLOCK_M"], forward["BLOCK_N"]) == (64, 32)
    assert kernel_launches.launches_within(16 * 1024, head_dim=256, element_size=4) is None


def test_kernels_are_not_offered_where_they_cannot_run(monkeypatch):
    monkeypatch.setattr(kernel_launches, "INTERPRETED", False)
    assert not attention_kernels.supports(torch.zeros(1, 2, 3, 16))  # CPU tensor without the interpreter
    monkeypatch.setattr(kernel_launches, "INTERPRETED", True)
    assert attention_kernels.supports(torch.zeros(1, 2, 3, 16))
    assert not attention_kernels.supports(torch.zeros(1, 2, 3, 24))  # head_dim not a power of two
    assert not attention_kernels.fits(torch.zeros(1, 2, 3, 24))
    assert not attention_kernels.supports(torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16))  # interpreter: float32 only


def test_dense_mask_follows_the_rule():
    """The torch paths' mask (`KeyVisibility.dense`, what `LayerEviction.visible_keys` returns) is
    the kernels' rule, key by key, over a range of keys shorter than the state."""
    *_, seen, _ = random_case(2, 3, 1, 11, 40, 16, seed=9, key_stop=40)
    dense = seen.dense(40)
    assert dense.shape == (2, 3, 11, 40)
    for b, h, i, k in itertools.product(range(2), range(3), range(11), range(40)):
        assert bool(dense[b, h, i, k]) == sees(seen, b, h, i, k, key_stop=40), (b, h, i, k)


def test_column_sums_skip_key_blocks_decided_before_the_pass():
    """Keys below `undecided_from` (per document) need no more sums: blocks of keys wholly below it
    keep what they had; every other key receives exactly what the reference gives."""
    batch, kv_heads, groups, q_len, k_len, head_dim = 2, 2, 2, 6, 150, 16
    case = random_case(batch, kv_heads, groups, q_len, k_len, head_dim, seed=11, key_stop=k_len)
    query, key, value, seen, row_weights = on(DEVICE, case)
    _, expected = reference_attention(*case, head_dim**-0.5)
    launch = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    received = torch.full((batch, kv_heads, k_len), 0.25, device=DEVICE)
    undecided_from = torch.tensor([70, 0], device=DEVICE)
    attention_kernels.attend_and_accumulate(
        query, key, value, seen, row_weights, head_dim**-0.5, received,
        column_sums_launch=launch, undecided_from=undecided_from,
    )  # fmt: skip
    received = received.cpu().double()
    # Document 0: the blocks [0, 32) and [32, 64) lie below 70 and are skipped; [64, 96) is not.
    assert (received[0, :, :64] == 0.25).all()
    torch.testing.assert_close(received[0, :, 64:], expected[0, :, 64:] + 0.25, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(received[1], expected[1] + 0.25, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("row_splits,sums_from", [(2, 0), (3, 0), (9, 0), (3, 70), (1, 70)])
def test_column_sums_over_shares_of_the_rows_match_an_explicit_loop(row_splits, sums_from):
    """With few programs (batch 1), each sums a share of the row blocks and `_add_row_splits` adds
    the shares. 148 rows in blocks of 32 (five, the last ragged) in 2, 3 or 9 shares (nine: one
    block each, five shares); the blocks below `undecided_from` keep what they had. With
    `sums_from` 70, no program is launched for the key blocks below 64, in either document."""
    batch, kv_heads, groups, q_len, k_len, head_dim = 2, 2, 4, 37, 130, 16
    case = random_case(batch, kv_heads, groups, q_len, k_len, head_dim, seed=17, key_stop=k_len)
    query, key, value, seen, row_weights = on(DEVICE, case)
    _, expected = reference_attention(*case, head_dim**-0.5)
    launch = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    undecided_from = torch.tensor([40, 0], device=DEVICE)

    def received_by(shares):
        received = torch.full((batch, kv_heads, k_len), 0.25, device=DEVICE)
        attention_kernels.attend_and_accumulate(
            query, key, value, seen, row_weights, head_dim**-0.5, received, column_sums_launch=launch,
            undecided_from=undecided_from, row_splits=shares, sums_from=sums_from,
        )  # fmt: skip
        return received.cpu().double()

    received = received_by(row_splits)
    skipped = [32, 0] if sums_from == 0 else [64, 64]  # per document: the keys that got no sums
    for b, first in enumerate(skipped):
        assert (received[b, :, :first] == 0.25).all()
        torch.testing.assert_close(received[b, :, first:], expected[b, :, first:] + 0.25, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(received, received_by(1), rtol=1e-6, atol=1e-7)


def test_rows_are_split_only_when_the_programs_leave_the_gpu_idle():
    query = torch.zeros(1, 4, 1, 16)  # a CPU tensor: INTERPRETER_SMS (4) multiprocessors taken
    target = kernel_launches.PROGRAMS_PER_SM * kernel_launches.INTERPRETER_SMS
    assert kernel_launches.row_splits(query, target, row_blocks=8) == 1
    assert kernel_launches.row_splits(query, 3, row_blocks=8) == -(-target // 3)
    assert kernel_launches.row_splits(query, 1, row_blocks=2) == 2  # at most one share a row block


@pytest.mark.parametrize("split_keys", [None, 16])
def test_what_the_kernels_read_from_the_layout_matches_an_explicit_loop(split_keys):
    """As the model's attention calls them (`kvsweep.engine.attention`): the stop after the pass's last
    query slot, H2O's row weights (1 / groups a query of the document, 0 a padding query) and the
    first undecided slot (tokens_before - window) are worked out in the kernels, with no tensor
    passed. They give what the explicit arguments and the reference give."""
    batch, kv_heads, groups, q_len, k_len, head_dim = 2, 2, 3, 7, 120, 16
    case = random_case(batch, kv_heads, groups, q_len, k_len, head_dim, seed=13, key_stop=k_len)
    query, key, value, seen, _ = case
    # A pass's queries sit in consecutive slots; keys from the last one's slot + 1 on are hidden.
    seen = KeyVisibility(seen.evicted, seen.position, torch.arange(90, 90 + q_len))
    seen.position[1, 92] = seen.position[0, 95] = -1  # padding queries
    real = (seen.position.index_select(1, seen.query_slots) >= 0).float()
    assert 0 < real.sum() < real.numel(), "the case needs real and padding queries"
    weights = real / groups
    stop = 90 + q_len
    # Keys and values past the stop are NaN: a kernel that read them would put NaN in the output
    # (causality alone hides them from the scores, not from the product with the values).
    key, value = key.clone(), value.clone()
    key[:, :, stop:], value[:, :, stop:] = float("nan"), float("nan")
    case = (query, key, value, seen, weights)
    _, expected = reference_attention(*case, head_dim**-0.5, stop)
    launch = {"column_sums_launch": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}}
    query, key, value, seen, weights = on(DEVICE, case)
    tokens_before, window = torch.tensor([100, 84], device=DEVICE), 20  # undecided from slots 80 and 64

    def received_by(**options):
        received = torch.full((batch, kv_heads, k_len), 0.25, device=DEVICE)
        out = attention_kernels.attend_and_accumulate(
            query, key, value, seen, options.pop("row_weights", None), head_dim**-0.5, received,
            split_keys=split_keys, **launch, **options,
        )  # fmt: skip
        return out.cpu(), received.cpu()

    out, received = received_by(stop_after_last_query=True, undecided_from=tokens_before, undecided_offset=-window)
    explicit_out, explicit = received_by(
        row_weights=weights, key_stop=torch.tensor([stop], device=DEVICE), undecided_from=tokens_before - window
    )
    assert torch.equal(out, explicit_out) and torch.equal(received, explicit)
    assert not out.isnan().any()
    # Both documents: the key blocks [0, 64) lie below their first undecided slot, skipped; [64, 96)
    # does not (it would in document 0 without the window: 96 <= 100).
    assert (received[:, :, :64] == 0.25).all()
    torch.testing.assert_close(received[:, :, 64:].double(), expected[:, :, 64:] + 0.25, rtol=1e-5, atol=1e-6)
    assert (received[:, :, stop:] == 0.25).all(), "keys past the last query's slot got sums"
    with pytest.raises(ValueError, match="not both"):
        received_by(stop_after_last_query=True, key_stop=torch.tensor([stop], device=DEVICE))


@pytest.mark.parametrize(
    "batch,kv_heads,groups,q_len,k_len,split_keys,key_stop",
    [
        (2, 2, 4, 1, 150, 32, None),  # decoding: 4 rows per KV head, 5 shares, the last ragged
        (1, 2, 2, 1, 150, 48, 70),  # shares not a multiple of the key block; shares past the stop are empty
        (2, 1, 3, 24, 130, 64, None),  # a pass of many rows (72, over row blocks) split as well
        (1, 1, 2, 5, 40, 16, 21),  # only rows whose visible keys are all in one share
    ],
)
def test_keys_split_over_programs_match_an_explicit_loop(batch, kv_heads, groups, q_len, k_len, split_keys, key_stop):
    """Split-K (flash-decoding): each program walks `split_keys` keys and a second kernel combines
    the shares. The output and the column sums (which read the combined log-sum-exp) hold the
    reference, and differ from one unsplit pass by rounding only."""
    case = random_case(batch, kv_heads, groups, q_len, k_len, 16, seed=k_len + q_len, key_stop=key_stop or k_len)
    query, key, value, seen, row_weights = on(DEVICE, case)
    stop = None if key_stop is None else torch.tensor([key_stop], device=DEVICE)
    received = torch.full((batch, kv_heads, k_len), 0.25, device=DEVICE)
    out = attention_kernels.attend_and_accumulate(
        query, key, value, seen, row_weights, 0.25, received, stop, split_keys=split_keys
    ).cpu()
    expected_out, expected = reference_attention(*case, 0.25, key_stop)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(received.cpu().double(), expected + 0.25, rtol=1e-5, atol=1e-6)
    unsplit = attention_kernels.attend(query, key, value, seen, 0.25, stop, split_keys=k_len).cpu()
    torch.testing.assert_close(out, unsplit, rtol=1e-5, atol=1e-6)


def test_a_row_that_sees_nothing_gets_zeros_split_or_not():
    """A query whose slot is at or past the stop and whose earlier keys are all hidden: no key at
    all. Unsplit it gets 0 (its sum is taken as 1); the combined shares must give the same, not NaN."""
    case = random_case(1, 1, 1, 3, 64, 16, seed=3, key_stop=64)
    query, key, value, seen, _ = on(DEVICE, case)
    seen = KeyVisibility(torch.ones_like(seen.evicted), seen.position, torch.tensor([10, 50, 63], device=DEVICE))
    stop = torch.tensor([40], device=DEVICE)  # rows 1 and 2 lie past it; every earlier key is evicted
    for split_keys in (64, 16):
        out = attention_kernels.attend(query, key, value, seen, 0.25, stop, split_keys=split_keys).cpu()
        assert torch.isfinite(out).all() and (out[0, 1:] == 0).all(), split_keys
        torch.testing.assert_close(out[0, 0, 0], value[0, 0, 10].cpu())  # row 0 sees its own slot only


def test_passes_are_split_only_when_their_programs_leave_the_gpu_idle(monkeypatch):
    monkeypatch.setattr(kernel_launches, "INTERPRETER_SMS", 132)  # an H100's multiprocessors
    query = torch.zeros(1, 1, 1, 16)
    # Chunk 128 at batch 1 (8 row blocks x 8 KV heads): 5 shares of 1,664 keys bring 64 programs to 320.
    assert kernel_launches.key_splits(query, programs=64, k_len=8192, block_n=64) == (5, 1664)
    # Decoding at batch 1 (one row block x 8 KV heads): 33 shares wanted, 32 of 256 keys allowed.
    assert kernel_launches.key_splits(query, programs=8, k_len=8192, block_n=64) == (32, 256)
    assert kernel_launches.key_splits(query, programs=512, k_len=8192, block_n=64) == (1, 8192)  # batch 8
    assert kernel_launches.key_splits(query, programs=8, k_len=300, block_n=64) == (1, 300)  # too few keys


def test_few_rows_take_the_smallest_row_blocks():
    h100 = 0.75 * 232448
    forward, columns = kernel_launches.launches_within(h100, head_dim=128, element_size=2, rows=4)
    assert (forward["BLOCK_M"], forward["BLOCK_N"], columns["BLOCK_M"]) == (16, 64, 16)
    forward, columns = kernel_launches.launches_within(h100, head_dim=128, element_size=2, rows=24)
    assert (forward["BLOCK_M"], columns["BLOCK_M"]) == (32, 32)


def test_h2o_sums_reach_every_undecided_key_when_prompts_leave_gaps(monkeypatch):
    """Generation's layout: document 1's prompt is 6 tokens shorter, so its later tokens sit 6 slots
    after their positions. Its undecided keys (position >= tokens_before - window) then start
    below the pass's first slot - window: the column sums must still reach them, as the torch
    path's sums do (the python bound `sums_from` takes the gap off too)."""
    monkeypatch.setattr(
        kernel_launches, "COLUMN_SUMS_LAUNCHES", ({"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},)
    )
    batch, kv_heads, groups, q_len, head_dim, capacity, window, gap = 2, 2, 2, 17, 16, 64, 8, 6
    slots = torch.arange(capacity)
    shifted = torch.where((slots >= 36) & (slots < 57), slots - gap, -1)
    position = torch.stack([torch.where(slots < 57, slots, -1), torch.where(slots < 30, slots, shifted)])
    layout = BatchLayout(
        position=position, tokens_before=torch.tensor([40, 34]), tokens_after=torch.tensor([57, 51]),
        query_slots=torch.arange(40, 57), slots=(40, capacity), max_gap=gap,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(21)
    query = torch.randn(batch, q_len, kv_heads * groups, head_dim, generator=generator).transpose(1, 2)
    key = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator)
    value = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator)
    evicted = torch.rand(batch, kv_heads, capacity, generator=generator) < 0.2

    def received_by_attention():
        state = LayerEviction.allocate(layout, kv_heads, entry_scores=False, accumulate_attention=True)
        state.decision_window = window
        state.evicted.copy_(evicted)
        module = types.SimpleNamespace(**{attention.STATE_ATTRIBUTE: state})
        out, _ = attention.masked_attention(module, query, key, value, None, scaling=head_dim**-0.5)
        return out, state.attention_received

    out, received = received_by_attention()
    monkeypatch.setattr(attention, "takes_kernels", lambda *args: False)
    torch_out, torch_received = received_by_attention()
    undecided = (position >= (layout.tokens_before - window)[:, None])[:, None, :].expand_as(received)
    assert undecided[1, :, 26:30].all() and not undecided[1, :, 20:26].any()  # below slot 40 - 8: 26..29
    torch.testing.assert_close(received[undecided], torch_received[undecided], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, torch_out, rtol=1e-5, atol=1e-5)
