"""The engine's static cache layer: a pass's keys and values written to its slots in one kernel
on a GPU (`kvsweep.kernels.cache_writes`), by transformers' `StaticLayer.update` elsewhere."""

from transformers.cache_utils import StaticLayer

from kvsweep.kernels import cache_writes


class PassCacheLayer(StaticLayer):
    """transformers' static cache layer, whose update writes keys and values in one kernel where
    `cache_writes.supports` holds (the same values to the same slots: a copy rounds nothing).
    With `storage` (keys, values), those tensors are the cache, as filled (a compacted context):
    none is allocated."""

    def __init__(self, max_cache_len: int, storage=None):
        super().__init__(max_cache_len)
        self.storage = storage

    def lazy_initialization(self, key_states, value_states):
        if self.storage is None:
            return super().lazy_initialization(key_states, value_states)
        keys, values = self.storage
        self.storage = None
        self.dtype, self.device = keys.dtype, keys.device
        self.max_batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.keys, self.values = keys, values
        self.is_initialized = True

    def update(self, key_states, value_states, cache_kwargs=None):
        slots = None if cache_kwargs is None else cache_kwargs.get("cache_position")
        if not (
            self.is_initialized
            and slots is not None
            and cache_writes.supports(self.keys, self.values, key_states, value_states, slots)
        ):
            return super().update(key_states, value_states, cache_kwargs)
        cache_writes.write_pass(self.keys, self.values, key_states, value_states, slots)
        return self.keys, self.values
