"""The latency kernels (Triton, here in its interpreter) score what the packed forward scores."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from similarity_service.bert import BertSimilarity
from similarity_service.model import load_model, resolve_model
from similarity_service.packed import PackedWeights, packed_probabilities, reference_varlen_attention
from similarity_service.packed_executor import GraphBucket, PackedExecutor, graph_bucket, graph_offsets, pack
from similarity_service.tokenization import PairTokenizer

pytest.importorskip("triton")  # a dev dependency on Linux x86_64, where CI runs
from similarity_service.latency_kernels import MAX_TOKENS, LatencyForward, varlen_attention  # noqa: E402


def _fp16(model_dir: Path) -> BertSimilarity:
    return load_model(resolve_model(model_dir)).module.half().keep_head_fp32()


def _graph_inputs(model_dir: Path, pairs: list[tuple[str, str]]) -> tuple[list[torch.Tensor], int]:
    """A few short pairs laid into the 64-token graph bucket as the executor lays them: the forward's
    inputs (ids, types, positions, cu_seqlens, [CLS] query offsets) and its max_len; the real pairs first."""
    items = [item for item in PairTokenizer(model_dir, max_seq_len=512).encode(pairs) if len(item.input_ids) <= 16]
    block, cu = pack(items[:3])
    bucket = graph_bucket(block.shape[1], 3, 512)
    assert bucket is not None and bucket.tokens == MAX_TOKENS
    padded = np.zeros((3, bucket.tokens), dtype=np.int32)
    padded[:, : block.shape[1]] = block
    offsets = graph_offsets(cu, bucket, 512)
    rows = [torch.from_numpy(np.ascontiguousarray(row)) for row in padded]
    cls = torch.arange(len(offsets), dtype=torch.int32)
    return [*rows, torch.from_numpy(offsets), cls], bucket.tokens


def test_latency_forward_scores_as_the_packed_forward(
    tiny_model_dir: Path, chinese_pairs: list[tuple[str, str]]
) -> None:
    inputs, max_len = _graph_inputs(tiny_model_dir, chinese_pairs)
    fp32 = load_model(resolve_model(tiny_model_dir)).module
    latency = LatencyForward(PackedWeights.of(_fp16(tiny_model_dir)))
    with torch.inference_mode():
        expected = packed_probabilities(PackedWeights.of(fp32), *inputs, max_len, reference_varlen_attention)
        got = latency(*inputs, max_len)
        again = latency(*inputs, max_len)  # the split-K accumulator must be back at zero
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)  # fp16 matmuls against fp32
    torch.testing.assert_close(again, got, atol=1e-6, rtol=0)
    assert len(set(np.round(got[:3].numpy(), 3))) == 3  # distinct pairs (the first three), distinct scores


@pytest.mark.parametrize("one_query", [False, True], ids=["every-token", "cls-query"])
def test_attention_kernel_matches_per_sequence_sdpa(one_query: bool) -> None:
    """Varlen attention on q/k/v strided as the fused qkv projection lays them out; with `one_query`, the
    last layer's form (one [CLS] query per sequence against all its keys)."""
    generator = torch.Generator().manual_seed(0)
    lengths = [1, 7, 16, 40]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    tokens, heads, dim = int(cu[-1]), 2, 16
    qkv = torch.randn(tokens, 3, heads, dim, generator=generator).half()
    q, k, v = qkv.unbind(1)
    cu_q, max_q = cu, max(lengths)
    if one_query:
        q, cu_q, max_q = q[cu[:-1].long()], torch.arange(len(lengths) + 1, dtype=torch.int32), 1
    got = varlen_attention(q, k, v, cu_q, cu, max_q, max(lengths))
    expected = reference_varlen_attention(q.float(), k.float(), v.float(), cu_q, cu, max_q, max(lengths))
    torch.testing.assert_close(got.float(), expected, atol=2e-3, rtol=0)


def test_latency_kernels_refuse_what_they_do_not_implement(tiny_model_dir: Path) -> None:
    model = _fp16(tiny_model_dir)
    with pytest.raises(ValueError, match="fp32"):
        LatencyForward(PackedWeights.of(model, residual_fp32=False))
    latency = LatencyForward(PackedWeights.of(model))
    ids = torch.zeros(MAX_TOKENS + 1, dtype=torch.int32)
    offsets = torch.tensor([0, MAX_TOKENS + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=f"at most {MAX_TOKENS} tokens"):
        latency(ids, ids, ids, offsets, torch.arange(2, dtype=torch.int32), MAX_TOKENS + 1)


def _executor_with_latency(
    model_dir: Path, make_latency: Callable[[PackedWeights], Callable[..., torch.Tensor]]
) -> tuple[PackedExecutor, tuple[torch.Tensor, torch.Tensor, GraphBucket]]:
    """A CPU executor given latency kernels (it makes them only on CUDA), and its 64-token bucket's capture inputs."""
    executor = PackedExecutor(_fp16(model_dir), torch.device("cpu"), reference_varlen_attention, max_seq_len=512)
    executor._latency = make_latency(executor._weights)  # noqa: SLF001
    bucket = graph_bucket(30, 1, 512)
    assert bucket is not None
    size = 3 * bucket.tokens
    cu = executor._static[size : bucket.input_size]  # noqa: SLF001 - the layout capture() uses
    cu.copy_(torch.from_numpy(graph_offsets(np.zeros(1, dtype=np.int32), bucket, 512)))
    return executor, (executor._static[:size].view(3, bucket.tokens), cu, bucket)  # noqa: SLF001


def test_capture_keeps_latency_kernels_that_agree_with_the_library_forward(tiny_model_dir: Path) -> None:
    executor, (block, cu, bucket) = _executor_with_latency(tiny_model_dir, LatencyForward)
    with torch.inference_mode():
        assert executor._warm_latency(block, cu, bucket)  # noqa: SLF001
    assert executor._latency is not None  # noqa: SLF001


def test_capture_drops_latency_kernels_that_disagree(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    def wrong(*inputs: torch.Tensor) -> torch.Tensor:
        return torch.full((inputs[3].numel() - 1,), 0.5)

    executor, (block, cu, bucket) = _executor_with_latency(tiny_model_dir, lambda weights: wrong)
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        assert not executor._warm_latency(block, cu, bucket)  # noqa: SLF001
    assert executor._latency is None  # noqa: SLF001 - every later bucket uses the library forward
    assert "differ from the library forward" in caplog.text
