"""A candidate measured by bench/ffn_gemm_probe.py, not used by the service: ffn_in's GEMM with its bias and
BERT's exact GELU fused in the epilogue, in Triton.

cuBLASLt's GELU epilogue is the tanh approximation, not BERT's erf GELU, so the exact fusion needs a GEMM of our
own, which pays only if it runs about as fast as cuBLAS. On an H200 at 65,536 rows the best of these took
0.752 ms against 0.719 for cuBLAS then ATen's GELU (`ffn_gemm_probe-NVIDIA-H200-20261202-205641.json`).

Two kernels compute act(x @ W^T + b), fp32 accumulation, W in nn.Linear's [N, K] layout (no transposed copy),
programs grouped GROUP_M row blocks at a time so neighbouring programs share W's tiles in L2:
- `_linear_kernel`: one program per BLOCK_M x BLOCK_N output tile, pointer loads (Triton's matmul tutorial);
- `_linear_persistent_kernel`: one program per SM looping over the tiles, operands and output through TMA
  descriptors (Hopper and later), so one tile's epilogue overlaps the next tile's loads.
On the CPU they run in Triton's interpreter: `bench/ffn_gemm_probe.py --check-cpu` checks them against torch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


class LinearTiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    persistent: bool = False  # `_linear_persistent_kernel` (TMA) rather than `_linear_kernel`
    subtile: bool = False  # persistent: the epilogue in two halves of BLOCK_N // 2 columns (less shared memory)


DEFAULT_TILES = LinearTiles(128, 256, 64, 8, 3)
GROUP_M = 8


@triton.jit
def _bias_act(acc, b_ptr, columns, N, GELU: tl.constexpr):
    y = acc + tl.load(b_ptr + columns, mask=columns < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))  # exact GELU, as BERT's
    return y


@triton.jit
def _tile_origin(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column block of output tile `tile`, in groups of GROUP_M row blocks (all columns of a group first)."""
    blocks_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@triton.jit(do_not_specialize=["M"])  # one build for every row count
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_origin(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows and columns past the matrix wrap around instead of being masked (unmasked loads pipeline best);
    # what they compute is never stored.
    x_ptrs = x_ptr + (rm % M)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + (rn % N)[None, :] * stride_wn + rk[:, None]  # [BLOCK_K, BLOCK_N]: W^T's tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):  # K is a multiple of BLOCK_K (checked by `linear`)
        acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = _bias_act(acc, b_ptr, rn, N, GELU)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit(do_not_specialize=["M"])
def _linear_persistent_kernel(
    x_desc, w_desc, out_desc, b_ptr, M, N, K,
    GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PROGRAMS: tl.constexpr, SUBTILE: tl.constexpr,
):  # fmt: skip
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):  # TMA reads rows past M as zeros and stores only rows within it
            acc = tl.dot(x_desc.load([off_m, k]), w_desc.load([off_n, k]).T, acc)
        if SUBTILE:
            left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            columns = off_n + tl.arange(0, BLOCK_N // 2)
            out_desc.store([off_m, off_n], _bias_act(left, b_ptr, columns, N, GELU).to(out_desc.dtype))
            right = _bias_act(right, b_ptr, columns + BLOCK_N // 2, N, GELU)
            out_desc.store([off_m, off_n + BLOCK_N // 2], right.to(out_desc.dtype))
        else:
            columns = off_n + tl.arange(0, BLOCK_N)
            out_desc.store([off_m, off_n], _bias_act(acc, b_ptr, columns, N, GELU).to(out_desc.dtype))


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, gelu: bool, tiles: LinearTiles = DEFAULT_TILES
) -> torch.Tensor:
    """act(x @ weight^T + bias) for x [M, K] (rows contiguous), weight [N, K] contiguous, bias [N]; x's dtype."""
    rows, inner = x.shape
    columns = weight.shape[0]
    if weight.shape[1] != inner or inner % tiles.block_k or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"linear: x {tuple(x.shape)}, weight {tuple(weight.shape)} with tiles {tiles}")
    out = torch.empty(rows, columns, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    tile_count = triton.cdiv(rows, tiles.block_m) * triton.cdiv(columns, tiles.block_n)
    if tiles.persistent:
        programs = min(_sm_count(x.device), tile_count)
        out_block = [tiles.block_m, tiles.block_n // 2 if tiles.subtile else tiles.block_n]
        _linear_persistent_kernel[(programs,)](
            TensorDescriptor.from_tensor(x, [tiles.block_m, tiles.block_k]),
            TensorDescriptor.from_tensor(weight, [tiles.block_n, tiles.block_k]),
            TensorDescriptor.from_tensor(out, out_block),
            bias, rows, columns, inner,
            GELU=gelu, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=GROUP_M,
            PROGRAMS=programs, SUBTILE=tiles.subtile, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
        return out
    _linear_kernel[(tile_count,)](
        x, weight, bias, out, rows, columns, inner, x.stride(0), weight.stride(0), out.stride(0),
        GELU=gelu, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=GROUP_M,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return out


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 3  # Triton's interpreter (the tests): a few programs, each looping over several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count
