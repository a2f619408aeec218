"""Loading a model: local directories, ModelScope hub ids, and a clear error for each way it goes wrong."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from similarity_service.model import (
    CorruptWeightsError,
    HubDownloadError,
    MissingModelFilesError,
    ModelLoadError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from similarity_service.runner import Engine

PAIRS = [("今天天气怎么样", "今天会下雨吗"), ("我要退货", "怎么申请退款")]


@pytest.fixture
def model_copy(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A private copy of the tiny checkpoint for a test to damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _edit_config(model_dir: Path, **changes: Any) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir / "config.json"


def _load(model: str | Path, **kwargs: Any) -> Engine:
    return Engine.load(model, device="cpu", precision="fp32", **kwargs)


def test_every_loading_error_is_a_model_load_error() -> None:
    for error in (
        ModelNotFoundError,
        MissingModelFilesError,
        UnsupportedModelError,
        HubDownloadError,
        CorruptWeightsError,
    ):
        assert issubclass(error, ModelLoadError)


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelNotFoundError, match=f"model directory {missing} does not exist"):
        _load(missing)


def test_a_file_is_not_a_model_directory(tmp_path: Path) -> None:
    file = tmp_path / "model.bin"
    file.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=f"model path {file} is not a directory"):
        _load(file)


def test_missing_files_are_all_named(tmp_path: Path, tiny_model_dir: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_model_dir / "config.json", partial)
    with pytest.raises(MissingModelFilesError) as caught:
        _load(partial)
    assert str(caught.value) == f"model directory {partial} lacks vocab.txt, model.safetensors or pytorch_model.bin"


def test_missing_config(model_copy: Path) -> None:
    (model_copy / "config.json").unlink()
    with pytest.raises(MissingModelFilesError, match=f"{model_copy} lacks config.json$"):
        _load(model_copy)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not a BERT-family model (expected one of bert, structbert)"),
        ({"architectures": ["BertForMaskedLM"]}, "has no sequence classifier (*ForSequenceClassification)"),
        ({"id2label": {"0": "negative", "1": "positive"}, "label2id": None}, "no label '1' (similar) in id2label"),
        ({"id2label": {"0": "0", "1": "1", "2": "2"}}, "a 2-label classifier (ids 0 and 1) is needed, id2label has 3"),
        ({"id2label": None, "label2id": None}, "has no id2label/label2id: cannot tell which output means similar"),
        ({"hidden_size": "big"}, "hidden_size must be a positive integer, got 'big'"),
        ({"hidden_act": "swish"}, "hidden_act 'swish' is not supported"),
    ],
)
def test_config_that_is_not_a_bert_pair_classifier(model_copy: Path, changes: dict[str, Any], problem: str) -> None:
    path = _edit_config(model_copy, **changes)
    with pytest.raises(UnsupportedModelError) as caught:
        _load(model_copy)
    assert str(path) in str(caught.value)
    assert problem in str(caught.value)


def test_config_that_is_not_json(model_copy: Path) -> None:
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match=f"{model_copy / 'config.json'} is not readable JSON"):
        _load(model_copy)


def test_label_2id_alone_is_enough(model_copy: Path, tiny_engine: Engine) -> None:
    _edit_config(model_copy, id2label=None, label2id={"0": 0, "1": 1})
    assert _load(model_copy).score(PAIRS) == pytest.approx(tiny_engine.score(PAIRS), abs=1e-6)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_file(model_copy: Path, damage: str) -> None:
    weights = model_copy / "pytorch_model.bin"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(CorruptWeightsError, match=f"cannot read weights file {weights} \\(truncated or corrupt\\?\\)"):
        _load(model_copy)


def test_weights_lacking_the_classifier(model_copy: Path) -> None:
    weights = model_copy / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    del state["classifier.weight"], state["classifier.bias"]
    torch.save(state, weights)
    with pytest.raises(CorruptWeightsError, match="lack 2 tensor\\(s\\): classifier.weight, classifier.bias"):
        _load(model_copy)


def test_weights_that_do_not_fit_the_config(model_copy: Path) -> None:
    _edit_config(model_copy, intermediate_size=256)
    with pytest.raises(CorruptWeightsError, match="does not fit .*config.json: tensor shapes do not match"):
        _load(model_copy)


def test_safetensors_weights_load_the_same(model_copy: Path, tiny_engine: Engine) -> None:
    from safetensors.torch import save_file

    weights = model_copy / "pytorch_model.bin"
    save_file(torch.load(weights, weights_only=True), model_copy / "model.safetensors")
    weights.unlink()
    assert _load(model_copy).score(PAIRS) == pytest.approx(tiny_engine.score(PAIRS), abs=1e-7)


def test_truncated_safetensors(model_copy: Path) -> None:
    from safetensors.torch import save_file

    weights = model_copy / "model.safetensors"
    save_file(torch.load(model_copy / "pytorch_model.bin", weights_only=True), weights)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptWeightsError, match=f"cannot read weights file {weights}"):
        _load(model_copy)  # safetensors is preferred over the intact .bin beside it


def test_vocab_without_special_tokens(model_copy: Path) -> None:
    (model_copy / "vocab.txt").write_text("a\nb\nc\n")
    with pytest.raises(
        UnsupportedModelError, match="vocab.txt lacks the special token\\(s\\) \\[UNK\\], \\[CLS\\], \\[SEP\\]"
    ):
        _load(model_copy)


def test_max_seq_len_beyond_the_positions_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_seq_len must be between 3 and 512 for this model, got 1024"):
        _load(tiny_model_dir, max_seq_len=1024)


def test_hub_id_goes_through_modelscope_snapshot_download(
    tiny_model_dir: Path, tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id is handed to modelscope's snapshot_download with the revision, cache dir and offline flag."""
    # The module, not the function of the same name that modelscope.hub re-exports.
    hub = importlib.import_module("modelscope.hub.snapshot_download")

    calls: list[tuple[Any, ...]] = []

    def snapshot_download(model_id: str, **kwargs: Any) -> str:
        calls.append((model_id, kwargs))
        return str(tiny_model_dir)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    engine = _load(
        "iic/nlp_structbert_sentence-similarity_chinese-base", revision="v1.0.1", cache_dir="/cache", offline=True
    )
    assert calls == [
        (
            "iic/nlp_structbert_sentence-similarity_chinese-base",
            {"revision": "v1.0.1", "cache_dir": "/cache", "local_files_only": True},
        )
    ]
    assert engine.info.model_id == "iic/nlp_structbert_sentence-similarity_chinese-base"
    assert engine.info.revision == "v1.0.1"
    assert engine.info.model_dir == str(tiny_model_dir)
    assert engine.info.fingerprint == tiny_engine.info.fingerprint  # the same files, wherever they come from
    assert engine.score(PAIRS) == tiny_engine.score(PAIRS)


def test_offline_mode_with_an_empty_cache_says_so(tmp_path: Path) -> None:
    with pytest.raises(HubDownloadError) as caught:
        _load("iic/nlp_structbert_sentence-similarity_chinese-base", cache_dir=str(tmp_path), offline=True)
    message = str(caught.value)
    assert (
        "could not get model 'iic/nlp_structbert_sentence-similarity_chinese-base' in the local cache (offline mode)"
        in message
    )
    assert "To use a local copy, pass its directory" in message


def test_unreachable_hub_is_a_clear_error_naming_the_id(tmp_path: Path) -> None:
    """The hub endpoint is a closed loopback port; runs in a fresh process because modelscope reads its
    endpoint and retry settings from the environment when first imported."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "MODELSCOPE_ENDPOINT": f"http://127.0.0.1:{port}",
        "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": "1",  # no retries with back-off: keep the test fast
        "MODELSCOPE_API_MAX_RETRIES": "1",
    }
    code = (
        "import sys\n"
        "from similarity_service.runner import Engine\n"
        "from similarity_service.model import HubDownloadError\n"
        "try:\n"
        f"    Engine.load('iic/nlp_structbert_sentence-similarity_chinese-base', revision='v1.0.1', cache_dir={str(tmp_path)!r}, device='cpu')\n"
        "except HubDownloadError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 3, result.stderr
    message = result.stdout
    assert (
        "could not get model 'iic/nlp_structbert_sentence-similarity_chinese-base' (revision v1.0.1) from the ModelScope hub"
        in message
    )
    assert f"127.0.0.1', port={port}" in message  # the cause, as modelscope reports it
    assert "To use a local copy, pass its directory" in message


def test_a_path_that_is_neither_a_directory_nor_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="model directory .*a/b/c does not exist"):
        _load("a/b/c")
