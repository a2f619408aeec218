"""The Engine on the tiny synthetic checkpoint, on the CPU: scores, order, batching, OOM splitting."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from similarity_service.bert import BertSimilarity
from similarity_service.engine_api import EncodedPair, ScoringEngine
from similarity_service.runner import Engine, EngineOOMError, bucket_lengths, plan_batches


def _one_by_one(engine: Engine, pairs: list[tuple[str, str]]) -> list[float]:
    return [engine.score([pair])[0] for pair in pairs]


def test_engine_implements_the_protocol_and_reports_itself(tiny_engine: Engine, tiny_model_dir: Path) -> None:
    protocol: ScoringEngine = tiny_engine  # checked by mypy; the protocol is not runtime-checkable
    assert callable(protocol.encode) and callable(protocol.score_encoded)
    info = tiny_engine.info
    assert info.precision == "fp32"
    assert info.device == "cpu"
    assert info.compute_capability is None
    assert info.model_dir == str(tiny_model_dir.resolve())
    assert info.revision is None
    assert len(info.fingerprint) == 16
    assert info.max_seq_len == 512


def test_scores_are_probabilities_in_input_order(tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]) -> None:
    scores = tiny_engine.score(chinese_pairs)
    assert len(scores) == len(chinese_pairs)
    assert all(0.0 <= score <= 1.0 for score in scores)
    # Batched (sorted, split, padded to buckets, unsorted) equals one pair at a time without padding.
    assert scores == pytest.approx(_one_by_one(tiny_engine, chinese_pairs), abs=1e-5)
    # Reversing the input reverses the output: the unsort is right.
    assert tiny_engine.score(chinese_pairs[::-1]) == pytest.approx(scores[::-1], abs=1e-5)


def test_empty_input_scores_nothing(tiny_engine: Engine) -> None:
    assert tiny_engine.score([]) == []
    assert tiny_engine.encode([]) == []


def test_encode_then_score_encoded_equals_score(tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]) -> None:
    encoded = tiny_engine.encode(chinese_pairs)
    assert all(pair.input_ids[0] == 101 and pair.input_ids[-1] == 102 for pair in encoded)
    assert tiny_engine.score_encoded(encoded) == tiny_engine.score(chinese_pairs)


def test_score_encoded_refuses_pairs_longer_than_max_seq_len(tiny_engine: Engine) -> None:
    with pytest.raises(ValueError, match="1 to 512"):
        tiny_engine.score_encoded([EncodedPair([101] * 600, [0] * 600)])


def test_small_batches_and_token_budget_give_the_same_scores(
    tiny_model_dir: Path, tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]
) -> None:
    small = Engine.load(tiny_model_dir, device="cpu", precision="fp32", max_batch_size=3, max_batch_tokens=64)
    assert small.score(chinese_pairs) == pytest.approx(tiny_engine.score(chinese_pairs), abs=1e-5)


def test_plan_sorts_longest_first_and_respects_size_and_token_limits() -> None:
    lengths = [5, 40, 17, 33, 16, 100, 2]
    plan = plan_batches(lengths, max_batch_size=2, max_batch_tokens=100, bucket_multiple=16, max_seq_len=64)
    flat = [index for indices, _ in plan for index in indices]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for indices, padded in plan:
        assert len(indices) <= 2
        assert all(min(lengths[i], 64) <= padded for i in indices)
        assert padded % 16 == 0 or padded == 64
        assert len(indices) == 1 or len(indices) * padded <= 100
    # Short pairs are padded to their own bucket, not to the longest pair of the call.
    assert plan[-1] == ([0, 6], 16)


def test_buckets_are_multiples_up_to_max_seq_len() -> None:
    assert bucket_lengths(64, 16) == (16, 32, 48, 64)
    assert bucket_lengths(100, 16) == (16, 32, 48, 64, 80, 96, 100)


def test_truncated_long_pairs_score(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_model_dir, device="cpu", precision="fp32", max_seq_len=32)
    long_text = "这是一个很长的句子。" * 40
    encoded = engine.encode([(long_text, long_text), ("短句", long_text)])
    assert [len(pair.input_ids) for pair in encoded] == [32, 32]
    assert all(0.0 <= score <= 1.0 for score in engine.score_encoded(encoded))


def test_warmup_runs_every_bucket(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine.load(tiny_model_dir, device="cpu", precision="fp32", max_seq_len=100)
    seen: list[int] = []
    forward = engine._forward

    def recording(items: list[EncodedPair], padded: int, module: BertSimilarity) -> list[float]:
        seen.append(padded)
        return forward(items, padded, module)

    monkeypatch.setattr(engine, "_forward", recording)
    engine.warmup()
    assert seen == list(engine.buckets) == [16, 32, 48, 64, 80, 96, 100]


def test_cuda_oom_splits_the_batch_in_halves_and_still_scores_everything(
    tiny_model_dir: Path, tiny_engine: Engine, chinese_pairs: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine.load(tiny_model_dir, device="cpu", precision="fp32", max_batch_size=64)
    forward = engine._forward
    sizes: list[int] = []

    def scarce_memory(items: list[EncodedPair], padded: int, module: BertSimilarity) -> list[float]:
        sizes.append(len(items))
        if len(items) > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(items, padded, module)

    monkeypatch.setattr(engine, "_forward", scarce_memory)
    scores = engine.score(chinese_pairs)
    assert scores == pytest.approx(tiny_engine.score(chinese_pairs), abs=1e-5)
    assert sizes[0] == len(chinese_pairs)
    assert max(size for size in sizes if size <= 8) <= 8
    assert any(size > 8 for size in sizes[1:])  # halved step by step, not straight to single pairs


def test_cuda_oom_on_a_single_pair_is_a_clear_error(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine.load(tiny_model_dir, device="cpu", precision="fp32")

    def no_memory(items: list[EncodedPair], padded: int, module: BertSimilarity) -> list[float]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "_forward", no_memory)
    with pytest.raises(EngineOOMError, match="single pair of 7 tokens in fp32"):
        engine.score([("你好", "再见")])
    monkeypatch.undo()
    assert 0.0 <= engine.score([("你好", "再见")])[0] <= 1.0  # the engine survives


def test_scoring_from_several_threads_is_safe(tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]) -> None:
    expected = tiny_engine.score(chinese_pairs)
    results: list[list[float]] = []

    def work() -> None:
        results.append(tiny_engine.score(chinese_pairs))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    assert all(result == pytest.approx(expected, abs=1e-6) for result in results)


def test_label_map_decides_which_probability_is_similarity(
    tmp_path: Path, tiny_model_dir: Path, tiny_engine: Engine
) -> None:
    """A checkpoint whose label "1" is row 0 (rows and labels swapped together) scores the same."""
    import json
    import shutil

    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_model_dir, swapped)
    config = json.loads((swapped / "config.json").read_text())
    config["id2label"] = {"0": "1", "1": "0"}
    config["label2id"] = {"1": 0, "0": 1}
    (swapped / "config.json").write_text(json.dumps(config))
    state = torch.load(swapped / "pytorch_model.bin", weights_only=True)
    state["classifier.weight"] = state["classifier.weight"].flip(0).contiguous()
    state["classifier.bias"] = state["classifier.bias"].flip(0).contiguous()
    torch.save(state, swapped / "pytorch_model.bin")

    pairs = [("今天天气很好", "今天是晴天"), ("我想退货", "这本书很好看")]
    engine = Engine.load(swapped, device="cpu", precision="fp32")
    assert engine.score(pairs) == pytest.approx(tiny_engine.score(pairs), abs=1e-6)
    assert engine.info.fingerprint != tiny_engine.info.fingerprint
