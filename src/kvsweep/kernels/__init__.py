"""kvsweep's Triton kernels, with no knowledge of transformers.

The contract of each kernel the engine calls: its op (a function over tensors), `fits(...)` (the
shapes, dtypes, devices and layouts it computes correctly, on any device) and `supports(...)`
(whether the engine runs it here: on a GPU where it fits). A caller that gets False runs its torch
path; results agree with it to the rounding each module documents (tests/kernels hold them to torch
and to float64 references, under Triton's interpreter on the CPU and compiled on a GPU). H2O's
column sums are launched by the attention kernels and share their `supports`; `attention_tiles`,
`launches` and `rounding` are helpers.
"""
