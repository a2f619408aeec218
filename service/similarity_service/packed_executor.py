"""Runs packed forwards on a CUDA device: host packing, one copy per call, CUDA graphs for most batches.

A call (a list of encoded pairs) is sorted by length and cut into sub-batches of at most `max_tokens`
real tokens; each is packed on the host and copied in one piece just before its launch (so packing
overlaps the device's work), the forwards run back to back, and the call synchronizes once.

Launched op by op, a forward costs the host ~0.5 ms (one pair) to ~3.5 ms (compiled, dynamic shapes)
of Python and kernel launches whatever its size, with the GIL held: that is most of a small batch's
time, and it stalls the serving event loop. So every call of up to `GRAPH_TOKEN_BUCKETS[-1]` tokens and
`GRAPH_SEQUENCE_BUCKETS[-1]` pairs replays a CUDA graph instead, captured per (token bucket, sequence
bucket): the inputs go into a static device buffer, padded with dummy sequences (one token each, for
the unused sequence slots, then the rest of the bucket's tokens in a few padding sequences of at most
`max_seq_len` tokens, so the attention grid is sized by `max_seq_len`, not by the bucket); input and
output go through persistent pinned buffers, and both copies are captured in the graph: a call is one
replay and one synchronize, the runner thread's only two releases of the GIL (each release costs it up to
the switch interval to win the GIL back while the event loop runs Python: bench/gil_reacquire_probe.py). Token
buckets double up to 2,048 tokens (where launches, not matmuls, set the time) and grow by at most 1.5x
above, so there padding costs at most a third of a bucket's matmul work. A call past the largest
bucket replays graphs on graph-sized chunks of it (each chunk packed while the previous one runs): op by
op, its forwards need ~3.5 ms of launches with the GIL each, and beside a thread that runs Python (the
serving event loop) a 512-pair, 28k-token call took 113 ms instead of 16 on an H200, chunked 23 ms
(bench/graph_chunks_probe.py). With nothing else wanting the GIL, op by op in forwards of up to
`max_tokens` is faster (x1.02-1.19 there); bulk calls ask for that.

The graphs of at most `LATENCY_MAX_TOKENS` tokens (a single pair's, mostly) capture the hand-written
forward of latency_kernels.py instead of the library one: 0.37 ms a replay instead of 0.50 on an H200.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch

from similarity_service.bert import BertSimilarity
from similarity_service.engine_api import EncodedPair
from similarity_service.packed import PackedWeights, VarlenAttention, packed_probabilities
from similarity_service.packed_pairs import PackedPairs, cu_seqlens

# Graph buckets: total tokens (incl. padding) and real sequence slots.
GRAPH_TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
GRAPH_SEQUENCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

PackedForward = Callable[..., torch.Tensor]

# The latency kernels' batches: at most this many tokens (latency_kernels.MAX_TOKENS, which needs triton).
LATENCY_MAX_TOKENS = 64
# Their scores against the library forward's on the same inputs, at capture (fp16: ~1e-3 apart at most).
LATENCY_TOLERANCE = 1e-2

logger = logging.getLogger(__name__)


def _latency_forward(weights: PackedWeights) -> Callable[..., torch.Tensor] | None:
    """The latency kernels' forward for these weights, or None (logged) where they cannot run."""
    try:
        from similarity_service.latency_kernels import MAX_TOKENS, LatencyForward
    except ImportError as exc:
        logger.info("the latency kernels need triton (%s); small batches use the library kernels", exc)
        return None
    assert MAX_TOKENS == LATENCY_MAX_TOKENS
    try:
        return LatencyForward(weights)
    except ValueError as exc:
        logger.info("the latency kernels do not fit this model (%s); small batches use the library kernels", exc)
        return None


class GraphBucket(NamedTuple):
    """One captured shape: `tokens` in all, `sequences` slots for real pairs, `padding` padding sequences."""

    tokens: int
    sequences: int
    padding: int

    @property
    def slots(self) -> int:
        """Sequences the graph runs: real slots, then padding sequences."""
        return self.sequences + self.padding

    @property
    def input_size(self) -> int:
        """int32 words of the graph's input: ids, types and positions of every token, then cu_seqlens."""
        return 3 * self.tokens + self.slots + 1


def _padding_sequences(token_bucket: int, max_seq_len: int) -> int:
    # enough sequences of at most max_seq_len tokens to hold a whole bucket
    return -(-token_bucket // max_seq_len)


def graph_bucket(tokens: int, sequences: int, max_seq_len: int) -> GraphBucket | None:
    """The smallest bucket that holds a batch plus its dummy and padding sequences, or None."""
    for seq_bucket in GRAPH_SEQUENCE_BUCKETS:
        if seq_bucket < sequences:
            continue
        for token_bucket in GRAPH_TOKEN_BUCKETS:
            padding = _padding_sequences(token_bucket, max_seq_len)
            # every unused slot gets one dummy token, and every padding sequence at least one token
            if token_bucket >= tokens + (seq_bucket - sequences) + padding:
                return GraphBucket(token_bucket, seq_bucket, padding)
        return None
    return None


def graph_chunks(cu: np.ndarray, max_seq_len: int, max_tokens: int, max_pairs: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges of the sequences of `cu` that each fit a graph bucket, within
    `max_tokens` real tokens and `max_pairs` sequences."""
    largest, most = GRAPH_TOKEN_BUCKETS[-1], GRAPH_SEQUENCE_BUCKETS[-1]
    # the worst case of a chunk in the largest bucket: most - 1 dummy slots, and the padding sequences
    room = largest - _padding_sequences(largest, max_seq_len) - (most - 1)
    return split_by_tokens(cu, min(max_tokens, room), min(max_pairs, most))


def reachable_buckets(max_seq_len: int) -> list[GraphBucket]:
    """Every bucket `graph_bucket` can return for batches of pairs of at most `max_seq_len` tokens."""
    buckets = set()
    lower = 0
    for seq_bucket in GRAPH_SEQUENCE_BUCKETS:
        # real batches for this bucket: lower+1 .. seq_bucket pairs of 1 .. max_seq_len tokens each;
        # the token bucket grows with the tokens, so the extremes and every bucket edge between them suffice
        for sequences in range(lower + 1, seq_bucket + 1):
            for tokens in (sequences, sequences * max_seq_len, *GRAPH_TOKEN_BUCKETS):
                if sequences <= tokens <= sequences * max_seq_len:
                    bucket = graph_bucket(tokens, sequences, max_seq_len)
                    if bucket is not None:
                        buckets.add(bucket)
        lower = seq_bucket
    return sorted(buckets, reverse=True)  # largest first: the shared memory pool grows once


def graph_offsets(cu: np.ndarray, bucket: GraphBucket, max_seq_len: int) -> np.ndarray:
    """cu_seqlens [slots + 1] for `cu`'s real sequences laid into `bucket`: the real ones, one-token
    dummies for the unused slots, then the remaining tokens spread over the padding sequences (each
    1 .. max_seq_len tokens)."""
    sequences, tokens = len(cu) - 1, int(cu[-1])
    dummies = bucket.sequences - sequences
    rest = bucket.tokens - tokens - dummies
    assert bucket.padding <= rest <= bucket.padding * max_seq_len, (bucket, tokens, sequences)
    per_padding = np.full(bucket.padding, rest // bucket.padding, dtype=np.int32)
    per_padding[: rest % bucket.padding] += 1
    out = np.empty(bucket.slots + 1, dtype=np.int32)
    out[: sequences + 1] = cu
    out[sequences + 1 : bucket.sequences + 1] = tokens + np.arange(1, dummies + 1, dtype=np.int32)
    out[bucket.sequences + 1 :] = tokens + dummies + np.cumsum(per_padding)
    return out


@functools.lru_cache(maxsize=2048)
def _single_pair_offsets(tokens: int, bucket: GraphBucket, max_seq_len: int) -> np.ndarray:
    """`graph_offsets` of one pair of `tokens` tokens (a few hundred distinct lengths: cached)."""
    offsets = graph_offsets(np.array([0, tokens], dtype=np.int32), bucket, max_seq_len)
    offsets.flags.writeable = False
    return offsets


def lengths_and_offsets(items: Sequence[EncodedPair]) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's token count [N] and the cumulative offsets cu_seqlens [N + 1], both int32."""
    lengths = np.fromiter((len(item.input_ids) for item in items), dtype=np.int32, count=len(items))
    return lengths, cu_seqlens(lengths)


def pack(items: Sequence[EncodedPair]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, types, positions) as one [3, T] int32 array, and cu_seqlens [N + 1] int32."""
    return PackedPairs.of(items).block(0, len(items))


def split_by_tokens(cu: np.ndarray, max_tokens: int, max_pairs: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges of sequences with at most max_tokens tokens (a longer single
    sequence still gets its own range) and max_pairs sequences each."""
    ranges, start, count = [], 0, len(cu) - 1
    while start < count:
        # the furthest end whose tokens fit, at least one sequence, at most max_pairs
        end = int(np.searchsorted(cu, int(cu[start]) + max_tokens, side="right")) - 1
        end = min(max(end, start + 1), start + max_pairs, count)
        ranges.append((start, end))
        start = end
    return ranges


class Completion(Protocol):
    def synchronize(self) -> None: ...


class PendingScores:
    """Scores of launched forwards in length order, on their way to a host buffer: `collect` waits for them
    and puts them back in the caller's order.

    `queued_behind` queues the copy to the host and an event right behind this call's forwards, so `collect`
    waits for this call's work only. (Read back with `.cpu()`, the copy would queue behind everything launched
    since, the next chunk's forwards included, and `Engine.score` would drain the device at every chunk.)
    """

    def __init__(self, order: np.ndarray, host_scores: torch.Tensor, done: Completion | None) -> None:
        self._order = order  # the caller's index of each sorted position
        self._host_scores = host_scores  # filled once `done` has completed
        self._done = done

    @classmethod
    def queued_behind(cls, order: np.ndarray, sorted_scores: torch.Tensor) -> PendingScores:
        if not sorted_scores.is_cuda:
            return cls(order, sorted_scores, None)
        host = torch.empty(sorted_scores.shape, dtype=sorted_scores.dtype, pin_memory=True)
        host.copy_(sorted_scores, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(sorted_scores.device))
        return cls(order, host, done)

    def collect(self) -> list[float]:
        if self._done is not None:
            self._done.synchronize()
        scores = np.empty(len(self._order), dtype=np.float32)
        scores[self._order] = self._host_scores.numpy()
        return scores.tolist()


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
        max_seq_len: int,
        compile_model: bool = False,
        residual_fp32: bool = True,
        latency_kernels: bool = True,
    ) -> None:
        model.requires_grad_(False)  # inference only: no autograd state, even outside inference_mode
        self._weights = PackedWeights.of(model, residual_fp32=residual_fp32)
        self._device = device
        self._attention = attention
        self._max_seq_len = max_seq_len
        self._forward: PackedForward = packed_probabilities
        if compile_model:
            self._forward = torch.compile(packed_probabilities, dynamic=True)
        cuda = device.type == "cuda"
        # The smallest graphs' forward: hand-written kernels (similarity_service/latency_kernels.py).
        self._latency: Callable[..., torch.Tensor] | None = None
        if latency_kernels and cuda:
            self._latency = _latency_forward(self._weights)
        self._pin = cuda
        # Graph inputs: a static device buffer laid out per bucket as [ids | types | positions | cu_seqlens],
        # mirrored by a persistent pinned host buffer; graph outputs land in a persistent pinned host buffer.
        self._buckets = reachable_buckets(max_seq_len)  # what capture_all captures, largest first
        max_slots = max((bucket.slots for bucket in self._buckets), default=1)
        size = 3 * GRAPH_TOKEN_BUCKETS[-1] + max_slots + 1
        self._static = torch.zeros(size, dtype=torch.int32, device=device)
        self._host_in = torch.zeros(size, dtype=torch.int32, pin_memory=cuda)
        self._host_out = torch.zeros(max_slots, dtype=torch.float32, pin_memory=cuda)
        self._host_in_np = self._host_in.numpy()
        self._positions = np.arange(max_seq_len, dtype=np.int32)
        self._cls_offsets = torch.arange(max_slots + 1, dtype=torch.int32, device=device)
        self._graphs: dict[GraphBucket, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda else None

    def run(
        self,
        items: Sequence[EncodedPair],
        *,
        max_tokens: int,
        max_pairs: int,
        use_graphs: bool = True,
        bulk: bool = False,
    ) -> list[float]:
        """P(similar) for each pair, in order. With `bulk`, a call past the largest graph runs op by op.
        Raises torch.cuda.OutOfMemoryError as it comes (the engine retries with a smaller `max_tokens`)."""
        if not items:
            return []
        if len(items) == 1 and use_graphs and self._pool is not None:
            return self._replay_one(items[0])
        with torch.inference_mode():
            if use_graphs and self._pool is not None:
                ranges = self._graph_ranges(items, max_tokens, max_pairs)
                if len(ranges) == 1 or not bulk:
                    return self._replay_chunks(items, ranges)
            return self.launch_bulk(items, max_tokens=max_tokens, max_pairs=max_pairs).collect()

    def launch_bulk(self, items: Sequence[EncodedPair], *, max_tokens: int, max_pairs: int) -> PendingScores:
        """`launch_packed` for a list of encoded pairs."""
        return self.launch_packed(PackedPairs.of(items), max_tokens=max_tokens, max_pairs=max_pairs)

    def launch_packed(self, pairs: PackedPairs, *, max_tokens: int, max_pairs: int) -> PendingScores:
        """Launch op-by-op forwards of `pairs` (at least one) in length-sorted sub-batches and return without
        waiting for them: `Engine.score` tokenizes and launches the next chunk while the device runs this one.
        Raises torch.cuda.OutOfMemoryError as it comes."""
        # Length-sorted sub-batches: each forward's longest pair sets its attention grid (max_len).
        order = np.argsort(pairs.lengths, kind="stable")
        with torch.inference_mode():
            return PendingScores.queued_behind(order, self._launch_eager(pairs.take(order), max_tokens, max_pairs))

    def _call(self, block: torch.Tensor, cu: torch.Tensor, max_len: int, *, latency: bool = False) -> torch.Tensor:
        sequences = cu.numel()
        # Graphs read the static offsets; an eager batch may have more sequences than they hold.
        if sequences <= self._cls_offsets.numel():
            cls_offsets = self._cls_offsets[:sequences]
        else:
            cls_offsets = torch.arange(sequences, dtype=torch.int32, device=self._device)
        if latency and self._latency is not None:
            return self._latency(block[0], block[1], block[2], cu, cls_offsets, max_len)
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

    def _launch_eager(self, pairs: PackedPairs, max_tokens: int, max_pairs: int) -> torch.Tensor:
        """Forwards launched back to back; their scores on the device, not yet read back. Each sub-batch is
        copied just before its launch, so the host prepares the next one while the device runs this one."""
        lengths = pairs.lengths
        outputs = []
        for start, end in split_by_tokens(pairs.cu, max_tokens, max_pairs):
            block, offsets = pairs.block(start, end)
            tokens = block.shape[1]
            # A fresh pinned buffer each time: the caching host allocator reuses it only once its copy is done.
            host = torch.empty(3 * tokens + len(offsets), dtype=torch.int32, pin_memory=self._pin)
            host_np = host.numpy()
            host_np[: 3 * tokens] = block.reshape(-1)
            host_np[3 * tokens :] = offsets
            on_device = host.to(self._device, non_blocking=self._pin)
            max_len = int(lengths[start:end].max())
            outputs.append(self._call(on_device[: 3 * tokens].view(3, tokens), on_device[3 * tokens :], max_len))
        return torch.cat(outputs)

    def _max_len(self, bucket: GraphBucket) -> int:
        # no sequence of a bucket is longer: real pairs are tokenized to max_seq_len, padding is cut to it
        return min(bucket.tokens, self._max_seq_len)

    def capture(self, bucket: GraphBucket) -> None:
        """Capture the graph of one bucket (warm-up runs first, on a side stream, as CUDA graphs require)."""
        if bucket in self._graphs:
            return
        size, used = 3 * bucket.tokens, bucket.input_size
        block = self._static[:size].view(3, bucket.tokens)
        cu = self._static[size:used]
        # A valid packing to capture with: no real pairs, every slot a dummy, the rest padding.
        cu.copy_(torch.from_numpy(graph_offsets(np.zeros(1, dtype=np.int32), bucket, self._max_seq_len)))
        latency = self._latency is not None and bucket.tokens <= LATENCY_MAX_TOKENS
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side), torch.inference_mode():
            if latency and not self._warm_latency(block, cu, bucket):
                latency = False
            for _ in range(2):
                self._call(block, cu, self._max_len(bucket), latency=latency)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Capture on this device's stream: torch.cuda.graph's default capture stream is one per process,
        # made on whichever device came first, so a second GPU's replica would capture nothing.
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool, stream=side):
            self._static[:used].copy_(self._host_in[:used], non_blocking=True)
            output = self._call(block, cu, self._max_len(bucket), latency=latency)
            self._host_out[: bucket.sequences].copy_(output[: bucket.sequences], non_blocking=True)
        self._graphs[bucket] = graph

    def _warm_latency(self, block: torch.Tensor, cu: torch.Tensor, bucket: GraphBucket) -> bool:
        """Compile the latency kernels and check them against the library forward on this bucket's capture
        layout with random tokens. False (and the library forward for every bucket from then on) if they fail
        or disagree."""
        max_len = self._max_len(bucket)
        block[0].random_(self._weights.model.config.vocab_size)  # real-looking tokens: zeros would check little
        try:
            got = self._call(block, cu, max_len, latency=True)
            expected = self._call(block, cu, max_len)
            difference = float((got - expected).abs().max())
        except Exception:  # noqa: BLE001 - a Triton build or launch failure: serve with the library kernels
            logger.warning("the latency kernels failed; small batches use the library kernels", exc_info=True)
            self._latency = None
            return False
        if not difference <= LATENCY_TOLERANCE:  # also catches NaN
            logger.warning("the latency kernels differ from the library forward by %.3g; not used", difference)
            self._latency = None
            return False
        return True

    def capture_all(self) -> None:
        """Capture every bucket, largest first (warm-up before ready: no request pays for a capture)."""
        for bucket in self._buckets:
            self.capture(bucket)
        if self._latency is not None:
            logger.info(
                "captured %d CUDA graphs, the latency kernels in those of up to %d tokens",
                len(self._graphs),
                LATENCY_MAX_TOKENS,
            )
        else:
            logger.info("captured %d CUDA graphs, library kernels only", len(self._graphs))

    def _graph_ranges(self, items: Sequence[EncodedPair], max_tokens: int, max_pairs: int) -> list[tuple[int, int]]:
        return graph_chunks(lengths_and_offsets(items)[1], self._max_seq_len, max_tokens, max_pairs)

    def _replay_chunks(self, items: Sequence[EncodedPair], ranges: list[tuple[int, int]]) -> list[float]:
        """Replays graphs on the consecutive `ranges` of `items` (one, most calls). The next chunk is packed
        while the device runs this one; the host buffers are shared, so each replay is collected before
        the next is launched."""
        scores: list[float] = []
        in_flight = 0  # sequences of the replay running on the device
        for start, end in ranges:
            block, cu = pack(items[start:end])
            bucket = graph_bucket(block.shape[1], end - start, self._max_seq_len)
            assert bucket is not None, "graph_chunks cut a chunk no bucket holds"
            if in_flight:
                scores += self._collect(in_flight)
            self._launch(block, cu, bucket)
            in_flight = end - start
        return scores + self._collect(in_flight)

    def _replay_one(self, item: EncodedPair) -> list[float]:
        """The common single pair: one replay, its input laid out by `_fill_one`."""
        bucket = self._fill_one(item)
        if bucket not in self._graphs:
            self.capture(bucket)  # captures from the static buffer; the replay copies the host buffer in
        self._graphs[bucket].replay()
        return self._collect(1)

    def _fill_one(self, item: EncodedPair) -> GraphBucket:
        """`_fill` for one pair without its numpy temporaries, which cost a one-pair call ~40 µs of host time
        on a 2-core CPU (~6 µs this way) and about twice that on an H200's host."""
        tokens = len(item.input_ids)
        bucket = graph_bucket(tokens, 1, self._max_seq_len)
        assert bucket is not None, "every single pair fits a graph bucket"
        size = 3 * bucket.tokens
        rows = self._host_in_np[:size].reshape(3, bucket.tokens)
        rows[0, :tokens] = item.input_ids
        rows[1, :tokens] = item.token_type_ids
        rows[2, :tokens] = self._positions[:tokens]
        rows[:, tokens:] = 0  # padding: id 0, type 0, position 0
        self._host_in_np[size : bucket.input_size] = _single_pair_offsets(tokens, bucket, self._max_seq_len)
        return bucket

    def _launch(self, block: np.ndarray, cu: np.ndarray, bucket: GraphBucket) -> None:
        if bucket not in self._graphs:
            self.capture(bucket)
        self._fill(block, cu, bucket)
        self._graphs[bucket].replay()  # the graph copies the host buffer in and the scores out itself

    def _fill(self, block: np.ndarray, cu: np.ndarray, bucket: GraphBucket) -> None:
        """Lay a packed batch into the pinned input buffer as `bucket`'s graph reads it."""
        tokens = block.shape[1]
        size = 3 * bucket.tokens
        rows = self._host_in_np[:size].reshape(3, bucket.tokens)
        rows[:, :tokens] = block
        rows[:, tokens:] = 0  # dummies and padding: id 0, type 0, position 0
        self._host_in_np[size : bucket.input_size] = graph_offsets(cu, bucket, self._max_seq_len)

    def _collect(self, sequences: int) -> list[float]:
        torch.cuda.current_stream(self._device).synchronize()
        return self._host_out[:sequences].tolist()
