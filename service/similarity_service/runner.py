"""The scoring engine: pairs in, P(similar) out. Synchronous, torch only; no HTTP, no asyncio.

How a batch runs on the CPU, and on CUDA in fp32/tf32: pairs are sorted by token count (longest first) and cut into sub-batches of at
most `max_batch_size` pairs and `max_batch_tokens` padded tokens; each sub-batch is padded only to
its own length bucket (a multiple of `bucket_multiple`), not to the longest pair of the whole call;
its ids, token types and mask go to the device in one copy (from pinned memory on CUDA); the
forward runs under `torch.inference_mode()`; probabilities come back in fp32 and are put back in
the caller's order. A CUDA out-of-memory error on a sub-batch empties the allocator cache and
retries the two halves, down to a single pair, before giving up with `EngineOOMError`.

On CUDA in fp16/bf16 the engine runs packed instead (packed.py, packed_executor.py): no padding at
all, variable-length attention (triton_attention.py, or flash attention), CUDA graphs for every batch of
up to 16k tokens, optionally torch.compile; the sub-batches are cut by real tokens, launched back to back,
and synchronized once at the end.

With `exact_thresholds` (fp16/bf16/tf32 only), a pair whose score lies within the precision's error margin
of one of those thresholds is scored again in fp32 by a second, fp32 copy of the model, so every decision
at those thresholds is fp32's: low precision moves a score by ~1e-4 (at most 9.1e-4 over this project's
corpus in fp16 on an H200), but a pair that close to a threshold can still flip. Where the engine runs
packed, the copy does too (one unpadded forward for a call's near pairs).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from similarity_service.bert import BertSimilarity
from similarity_service.engine_api import EncodedPair, EngineInfo, EngineOutOfMemory
from similarity_service.model import UnsupportedModelError, fingerprint, load_model, resolve_model
from similarity_service.packed import VarlenAttention, cuda_varlen_attention, reference_varlen_attention
from similarity_service.packed_executor import PackedExecutor
from similarity_service.packed_pairs import PackedPairs
from similarity_service.precision import (
    describe_device,
    matmul_precision,
    resolve_device,
    resolve_precision,
    torch_dtype,
)
from similarity_service.tokenization import SPECIAL_TOKENS_PER_PAIR, PairTokenizer, VocabularyError

logger = logging.getLogger(__name__)

# Padded tokens per forward. At BERT-base size this bounds activation memory to a few hundred MB in
# fp16 while still feeding a GPU fully (e.g. 64 pairs of 512 tokens, or 256 pairs of 128).
DEFAULT_MAX_BATCH_TOKENS = 32_768
DEFAULT_MAX_BATCH_SIZE = 256
# `score` tokenizes long inputs in chunks, overlapped with scoring: the first is small, so the device
# starts early (its tokenizing is the only part not overlapped), and each next one is SCORE_CHUNK_GROWTH
# times larger, up to SCORE_CHUNK_PAIRS.
FIRST_SCORE_CHUNK_PAIRS = 256
SCORE_CHUNK_GROWTH = 2.0
SCORE_CHUNK_PAIRS = 2_048
# Sub-batches are padded up to a multiple of this many tokens: few distinct shapes (each warmed up
# once), little padding (at most bucket_multiple - 1 tokens a pair), and Tensor Core-friendly sizes.
DEFAULT_BUCKET_MULTIPLE = 16
# Real tokens and pairs per packed forward (CUDA fp16/bf16). Measured on an H100
# (bench/kernels_probe.py): throughput rises up to ~64k tokens per forward, whose BERT-base
# activations fit in ~0.5 GB; without padding, more pairs per forward cost nothing extra.
DEFAULT_MAX_PACKED_TOKENS = 65_536
DEFAULT_MAX_PACKED_PAIRS = 4_096
# Precisions the flash varlen kernel takes.
PACKED_PRECISIONS = ("fp16", "bf16")
# How far from an exact threshold a score is re-checked in fp32: two to three times the largest error against fp32
# measured on the project's corpus (fp16 9.1e-4, bf16 5.7e-3, tf32 7.3e-4 on an H200: docs/performance.md).
THRESHOLD_MARGINS = {"fp16": 2e-3, "tf32": 2e-3, "bf16": 1.5e-2}


def score_chunks(count: int) -> list[tuple[int, int]]:
    """[start, end) ranges that cover `count` pairs: FIRST_SCORE_CHUNK_PAIRS, then SCORE_CHUNK_GROWTH times the
    last, up to SCORE_CHUNK_PAIRS."""
    ranges, start, size = [], 0, FIRST_SCORE_CHUNK_PAIRS
    while start < count:
        ranges.append((start, min(start + size, count)))
        start += size
        size = min(int(SCORE_CHUNK_GROWTH * size), SCORE_CHUNK_PAIRS)
    return ranges


def _triton_attention(
    fallback: VarlenAttention, device: torch.device, dtype: torch.dtype, tolerance: float
) -> VarlenAttention:
    """triton_attention.py's kernel where triton is installed and it attends as `fallback` does on this device
    (within `tolerance`), else `fallback`."""
    try:
        from similarity_service.triton_attention import checked_against
    except ImportError as exc:
        logger.info("the Triton attention kernel needs triton (%s); attention uses %s", exc, fallback.__name__)
        return fallback
    return checked_against(fallback, device, dtype, tolerance)


class EngineOOMError(EngineOutOfMemory):
    """Out of GPU memory even for a single pair; the engine itself is still usable."""


def bucket_lengths(max_seq_len: int, multiple: int) -> tuple[int, ...]:
    """All padded lengths a sub-batch can have: multiples of `multiple` below max_seq_len, and max_seq_len."""
    return (*range(multiple, max_seq_len, multiple), max_seq_len)


def plan_batches(
    lengths: Sequence[int], *, max_batch_size: int, max_batch_tokens: int, bucket_multiple: int, max_seq_len: int
) -> list[tuple[list[int], int]]:
    """Group pair indices into sub-batches: (indices, padded length), longest pairs first.

    A sub-batch holds at most `max_batch_size` pairs and, padded, at most `max_batch_tokens` tokens
    (a pair longer than that budget still runs, alone).
    """
    order = sorted(range(len(lengths)), key=lambda index: lengths[index], reverse=True)
    batches: list[tuple[list[int], int]] = []
    current: list[int] = []
    padded = 0
    for index in order:
        if current and (len(current) >= max_batch_size or (len(current) + 1) * padded > max_batch_tokens):
            batches.append((current, padded))
            current = []
        if not current:  # the first pair of a sub-batch is its longest
            padded = _bucket(lengths[index], bucket_multiple, max_seq_len)
        current.append(index)
    if current:
        batches.append((current, padded))
    return batches


def _bucket(length: int, multiple: int, max_seq_len: int) -> int:
    return min(-(-length // multiple) * multiple, max_seq_len)


class Engine:
    """A loaded model on one device in one precision. Implements `engine_api.ScoringEngine`.

    `encode` may be called from any thread; forwards are serialized by a lock, so `score_encoded` and
    `score` are safe from several threads too (the HTTP service calls them from one).
    """

    def __init__(
        self,
        *,
        module: BertSimilarity,
        tokenizer: PairTokenizer,
        info: EngineInfo,
        max_batch_size: int,
        max_batch_tokens: int,
        bucket_multiple: int,
        packed: PackedExecutor | None = None,
        cuda_graphs: bool = True,
        reference: BertSimilarity | None = None,
        reference_packed: PackedExecutor | None = None,
        exact_thresholds: Sequence[float] = (),
        threshold_margin: float = 0.0,
    ) -> None:
        """`reference`: an fp32 copy of the model that rescores pairs within `threshold_margin` of one of
        `exact_thresholds` (see the module's docstring); without it the thresholds do nothing.
        `reference_packed`: the packed path over that copy, which rescores them where given (one unpadded
        forward for all of a call's pairs instead of one padded forward per length bucket)."""
        if max_batch_size < 1 or max_batch_tokens < 1 or bucket_multiple < 1:
            raise ValueError("max_batch_size, max_batch_tokens and bucket_multiple must be positive")
        self._module = module
        self._reference = reference
        self._reference_packed = reference_packed
        self.exact_thresholds = tuple(exact_thresholds)
        self.threshold_margin = threshold_margin
        self.rescored_pairs = 0  # pairs scored again in fp32 so far (exact_thresholds)
        self._tokenizer = tokenizer
        self._info = info
        self._device = torch.device(info.device)
        self._pin_memory = self._device.type == "cuda"
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.bucket_multiple = bucket_multiple
        self.buckets = bucket_lengths(info.max_seq_len, bucket_multiple)
        self._lock = threading.Lock()
        self._packed = packed
        self.cuda_graphs = cuda_graphs

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str],
        *,
        revision: str | None = None,
        cache_dir: str | None = None,
        offline: bool = False,
        precision: str = "auto",
        device: str = "auto",
        max_seq_len: int = 512,
        max_batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        bucket_multiple: int = DEFAULT_BUCKET_MULTIPLE,
        packed: bool = True,
        cuda_graphs: bool = True,
        compile_model: bool = True,
        residual_fp32: bool = True,
        latency_kernels: bool = True,
        triton_attention: bool = True,
        exact_thresholds: Sequence[float] = (),
        threshold_margin: float | None = None,
    ) -> Engine:
        """Load a model (local directory or ModelScope hub id) onto a device in a precision.

        Raises `ModelLoadError` (model), `PrecisionError` / `DeviceError` (device), ValueError (limits).
        Device and precision are checked first, so a bad flag fails before a download.

        `packed`, `cuda_graphs`, `compile_model`, `residual_fp32`, `latency_kernels` and `triton_attention` choose
        the CUDA fp16/bf16 fast path's levers (they do nothing elsewhere): packed varlen forwards, CUDA graphs for
        batches of up to 16k tokens, torch.compile (~30 s more to start, faster forwards; falls back to eager if it
        fails), an fp32 residual stream (more accurate, a little slower), hand-written Triton kernels in the
        graphs of batches of up to 64 tokens (a single pair's; with an fp32 residual), and a Triton attention
        kernel sized to short sequences instead of flash attention's (in fp16; both where triton is installed).

        `exact_thresholds` (each in (0, 1)): decisions at these thresholds are fp32's; pairs scored within
        `threshold_margin` (default `THRESHOLD_MARGINS[precision]`) of one are scored again by an fp32 copy of
        the model on the same device (its memory: the fp32 weights, ~0.4 GB at BERT-base size). Nothing
        changes in fp32. `max_batch_size` (pairs) and `max_batch_tokens` bound one forward; their
        defaults depend on the path (padded: 256 pairs, 32k padded tokens; packed: 4096 pairs, 64k real tokens).
        """
        if any(not 0 < threshold < 1 for threshold in exact_thresholds):
            raise ValueError(f"exact thresholds must lie strictly between 0 and 1, got {list(exact_thresholds)}")
        torch_device = resolve_device(device)
        facts = describe_device(torch_device)
        chosen = resolve_precision(precision, torch_device, capability=facts.capability, device_name=facts.name)
        loaded = load_model(resolve_model(model, revision=revision, cache_dir=cache_dir, offline=offline))
        model_dir = loaded.resolved.model_dir
        limit = loaded.config.max_position_embeddings
        if not SPECIAL_TOKENS_PER_PAIR <= max_seq_len <= limit:
            raise ValueError(f"max_seq_len must be between {SPECIAL_TOKENS_PER_PAIR} and {limit} for this model, got {max_seq_len}")
        try:
            tokenizer = PairTokenizer(model_dir, max_seq_len=max_seq_len)
        except (OSError, VocabularyError) as exc:
            raise UnsupportedModelError(f"cannot build the tokenizer of {model_dir}: {exc}") from exc
        if tokenizer.vocab_size > loaded.config.vocab_size:
            raise UnsupportedModelError(
                f"{model_dir / 'vocab.txt'} has {tokenizer.vocab_size} tokens, more than config.json's "
                f"vocab_size {loaded.config.vocab_size}"
            )
        reference = None
        if exact_thresholds and chosen != "fp32":  # copied before `.to` converts the module in place
            reference = copy.deepcopy(loaded.module).to(torch_device).requires_grad_(False)
        module = loaded.module.to(device=torch_device, dtype=torch_dtype(chosen)).keep_head_fp32()
        info = EngineInfo(
            model_id=loaded.resolved.model_id,
            revision=loaded.resolved.revision,
            model_dir=str(model_dir),
            fingerprint=fingerprint(model_dir, loaded.weights_file, max_seq_len),
            precision=chosen,
            device=str(torch_device),
            device_name=facts.name,
            compute_capability=".".join(map(str, facts.capability)) if facts.capability else None,
            max_seq_len=max_seq_len,
        )
        executor = None
        attention = cuda_varlen_attention()
        if packed and torch_device.type == "cuda" and chosen in PACKED_PRECISIONS and attention is not None:
            # fp16 only: bf16 was not measured with it, and Triton's interpreter cannot check bf16 on the CPU
            if triton_attention and chosen == "fp16":
                attention = _triton_attention(attention, torch_device, torch.float16, 1e-2)
            executor = PackedExecutor(
                module,
                torch_device,
                attention,
                max_seq_len=max_seq_len,
                compile_model=compile_model,
                residual_fp32=residual_fp32,
                latency_kernels=latency_kernels and residual_fp32,
            )
        reference_packed = None
        if reference is not None and executor is not None:
            fp32_attention: VarlenAttention = reference_varlen_attention
            if triton_attention:
                fp32_attention = _triton_attention(fp32_attention, torch_device, torch.float32, 1e-4)
            reference_packed = PackedExecutor(
                reference, torch_device, fp32_attention, max_seq_len=max_seq_len, compile_model=False, latency_kernels=False
            )
        packed_path = executor is not None
        if max_batch_size is None:
            max_batch_size = DEFAULT_MAX_PACKED_PAIRS if packed_path else DEFAULT_MAX_BATCH_SIZE
        if max_batch_tokens is None:
            max_batch_tokens = DEFAULT_MAX_PACKED_TOKENS if packed_path else DEFAULT_MAX_BATCH_TOKENS
        return cls(
            module=module,
            tokenizer=tokenizer,
            info=info,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            bucket_multiple=bucket_multiple,
            packed=executor,
            cuda_graphs=cuda_graphs,
            reference=reference,
            reference_packed=reference_packed,
            exact_thresholds=exact_thresholds,
            threshold_margin=THRESHOLD_MARGINS.get(chosen, 0.0) if threshold_margin is None else threshold_margin,
        )

    @property
    def info(self) -> EngineInfo:
        """Model, precision and device facts."""
        return self._info

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
        """Tokenize (sentence1, sentence2) pairs, truncated longest-first to max_seq_len."""
        return self._tokenizer.encode(pairs)

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """P(similar) for each (sentence1, sentence2) pair, in order.

        A long list is tokenized chunk by chunk in a helper thread (the Rust tokenizer releases the GIL) and
        each chunk's forwards are launched before the chunk before it is read back, so the device runs one
        chunk while the host tokenizes and packs the next. On the packed path chunks are tokenized straight
        into flat arrays (packed_pairs.py). Pairs near an exact threshold are scored again in fp32 once, at
        the end, all chunks' together.
        """
        if len(pairs) <= FIRST_SCORE_CHUNK_PAIRS:
            return self.score_encoded(self.encode(pairs), bulk=True)
        chunks = [pairs[start:end] for start, end in score_chunks(len(pairs))]
        encode = self.encode if self._packed is None else self._tokenizer.encode_packed
        scores: list[float] = []
        near: list[int] = []
        near_items: list[EncodedPair] = []

        def read_back(encoded: Sequence[EncodedPair], collect: Callable[[], list[float]]) -> None:
            chunk_scores = collect()
            chunk_near = self._near_thresholds(chunk_scores)
            near.extend(len(scores) + index for index in chunk_near)
            near_items.extend(encoded[index] for index in chunk_near)
            scores.extend(chunk_scores)

        in_flight: tuple[Sequence[EncodedPair], Callable[[], list[float]]] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="structsim-tokenize") as tokenizer_thread:
            for encoded in tokenizer_thread.map(encode, chunks):
                launched = (encoded, self._launch_bulk(encoded))
                if in_flight is not None:
                    read_back(*in_flight)
                in_flight = launched
        if in_flight is not None:
            read_back(*in_flight)
        self._rescore(near_items, near, scores)
        return scores

    def _launch_bulk(self, batch: Sequence[EncodedPair]) -> Callable[[], list[float]]:
        """Start scoring `batch` in the engine's precision, op by op without waiting for the device; the returned
        callable reads the scores back. On the packed path `batch` is our tokenizer's `PackedPairs` (no check)."""
        if self._packed is None:
            scores = self._score_in_precision(batch, bulk=True)
            return lambda: scores
        assert isinstance(batch, PackedPairs)
        try:
            with self._lock:
                pending = self._packed.launch_packed(batch, max_tokens=self.max_batch_tokens, max_pairs=self.max_batch_size)
        except torch.cuda.OutOfMemoryError:
            pass  # scored below, with `_run_packed`'s smaller forwards
        else:
            return pending.collect
        torch.cuda.empty_cache()
        scores = self._score_in_precision(list(batch), bulk=True)
        return lambda: scores

    def score_encoded(self, batch: Sequence[EncodedPair], *, bulk: bool = False) -> list[float]:
        """P(similar) for each encoded pair, in the order given; any number of pairs.

        On the packed path a call past the largest CUDA graph replays graphs chunk by chunk, which needs the
        GIL twice a chunk (the batcher's calls: the event loop wants it too); `bulk` (offline lists, where
        nothing else does) runs it op by op in larger forwards instead, ~1.2x the pairs/s alone on an H200.
        """
        scores = self._score_in_precision(batch, bulk)
        near = self._near_thresholds(scores)
        self._rescore([batch[index] for index in near], near, scores)
        return scores

    def _validate(self, batch: Sequence[EncodedPair]) -> None:
        for item in batch:
            if not 0 < len(item.input_ids) <= self._info.max_seq_len or len(item.token_type_ids) != len(item.input_ids):
                raise ValueError(
                    f"an encoded pair has {len(item.input_ids)} ids and {len(item.token_type_ids)} type ids; "
                    f"this engine takes 1 to {self._info.max_seq_len} of each (encode with this engine)"
                )

    def _score_in_precision(self, batch: Sequence[EncodedPair], bulk: bool) -> list[float]:
        """The engine's own scores, before any exact-threshold rescoring."""
        self._validate(batch)
        if self._packed is not None:
            with self._lock:
                return self._run_packed(self._packed, list(batch), self.max_batch_tokens, use_graphs=self.cuda_graphs, bulk=bulk)
        return self._score_padded(batch, self._module)

    def _score_padded(self, batch: Sequence[EncodedPair], module: BertSimilarity) -> list[float]:
        scores = [0.0] * len(batch)
        plan = plan_batches(
            [len(item.input_ids) for item in batch],
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            bucket_multiple=self.bucket_multiple,
            max_seq_len=self._info.max_seq_len,
        )
        for indices, padded in plan:
            for index, score in zip(
                indices, self._score_splitting([batch[i] for i in indices], padded, module), strict=True
            ):
                scores[index] = score
        return scores

    def _near_thresholds(self, scores: Sequence[float]) -> list[int]:
        """The indices of the scores within `threshold_margin` of an exact threshold (none without a reference)."""
        if self._reference is None:
            return []
        margin = self.threshold_margin
        return [i for i, score in enumerate(scores) if any(abs(score - t) <= margin for t in self.exact_thresholds)]

    def _rescore(self, items: list[EncodedPair], indices: list[int], scores: list[float]) -> None:
        """Replace, in place, scores[indices] by fp32's scores of `items`."""
        if not items:
            return
        assert self._reference is not None
        if self._reference_packed is not None:
            with self._lock:
                rescored = self._run_packed(self._reference_packed, items, self.max_batch_tokens, use_graphs=False, bulk=True)
        else:
            rescored = self._score_padded(items, self._reference)
        for index, score in zip(indices, rescored, strict=True):
            scores[index] = score
        self.rescored_pairs += len(items)

    def warmup(self) -> None:
        """Run one pair at every bucket length, so no request meets a first-call outlier (cuDNN/cuBLAS
        pick kernels per shape on first use); on the packed path, capture every CUDA graph. The fp32
        reference of `exact_thresholds` too."""
        cls_id, sep_id = self._tokenizer.cls_id, self._tokenizer.sep_id
        padded_modules = [self._module] if self._packed is None else []  # the packed path warms up below
        if self._reference is not None and self._reference_packed is None:
            padded_modules.append(self._reference)
        for module in padded_modules:
            for length in self.buckets:
                ids = [cls_id] + [sep_id] * (length - 1)
                self._score_splitting([EncodedPair(ids, [0] * length)], length, module)
        executors = [executor for executor in (self._packed, self._reference_packed) if executor is not None]
        with self._lock:
            if self._packed is not None and self.cuda_graphs:
                self._packed.capture_all()
            # the eager path's first calls: each attention tile size (triton_attention.tiles_for) built
            for executor in executors:
                for length in (8, 32, 64, self._info.max_seq_len):
                    ids = [cls_id] + [sep_id] * (length - 1)
                    executor.run(
                        [EncodedPair(ids, [0] * length)] * 80,
                        max_tokens=self.max_batch_tokens,
                        max_pairs=self.max_batch_size,
                        use_graphs=False,
                    )

    def _run_packed(
        self, executor: PackedExecutor, items: list[EncodedPair], max_tokens: int, *, use_graphs: bool, bulk: bool
    ) -> list[float]:
        """One packed call; on CUDA OOM empty the cache and retry with half the tokens per forward."""
        try:
            return executor.run(items, max_tokens=max_tokens, max_pairs=self.max_batch_size, use_graphs=use_graphs, bulk=bulk)
        except torch.cuda.OutOfMemoryError:
            longest = max(len(item.input_ids) for item in items)
            if max_tokens <= longest:  # the forward that failed held the longest pair alone
                raise self._single_pair_oom(longest) from None
        # Retried outside the except block, so the failed attempt's tensors (held by its traceback) are freed.
        torch.cuda.empty_cache()
        return self._run_packed(executor, items, max_tokens // 2, use_graphs=use_graphs, bulk=bulk)

    def _score_splitting(self, items: list[EncodedPair], padded: int, module: BertSimilarity) -> list[float]:
        """Forward one sub-batch; on CUDA OOM retry its halves (each padded to its own bucket)."""
        try:
            with self._lock:
                return self._forward(items, padded, module)
        except torch.cuda.OutOfMemoryError:
            if len(items) == 1:
                raise self._single_pair_oom(len(items[0].input_ids)) from None
        # Retried outside the except block, so the failed attempt's tensors (held by its traceback) are freed.
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(items) // 2
        first, second = items[:half], items[half:]
        return self._score_splitting(first, self._padded(first), module) + self._score_splitting(
            second, self._padded(second), module
        )

    def _single_pair_oom(self, tokens: int) -> EngineOOMError:
        return EngineOOMError(
            f"out of GPU memory on {self._info.device_name} ({self._info.device}) scoring a single pair "
            f"of {tokens} tokens in {self._info.precision}; free GPU memory or lower max_seq_len"
        )

    def _padded(self, items: list[EncodedPair]) -> int:
        return _bucket(max(len(item.input_ids) for item in items), self.bucket_multiple, self._info.max_seq_len)

    def _forward(self, items: list[EncodedPair], padded: int, module: BertSimilarity) -> list[float]:
        """P(similar) of one padded sub-batch by `module`: the engine's, or its fp32 reference (run in fp32)."""
        # One int32 block (ids, token types, mask) so there is a single host→device copy. Padding ids are
        # 0 ([PAD]); they are masked out, and the mask (not the id) marks them, as a typed "[PAD]" is real.
        host = torch.zeros((3, len(items), padded), dtype=torch.int32, pin_memory=self._pin_memory)
        block = host.numpy()
        for row, item in enumerate(items):
            count = len(item.input_ids)
            block[0, row, :count] = item.input_ids
            block[1, row, :count] = item.token_type_ids
            block[2, row, :count] = 1
        tensors = host.to(self._device, non_blocking=self._pin_memory)
        precision = self._info.precision if module is self._module else "fp32"
        with torch.inference_mode(), matmul_precision(precision):
            logits = module(tensors[0], tensors[1], tensors[2].bool())
            return torch.sigmoid(logits).cpu().tolist()
