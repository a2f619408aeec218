"""The unpadded ("packed") forward: every pair's tokens end to end in one [T, H] tensor, no padding.

Length-sorted padded batches still spend matmul work on pad tokens and need a mask; packing spends
none: every matmul runs on exactly the tokens there are, and attention is variable-length attention
over cumulative sequence offsets (`cu_seqlens`). The last layer computes only each pair's
[CLS] row (queries, output projection, FFN and LayerNorms), since nothing else is read.

Precision: matmuls and attention run in the model's dtype (fp16/bf16); the pooler and the head run
in fp32, and so, with `residual_fp32`, do the residual stream and the LayerNorms (`PackedWeights`).
Rounding the residual sum to fp16 after every block is the main source of fp16's error against fp32;
keeping it in fp32 costs elementwise bandwidth (bench/perf.py measures both).

The attention kernel is triton_attention.py's (tiles sized to short sequences), or PyTorch's flash
`varlen_attn` (CUDA, fp16/bf16) where Triton is missing or fails its check. `reference_varlen_attention` is
the same function spelled with per-sequence SDPA, so the packing logic is tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from similarity_service.bert import BertSimilarity

VarlenAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def cuda_varlen_attention() -> VarlenAttention | None:
    """PyTorch's flash varlen attention, or None where this torch build lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn  # type: ignore[no-any-return]


@torch.library.custom_op("structsim::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(x @ weight^T + bias): ffn_in and its activation, one opaque op to torch.compile.

    Under torch.compile with dynamic shapes, Inductor's own GELU kernel moved [tokens, 3072] fp16 at 2.1 TB/s on
    an H100 (36 of 238 ms of a bulk call's kernel time) and ATen's at 3.0 TB/s (bench/ffn_gemm_probe.py); as a
    custom op the compiled forward runs cuBLAS (bias in its epilogue) and ATen's GELU, the same math.
    """
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


@linear_gelu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    del bias, approximate
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def reference_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int
) -> torch.Tensor:
    """Variable-length attention by one SDPA call per sequence ([T, heads, dim] layout). For the CPU and tests."""
    del max_q, max_k  # sizes the CUDA kernel's grid; nothing to size here
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    out = torch.empty_like(q)
    for i in range(len(starts_q) - 1):
        qs, qe, ks, ke = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        if qe > qs:
            out[qs:qe] = F.scaled_dot_product_attention(
                q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1)
            ).transpose(0, 1)
    return out


@dataclass(frozen=True)
class Norm:
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class PackedWeights:
    """The model's weights as the packed forward uses them: matmuls in the model's dtype, the rest fp32."""

    model: BertSimilarity
    residual_dtype: torch.dtype
    embedding_norm: Norm
    attention_norms: list[Norm]
    ffn_norms: list[Norm]
    pooler_weight: torch.Tensor
    pooler_bias: torch.Tensor

    @classmethod
    def of(cls, model: BertSimilarity, *, residual_fp32: bool = True) -> PackedWeights:
        residual = torch.float32 if residual_fp32 else model.word_embeddings.weight.dtype

        def norm(layer_norm: torch.nn.LayerNorm) -> Norm:
            return Norm(layer_norm.weight.to(residual), layer_norm.bias.to(residual), layer_norm.eps)

        return cls(
            model=model,
            residual_dtype=residual,
            embedding_norm=norm(model.embedding_norm),
            attention_norms=[norm(layer.attention_norm) for layer in model.layers],
            ffn_norms=[norm(layer.ffn_norm) for layer in model.layers],
            pooler_weight=model.pooler.weight.float(),
            pooler_bias=model.pooler.bias.float(),
        )


def packed_probabilities(
    weights: PackedWeights,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cls_query_offsets: torch.Tensor,
    max_len: int,
    attention: VarlenAttention,
) -> torch.Tensor:
    """P(similar) [N] in fp32 for N packed sequences.

    input_ids, token_type_ids, position_ids: [T] integer; cu_seqlens: [N + 1] int32, the offsets of each
    sequence (its [CLS] token first); cls_query_offsets: [N + 1] int32 equal to arange(N + 1), the query
    offsets of the last layer (one query, [CLS], per sequence; passed in so a CUDA graph can capture it);
    max_len: an upper bound of any sequence's length.
    """
    model = weights.model
    dtype, residual = model.word_embeddings.weight.dtype, weights.residual_dtype
    x = weights.embedding_norm(
        model.word_embeddings(input_ids).to(residual)
        + model.position_embeddings(position_ids).to(residual)
        + model.token_type_embeddings(token_type_ids).to(residual)
    )
    tokens, hidden = x.shape
    last = len(model.layers) - 1
    for index, layer in enumerate(model.layers):
        q, k, v = layer.qkv(x.to(dtype)).view(tokens, 3, layer.num_heads, hidden // layer.num_heads).unbind(1)
        if index == last:
            cls_rows = cu_seqlens[:-1].long()
            x, q = x[cls_rows], q[cls_rows]
            attended = attention(q, k, v, cls_query_offsets, cu_seqlens, 1, max_len)
        else:
            attended = attention(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
        x = weights.attention_norms[index](x + layer.attention_out(attended.reshape(x.shape[0], hidden)).to(residual))
        inner = linear_gelu(x.to(dtype), layer.ffn_in.weight, layer.ffn_in.bias, layer.gelu_approximate)
        x = weights.ffn_norms[index](x + layer.ffn_out(inner).to(residual))
    pooled = torch.tanh(F.linear(x.float(), weights.pooler_weight, weights.pooler_bias))
    return torch.sigmoid(model.head(pooled).squeeze(-1))
