"""Runs packed forwards on a CUDA device: host packing, one copy per call, CUDA graphs for small batches.

A call (a list of encoded pairs) is sorted by length and cut into sub-batches of at most `max_tokens`
real tokens; each is packed on the host and copied in one piece just before its launch (so packing
overlaps the device's work), the forwards run back to back, and the call synchronizes once.

Small calls are launch-bound: BERT-base is ~150 kernels of a few microseconds each. For them the
executor replays a CUDA graph captured per (token bucket, sequence bucket): the inputs go into a
static device buffer, padded with dummy sequences (token 0, one token each, plus one that takes the
rest), so every shape in a bucket runs the same graph; input and output go through persistent
pinned buffers, so a one-pair call is one copy in, one replay, one copy out.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from similarity_service.bert import BertSimilarity
from similarity_service.engine_api import EncodedPair
from similarity_service.packed import PackedWeights, VarlenAttention, packed_probabilities

# Graph buckets: total tokens (incl. dummies) and sequences (incl. dummies). Small calls only; above
# these the launch overhead is a small share of the work.
GRAPH_TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048)
GRAPH_SEQUENCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_MAX_GRAPH_TOKENS = GRAPH_TOKEN_BUCKETS[-1]
_MAX_GRAPH_SEQUENCES = GRAPH_SEQUENCE_BUCKETS[-1] + 1  # the padding sequence

PackedForward = Callable[..., torch.Tensor]

logger = logging.getLogger(__name__)


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


def split_by_tokens(cu: np.ndarray, max_tokens: int, max_pairs: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges of sequences with at most max_tokens tokens (a longer single
    sequence still gets its own range) and max_pairs sequences each."""
    ranges, start, count = [], 0, len(cu) - 1
    while start < count:
        # the furthest end whose tokens fit, at least one sequence, at most max_pairs
        end = int(np.searchsorted(cu, cu[start] + max_tokens, side="right")) - 1
        end = min(max(end, start + 1), start + max_pairs, count)
        ranges.append((start, end))
        start = end
    return ranges


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
        self,
        model: BertSimilarity,
        device: torch.device,
        attention: VarlenAttention,
        *,
        compile_model: bool = False,
        residual_fp32: bool = True,
    ) -> None:
        model.requires_grad_(False)  # inference only: no autograd state, even outside inference_mode
        self._weights = PackedWeights.of(model, residual_fp32=residual_fp32)
        self._device = device
        self._attention = attention
        self._forward: PackedForward = packed_probabilities
        if compile_model:
            self._forward = torch.compile(packed_probabilities, dynamic=True)
        cuda = device.type == "cuda"
        self._pin = cuda
        # Graph inputs: static device buffer [ids | types | positions | cu_seqlens], mirrored by a
        # persistent pinned host buffer; graph outputs land in a persistent pinned host buffer.
        size = 3 * _MAX_GRAPH_TOKENS + _MAX_GRAPH_SEQUENCES + 1
        self._static = torch.zeros(size, dtype=torch.int32, device=device)
        self._host_in = torch.zeros(size, dtype=torch.int32, pin_memory=cuda)
        self._host_out = torch.zeros(_MAX_GRAPH_SEQUENCES, dtype=torch.float32, pin_memory=cuda)
        self._cls_offsets = torch.arange(_MAX_GRAPH_SEQUENCES + 1, dtype=torch.int32, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda else None

    def run(
        self, items: Sequence[EncodedPair], *, max_tokens: int, max_pairs: int, use_graphs: bool = True
    ) -> list[float]:
        """P(similar) for each pair, in order. Raises torch.cuda.OutOfMemoryError as it comes (the engine
        retries with a smaller `max_tokens`)."""
        if not items:
            return []
        tokens = sum(len(item.input_ids) for item in items)
        bucket = graph_bucket(tokens, len(items)) if use_graphs and self._pool is not None else None
        with torch.inference_mode():
            if bucket is not None and len(items) <= max_pairs and tokens <= max_tokens:
                return self._replay(*pack(items), bucket)
            # Length-sorted sub-batches: each forward's longest pair sets its attention grid (max_len).
            order = sorted(range(len(items)), key=lambda index: len(items[index].input_ids))
            sorted_scores = self._run_eager([items[index] for index in order], max_tokens, max_pairs)
        scores = [0.0] * len(items)
        for position, index in enumerate(order):
            scores[index] = sorted_scores[position]
        return scores

    def _call(self, block: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        sequences = cu.numel()
        # Graphs read the static offsets; an eager batch may have more sequences than they hold.
        if sequences <= self._cls_offsets.numel():
            cls_offsets = self._cls_offsets[:sequences]
        else:
            cls_offsets = torch.arange(sequences, dtype=torch.int32, device=self._device)
        args = (self._weights, block[0], block[1], block[2], cu, cls_offsets, max_len, self._attention)
        if self._forward is packed_probabilities:
            return packed_probabilities(*args)
        try:
            return self._forward(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 - any compiler failure: serve eagerly rather than not at all
            logger.warning("torch.compile failed; the packed forward runs eagerly", exc_info=True)
            self._forward = packed_probabilities
            return packed_probabilities(*args)

    def _run_eager(self, items: Sequence[EncodedPair], max_tokens: int, max_pairs: int) -> list[float]:
        """Forwards launched back to back, one read-back at the end. Each sub-batch is packed and copied
        just before its launch, so the host packs the next one while the device runs this one."""
        lengths = np.fromiter((len(item.input_ids) for item in items), dtype=np.int64, count=len(items))
        cu = np.concatenate(([0], np.cumsum(lengths)))
        outputs = []
        for start, end in split_by_tokens(cu, max_tokens, max_pairs):
            block, offsets = pack(items[start:end])
            tokens = block.shape[1]
            # A fresh pinned buffer each time: the caching host allocator reuses it only once its copy is done.
            host = torch.empty(3 * tokens + len(offsets), dtype=torch.int32, pin_memory=self._pin)
            host_np = host.numpy()
            host_np[: 3 * tokens] = block.reshape(-1)
            host_np[3 * tokens :] = offsets
            on_device = host.to(self._device, non_blocking=self._pin)
            max_len = int(lengths[start:end].max())
            outputs.append(self._call(on_device[: 3 * tokens].view(3, tokens), on_device[3 * tokens :], max_len))
        return torch.cat(outputs).cpu().tolist()

    def _static_views(self, tokens: int, sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = self._static[: 3 * _MAX_GRAPH_TOKENS].view(3, _MAX_GRAPH_TOKENS)[:, :tokens]
        cu = self._static[3 * _MAX_GRAPH_TOKENS : 3 * _MAX_GRAPH_TOKENS + sequences + 2]
        return block, cu

    def capture(self, tokens: int, sequences: int) -> None:
        """Capture the graph of one bucket (warm-up runs first, on a side stream, as CUDA graphs require)."""
        if (tokens, sequences) in self._graphs:
            return
        block, cu = self._static_views(tokens, sequences)
        # A valid packing to capture with: one 1-token sequence per slot, the padding in the last.
        cu.copy_(torch.tensor([*range(sequences + 1), tokens], dtype=torch.int32))
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._call(block, cu, tokens)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Capture on this device's stream: torch.cuda.graph's default capture stream is one per process,
        # made on whichever device came first, so a second GPU's replica would capture nothing.
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool, stream=side):
            output = self._call(block, cu, tokens)
        self._graphs[(tokens, sequences)] = (graph, output)

    def capture_all(self) -> None:
        """Capture every bucket (warm-up before ready: no request pays for a capture)."""
        for tokens in GRAPH_TOKEN_BUCKETS:
            for sequences in GRAPH_SEQUENCE_BUCKETS:
                if tokens >= sequences + 2:
                    self.capture(tokens, sequences)

    def _replay(self, block: np.ndarray, cu: np.ndarray, bucket: tuple[int, int]) -> list[float]:
        token_bucket, seq_bucket = bucket
        if bucket not in self._graphs:
            self.capture(token_bucket, seq_bucket)
        graph, output = self._graphs[bucket]
        tokens, sequences = block.shape[1], len(cu) - 1
        host = self._host_in.numpy()
        rows = host[: 3 * _MAX_GRAPH_TOKENS].reshape(3, _MAX_GRAPH_TOKENS)
        rows[:, :tokens] = block
        rows[:, tokens:token_bucket] = 0  # padding: id 0, type 0, position 0
        offsets = host[3 * _MAX_GRAPH_TOKENS : 3 * _MAX_GRAPH_TOKENS + seq_bucket + 2]
        offsets[: sequences + 1] = cu
        dummies = seq_bucket - sequences  # one token each, then one sequence with the rest
        offsets[sequences + 1 : seq_bucket + 1] = tokens + np.arange(1, dummies + 1, dtype=np.int32)
        offsets[seq_bucket + 1] = token_bucket
        self._static.copy_(self._host_in, non_blocking=True)
        graph.replay()
        self._host_out[:sequences].copy_(output[:sequences], non_blocking=True)
        torch.cuda.current_stream(self._device).synchronize()
        return self._host_out[:sequences].tolist()
