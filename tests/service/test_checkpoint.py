"""The synthetic checkpoint: ModelScope's on-disk format, determinism, and a spread of scores."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from similarity_service.bert import BertConfig, hf_tensor_shapes
from similarity_service.checkpoint import build_vocab, make_checkpoint, model_config
from similarity_service.cli import main
from similarity_service.corpus import load_corpus
from similarity_service.runner import Engine
from similarity_service.tokenization import PairTokenizer


def test_directory_holds_the_four_files_of_the_modelscope_format(tiny_model_dir: Path) -> None:
    assert sorted(path.name for path in tiny_model_dir.iterdir()) == [
        "config.json",
        "configuration.json",
        "pytorch_model.bin",
        "vocab.txt",
    ]
    configuration = json.loads((tiny_model_dir / "configuration.json").read_text())
    assert configuration["framework"] == "pytorch"
    assert configuration["task"] == "sentence-similarity"
    assert configuration["pipeline"] == {"type": "sentence-similarity"}
    assert configuration["model"] == {"type": "structbert"}
    for mode in ("train", "val"):
        assert configuration["preprocessor"][mode]["type"] == "sen-sim-tokenizer"
        assert configuration["preprocessor"][mode]["first_sequence"] == "sentence1"
        assert configuration["preprocessor"][mode]["second_sequence"] == "sentence2"


def test_config_is_a_structbert_two_label_classifier(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "structbert"
    assert config["id2label"] == {"0": "0", "1": "1"}
    assert config["label2id"] == {"0": 0, "1": 1}
    assert config["vocab_size"] == 21128
    assert config["max_position_embeddings"] == 512
    assert config["type_vocab_size"] == 2
    assert config["hidden_act"] == "gelu"


def test_base_size_is_bert_base() -> None:
    config = model_config("base")
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (12, 768, 12)
    assert config["intermediate_size"] == 3072
    # 201 weights and the position_ids buffer: the 202 tensors of the real file.
    assert len(hf_tensor_shapes(BertConfig.from_dict(config))) + 1 == 202
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        model_config("huge")  # type: ignore[arg-type]


def test_weights_are_hugging_face_bert_names_with_position_ids(tiny_model_dir: Path) -> None:
    state = torch.load(tiny_model_dir / "pytorch_model.bin", weights_only=True)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    shapes = hf_tensor_shapes(BertConfig.from_dict(config))
    assert set(state) == set(shapes) | {"bert.embeddings.position_ids"}
    assert all(tuple(state[name].shape) == shape for name, shape in shapes.items())
    assert state["bert.embeddings.position_ids"].tolist() == [list(range(512))]
    assert all(
        tensor.dtype == torch.float32 for name, tensor in state.items() if name != "bert.embeddings.position_ids"
    )
    assert "bert.encoder.layer.1.attention.self.query.weight" in state
    assert "bert.pooler.dense.weight" in state and "classifier.bias" in state


def test_vocab_has_bert_layout_and_real_chinese_characters(tiny_model_dir: Path) -> None:
    lines = (tiny_model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # one token per line, newline-terminated
    vocab = lines[:-1]
    assert vocab == build_vocab()
    assert len(vocab) == 21128 == len(set(vocab))
    assert vocab[0] == "[PAD]"
    assert vocab[1:100] == [f"[unused{i}]" for i in range(1, 100)]
    assert vocab[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    hanzi = [token for token in vocab if len(token) == 1 and "\u4e00" <= token <= "\u9fff"]
    assert len(hanzi) >= 10_000
    for common in "的是了我你他在有这个们中国上大和人":
        assert common in vocab
    assert {"##a", "##1", "a", "0", "，", "。", "？"} <= set(vocab)


def test_chinese_tokenizes_one_token_per_character_with_no_unknowns(tiny_model_dir: Path) -> None:
    tokenizer = PairTokenizer(tiny_model_dir)
    encoded = tokenizer.encode([("我的快递什么时候到？", "退款多久能到账")])[0]
    assert len(encoded.input_ids) == 10 + 7 + 3
    corpus = [pair.pair for pair in load_corpus()]
    unknown = sum(item.input_ids.count(100) for item in tokenizer.encode(corpus))
    assert unknown == 0


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = make_checkpoint(tmp_path / "again", "tiny", seed=0)
    other = make_checkpoint(tmp_path / "other", "tiny", seed=1)
    for name in ("config.json", "configuration.json", "vocab.txt", "pytorch_model.bin"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (other / "pytorch_model.bin").read_bytes() != (again / "pytorch_model.bin").read_bytes()


def test_writing_into_an_existing_directory_replaces_only_its_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "README.md").write_text("keep me")
    (target / "pytorch_model.bin").write_bytes(b"stale")
    make_checkpoint(target, "tiny", seed=0)
    assert (target / "README.md").read_text() == "keep me"
    assert (target / "pytorch_model.bin").read_bytes() == (tiny_model_dir / "pytorch_model.bin").read_bytes()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging left behind


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_spread_over_zero_to_one_on_the_corpus(tmp_path: Path, seed: int) -> None:
    """Random BERT weights alone give ~0.6 for every pair; the calibrated head must not."""
    model_dir = make_checkpoint(tmp_path / f"seed{seed}", "tiny", seed=seed)
    # 128 tokens keep the test fast; the long passages still count, truncated.
    engine = Engine.load(model_dir, device="cpu", precision="fp32", max_seq_len=128)
    scores = engine.score([pair.pair for pair in load_corpus()])
    assert statistics.pstdev(scores) >= 0.2
    assert min(scores) < 0.05 and max(scores) > 0.95
    # Both sides of common thresholds are populated, so decisions can flip.
    for threshold in (0.5, 0.7):
        above = sum(score >= threshold for score in scores) / len(scores)
        assert 0.1 < above < 0.9


def test_make_checkpoint_command(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-model"
    assert main(["make-checkpoint", str(out), "--size", "tiny", "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "not semantic" in printed
    assert (out / "pytorch_model.bin").read_bytes() == (tiny_model_dir / "pytorch_model.bin").read_bytes()


def test_make_checkpoint_command_rejects_an_unknown_size(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "similarity_service.cli", "make-checkpoint", str(tmp_path / "x"), "--size", "huge"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid choice: 'huge'" in result.stderr
    assert not (tmp_path / "x").exists()
