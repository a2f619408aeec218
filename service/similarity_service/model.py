"""Finding and loading a StructBERT/BERT sentence-pair classifier: a local directory or a ModelScope hub id.

Every failure is a `ModelLoadError` whose message names the path or id and what is wrong, so that
`structsim serve` and `structsim score` can print it as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from similarity_service.bert import BertConfig, BertSimilarity, WeightsMismatchError

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.txt"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # tried in this order
BERT_MODEL_TYPES = ("bert", "structbert")
POSITIVE_LABEL = "1"  # the label whose probability is the similarity
# owner/name, as ModelScope spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class ModelLoadError(Exception):
    """Base of every model-loading failure; the message says what and where."""


class ModelNotFoundError(ModelLoadError):
    """The local model directory does not exist (or is not a directory)."""


class MissingModelFilesError(ModelLoadError):
    """The directory lacks files a model needs."""


class UnsupportedModelError(ModelLoadError):
    """The config (or weights) describe something other than a BERT-family 2-label pair classifier."""


class HubDownloadError(ModelLoadError):
    """The ModelScope hub could not provide the model (unreachable, unknown id, not cached offline)."""


class CorruptWeightsError(ModelLoadError):
    """The weights file cannot be read or does not match its config."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference led."""

    model_id: str  # as the user gave it
    revision: str | None  # hub revision; None for a local directory
    model_dir: Path


@dataclass(frozen=True)
class LoadedModel:
    """A model read from disk: the fp32 CPU module, its config and what identifies it."""

    resolved: ResolvedModel
    config: BertConfig
    module: BertSimilarity
    weights_file: Path


def resolve_model(
    model: str | os.PathLike[str], *, revision: str | None = None, cache_dir: str | None = None, offline: bool = False
) -> ResolvedModel:
    """An existing directory is used as is; an `owner/name` that is not one is fetched from ModelScope.

    Hub downloads go through modelscope's `snapshot_download` (into `cache_dir`, or modelscope's default
    cache); with `offline` only the local cache is looked at. `revision` is ignored for a directory.
    """
    reference = os.fspath(model)
    path = Path(reference).expanduser()
    if path.is_dir():
        return ResolvedModel(reference, None, path.resolve())
    if path.exists():
        raise ModelNotFoundError(f"model path {path} is not a directory (a model is a directory with {CONFIG_FILE})")
    if not _HUB_ID.fullmatch(reference):
        raise ModelNotFoundError(f"model directory {path} does not exist")
    return ResolvedModel(reference, revision, _download(reference, revision, cache_dir, offline))


def _download(model_id: str, revision: str | None, cache_dir: str | None, offline: bool) -> Path:
    # modelscope is heavy and optional: imported only when a hub id is used.
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError as exc:
        raise HubDownloadError(
            f"{model_id!r} is not a local directory, so it was taken as a ModelScope hub id, but modelscope is "
            f"not installed (pip install 'structsim[modelscope]'), or pass the model's local directory instead"
        ) from exc
    what = f"{model_id!r}" + (f" (revision {revision})" if revision else "")
    try:
        directory = snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    except Exception as exc:  # modelscope raises many types (network, HTTP, cache); all mean "not available"
        where = "in the local cache (offline mode)" if offline else "from the ModelScope hub"
        raise HubDownloadError(
            f"could not get model {what} {where}: {exc}. {model_id!r} is not a local directory either. "
            f"To use a local copy, pass its directory (e.g. --model /models/structbert), or download it once "
            f"where the hub is reachable into a cache directory and point --cache-dir at it with --offline"
        ) from exc
    return Path(directory)


def read_config(model_dir: Path) -> tuple[BertConfig, int]:
    """The BERT config and the classifier row of label "1"; raises UnsupportedModelError saying why not."""
    path = model_dir / CONFIG_FILE
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UnsupportedModelError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise UnsupportedModelError(f"{path} is not a JSON object")
    model_type = raw.get("model_type")
    if model_type not in BERT_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{path}: model_type {model_type!r} is not a BERT-family model "
            f"(expected one of {', '.join(BERT_MODEL_TYPES)})"
        )
    architectures = raw.get("architectures") or []
    if architectures and not any(str(name).endswith("ForSequenceClassification") for name in architectures):
        raise UnsupportedModelError(
            f"{path}: architectures {architectures} has no sequence classifier (*ForSequenceClassification)"
        )
    try:
        config = BertConfig.from_dict(raw)
    except ValueError as exc:
        raise UnsupportedModelError(f"{path}: {exc}") from exc
    return config, _positive_label_index(raw, path)


def _positive_label_index(raw: dict[str, Any], path: Path) -> int:
    """The classifier row whose probability is P(similar), read from the model's own label map."""
    id2label = raw.get("id2label")
    label2id = raw.get("label2id")
    try:
        if isinstance(id2label, dict) and id2label:
            labels = {int(index): str(label) for index, label in id2label.items()}
        elif isinstance(label2id, dict) and label2id:
            labels = {int(index): str(label) for label, index in label2id.items()}
        else:
            raise UnsupportedModelError(f"{path} has no id2label/label2id: cannot tell which output means similar")
    except (TypeError, ValueError) as exc:
        raise UnsupportedModelError(f"{path}: label ids must be integers: {exc}") from exc
    if sorted(labels) != [0, 1]:
        raise UnsupportedModelError(
            f"{path}: a 2-label classifier (ids 0 and 1) is needed, id2label has {len(labels)} label(s): {labels}"
        )
    positive = [index for index, label in labels.items() if label == POSITIVE_LABEL]
    if not positive:
        raise UnsupportedModelError(
            f"{path}: no label {POSITIVE_LABEL!r} (similar) in id2label {labels}; "
            "this is not a sentence-similarity model"
        )
    return positive[0]


def check_files(model_dir: Path) -> Path:
    """The weights file to read (safetensors preferred); MissingModelFilesError naming every missing file."""
    missing = [name for name in (CONFIG_FILE, VOCAB_FILE) if not (model_dir / name).is_file()]
    found = [model_dir / name for name in WEIGHTS_FILES if (model_dir / name).is_file()]
    if not found:
        missing.append(" or ".join(WEIGHTS_FILES))
    if missing:
        raise MissingModelFilesError(f"model directory {model_dir} lacks {', '.join(missing)}")
    return found[0]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or pytorch .bin weights file onto the CPU; CorruptWeightsError if unreadable."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/pickle/zip/safetensors each raise their own types for a damaged file
        raise CorruptWeightsError(f"cannot read weights file {path} (truncated or corrupt?): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptWeightsError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_model(resolved: ResolvedModel) -> LoadedModel:
    """Check the directory, read config and weights, and build the fp32 CPU module."""
    model_dir = resolved.model_dir
    path = check_files(model_dir)
    config, positive_label = read_config(model_dir)
    state = load_state_dict(path)
    try:
        module = BertSimilarity.from_hf_state_dict(config, state, positive_label=positive_label)
    except WeightsMismatchError as exc:
        raise CorruptWeightsError(f"weights file {path} does not fit {model_dir / CONFIG_FILE}: {exc}") from exc
    return LoadedModel(resolved, config, module, path)


def fingerprint(model_dir: Path, weights: Path, max_seq_len: int) -> str:
    """A stable id of what the engine computes: config, vocabulary, weights and max_seq_len (16 hex digits).

    Copies of the same model hash the same wherever they lie; any change to what scores depend on changes it.
    """
    digest = hashlib.sha256()
    for path in (model_dir / CONFIG_FILE, model_dir / VOCAB_FILE, model_dir / "tokenizer_config.json", weights):
        if path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    digest.update(f"max_seq_len={max_seq_len}".encode())
    return digest.hexdigest()[:16]
