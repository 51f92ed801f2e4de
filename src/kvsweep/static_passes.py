"""Fixed-shape forward passes over a preallocated KV cache, replayed as CUDA graphs on a GPU.

Why: at small chunks (exact streaming, decoding) eager transformers is bound by the host. An 8B
model launches about 1,800 kernels per pass; the host needs ~80 ms to issue them while the GPU
works ~10 ms (benchmarks/RESULTS.md). A pass whose shapes and buffers are fixed can be captured
once as a CUDA graph and replayed with a single launch.

Shapes are fixed by a grid of key buckets. The cache holds `capacity` slots, allocated once; a
pass whose queries lie in bucket i (slots [i * bucket, (i + 1) * bucket)) attends to the keys
[0, (i + 1) * bucket), so attention still costs what the position needs, and each (query count,
bucket) pair is captured once, by its first pass, which runs eagerly. Whatever changes from pass
to pass (token ids, position ids, query slots, the layout's token counts, the cache, the eviction
state) lives in tensors written in place, which the graph reads.

With `cuda_graphs=False` (and on the CPU) the same passes run eagerly, so the CPU tests exercise
the code that the GPU captures.
"""

import torch
from transformers.cache_utils import Cache, StaticLayer

from kvsweep.eviction import BatchLayout


def whole_chunks(n: int, chunk_size: int) -> int:
    """n rounded up to a multiple of chunk_size."""
    return chunk_size * -(-n // chunk_size)


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
    """

    def __init__(
        self,
        model,
        layout: BatchLayout,
        chunk_size: int,
        key_bucket: int | None = None,
        cuda_graphs: bool | None = None,
    ):
        cuda_graphs = model.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if cuda_graphs and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        config = model.config.get_text_config()
        batch, self.capacity = layout.position.shape
        self.model, self.layout, self.cuda_graphs = model, layout, cuda_graphs
        self.bucket = key_bucket or default_bucket(chunk_size)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = Cache(layers=[StaticLayer(self.capacity) for _ in range(config.num_hidden_layers)])
        self.cache.early_initialization(batch, config.num_key_value_heads, head_dim, model.dtype, model.device)
        self._inputs = {}  # query count -> (input_ids, position_ids, query_slots) buffers
        self._graphs = {}  # (query count, bucket index) -> (graph, its logits)
        self._pool = None

    def stream(self, input_ids: torch.Tensor, lengths: torch.Tensor, width: int, chunk_size: int):
        """Stream right-padded documents (`lengths` tokens each, slot = position) through slots
        [0, width) in whole chunks; yields (start, end, positions, logits) per pass."""
        for start in range(0, width, chunk_size):
            end = start + chunk_size
            self.layout.read(lengths.clamp(max=start), lengths.clamp(max=end))
            positions = torch.arange(start, end, device=input_ids.device)
            logits = self.run(input_ids[:, start:end], positions.expand(len(input_ids), -1), start)
            yield start, end, positions, logits

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, first_slot: int) -> torch.Tensor:
        """One pass of q = input_ids.shape[1] tokens into the cache slots [first_slot, first_slot + q).

        Returns the logits (batch, q, vocab); the next pass may overwrite them. Passes must move
        forward: a pass never lies in an earlier bucket than the one before it.
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
        if not self.cuda_graphs:
            return self._forward(ids, positions, slots)

        if (q, index) in self._graphs:
            graph, logits = self._graphs[(q, index)]
            graph.replay()
            return logits
        logits = self._forward(ids, positions, slots)  # this pass's own work, and the capture's warm-up
        # Earlier buckets are never replayed again: their logits go back to the shared pool for this
        # capture to reuse; the graphs themselves go after it (the pool lives while a graph uses it).
        earlier = [key for key in self._graphs if key[1] < index]
        for key in earlier:
            self._graphs[key] = (self._graphs[key][0], None)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            captured = self._forward(ids, positions, slots)
        self._pool = graph.pool()
        for key in earlier:
            del self._graphs[key]
        self._graphs[(q, index)] = (graph, captured)
        return logits

    def _forward(self, ids, positions, slots) -> torch.Tensor:
        return self.model(
            input_ids=ids, position_ids=positions, cache_position=slots, past_key_values=self.cache, use_cache=True
        ).logits
