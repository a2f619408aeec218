"""Variable-length attention in Triton, its tiles sized to the batch's sequences: the packed path's attention.

Flash attention's varlen kernel works in 128-query x 128-key tiles whatever the sequences' lengths. This
model's pairs are short (the corpus: median 24 tokens, mean 55), so most of each tile is masked work: in a
forward of the whole corpus x8 on an H200 it took 60 of 250 ms of kernel time (24 %), where its real
FLOPs are a few ms (bench/profile_engine.py). Here a program computes one (sequence, head, block of
queries), with tiles of 16-64 queries and keys picked from the batch's longest sequence, and an online
softmax over the key blocks (fp32 softmax and accumulator, as flash does). The bulk path sorts pairs by
length before it splits them into forwards, so each forward's sequences are near its longest.

The engine uses it in fp16, and in fp32 for the copy that scores pairs near an exact threshold again (the
products then full fp32, not tf32); bf16 keeps flash attention (not measured with this kernel).

`varlen_attention` is registered as a torch custom op, so torch.compile treats it as one opaque call and CUDA
graphs capture its launch. On the CPU it runs in Triton's interpreter (TRITON_INTERPRET=1), which is how the
tests check it against per-sequence SDPA.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from similarity_service.packed import VarlenAttention

logger = logging.getLogger(__name__)

_MIN_TILE = 16  # tl.dot's smallest dimension
_MAX_TILE = 64


class Tiles(NamedTuple):
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


def tiles_for(max_q: int, max_k: int) -> Tiles:
    """The tiles for a batch whose longest sequence has max_q queries and max_k keys."""
    block_q = min(_MAX_TILE, max(_MIN_TILE, triton.next_power_of_2(max_q)))
    block_k = min(_MAX_TILE, max(_MIN_TILE, triton.next_power_of_2(max_k)))
    return Tiles(block_q, block_k, num_warps=4, num_stages=2)


@triton.jit
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, cu_k_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    scale_log2, q_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Sequence s, head h, queries [b * BLOCK_Q, (b + 1) * BLOCK_Q): softmax(q k^T * scale) v, key block by block.
    IEEE: fp32 inputs multiplied in full fp32 (tl.dot would round them to tf32)."""
    seq = tl.program_id(0) // q_blocks
    q_block = tl.program_id(0) % q_blocks
    head = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q < q_len:  # a short sequence leaves its later query blocks with nothing to do
        k_start = tl.load(cu_k_ptr + seq)
        k_len = tl.load(cu_k_ptr + seq + 1) - k_start
        rq = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        dims = tl.arange(0, HEAD_DIM)
        q_ok = (rq < q_len)[:, None]
        q = tl.load(q_ptr + (q_start + rq)[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=q_ok, other=0.0)
        row_max = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_Q, HEAD_DIM), dtype=tl.float32)
        for start in range(0, k_len, BLOCK_K):
            rk = start + tl.arange(0, BLOCK_K)
            k_ok = rk < k_len
            k = tl.load(
                k_ptr + (k_start + rk)[None, :] * stride_kt + head * stride_kh + dims[:, None], mask=k_ok[None, :], other=0.0
            )
            if IEEE:
                logits = tl.dot(q, k, input_precision="ieee")
            else:
                logits = tl.dot(q, k)
            logits = logits * scale_log2  # base-2 logits: exp2 below
            logits = tl.where(k_ok[None, :], logits, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            weights = tl.math.exp2(logits - new_max[:, None])
            rescale = tl.math.exp2(row_max - new_max)
            row_sum = row_sum * rescale + tl.sum(weights, axis=1)
            v = tl.load(
                v_ptr + (k_start + rk)[:, None] * stride_vt + head * stride_vh + dims[None, :], mask=k_ok[:, None], other=0.0
            )
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
            row_max = new_max
        out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]  # a sequence without keys (padding slots): zeros
        o_ptrs = o_ptr + (q_start + rq)[:, None] * stride_ot + head * stride_oh + dims[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=q_ok)


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """The kernel on [T, heads, dim] q, k, v (any token and head strides, dims contiguous); `tiles` default
    to `tiles_for(max_q, max_k)` (bench/attention_probe.py times others)."""
    heads, head_dim = q.shape[1], q.shape[2]
    tiles = tiles or tiles_for(max_q, max_k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    q_blocks = triton.cdiv(max(max_q, 1), tiles.block_q)
    _varlen_attention_kernel[((cu_q.numel() - 1) * q_blocks, heads)](
        q, k, v, out, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        math.log2(math.e) / math.sqrt(head_dim), q_blocks,
        HEAD_DIM=head_dim, BLOCK_Q=tiles.block_q, BLOCK_K=tiles.block_k, IEEE=q.dtype == torch.float32,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return out


@torch.library.custom_op("structsim::varlen_attention", mutates_args=())
def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int
) -> torch.Tensor:
    """`packed.VarlenAttention`: softmax(q k^T / sqrt(dim)) v within each sequence ([T, heads, dim] layout)."""
    return launch(q, k, v, cu_q, cu_k, max_q, max_k)


@varlen_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int) -> torch.Tensor:
    del k, v, cu_q, cu_k, max_q, max_k
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def checked_against(fallback: VarlenAttention, device: torch.device, dtype: torch.dtype, tolerance: float) -> VarlenAttention:
    """This kernel where it builds and attends as `fallback` does on this device (random sequences of 1-200
    tokens, within `tolerance`), else `fallback`, logged: a Triton or driver problem costs speed, not service."""
    name = getattr(fallback, "__name__", "the library kernel")
    generator = torch.Generator(device=device).manual_seed(0)
    lengths = [1, 30, 200]
    cu = torch.tensor([0, 1, 31, 231], dtype=torch.int32, device=device)
    q, k, v = torch.randn(231, 3, 12, 64, generator=generator, device=device, dtype=dtype).unbind(1)
    try:
        got = varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths))
        difference = float((got.float() - fallback(q, k, v, cu, cu, max(lengths), max(lengths)).float()).abs().max())
    except Exception:  # noqa: BLE001 - any build or launch failure: the fallback serves
        logger.warning("the Triton attention kernel failed its check; attention uses %s", name, exc_info=True)
        return fallback
    if not difference <= tolerance:
        logger.warning("the Triton attention kernel differs from %s by %.3g; attention uses it", name, difference)
        return fallback
    return varlen_attention
