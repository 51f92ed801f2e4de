"""Fixed-shape forward passes over a preallocated KV cache, replayed as CUDA graphs on a GPU.

Why: at small chunks (exact streaming, decoding) eager transformers is bound by the host. An 8B
model launches about 1,800 kernels per pass; the host needs ~80 ms to issue them while the GPU
works ~10 ms (benchmarks/history/2026-11-28.md, "What changed in the engine"). A pass whose shapes and buffers are fixed can be captured
once as a CUDA graph and replayed with a single launch.

Shapes are fixed by a grid of key buckets. The cache holds `capacity` slots, allocated once; a
pass whose queries lie in bucket i (slots [i * bucket, (i + 1) * bucket)) attends to the keys
[0, (i + 1) * bucket), so attention still costs what the position needs, and each (query count,
bucket) pair is captured once, by its first pass, which runs eagerly. Whatever changes from pass
to pass (token ids, position ids, query slots, the layout's token counts, the cache, the eviction
state) lives in tensors written in place, which the graph reads.

With `cuda_graphs=False` (and on the CPU) the same passes run eagerly, so the CPU tests exercise
the code that the GPU captures.

A job streams many batches, mostly of one shape. `ReusablePasses` keeps the passes of the last shape
(cache, eviction state, graphs) for the next batch of that shape, reset in place, so each pass
shape is captured once per job rather than once per batch.
"""

import contextlib

import torch
from transformers.cache_utils import Cache

from kvsweep.engine.cache import PassCacheLayer
from kvsweep.engine.graphs import SegmentedCapture
from kvsweep.engine.layout import BatchLayout
from kvsweep.engine.placement import decoder_of, model_devices, module_device


def whole_chunks(n: int, chunk_size: int) -> int:
    """n rounded up to a multiple of chunk_size."""
    return chunk_size * -(-n // chunk_size)


def cache_slots(width: int, chunk_size: int, key_bucket: int | None = None) -> int:
    """Slots to allocate for passes over [0, width): whole key buckets, so that batches whose widths
    lie in the same bucket have one shape (the slots past `width` are never streamed: memory only)."""
    return whole_chunks(width, key_bucket or default_bucket(chunk_size))


def default_bucket(chunk_size: int) -> int:
    """Slots per key bucket: a multiple of the chunk, at least 256 slots and 16 chunks. A capture
    costs about as much as a few eager passes, so each graph should be replayed ~16 times or more;
    the extra keys a larger bucket attends to cost little next to a large chunk's matmuls."""
    return whole_chunks(max(256, 16 * chunk_size), chunk_size)


class StaticPasses:
    """Runs the passes of one batch, laid out as `layout`, through `model` (inside the press's
    context, after `press.begin(model, layout)`), `chunk_size` queries at a time (fewer allowed).

    `key_bucket`: slots per key bucket (default: `default_bucket(chunk_size)`); `cuda_graphs`:
    capture and replay (default: on for a model on a CUDA device). Neither changes the results.
    `clock` (a `kvsweep.core.timing.StageClock`): the captures are billed to its `graph_capture` stage.
    `keep_graphs`: keep every bucket's graph for later batches (`ReusablePasses`), rather than freeing
    a bucket's graph once the passes have moved past it. `storage`: per layer, the (keys, values)
    tensors to use as the cache, already filled (`kvsweep.engine.compaction`), instead of zeros.
    """

    def __init__(
        self,
        model,
        layout: BatchLayout,
        chunk_size: int,
        key_bucket: int | None = None,
        cuda_graphs: bool | None = None,
        clock=None,
        keep_graphs: bool = False,
        storage: list | None = None,
    ):
        cuda_graphs = model.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if cuda_graphs and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        config = model.config.get_text_config()
        batch, self.capacity = layout.position.shape
        self.model, self.layout, self.cuda_graphs = model, layout, cuda_graphs
        self.bucket = key_bucket or default_bucket(chunk_size)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        storage = storage or [None] * config.num_hidden_layers
        self.cache = Cache(layers=[PassCacheLayer(self.capacity, kept) for kept in storage])
        for cache_layer, layer in zip(self.cache.layers, decoder_of(model).layers, strict=True):
            # Each layer's cache on its layer's device (a split model's are on several GPUs).
            empty = torch.zeros((batch, config.num_key_value_heads, 0, head_dim), dtype=model.dtype,
                                device=module_device(layer))  # fmt: skip
            cache_layer.lazy_initialization(empty, empty)
        self._inputs = {}  # query count -> (input_ids, position_ids, query_slots) buffers
        self._graphs = {}  # (query count, bucket index) -> (graph, its logits)
        self._pool = None
        # A model split over several GPUs is captured as one graph per stretch on one GPU.
        self._segments = SegmentedCapture(model) if cuda_graphs and len(model_devices(model)) > 1 else None
        self._clock = clock
        self._keep_graphs = keep_graphs

    def stream(self, input_ids: torch.Tensor, lengths: torch.Tensor, width: int, chunk_size: int):
        """Stream right-padded documents (`lengths` tokens each, slot = position) through slots
        [0, width) in whole chunks; yields (start, end, positions, logits) per pass."""
        for start in range(0, width, chunk_size):
            end = start + chunk_size
            self.layout.read(lengths.clamp(max=start), lengths.clamp(max=end))
            positions = torch.arange(start, end, device=input_ids.device)
            logits = self.run(input_ids[:, start:end], positions.expand(len(input_ids), -1), start)
            yield start, end, positions, logits

    def run(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        first_slot: int,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass of q = input_ids.shape[1] tokens into the cache slots [first_slot, first_slot + q).

        Returns the logits (batch, q, vocab), or with `logits_at` (pass offsets, a long tensor) only
        those (batch, len(logits_at), vocab), computed eagerly; the next pass may overwrite them.
        Passes must move forward: a pass never lies in an earlier bucket than the one before it.
        """
        q = input_ids.shape[1]
        index = first_slot // self.bucket
        if (first_slot + q - 1) // self.bucket != index or first_slot + q > self.capacity:
            raise ValueError(
                f"slots [{first_slot}, {first_slot + q}) straddle a key bucket of {self.bucket} or the cache"
            )
        if q not in self._inputs:
            device = input_ids.device
            self._inputs[q] = (torch.zeros_like(input_ids), torch.zeros_like(position_ids),
                               torch.zeros(q, dtype=torch.long, device=device))  # fmt: skip
        ids, positions, slots = self._inputs[q]
        ids.copy_(input_ids)
        positions.copy_(position_ids)
        torch.arange(first_slot, first_slot + q, out=slots)
        self.layout.query_slots = slots
        self.layout.slots = (index * self.bucket, min((index + 1) * self.bucket, self.capacity))
        self.layout.sync()
        if not self.cuda_graphs or logits_at is not None:
            return self._forward(ids, positions, slots, logits_at)

        if (q, index) in self._graphs:
            graph, logits = self._graphs[(q, index)]
            graph.replay()
            return logits
        logits = self._forward(ids, positions, slots)  # this pass's own work, and the capture's warm-up
        # Earlier buckets are never replayed again in this batch: unless they are kept for the next
        # batches, their logits go back to the shared pool for this capture to reuse, and the
        # graphs themselves go after it (the pool lives while a graph uses it). Kept graphs keep
        # their logits, so no capture reuses that memory; they replay in the order they were
        # captured, batch after batch, which is what makes sharing one pool safe.
        earlier = [] if self._keep_graphs else [key for key in self._graphs if key[1] < index]
        for key in earlier:
            self._graphs[key] = (self._graphs[key][0], None)
            if self._segments is not None:
                self._graphs[key][0].release()
        with self._capture_stage():
            if self._segments is not None:
                graph = self._segments.capture(lambda: self._forward(ids, positions, slots), ids.device)
                captured = graph.output
            else:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    captured = self._forward(ids, positions, slots)
                self._pool = graph.pool()
        for key in earlier:
            del self._graphs[key]
        self._graphs[(q, index)] = (graph, captured)
        return logits

    def kv_bytes(self) -> int:
        """Bytes of keys and values the cache holds, over every layer."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)

    def reset_cache(self) -> None:
        """Zero the cache for a new batch (the masks hide unwritten slots; zeros keep them finite)."""
        self.cache.reset()

    def _capture_stage(self):
        return self._clock.stage("graph_capture") if self._clock is not None else contextlib.nullcontext()

    def _forward(self, ids, positions, slots, logits_at=None) -> torch.Tensor:
        keep = {} if logits_at is None else {"logits_to_keep": logits_at}
        return self.model(
            input_ids=ids, position_ids=positions, cache_position=slots, past_key_values=self.cache, use_cache=True,
            **keep,
        ).logits  # fmt: skip


class ReusablePasses:
    """The passes of a job's last batch shape, for its next batches: one per job (an evaluator's).

    A batch of the same shape (documents x slots, `max_gap`, chunk, bucket) and press as the last
    one gets that batch's `StaticPasses` back, with its layout and eviction states overwritten in
    place by the new batch's and its cache zeroed, so its captured CUDA graphs replay (on an H100
    at chunk 128, four captures per batch of 8,192 tokens cost ~2-3 s of a 100-document job). A
    batch of another shape replaces what is kept. Results are those of fresh passes. Streaming
    allocates whole key buckets (`cache_slots`), so batches of documents of different lengths
    share a shape; in generation the prompts' padding gap is part of the shape, so batches share
    their passes only when it is the same (e.g. prompts cut to max_length).

    The press must not change while its passes are kept: its settings (the threshold, windows) are
    Python values that the captured graphs hold (calibration, which sets a new threshold per step,
    streams through fresh passes).

    Kept graphs keep every key bucket's logits (batch x chunk x vocabulary each: ~1 GiB at batch
    8, chunk 128 and a 128k vocabulary over 4 buckets) rather than one bucket's.
    """

    def __init__(self):
        self._key = None
        self._reused = None  # (press, passes, states)
        self.mask_only_press = None  # the baseline's press (masking only), one per job
        self.reused = 0  # batches that got the previous batch's passes back

    def open(self, model, layout: BatchLayout, press, chunk_size, key_bucket=None, cuda_graphs=None, clock=None):
        """`press.begin` and the passes for this batch (inside the press's context)."""
        key = (tuple(layout.position.shape), layout.max_gap, chunk_size, key_bucket)
        if key != self._key or self._reused[0] is not press:
            self._key, self._reused = None, None  # what was reused goes before the new allocation
            press.begin(model, layout)
            passes = StaticPasses(model, layout, chunk_size, key_bucket, cuda_graphs, clock, keep_graphs=True)
            self._key, self._reused = key, (press, passes, dict(press.layers))
            return passes
        _, passes, states = self._reused
        self.reused += 1
        passes.layout.assign(layout)
        press.begin(model, passes.layout, reused=states)
        passes.reset_cache()
        return passes


def open_passes(model, layout, press, chunk_size, key_bucket=None, cuda_graphs=None, clock=None, reuse=None):
    """The passes of one batch, after `press.begin` (inside the press's context): fresh, or with
    `reuse` (`ReusablePasses`) those of the job's previous batch of the same shape. Read the layout
    back from the passes (`passes.layout`): with `reuse` it is the reused one, holding this batch."""
    if reuse is not None:
        return reuse.open(model, layout, press, chunk_size, key_bucket, cuda_graphs, clock)
    press.begin(model, layout)
    return StaticPasses(model, layout, chunk_size, key_bucket, cuda_graphs, clock)
