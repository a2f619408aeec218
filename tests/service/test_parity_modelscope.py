"""Parity with ModelScope: the Engine's fp32 P(similar) equals what ModelScope's own StructBERT class
and its sentence-similarity pipeline compute on the same checkpoint, within 1e-5.

ModelScope is imported only here (module-scoped fixtures), so its import cost stays out of other tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from similarity_service.corpus import load_corpus
from similarity_service.runner import Engine

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def parity_pairs(chinese_pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Corpus pairs of every category and length (long passages truncate at 512), plus the test pairs."""
    corpus = load_corpus()
    by_category: dict[str, list[tuple[str, str]]] = {}
    for row in corpus:
        by_category.setdefault(row.category, []).append(row.pair)
    picked = [pair for pairs in by_category.values() for pair in pairs[:6]]
    over_long = ("这是一段很长的文字，用来检验截断。" * 40, "第二句也不短，" * 20)
    return picked + chinese_pairs + [over_long]


@pytest.fixture(scope="module")
def modelscope_pipeline(tiny_model_dir: Path) -> Any:
    from modelscope.pipelines import pipeline

    return pipeline("sentence-similarity", model=str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def modelscope_model(tiny_model_dir: Path) -> Any:
    from modelscope.models import Model

    return Model.from_pretrained(str(tiny_model_dir)).eval()


@pytest.fixture(scope="module")
def engine_scores(tiny_model_dir: Path, parity_pairs: list[tuple[str, str]]) -> list[float]:
    engine = Engine.load(tiny_model_dir, device="cpu", precision="fp32", max_seq_len=512, max_batch_size=16)
    return engine.score(parity_pairs)


def test_pairs_cover_varied_lengths(tiny_model_dir: Path, parity_pairs: list[tuple[str, str]]) -> None:
    engine = Engine.load(tiny_model_dir, device="cpu", precision="fp32")
    lengths = [len(item.input_ids) for item in engine.encode(parity_pairs)]
    assert len(parity_pairs) >= 50
    assert min(lengths) <= 10 and max(lengths) == 512
    assert sum(length > 128 for length in lengths) >= 5


def test_engine_equals_modelscope_model_class(
    modelscope_model: Any, modelscope_pipeline: Any, parity_pairs: list[tuple[str, str]], engine_scores: list[float]
) -> None:
    """ModelScope's SbertForSequenceClassification, fed by ModelScope's own preprocessor (padded to 512)."""
    label_index = {label: index for index, label in modelscope_model.config.id2label.items()}["1"]
    inputs = [modelscope_pipeline.preprocess(pair) for pair in parity_pairs]
    with torch.no_grad():
        logits = modelscope_model(
            **{
                key: torch.cat([item[key] for item in inputs])
                for key in ("input_ids", "token_type_ids", "attention_mask")
            }
        )["logits"]
    expected = torch.softmax(logits.float(), dim=-1)[:, label_index].tolist()
    differences = [abs(ours - theirs) for ours, theirs in zip(engine_scores, expected, strict=True)]
    assert max(differences) <= TOLERANCE, max(differences)


def test_engine_equals_pipeline_probability_of_label_1_not_its_first_score(
    modelscope_pipeline: Any, parity_pairs: list[tuple[str, str]], engine_scores: list[float]
) -> None:
    outputs = modelscope_pipeline(parity_pairs, batch_size=16)
    similar = [output["scores"][output["labels"].index("1")] for output in outputs]
    assert max(abs(a - b) for a, b in zip(engine_scores, similar, strict=True)) <= TOLERANCE

    # The pipeline sorts its scores: scores[0] is the larger probability, which is P(similar) only when
    # label "1" wins. Where label "0" wins, the engine must differ from scores[0].
    differing = [
        (ours, output["scores"][0])
        for ours, output in zip(engine_scores, outputs, strict=True)
        if output["labels"][0] == "0"
    ]
    assert len(differing) >= 10
    for ours, first in differing:
        assert abs(ours - first) > 1e-3
        assert ours == pytest.approx(1.0 - first, abs=TOLERANCE)
