"""A pass's keys and values written into a static cache's slots by one kernel.

transformers' `StaticLayer.update` writes a pass's keys and its values with two `index_copy_`
calls. In exact streaming and decoding each writes a few kilobytes, and each took 2.7 us a layer
on an H200 at batch 8 (benchmarks/results/h200_llama-3.1-8b_2026-11-28_profile_chunk1_b8_all_methods.txt): a launch, not a copy. Here one kernel
copies both to the pass's cache slots, the same values to the same places (a copy rounds nothing).
Anything else (the CPU, a dtype or device that does not match the cache, no slots given) takes
`StaticLayer`'s own update (`kvsweep.engine.cache.PassCacheLayer` chooses).
"""

from kvsweep.kernels.launches import launched, on_gpu, on_tensor_device, triton

if triton is not None:
    import triton.language as tl


# Passes of up to this many tokens take the kernel (exact streaming, decoding, small chunks): there
# the two copies are two launches. A chunk's copies are a sliver of its pass, and were timed with
# `index_copy_` (benchmarks/history/2026-11-28.md, "Fifth step").
MAX_QUERIES = 16


def supports(keys, values, new_keys, new_values, slots) -> bool:
    """On a GPU, for a pass of at most `MAX_QUERIES` tokens, where the kernel `fits`."""
    return (
        on_gpu(keys)
        and new_keys.dim() == 4
        and new_keys.shape[2] <= MAX_QUERIES
        and fits(keys, values, new_keys, new_values, slots)
    )


def fits(keys, values, new_keys, new_values, slots) -> bool:
    """New keys and values (batch, heads, q, d) of the cache's batch, heads, head sizes, dtype and
    device, and q slots (integers on that device)."""
    return (
        new_keys.dim() == new_values.dim() == 4
        and new_keys.shape[:3] == new_values.shape[:3]
        and new_keys.shape[:2] == keys.shape[:2]
        and new_keys.shape[3] == keys.shape[3]
        and new_values.shape[3] == values.shape[3]
        and new_keys.dtype == new_values.dtype == keys.dtype == values.dtype
        and len({keys.device, values.device, new_keys.device, new_values.device, slots.device}) == 1
        and slots.dim() == 1
        and slots.numel() == new_keys.shape[2]
        and not slots.is_floating_point()
    )


def write_pass(keys, values, new_keys, new_values, slots) -> None:
    """keys[:, :, slots] = new_keys and values[:, :, slots] = new_values, in place (what the two
    `index_copy_(2, slots, ...)` of `StaticLayer.update` do), any strides."""
    launched("cache_writes")
    batch, heads, q_len, _ = new_keys.shape
    block_q = min(16, triton.next_power_of_2(q_len))
    block_d = triton.next_power_of_2(max(keys.shape[3], values.shape[3]))
    with on_tensor_device(keys):
        _write_pass[(batch * heads, triton.cdiv(q_len, block_q))](
            keys, *keys.stride(), values, *values.stride(), new_keys, *new_keys.stride(), new_values,
            *new_values.stride(), slots, slots.stride(0), q_len, heads, keys.shape[3], values.shape[3],
            BLOCK_Q=block_q, BLOCK_D=block_d,
        )  # fmt: skip


if triton is not None:

    @triton.jit
    def _write_pass(
        K, skb, skh, sks, skd, V, svb, svh, svs, svd, NK, snkb, snkh, snkq, snkd, NV, snvb, snvh, snvq, snvd,
        S, ss, q_len, heads, k_dim, v_dim, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One (document, head)'s block of the pass's queries: their key and value rows to their slots."""
        bh = tl.program_id(0).to(tl.int64)
        b, h = bh // heads, bh % heads
        i = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d = tl.arange(0, BLOCK_D)
        ok = i < q_len
        slot = tl.load(S + i * ss, mask=ok, other=0).to(tl.int64)
        k_ok = ok[:, None] & (d[None, :] < k_dim)
        k = tl.load(NK + b * snkb + h * snkh + i[:, None] * snkq + d[None, :] * snkd, mask=k_ok)
        tl.store(K + b * skb + h * skh + slot[:, None] * sks + d[None, :] * skd, k, mask=k_ok)
        v_ok = ok[:, None] & (d[None, :] < v_dim)
        v = tl.load(NV + b * snvb + h * snvh + i[:, None] * snvq + d[None, :] * snvd, mask=v_ok)
        tl.store(V + b * svb + h * svh + slot[:, None] * svs + d[None, :] * svd, v, mask=v_ok)
