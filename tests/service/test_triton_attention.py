"""The packed path's Triton attention (here in Triton's interpreter) attends as per-sequence SDPA does."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from similarity_service.model import load_model, resolve_model
from similarity_service.packed import PackedWeights, packed_probabilities, reference_varlen_attention
from similarity_service.packed_executor import pack
from similarity_service.tokenization import PairTokenizer

pytest.importorskip("triton")  # a dev dependency on Linux x86_64, where CI runs
from similarity_service.triton_attention import (  # noqa: E402
    Tiles,
    checked_against,
    launch,
    tiles_for,
    varlen_attention,
)


def _qkv(lengths: list[int], heads: int = 2, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v strided as the fused qkv projection lays them out, and the sequences' offsets."""
    generator = torch.Generator().manual_seed(sum(lengths))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    qkv = torch.randn(int(cu[-1]), 3, heads, dim, generator=generator).half()
    q, k, v = qkv.unbind(1)
    return q, k, v, cu


@pytest.mark.parametrize(
    ("lengths", "tiles"),
    [
        ([1, 7, 16, 40], None),  # one query block and one key block per sequence
        ([3, 70, 33], None),  # 64-tiles: the 70-token sequence takes two of each
        ([40, 17, 5], Tiles(16, 16, num_warps=4, num_stages=2)),  # several query and key blocks, a partial last one
    ],
)
def test_attention_matches_per_sequence_sdpa(lengths: list[int], tiles: Tiles | None) -> None:
    q, k, v, cu = _qkv(lengths)
    got = launch(q, k, v, cu, cu, max(lengths), max(lengths), tiles)
    expected = reference_varlen_attention(q.float(), k.float(), v.float(), cu, cu, max(lengths), max(lengths))
    torch.testing.assert_close(got.float(), expected, atol=2e-3, rtol=0)


def test_one_query_per_sequence_as_the_last_layer_asks() -> None:
    lengths = [5, 90, 12]
    q, k, v, cu = _qkv(lengths)
    q_cls, cu_q = q[cu[:-1].long()], torch.arange(len(lengths) + 1, dtype=torch.int32)
    got = torch.ops.structsim.varlen_attention(q_cls, k, v, cu_q, cu, 1, max(lengths))
    expected = reference_varlen_attention(q_cls.float(), k.float(), v.float(), cu_q, cu, 1, max(lengths))
    torch.testing.assert_close(got.float(), expected, atol=2e-3, rtol=0)


def test_a_sequence_without_keys_attends_to_nothing() -> None:
    """A graph bucket's padding slots can be empty; their rows come out zero, not NaN."""
    q, k, v, cu = _qkv([6, 4])
    cu_k = torch.tensor([0, 6, 6], dtype=torch.int32)  # the second sequence's keys: none
    got = launch(q, k, v, cu, cu_k, 6, 6)
    assert torch.equal(got[6:], torch.zeros_like(got[6:]))
    torch.testing.assert_close(
        got[:6].float(), reference_varlen_attention(q.float(), k.float(), v.float(), cu[:2], cu_k[:2], 6, 6)[:6], atol=2e-3, rtol=0
    )


def test_tiles_follow_the_longest_sequence() -> None:
    assert tiles_for(1, 9)[:2] == (16, 16)
    assert tiles_for(24, 24)[:2] == (32, 32)
    assert tiles_for(300, 300)[:2] == (64, 64)


def test_packed_fp16_forward_with_it_scores_as_fp32(tiny_model_dir: Path, chinese_pairs: list[tuple[str, str]]) -> None:
    fp32 = load_model(resolve_model(tiny_model_dir)).module
    fp16 = load_model(resolve_model(tiny_model_dir)).module.half().keep_head_fp32()
    items = PairTokenizer(tiny_model_dir, max_seq_len=512).encode(chinese_pairs[:6])
    block, cu = pack(items)
    rows = [torch.from_numpy(np.ascontiguousarray(row)) for row in block]
    offsets = torch.from_numpy(cu)
    cls = torch.arange(len(cu), dtype=torch.int32)
    max_len = max(len(item.input_ids) for item in items)
    with torch.inference_mode():
        expected = packed_probabilities(PackedWeights.of(fp32), *rows, offsets, cls, max_len, reference_varlen_attention)
        got = packed_probabilities(PackedWeights.of(fp16), *rows, offsets, cls, max_len, varlen_attention)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)


def test_fp32_inputs_attend_in_full_fp32() -> None:
    """The fp32 copy that rescores pairs near an exact threshold uses this kernel too: no tf32 rounding."""
    lengths = [9, 70, 33]
    q, k, v, cu = (t.float() if t.is_floating_point() else t for t in _qkv(lengths))
    got = launch(q, k, v, cu, cu, max(lengths), max(lengths))
    expected = reference_varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_the_load_time_check_keeps_the_kernel_only_where_it_agrees(caplog: pytest.LogCaptureFixture) -> None:
    """Engine.load checks the kernel against the library's attention on the device; a kernel that differs (or
    fails to build) leaves the library's in place, with a warning."""
    cpu = torch.device("cpu")
    assert checked_against(reference_varlen_attention, cpu, torch.float32, 1e-4) is varlen_attention

    def wrong(*args: object) -> torch.Tensor:
        return torch.zeros_like(reference_varlen_attention(*args))  # type: ignore[arg-type]

    with caplog.at_level(logging.WARNING):
        assert checked_against(wrong, cpu, torch.float32, 1e-4) is wrong
    assert "differs from wrong" in caplog.text
