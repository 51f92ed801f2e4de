"""Launch settings of kvsweep's Triton kernels: which tile sizes a pass takes on this GPU, over
how many programs it splits its keys, where a kernel runs, and which kernels a process launched.

The settings are tried in order of preference; each call takes the first whose tiles fit the
GPU's shared memory (and whose row blocks suit the pass's rows). Under Triton's interpreter (the
CPU tests) any setting fits, and the GPU is taken to have INTERPRETER_SMS multiprocessors.
"""

import contextlib
import functools
import math
import os

import torch

try:
    import triton
except ImportError:  # no Triton (e.g. macOS, or a CPU-only install): torch ops are used instead
    triton = None

# Triton's interpreter runs the kernels on the CPU (the tests); it is read when a kernel is defined.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Every kernel this process launched, by module (a result's provenance: kvsweep.core.provenance).
LAUNCHED: set[str] = set()


def on_gpu(tensor: torch.Tensor) -> bool:
    """Where the engine runs kvsweep's kernels: CUDA tensors, with Triton installed."""
    return triton is not None and tensor.is_cuda


def launched(name: str) -> None:
    """Note that the kernel `name` ran (once per call on the host: a CUDA graph's replays are not
    counted, its capture is)."""
    LAUNCHED.add(name)


# Launch settings of the attention kernels (`kvsweep.kernels.attention`) (block of query rows, block of keys, warps, pipeline stages),
# in order of preference: each call takes the first whose tiles fit the GPU's shared memory.
# `benchmarks/attention_kernels_bench.py` times them on a GPU. On an H100 in bf16 (Llama-3.1-8B's shape,
# a pass at key 4,096, results/h100_llama-3.1-8b_2026-11-28_kernels_factored.json), with the first
# forward setting H2O's two kernels took 0.78 ms at batch 8 against 1.05 ms with 128 x 128 blocks,
# and at batch 1 as little as with the best setting tried.
# A pass with few query rows per KV head (decoding, exact streaming: one query times the heads of
# a group) takes the settings with the smallest row blocks that hold its rows (16, the least a
# matrix product takes), rather than computing mostly empty rows.
FORWARD_LAUNCHES = (
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
)
# Column sums: 64 x 64 blocks (64 x 128 before). In a CUDA-graph sweep on an H200 (Llama-3.1-8B's
# shape, H2O's 512-key window, results/h200_llama-3.1-8b_2026-11-28_launch_sweep.json) they took
# 4-5 us less than 64 x 128 at chunk 128 and batch 1, and the same at batch 8. The sweep launched
# every key block with whole rows (before `sums_from` and the row shares), not as the engine now does.
COLUMN_SUMS_LAUNCHES = (
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
)
# Split-K (flash-decoding): when one program per block of rows and KV head would leave the GPU
# mostly idle (batch 1, decoding), each also gets a share of the keys; a second kernel combines
# the shares. A pass gets about PROGRAMS_PER_SM programs per multiprocessor, and each share at
# least MIN_SPLIT_KEYS keys. Under Triton's interpreter the GPU is taken to have
# INTERPRETER_SMS multiprocessors, so that the CPU tests split passes as a GPU does.
PROGRAMS_PER_SM = 2
MIN_SPLIT_KEYS = 256
INTERPRETER_SMS = 4
# Triton needs shared memory beyond the pipelined tiles (the probabilities as a matmul operand,
# layout conversions): a setting is taken only if its tiles use at most this share of it.
SHARED_MEMORY_SHARE = 0.75


def choose_launches(query: torch.Tensor, rows: int = 1 << 30) -> tuple[dict, dict] | None:
    """The forward and column-sum settings for this query tensor's GPU (any under Triton's
    interpreter) and `rows` query rows per KV head, or None if one kernel has none that fits."""
    budget = SHARED_MEMORY_SHARE * _shared_memory(query.device.index) if query.is_cuda else math.inf
    return launches_within(budget, query.shape[-1], query.element_size(), rows)


def launches_within(budget: float, head_dim: int, element_size: int, rows: int = 1 << 30) -> tuple[dict, dict] | None:
    """The first settings of each kernel whose pipelined tiles take at most `budget` bytes, among
    those whose row blocks are no larger than `rows` needs (all of them if none is)."""
    row_block = max(16, triton.next_power_of_2(rows)) if triton is not None else rows

    def first_fitting(launches, tiles):
        small = [launch for launch in launches if launch["BLOCK_M"] <= row_block] or launches
        return next((launch for launch in small if element_size * head_dim * tiles(launch) <= budget), None)

    # Forward: the query block, and a key and a value block per pipeline stage.
    forward = first_fitting(FORWARD_LAUNCHES, lambda lc: lc["BLOCK_M"] + 2 * lc["num_stages"] * lc["BLOCK_N"])
    # Column sums: the key block, and a query block per pipeline stage.
    columns = first_fitting(COLUMN_SUMS_LAUNCHES, lambda lc: lc["BLOCK_N"] + lc["num_stages"] * lc["BLOCK_M"])
    return None if forward is None or columns is None else (forward, columns)


def key_splits(query: torch.Tensor, programs: int, k_len: int, block_n: int) -> tuple[int, int]:
    """(splits, keys per split) for a forward pass of `programs` programs over `k_len` keys: one
    split if the programs already fill the GPU, else as many as bring them to PROGRAMS_PER_SM per
    multiprocessor, each over a whole number of key blocks and at least MIN_SPLIT_KEYS keys."""
    sms = _multiprocessors(query.device.index) if query.is_cuda else INTERPRETER_SMS
    wanted = min(triton.cdiv(PROGRAMS_PER_SM * sms, programs), k_len // MIN_SPLIT_KEYS)
    if wanted <= 1:
        return 1, k_len
    span = triton.cdiv(triton.cdiv(k_len, wanted), block_n) * block_n
    return triton.cdiv(k_len, span), span


def row_splits(query: torch.Tensor, programs: int, row_blocks: int) -> int:
    """Shares of the rows for H2O's column sums, whose `programs` (live key blocks x batch x KV
    heads) each walk all `row_blocks` blocks of query rows: one if they already fill the GPU, else
    as many as bring them to PROGRAMS_PER_SM per multiprocessor, at most one per row block."""
    sms = _multiprocessors(query.device.index) if query.is_cuda else INTERPRETER_SMS
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, max(programs, 1)), row_blocks))


def on_tensor_device(tensor: torch.Tensor):
    """The tensor's GPU as the current device (where Triton launches), for the duration."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@functools.cache
def _shared_memory(device_index: int) -> int:
    """Bytes of shared memory a block may use on this GPU."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
