"""The packed (unpadded) forward computes what the padded one does; its packing and graph buckets hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from similarity_service.engine_api import EncodedPair
from similarity_service.runner import FIRST_SCORE_CHUNK_PAIRS, Engine, score_chunks
from similarity_service.model import load_model, resolve_model
from similarity_service.packed import PackedWeights, linear_gelu, packed_probabilities, reference_varlen_attention
from similarity_service.packed_pairs import PackedPairs
from similarity_service.packed_executor import (
    PackedExecutor,
    PendingScores,
    GRAPH_SEQUENCE_BUCKETS,
    GRAPH_TOKEN_BUCKETS,
    graph_bucket,
    graph_chunks,
    graph_offsets,
    pack,
    reachable_buckets,
    split_by_tokens,
)
from similarity_service.tokenization import PairTokenizer


def test_pack_concatenates_pairs_with_offsets_and_positions() -> None:
    items = [EncodedPair([101, 7, 102], [0, 0, 0]), EncodedPair([101, 8, 9, 102, 5], [0, 0, 0, 1, 1])]
    block, cu = pack(items)
    assert cu.tolist() == [0, 3, 8]
    assert block[0].tolist() == [101, 7, 102, 101, 8, 9, 102, 5]
    assert block[1].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert block[2].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert block.dtype == np.int32 and cu.dtype == np.int32


@pytest.mark.parametrize(
    ("max_tokens", "max_pairs"), [(10, 100), (7, 100), (1, 100), (100, 2), (1000, 1000), (10**10, 1000)]
)
def test_split_by_tokens_covers_every_sequence_once_within_budgets(max_tokens: int, max_pairs: int) -> None:
    lengths = [3, 4, 8, 2, 2, 2, 9, 1]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ranges = split_by_tokens(cu, max_tokens, max_pairs)
    assert [i for start, end in ranges for i in range(start, end)] == list(range(len(lengths)))
    for start, end in ranges:
        assert end - start <= max_pairs
        assert end - start == 1 or sum(lengths[start:end]) <= max_tokens


@pytest.mark.parametrize(
    ("tokens", "sequences"), [(1, 1), (30, 1), (62, 1), (63, 1), (100, 3), (500, 17), (1900, 64), (7000, 128), (16000, 200)]
)
def test_graph_bucket_holds_the_batch_and_its_dummy_and_padding_sequences(tokens: int, sequences: int) -> None:
    bucket = graph_bucket(tokens, sequences, 512)
    assert bucket is not None
    assert bucket.sequences >= sequences
    assert bucket.padding * 512 >= bucket.tokens  # padding sequences never longer than max_seq_len
    assert bucket.tokens >= tokens + (bucket.sequences - sequences) + bucket.padding  # one token each at least
    assert bucket.tokens in GRAPH_TOKEN_BUCKETS and bucket.sequences in GRAPH_SEQUENCE_BUCKETS


@pytest.mark.parametrize(("tokens", "sequences"), [(GRAPH_TOKEN_BUCKETS[-1], 1), (100, GRAPH_SEQUENCE_BUCKETS[-1] + 1)])
def test_graph_bucket_is_none_past_the_largest(tokens: int, sequences: int) -> None:
    assert graph_bucket(tokens, sequences, 512) is None


@pytest.mark.parametrize("max_seq_len", [32, 128, 512])
@pytest.mark.parametrize(("max_tokens", "max_pairs"), [(65_536, 4_096), (65_536, 300), (5_000, 4_096)])
def test_graph_chunks_cover_a_large_call_in_order_each_in_a_bucket(max_seq_len: int, max_tokens: int, max_pairs: int) -> None:
    """A call past the largest graph is cut into chunks that each replay a graph: none left to run op by op."""
    rng = np.random.default_rng(max_seq_len)
    for count, short in ((3_000, False), (1_500, True)):  # long pairs fill the tokens first, short ones the slots
        lengths = rng.integers(3, 12 if short else max_seq_len + 1, size=count)
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ranges = graph_chunks(cu, max_seq_len, max_tokens, max_pairs)
        assert [i for start, end in ranges for i in range(start, end)] == list(range(count))
        assert len(ranges) > 1
        for start, end in ranges:
            tokens = int(cu[end] - cu[start])
            assert end - start <= max_pairs and tokens <= max_tokens
            assert graph_bucket(tokens, end - start, max_seq_len) in reachable_buckets(max_seq_len)
        # full chunks: none of them (but the last) is less than half as long as the budget lets it be
        budget = min(max_tokens, GRAPH_TOKEN_BUCKETS[-1])
        for start, end in ranges[:-1]:
            assert end - start == min(max_pairs, GRAPH_SEQUENCE_BUCKETS[-1]) or cu[end] - cu[start] > budget // 2


@pytest.mark.parametrize("max_seq_len", [64, 512])
def test_graph_offsets_keep_real_sequences_and_bound_every_padding_sequence(max_seq_len: int) -> None:
    rng = np.random.default_rng(0)
    reachable = set(reachable_buckets(max_seq_len))
    for _ in range(300):
        count = int(rng.integers(1, 600))
        lengths = rng.integers(1, max_seq_len + 1, size=count)
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        bucket = graph_bucket(int(cu[-1]), count, max_seq_len)
        if bucket is None:
            continue
        assert bucket in reachable  # capture_all captured it before the first request
        offsets = graph_offsets(cu, bucket, max_seq_len)
        assert len(offsets) == bucket.slots + 1
        assert offsets[: count + 1].tolist() == cu.tolist()
        assert offsets[-1] == bucket.tokens
        extra = np.diff(offsets[count:])
        assert extra.min() >= 1 and extra.max() <= max_seq_len  # no empty sequence, none past max_len


def test_a_batch_laid_into_its_graph_bucket_scores_as_it_does_alone(
    tiny_model_dir: Path, chinese_pairs: list[tuple[str, str]]
) -> None:
    """The graph layout (dummy and padding sequences, max_len cut to max_seq_len) changes no real score.
    Checked on the CPU with the graph's exact inputs, run eagerly (CUDA graphs replay the same forward)."""
    max_seq_len = 32  # short, so the bucket needs several padding sequences
    module = load_model(resolve_model(tiny_model_dir)).module
    items = PairTokenizer(tiny_model_dir, max_seq_len=max_seq_len).encode(chinese_pairs[:11])
    block, cu = pack(items)
    bucket = graph_bucket(block.shape[1], len(items), max_seq_len)
    assert bucket is not None and bucket.padding > 1 and bucket.sequences > len(items)
    padded = np.zeros((3, bucket.tokens), dtype=np.int32)
    padded[:, : block.shape[1]] = block
    offsets = graph_offsets(cu, bucket, max_seq_len)
    weights = PackedWeights.of(module)

    def forward(ids: np.ndarray, offsets: np.ndarray, max_len: int) -> torch.Tensor:
        tensors = [torch.from_numpy(np.ascontiguousarray(row)) for row in ids]
        sequences = len(offsets) - 1
        cls = torch.arange(sequences + 1, dtype=torch.int32)
        return packed_probabilities(weights, *tensors, torch.from_numpy(offsets), cls, max_len, reference_varlen_attention)

    with torch.inference_mode():
        alone = forward(block, cu, max(len(item.input_ids) for item in items))
        in_bucket = forward(padded, offsets, min(bucket.tokens, max_seq_len))
    assert in_bucket.shape == (bucket.slots,)
    torch.testing.assert_close(in_bucket[: len(items)], alone, atol=1e-6, rtol=0)


def test_packed_forward_matches_padded_forward(tiny_model_dir: Path, chinese_pairs: list[tuple[str, str]]) -> None:
    module = load_model(resolve_model(tiny_model_dir)).module
    items = PairTokenizer(tiny_model_dir, max_seq_len=128).encode(chinese_pairs)
    lengths = [len(item.input_ids) for item in items]
    padded = max(lengths)
    ids = torch.zeros(len(items), padded, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros(len(items), padded, dtype=torch.bool)
    for row, item in enumerate(items):
        ids[row, : lengths[row]] = torch.tensor(item.input_ids)
        types[row, : lengths[row]] = torch.tensor(item.token_type_ids)
        mask[row, : lengths[row]] = True
    block, cu = pack(items)
    with torch.inference_mode():
        expected = module(ids, types, mask)
        got = packed_probabilities(
            PackedWeights.of(module),
            torch.from_numpy(block[0]),
            torch.from_numpy(block[1]),
            torch.from_numpy(block[2]),
            torch.from_numpy(cu),
            torch.arange(len(items) + 1, dtype=torch.int32),
            padded,
            reference_varlen_attention,
        )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.sigmoid(expected), atol=1e-5, rtol=0)  # fp32 reduction order differs
    assert len(set(np.round(got.numpy(), 3))) > len(items) // 2  # not a constant output


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_is_linear_then_gelu_eager_and_compiled(approximate: str) -> None:
    """The op the compiled forward keeps opaque: its math, and its fake (shape) under dynamic-shape tracing."""
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 16), torch.randn(48)
    compiled = torch.compile(lambda x: linear_gelu(x, weight, bias, approximate), backend="aot_eager", dynamic=True)
    for rows in (3, 17, 1):
        x = torch.randn(rows, 16) * 3
        expected = torch.nn.functional.gelu(x @ weight.T + bias, approximate=approximate)
        torch.testing.assert_close(linear_gelu(x, weight, bias, approximate), expected)
        torch.testing.assert_close(compiled(x), expected)
    exact = linear_gelu(x, weight, bias, "none")
    assert not torch.equal(exact, linear_gelu(x, weight, bias, "tanh"))  # the approximation is passed through


def test_executor_packs_large_batches_like_the_padded_forward(
    tiny_model_dir: Path, chinese_pairs: list[tuple[str, str]]
) -> None:
    """Several forwards cut by the token budget, through the executor's own packing (CPU: no graphs)."""
    from similarity_service.packed_executor import PackedExecutor

    loaded = load_model(resolve_model(tiny_model_dir))
    items = PairTokenizer(tiny_model_dir, max_seq_len=128).encode(chinese_pairs * 2)
    executor = PackedExecutor(loaded.module, torch.device("cpu"), reference_varlen_attention, max_seq_len=128)
    # no graphs on the CPU: the eager path, cut into several forwards by the token budget
    got = executor.run(items, max_tokens=300, max_pairs=50, use_graphs=True)
    with torch.inference_mode():
        expected = [torch.sigmoid(loaded.module(*_padded([item]))).item() for item in items]
    assert len(split_by_tokens(pack(items)[1], 300, 50)) > 2
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=0)


def _padded(items: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.tensor([item.input_ids for item in items])
    return ids, torch.tensor([item.token_type_ids for item in items]), torch.ones_like(ids, dtype=torch.bool)


def test_score_tokenizes_long_lists_in_chunks_and_keeps_their_order(
    tiny_engine: Engine, chinese_pairs: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from similarity_service import runner

    pairs = chinese_pairs * 2
    expected = tiny_engine.score_encoded(tiny_engine.encode(pairs))
    monkeypatch.setattr(runner, "FIRST_SCORE_CHUNK_PAIRS", 3)
    monkeypatch.setattr(runner, "SCORE_CHUNK_PAIRS", 7)
    # same scores in the same order; batch composition moves fp32 results by rounding only
    assert tiny_engine.score(pairs) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("growth", [None, 1.5])
def test_score_chunks_start_small_grow_and_cover_every_pair(growth: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from similarity_service import runner
    from similarity_service.runner import FIRST_SCORE_CHUNK_PAIRS, SCORE_CHUNK_PAIRS, score_chunks

    if growth is not None:
        monkeypatch.setattr(runner, "SCORE_CHUNK_GROWTH", growth)
    count = 5 * SCORE_CHUNK_PAIRS + 3
    chunks = score_chunks(count)
    sizes = [end - start for start, end in chunks]
    assert [start for start, _ in chunks] == [0, *(end for _, end in chunks[:-1])] and chunks[-1][1] == count
    assert sizes[0] == FIRST_SCORE_CHUNK_PAIRS
    factor = runner.SCORE_CHUNK_GROWTH
    assert all(after == min(int(factor * before), SCORE_CHUNK_PAIRS) for before, after in zip(sizes, sizes[1:-1]))
    assert max(sizes) == SCORE_CHUNK_PAIRS and 0 < sizes[-1] <= SCORE_CHUNK_PAIRS
    assert score_chunks(FIRST_SCORE_CHUNK_PAIRS - 1) == [(0, FIRST_SCORE_CHUNK_PAIRS - 1)]


def test_one_by_one_and_batch_encoding_agree(tiny_model_dir: Path) -> None:
    from similarity_service.corpus import load_corpus

    tokenizer = PairTokenizer(tiny_model_dir, max_seq_len=64)  # short: many pairs truncate
    pairs = [pair.pair for pair in load_corpus()][::5]
    assert len(pairs) >= tokenizer.parallel_min_pairs
    batch = tokenizer.encode(pairs)
    assert [tokenizer.encode([pair])[0] for pair in pairs] == batch
    assert any(item.num_tokens == 64 for item in batch)


@pytest.mark.parametrize("tokens", [3, 30, 63, 64, 65, 200, 512])
def test_a_single_pair_is_laid_into_its_graph_input_as_any_batch_is(tiny_model_dir: Path, tokens: int) -> None:
    """The single-pair fast path (`_fill_one`) writes the graph's pinned input exactly as the general
    `_fill` does, over whatever an earlier call left there."""
    executor = PackedExecutor(load_model(resolve_model(tiny_model_dir)).module, torch.device("cpu"),
                              reference_varlen_attention, max_seq_len=512)  # fmt: skip
    generator = np.random.default_rng(tokens)
    item = EncodedPair(generator.integers(1, 100, tokens).tolist(), sorted(generator.integers(0, 2, tokens).tolist()))
    buffer = executor._host_in_np  # noqa: SLF001 - the layout is what the graphs read
    buffer[:] = generator.integers(0, 1000, buffer.size)
    bucket = executor._fill_one(item)  # noqa: SLF001
    fast = buffer[: bucket.input_size].copy()
    buffer[:] = generator.integers(0, 1000, buffer.size)
    block, cu = pack([item])
    assert graph_bucket(block.shape[1], 1, 512) == bucket
    executor._fill(block, cu, bucket)  # noqa: SLF001
    np.testing.assert_array_equal(fast, buffer[: bucket.input_size])


def _packed_cpu_engine(model_dir: Path) -> tuple[Engine, Engine, PackedExecutor]:
    """The fp32 engine Engine.load makes on the CPU, the same model on a packed executor (per-sequence SDPA,
    no graphs: the CUDA path's code on the CPU), and that executor."""
    fp32 = Engine.load(model_dir, device="cpu", precision="fp32")
    executor = PackedExecutor(fp32._module, torch.device("cpu"), reference_varlen_attention, max_seq_len=512)  # noqa: SLF001
    engine = Engine(
        module=fp32._module,  # noqa: SLF001
        tokenizer=fp32._tokenizer,  # noqa: SLF001
        info=fp32.info,
        max_batch_size=256,
        max_batch_tokens=4096,
        bucket_multiple=16,
        packed=executor,
        cuda_graphs=False,
    )
    return fp32, engine, executor


def test_pending_scores_wait_for_their_own_copy_and_return_the_callers_order() -> None:
    """`collect` waits on the completion queued behind its own forwards (on CUDA, an event after the copy to a
    pinned buffer), not on the device's whole queue, and only then reads the buffer."""
    host = torch.zeros(3)
    waited: list[bool] = []

    class CopyLanding:
        def synchronize(self) -> None:
            waited.append(True)
            host.copy_(torch.tensor([0.1, 0.2, 0.3]))  # the scores land when the work completes

    pending = PendingScores(np.array([2, 0, 1]), host, CopyLanding())
    assert pending.collect() == pytest.approx([0.2, 0.3, 0.1])
    assert waited == [True]


def test_a_long_list_on_the_packed_path_launches_each_chunk_before_reading_the_last_back(
    tiny_model_dir: Path, chinese_pairs: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Engine.score` keeps one chunk on the device while it launches the next; the scores are those of one
    `score_encoded` call, in order."""
    fp32, engine, executor = _packed_cpu_engine(tiny_model_dir)
    events: list[str] = []
    launch_packed = executor.launch_packed

    def recording_launch(pairs: PackedPairs, **limits: int) -> object:
        pending = launch_packed(pairs, **limits)
        chunk = sum(event.startswith("launch") for event in events)
        events.append(f"launch {chunk}")

        class Recorded:
            def collect(self) -> list[float]:
                events.append(f"collect {chunk}")
                return pending.collect()

        return Recorded()

    monkeypatch.setattr(executor, "launch_packed", recording_launch)
    pairs = chinese_pairs * (4 * FIRST_SCORE_CHUNK_PAIRS // len(chinese_pairs))  # chunks of 256 and 512 pairs, then the rest
    chunks = len(score_chunks(len(pairs)))
    assert chunks >= 3
    got = engine.score(pairs)
    assert events == ["launch 0"] + [e for k in range(1, chunks) for e in (f"launch {k}", f"collect {k - 1}")] + [f"collect {chunks - 1}"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(fp32.score_encoded(fp32.encode(pairs))), atol=1e-5, rtol=0)


def test_a_chunk_whose_launch_runs_out_of_memory_is_scored_with_smaller_forwards(
    tiny_model_dir: Path, chinese_pairs: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32, engine, executor = _packed_cpu_engine(tiny_model_dir)
    launch_packed = executor.launch_packed
    launches = []

    def second_launch_fails(pairs: PackedPairs, **limits: int) -> object:
        launches.append(len(pairs))
        if len(launches) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return launch_packed(pairs, **limits)

    monkeypatch.setattr(executor, "launch_packed", second_launch_fails)
    pairs = chinese_pairs * (4 * FIRST_SCORE_CHUNK_PAIRS // len(chinese_pairs))
    got = engine.score(pairs)
    assert len(launches) == len(score_chunks(len(pairs))) + 1  # the failed chunk once more, through run()
    assert launches[1] == launches[2]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(fp32.score_encoded(fp32.encode(pairs))), atol=1e-5, rtol=0)
