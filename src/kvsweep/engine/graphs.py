"""CUDA graphs of a pass through a model split over several GPUs: one graph per stretch on one GPU.

A CUDA graph is captured from one GPU's stream, into that GPU's memory pool. A split model's pass
runs on one GPU after the other, and accelerate's hooks hand the hidden state, the rotary tables
and the position ids to the next GPU with copies that PyTorch issues on the source GPU's stream,
which is no longer being captured once the pass has moved on. So the pass is captured in segments:
a forward pre-hook on every block of the device map ends the segment being captured when a block
receives tensors from another GPU, copies them into buffers on the block's GPU (outside any graph),
and starts the next segment there. A later block of the same segment that receives the same tensor
(the rotary tables reach every layer) reads the same buffer.

A replay replays the segments in order, with each segment's hand-over copies before it: one graph
launch per GPU and a few copies per pass. The copies run on the default streams of the two GPUs,
which PyTorch orders both ways, so each segment sees the previous one's outputs.
"""

import torch
from torch import nn


class SegmentedGraph:
    """One captured pass: [(device, graph, copies)], the copies (source, buffer) run before the graph."""

    def __init__(self):
        self.segments = []
        self.output = None

    def replay(self):
        for device, graph, copies in self.segments:
            for source, buffer in copies:
                buffer.copy_(source)
            with torch.cuda.device(device):
                graph.replay()
        return self.output

    def release(self) -> None:
        """Let the capture that follows reuse the pool memory of the output and the hand-overs (the
        graphs themselves stay until after it: the pool lives while a graph uses it)."""
        self.output = None
        self.segments = [(device, graph, []) for device, graph, _ in self.segments]


def block_devices(model: nn.Module) -> list[tuple[nn.Module, torch.device]]:
    """The blocks of the model's device map with the GPU each runs on."""
    blocks = []
    for name, index in getattr(model, "hf_device_map", {}).items():
        if isinstance(index, str) and not index.startswith("cuda"):
            raise ValueError(f"CUDA graphs need every block of the model on a GPU; '{name}' is on {index}")
        device = torch.device("cuda", index) if isinstance(index, int) else torch.device(index)
        blocks.append((model.get_submodule(name), device))
    return blocks


class SegmentedCapture:
    """Captures passes of a split model as `SegmentedGraph`s; `pools` (device -> the memory pool of
    the graphs captured there) and the side streams are shared by every capture of one `StaticPasses`."""

    def __init__(self, model: nn.Module):
        self.blocks = block_devices(model)
        if len({device for _, device in self.blocks}) < 2:
            raise ValueError(
                "CUDA graphs of a model on several GPUs need its device map (load it with device_map, "
                "as kvsweep.engine.models.load_model does), or run with cuda_graphs off"
            )
        self._device_of = {id(block): device for block, device in self.blocks}
        self.pools = {}
        self._streams = {}
        self._captured = None  # the SegmentedGraph being captured
        self._open = None  # (device, graph, stream context, copies) of the segment being captured
        self._buffers = {}  # (device, id(source)) -> buffer, for this capture
        self._running = 0

    def capture(self, forward, first_device: torch.device) -> SegmentedGraph:
        """Capture `forward()` (one pass; its inputs on `first_device`), whose result is kept as the
        graph's `output`."""
        self._synchronize({device for _, device in self.blocks} | {first_device})
        self._captured, self._buffers = SegmentedGraph(), {}
        self._running = 0  # blocks entered and not yet left
        handles = [block.register_forward_pre_hook(self._hand_over, with_kwargs=True) for block, _ in self.blocks]
        handles += [block.register_forward_hook(self._leave) for block, _ in self.blocks]
        try:
            self._begin(first_device, [])
            output = forward()
            self._end()
        except BaseException:
            if self._open is not None:  # leave no stream capturing
                self._close()
            raise
        finally:
            for handle in handles:
                handle.remove()
        captured, self._captured, self._buffers = self._captured, None, {}
        captured.output = output
        return captured

    def _hand_over(self, module, args, kwargs):
        device = self._device_of[id(module)]
        foreign = []
        _collect(args, device, foreign)
        _collect(kwargs, device, foreign)
        new = [tensor for tensor in foreign if (device, id(tensor)) not in self._buffers]
        boundary = new or device != self._open[0]
        if boundary and self._running:
            # The rest of the enclosing block would run outside every segment's graph.
            raise RuntimeError(
                f"{type(module).__name__} (on {device}) was called from inside another block of the device "
                "map: a split model is captured per GPU only when its blocks run one after the other "
                "(run with cuda_graphs off)"
            )
        self._running += 1
        if boundary:
            self._end()
            copies = []
            for tensor in new:
                buffer = self._new_buffer(tensor, device)
                self._buffers[(device, id(tensor))] = buffer
                copies.append((tensor, buffer))
            self._begin(device, copies)
        if not foreign:
            return None
        return _replaced(args, device, self._buffers), _replaced(kwargs, device, self._buffers)

    def _synchronize(self, devices) -> None:
        for device in devices:
            torch.cuda.synchronize(device)

    def _new_buffer(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A buffer on `device` for `tensor`, allocated outside any graph. Each replay copies the
        tensor into it before the segment; the copy here only fills it once (the capture runs
        nothing, so the values it gets now are never used)."""
        buffer = torch.empty_like(tensor, device=device)
        buffer.copy_(tensor)
        return buffer

    def _leave(self, module, args, output) -> None:
        self._running -= 1

    def _begin(self, device: torch.device, copies) -> None:
        stream = self._streams.setdefault(device, torch.cuda.Stream(device))
        stream.wait_stream(torch.cuda.current_stream(device))
        context = torch.cuda.stream(stream)
        context.__enter__()
        graph = torch.cuda.CUDAGraph()
        self._open = (device, graph, context, copies)
        graph.capture_begin(pool=self.pools.get(device))

    def _close(self):
        """End the open segment's capture and leave its stream: (device, graph, copies)."""
        device, graph, context, copies = self._open
        self._open = None
        try:
            graph.capture_end()
        finally:
            context.__exit__(None, None, None)
        return device, graph, copies

    def _end(self) -> None:
        device, graph, copies = self._close()
        torch.cuda.current_stream(device).wait_stream(self._streams[device])
        self.pools[device] = graph.pool()
        self._captured.segments.append((device, graph, copies))


def _collect(value, device, found: list) -> None:
    """The tensors in `value` (nested tuples, lists, dicts) that are on a GPU other than `device`."""
    if isinstance(value, torch.Tensor):
        if value.device != device and all(value is not seen for seen in found):
            found.append(value)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _collect(item, device, found)
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, device, found)


def _replaced(value, device, buffers):
    if isinstance(value, torch.Tensor):
        return buffers.get((device, id(value)), value) if value.device != device else value
    if isinstance(value, (tuple, list)):
        items = [_replaced(item, device, buffers) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {key: _replaced(item, device, buffers) for key, item in value.items()}
    return value
