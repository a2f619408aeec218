"""Hand-written Triton kernels for the smallest packed batches (a single pair, a few pairs): the latency path.

One pair's forward, replayed from a CUDA graph, was 127 library kernels each bound by its fixed costs, not
its work: on an H200 cuBLAS takes 4-8 us a GEMM at 64 rows where reading the weights takes under 1 us,
flash attention 6.4 us a layer for 64 tokens, and separate kernels add the GELU, the residual sum and the
LayerNorms (bench/profile_engine.py, bench/triton_gemm_probe.py). Here a layer is 7 kernels:

  qkv GEMM + bias -> attention (each sequence's keys in one tile) -> attention_out GEMM, split-K into an
  fp32 accumulator -> bias + residual + LayerNorm (writes the fp32 residual and its fp16 copy, re-zeroes
  the accumulator) -> ffn_in GEMM + bias + exact GELU -> ffn_out GEMM, split-K -> bias + residual + LayerNorm.

The numerics are the packed path's with an fp32 residual stream, except that attention_out's and ffn_out's
products reach the residual in fp32 rather than rounded to fp16 first. Every row of a batch sits in one
tile, so the path serves batches of at most `MAX_TOKENS` tokens, and only inside CUDA graphs: launching a
Triton kernel from Python costs tens of microseconds, a replay nothing.

The GEMM configurations are the fastest of bench/triton_gemm_probe.py's sweep at 64 rows on an H200.
On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 set before this module is imported), which
is how the tests check them against the packed forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from similarity_service.packed import Norm, PackedWeights

MAX_TOKENS = 64  # the batch's rows, all in one GEMM tile, and its longest sequence, all in one attention tile
_MIN_TILE = 16  # tl.dot's smallest dimension


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int  # > 1: programs split K and add fp32 partial sums atomically


QKV = GemmConfig(block_n=32, block_k=128, num_warps=4, num_stages=4, split_k=1)
ATTENTION_OUT = GemmConfig(block_n=32, block_k=64, num_warps=4, num_stages=4, split_k=4)
FFN_IN = GemmConfig(block_n=32, block_k=128, num_warps=4, num_stages=4, split_k=1)
FFN_OUT = GemmConfig(block_n=32, block_k=128, num_warps=4, num_stages=4, split_k=4)


@triton.jit(do_not_specialize=["M"])  # one build for every row count: see _launch_gemm
def linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, K, k_chunk,
    stride_xm, stride_wn, stride_om,
    GELU: tl.constexpr, ACCUMULATE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[:M, cols] for this program's BLOCK_N columns over K in [pid_k * k_chunk, +k_chunk).

    ACCUMULATE: add the fp32 partial product x @ W^T into out (bias left to the norm kernel); else store
    act(x @ W^T + b) in out's dtype. W is nn.Linear's [N, K], K-contiguous: no transposed copy.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M  # rows past M pad the tile: loaded as 0, never stored
    n_ok = rn < N
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_lo + rk)[None, :]
    w_ptrs = w_ptr + rn[:, None] * stride_wn + (k_lo + rk)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:  # no K mask keeps the weight loads vectorized
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = (k + rk) < k_hi
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        # relaxed suffices: the sums commute, and the norm kernel reads them after this kernel ends
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")
    else:
        y = acc + tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GELU:
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))  # exact GELU, as BERT's
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_row(y, ok, gamma_ptr, beta_ptr, cols, H, eps):
    mean = tl.sum(y, axis=0) / H
    centered = tl.where(ok, y - mean, 0.0)
    variance = tl.sum(centered * centered, axis=0) / H
    gamma = tl.load(gamma_ptr + cols, mask=ok, other=0.0)
    beta = tl.load(beta_ptr + cols, mask=ok, other=0.0)
    return centered * tl.math.rsqrt(variance + eps) * gamma + beta


@triton.jit
def _embed_norm_kernel(
    ids_ptr, types_ptr, positions_ptr, word_ptr, position_ptr, type_ptr, gamma_ptr, beta_ptr,
    x_ptr, x16_ptr, H, eps, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Row r: LayerNorm(word[id] + position[pos] + type[type]) in fp32, stored fp32 and in x16's dtype."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    word = tl.load(ids_ptr + row).to(tl.int64)
    position = tl.load(positions_ptr + row).to(tl.int64)
    kind = tl.load(types_ptr + row).to(tl.int64)
    y = tl.load(word_ptr + word * H + cols, mask=ok, other=0.0).to(tl.float32)
    y += tl.load(position_ptr + position * H + cols, mask=ok, other=0.0).to(tl.float32)
    y += tl.load(type_ptr + kind * H + cols, mask=ok, other=0.0).to(tl.float32)
    y = _layer_norm_row(y, ok, gamma_ptr, beta_ptr, cols, H, eps)
    tl.store(x_ptr + row * H + cols, y, mask=ok)
    tl.store(x16_ptr + row * H + cols, y.to(x16_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _residual_norm_kernel(acc_ptr, bias_ptr, x_ptr, gamma_ptr, beta_ptr, x16_ptr, H, eps, BLOCK_H: tl.constexpr):
    """Row r: x = LayerNorm(x + acc + bias) in fp32 (in place), its copy in x16's dtype; acc re-zeroed."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    y = tl.load(acc_ptr + row * H + cols, mask=ok, other=0.0)
    y += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y += tl.load(x_ptr + row * H + cols, mask=ok, other=0.0)
    y = _layer_norm_row(y, ok, gamma_ptr, beta_ptr, cols, H, eps)
    tl.store(x_ptr + row * H + cols, y, mask=ok)
    tl.store(x16_ptr + row * H + cols, y.to(x16_ptr.dtype.element_ty), mask=ok)
    tl.store(acc_ptr + row * H + cols, tl.zeros((BLOCK_H,), dtype=tl.float32), mask=ok)  # ready for the next GEMM


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, cu_k_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Sequence s, head h: softmax(q k^T * scale) v over the sequence's keys, all in one tile (fp32 softmax).

    triton_attention's kernel computes the same with tiles of up to 64 and an online softmax over key blocks,
    and could serve here; in one pair's graph on an H200 it took 2.77 us a layer against this one's 2.43-2.45
    (bench/profile_engine.py, `profile_engine-…-72024c1.json`): on the single-pair path, this one-tile case
    is worth its own kernel."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    k_start = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k_start
    rq = tl.arange(0, BLOCK_Q)
    rk = tl.arange(0, BLOCK_K)
    dims = tl.arange(0, HEAD_DIM)
    q_ok = (rq < q_len)[:, None]
    k_ok = (rk < k_len)[:, None]
    q = tl.load(q_ptr + (q_start + rq)[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=q_ok, other=0.0)
    k = tl.load(k_ptr + (k_start + rk)[:, None] * stride_kt + head * stride_kh + dims[None, :], mask=k_ok, other=0.0)
    v = tl.load(v_ptr + (k_start + rk)[:, None] * stride_vt + head * stride_vh + dims[None, :], mask=k_ok, other=0.0)
    logits = tl.dot(q, tl.trans(k)) * scale_log2  # base-2 logits: exp2 below
    logits = tl.where((rk < k_len)[None, :], logits, float("-inf"))
    weights = tl.math.exp2(logits - tl.max(logits, axis=1)[:, None])
    out = tl.dot(weights.to(v.dtype), v) / tl.sum(weights, axis=1)[:, None]
    o_ptrs = o_ptr + (q_start + rq)[:, None] * stride_ot + head * stride_oh + dims[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=q_ok)


def _tile(size: int) -> int:
    return max(_MIN_TILE, triton.next_power_of_2(size))


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int
) -> torch.Tensor:
    """`packed.VarlenAttention` for sequences of at most MAX_TOKENS tokens ([T, heads, dim] layout)."""
    if max(max_q, max_k) > MAX_TOKENS:
        raise ValueError(f"the latency kernels take sequences of at most {MAX_TOKENS} tokens, got {max(max_q, max_k)}")
    heads, head_dim = q.shape[1], q.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    scale_log2 = math.log2(math.e) / math.sqrt(head_dim)
    _attention_kernel[(cu_q.numel() - 1, heads)](
        q, k, v, out, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale_log2, HEAD_DIM=head_dim, BLOCK_Q=_tile(max_q), BLOCK_K=_tile(max_k), num_warps=4,
    )  # fmt: skip
    return out


class LatencyForward:
    """`packed_probabilities` for batches of at most MAX_TOKENS tokens, with the kernels above.

    Holds the split-K accumulator, zero between calls (each norm kernel re-zeroes what its GEMM summed), so
    one instance serves every graph of one executor, replayed one at a time.
    """

    def __init__(self, weights: PackedWeights) -> None:
        model = weights.model
        if weights.residual_dtype != torch.float32:
            raise ValueError("the latency kernels keep the residual stream in fp32")
        if model.layers[0].gelu_approximate != "none":
            raise ValueError("the latency kernels implement BERT's exact GELU only")
        hidden = model.config.hidden_size
        if (hidden // model.config.num_attention_heads) % _MIN_TILE:
            raise ValueError(f"the attention kernel needs a head size that is a multiple of {_MIN_TILE}")
        self._weights = weights
        self._block_h = triton.next_power_of_2(hidden)
        device = model.word_embeddings.weight.device
        self._accumulator = torch.zeros(MAX_TOKENS, hidden, dtype=torch.float32, device=device)

    def __call__(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        cls_query_offsets: torch.Tensor,
        max_len: int,
    ) -> torch.Tensor:
        """P(similar) [N] in fp32, with `packed_probabilities`' arguments (less the weights and attention)."""
        weights = self._weights
        model = weights.model
        tokens = input_ids.numel()
        if tokens > MAX_TOKENS:
            raise ValueError(f"the latency kernels take at most {MAX_TOKENS} tokens, got {tokens}")
        hidden, dtype = model.config.hidden_size, model.word_embeddings.weight.dtype
        x = torch.empty(tokens, hidden, dtype=torch.float32, device=input_ids.device)
        x16 = torch.empty(tokens, hidden, dtype=dtype, device=input_ids.device)
        norm = weights.embedding_norm
        _embed_norm_kernel[(tokens,)](
            input_ids, token_type_ids, position_ids,
            model.word_embeddings.weight, model.position_embeddings.weight, model.token_type_embeddings.weight,
            norm.weight, norm.bias, x, x16, hidden, norm.eps, BLOCK_H=self._block_h,
        )  # fmt: skip
        last = len(model.layers) - 1
        for index, layer in enumerate(model.layers):
            qkv = self._linear(x16, layer.qkv, QKV)
            q, k, v = qkv.view(tokens, 3, layer.num_heads, hidden // layer.num_heads).unbind(1)
            if index == last:  # only the [CLS] rows are read after the last layer
                cls_rows = cu_seqlens[:-1].long()
                x, q = x[cls_rows], q[cls_rows]
                attended = varlen_attention(q, k, v, cls_query_offsets, cu_seqlens, 1, max_len)
            else:
                attended = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
            rows = x.shape[0]
            x16 = self._add_norm(
                attended.view(rows, hidden), layer.attention_out, ATTENTION_OUT, x, weights.attention_norms[index]
            )
            inner = self._linear(x16, layer.ffn_in, FFN_IN, gelu=True)
            x16 = self._add_norm(inner, layer.ffn_out, FFN_OUT, x, weights.ffn_norms[index])
        pooled = torch.tanh(F.linear(x, weights.pooler_weight, weights.pooler_bias))
        return torch.sigmoid(model.head(pooled).squeeze(-1))

    def _linear(
        self, x: torch.Tensor, linear: torch.nn.Linear, config: GemmConfig, *, gelu: bool = False
    ) -> torch.Tensor:
        """act(x @ W^T + b) in x's dtype."""
        rows, n = x.shape[0], linear.out_features
        out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
        self._launch_gemm(x, linear, config, out, gelu=gelu, accumulate=False)
        return out

    def _add_norm(
        self, x: torch.Tensor, linear: torch.nn.Linear, config: GemmConfig, residual: torch.Tensor, norm: Norm
    ) -> torch.Tensor:
        """residual = norm(residual + x @ W^T + b), in place in fp32; returns its copy in x's dtype."""
        rows, hidden = residual.shape
        accumulator = self._accumulator[:rows]
        self._launch_gemm(x, linear, config, accumulator, gelu=False, accumulate=True)
        copy = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
        _residual_norm_kernel[(rows,)](
            accumulator, linear.bias, residual, norm.weight, norm.bias, copy, hidden, norm.eps, BLOCK_H=self._block_h
        )
        return copy

    @staticmethod  # every call one BLOCK_M (the last layer's few [CLS] rows too): 4 Triton builds, not 12, at start
    def _launch_gemm(
        x: torch.Tensor, linear: torch.nn.Linear, config: GemmConfig, out: torch.Tensor, *, gelu: bool, accumulate: bool
    ) -> None:
        rows, k = x.shape
        n = linear.out_features
        steps = triton.cdiv(k, config.block_k)
        k_chunk = triton.cdiv(steps, config.split_k) * config.block_k  # whole BLOCK_K steps per split
        linear_kernel[(triton.cdiv(n, config.block_n), triton.cdiv(k, k_chunk))](
            x, linear.weight, linear.bias, out,
            rows, n, k, k_chunk,
            x.stride(0), linear.weight.stride(0), out.stride(0),
            GELU=gelu, ACCUMULATE=accumulate, EVEN_K=k % config.block_k == 0,
            BLOCK_M=MAX_TOKENS, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
