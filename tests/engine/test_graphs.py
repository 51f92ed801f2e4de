"""Where a split model's pass is cut into per-GPU graphs, checked without GPUs.

The captures themselves need CUDA (benchmarks/multi_gpu.py checks them on GPUs: the split model
gives the one-GPU results exactly); what is checked here is the bookkeeping of the hand-overs:
where a segment ends, which tensors are copied, and that later blocks read the same buffers. The
"meta" device plays the first GPU and the CPU the second.
"""

import pytest
import torch
from torch import nn

from kvsweep.engine.graphs import SegmentedCapture

FIRST, SECOND = torch.device("meta"), torch.device("cpu")


class Block(nn.Module):
    """A decoder-layer-like block: the hidden state and the rotary tables (a tuple) in, a hidden state out."""

    def __init__(self, device):
        super().__init__()
        self.device = device
        self.seen = []

    def forward(self, hidden, rotary=None, extra=None):
        self.seen.append((hidden, rotary, extra))
        return torch.zeros(2, 3, device=self.device)


class RecordingCapture(SegmentedCapture):
    """The capture's bookkeeping, with segments recorded instead of captured."""

    def __init__(self, blocks):
        self.blocks = blocks
        self._device_of = {id(block): device for block, device in blocks}
        self.pools, self._streams, self._captured, self._open, self._buffers = {}, {}, None, None, {}
        self.segments = []

    def _synchronize(self, devices):
        pass

    def _new_buffer(self, tensor, device):
        return torch.zeros(tensor.shape, dtype=tensor.dtype, device=device)

    def _begin(self, device, copies):
        self._open = (device, None, None, copies)

    def _close(self):
        device, _, _, copies = self._open
        self._open = None
        return device, None, copies

    def _end(self):
        device, _, copies = self._close()
        self.segments.append((device, copies))


def test_a_segment_ends_where_a_block_receives_another_gpus_tensors():
    embed, first, second, third, fourth = (Block(d) for d in (FIRST, FIRST, SECOND, SECOND, SECOND))
    capture = RecordingCapture([(embed, FIRST), (first, FIRST), (second, SECOND), (third, SECOND), (fourth, SECOND)])
    rotary = (torch.zeros(4, device=FIRST), torch.zeros(4, device=FIRST))
    late = torch.zeros(5, device=FIRST)  # a tensor of the first GPU that only the last block reads

    def forward():
        hidden = embed(torch.zeros(2, 3, device=FIRST))
        hidden = first(hidden, rotary=rotary)
        hidden = second(hidden, rotary=rotary)
        hidden = third(hidden, rotary=rotary)
        return fourth(hidden, rotary=rotary, extra=late)

    capture.capture(forward, FIRST)
    assert [device for device, _ in capture.segments] == [FIRST, SECOND, SECOND]
    # The first block on the second GPU gets buffers for the hidden state and both rotary tables.
    handed_over = capture.segments[1][1]
    assert [source.shape for source, _ in handed_over] == [(2, 3), (4,), (4,)]
    assert all(buffer.device == SECOND for _, buffer in handed_over)
    hidden, (cos, sin), _ = second.seen[0]
    assert all(seen is buffer for seen, (_, buffer) in zip([hidden, cos, sin], handed_over, strict=True))
    # The next block reads the same rotary buffers, and its hidden state is the previous block's.
    _, (cos3, sin3), _ = third.seen[0]
    assert cos3 is cos and sin3 is sin
    # A tensor first read later on the same GPU ends the segment there, with one copy.
    assert len(capture.segments[2][1]) == 1 and capture.segments[2][1][0][0] is late
    assert fourth.seen[0][2] is capture.segments[2][1][0][1]
    # Blocks on the first GPU read their inputs as they are.
    assert first.seen[0][1] is rotary


class Outer(nn.Module):
    """A block that calls a block of another GPU from inside itself (as a layer calling the first
    GPU's rotary embedding would)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden):
        return self.inner(hidden) + 1


def test_a_block_of_another_gpu_called_from_inside_a_block_is_refused():
    inner = Block(FIRST)
    outer = Outer(inner)
    capture = RecordingCapture([(outer, SECOND), (inner, FIRST)])
    with pytest.raises(RuntimeError, match="called from inside another block of the device map"):
        capture.capture(lambda: outer(torch.zeros(2, 3, device=SECOND)), SECOND)


def test_a_model_on_several_gpus_without_its_device_map_is_refused():
    with pytest.raises(ValueError, match="need its device map"):
        SegmentedCapture(nn.Linear(2, 2))
