"""Runs packed forwards on a CUDA device: host packing, one copy per batch, CUDA graphs for small batches.

Small batches are launch-bound: BERT-base is ~100 kernels, each a few microseconds of work. For them
the executor replays a CUDA graph captured per (token bucket, sequence bucket): the inputs are packed
into a static device buffer and padded with dummy sequences (token 0, one token each, plus one that
takes the rest), so every shape in a bucket runs the same graph. Bigger batches run the packed forward
directly (their launches are amortized). All of it is asynchronous: results stay on the device until
`collect`, so the host packs the next batch while the GPU runs this one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from similarity_service.bert import BertSimilarity
from similarity_service.engine_api import EncodedPair
from similarity_service.packed import VarlenAttention, packed_logits

# Graph buckets: total tokens (incl. dummies) and sequences (incl. dummies). Small batches only;
# above these the launch overhead is a small share of the work.
GRAPH_TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048)
GRAPH_SEQUENCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

PackedForward = Callable[..., torch.Tensor]


def pack(items: Sequence[EncodedPair]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, types, positions) as one [3, T] int32 array, and cu_seqlens [N + 1] int32."""
    lengths = np.fromiter((len(item.input_ids) for item in items), dtype=np.int32, count=len(items))
    cu = np.zeros(len(items) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    total = int(cu[-1])
    block = np.empty((3, total), dtype=np.int32)
    block[0] = np.fromiter(itertools.chain.from_iterable(item.input_ids for item in items), np.int32, total)
    block[1] = np.fromiter(itertools.chain.from_iterable(item.token_type_ids for item in items), np.int32, total)
    block[2] = np.arange(total, dtype=np.int32) - np.repeat(cu[:-1], lengths)
    return block, cu


def graph_bucket(tokens: int, sequences: int) -> tuple[int, int] | None:
    """The smallest (token, sequence) bucket that holds a batch plus its dummy sequences, or None."""
    for seq_bucket in GRAPH_SEQUENCE_BUCKETS:
        if seq_bucket < sequences:
            continue
        # every dummy sequence needs a token, and one more dummy holds the padding tokens
        needed = tokens + (seq_bucket - sequences) + 1
        for token_bucket in GRAPH_TOKEN_BUCKETS:
            if token_bucket >= needed:
                return token_bucket, seq_bucket
        return None
    return None


class PackedExecutor:
    """Packed forwards of one model on one device. Not thread-safe: the engine serializes calls.

    Made for CUDA; on the CPU (with `reference_varlen_attention`, no graphs) it runs the same packing
    code, which is how the tests check it.
    """

    def __init__(
        self, model: BertSimilarity, device: torch.device, attention: VarlenAttention, *, compile_model: bool = False
    ) -> None:
        self._model = model
        self._device = device
        self._attention = attention
        self._forward: PackedForward = packed_logits
        if compile_model:
            self._forward = torch.compile(packed_logits, dynamic=True)  # type: ignore[assignment]
        max_tokens, max_seqs = GRAPH_TOKEN_BUCKETS[-1], GRAPH_SEQUENCE_BUCKETS[-1] + 1
        # Static device inputs the graphs read: ids | types | positions rows, then cu_seqlens.
        self._static = torch.zeros(3 * max_tokens + max_seqs + 1, dtype=torch.int32, device=device)
        self._cls_offsets = torch.arange(max_seqs + 1, dtype=torch.int32, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self._pin = device.type == "cuda"

    def _call(self, block: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        sequences = cu.numel()
        # Graphs read the static offsets; an eager batch may have more sequences than they hold.
        if sequences <= self._cls_offsets.numel():
            cls_offsets = self._cls_offsets[:sequences]
        else:
            cls_offsets = torch.arange(sequences, dtype=torch.int32, device=self._device)
        return self._forward(self._model, block[0], block[1], block[2], cu, cls_offsets, max_len, self._attention)

    def _static_views(self, tokens: int, sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        max_tokens = GRAPH_TOKEN_BUCKETS[-1]
        block = self._static[: 3 * max_tokens].view(3, max_tokens)[:, :tokens]
        cu = self._static[3 * max_tokens : 3 * max_tokens + sequences + 2]
        return block, cu

    def capture(self, tokens: int, sequences: int) -> None:
        """Capture the graph of one bucket (warm-up runs first, on a side stream, as CUDA graphs require)."""
        if (tokens, sequences) in self._graphs:
            return
        block, cu = self._static_views(tokens, sequences)
        # A valid packing to capture with: one real 1-token sequence per slot, the padding in the last.
        cu.copy_(torch.tensor([*range(sequences + 1), tokens], dtype=torch.int32))
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._call(block, cu, tokens)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            output = self._call(block, cu, tokens)
        self._graphs[(tokens, sequences)] = (graph, output)

    def capture_all(self) -> None:
        """Capture every bucket (warm-up before ready: no request pays for a capture)."""
        for tokens in GRAPH_TOKEN_BUCKETS:
            for sequences in GRAPH_SEQUENCE_BUCKETS:
                if tokens >= sequences + 2:
                    self.capture(tokens, sequences)

    def launch(self, items: Sequence[EncodedPair], *, use_graphs: bool = True) -> torch.Tensor:
        """Start the forward of one batch; returns its fp32 logits [N] on the device (not yet synchronized)."""
        block_np, cu_np = pack(items)
        tokens, sequences = block_np.shape[1], len(items)
        bucket = graph_bucket(tokens, sequences) if use_graphs and self._pool is not None else None
        if bucket is not None:
            return self._replay(block_np, cu_np, bucket)
        host = torch.empty(3 * tokens + sequences + 1, dtype=torch.int32, pin_memory=self._pin)
        host_np = host.numpy()
        host_np[: 3 * tokens] = block_np.reshape(-1)
        host_np[3 * tokens :] = cu_np
        device_copy = host.to(self._device, non_blocking=self._pin)
        block = device_copy[: 3 * tokens].view(3, tokens)
        cu = device_copy[3 * tokens :]
        max_len = int(np.diff(cu_np).max())
        with torch.inference_mode():
            return self._call(block, cu, max_len)

    def _replay(self, block_np: np.ndarray, cu_np: np.ndarray, bucket: tuple[int, int]) -> torch.Tensor:
        token_bucket, seq_bucket = bucket
        if bucket not in self._graphs:
            self.capture(token_bucket, seq_bucket)
        graph, output = self._graphs[bucket]
        tokens, sequences = block_np.shape[1], len(cu_np) - 1
        max_tokens = GRAPH_TOKEN_BUCKETS[-1]
        host = torch.zeros(3 * max_tokens + GRAPH_SEQUENCE_BUCKETS[-1] + 2, dtype=torch.int32, pin_memory=True)
        host_np = host.numpy()
        rows = host_np[: 3 * max_tokens].reshape(3, max_tokens)
        rows[:, :tokens] = block_np  # padding tokens stay id 0, type 0, position 0
        cu = host_np[3 * max_tokens : 3 * max_tokens + seq_bucket + 2]
        cu[: sequences + 1] = cu_np
        dummies = seq_bucket - sequences  # one token each, then one sequence with the rest
        cu[sequences + 1 : seq_bucket + 1] = tokens + np.arange(1, dummies + 1, dtype=np.int32)
        cu[seq_bucket + 1] = token_bucket
        self._static.copy_(host, non_blocking=True)
        graph.replay()
        return output[:sequences].clone()
