"""The HTTP API's wire types (msgspec structs) and the one strict way request bodies are decoded. No torch.

Request structs refuse unknown fields; sentences must hold a non-space character, no NUL and valid
Unicode. Limits that depend on settings (sentence length, pairs per request) are checked by the
scoring layer, which answers 413 for them; everything here answers 400.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, NoReturn, TypeVar

import msgspec
from msgspec import Meta

from similarity_service.errors import BadRequest

T = TypeVar("T")

Sentence = Annotated[
    str,
    Meta(min_length=1, description="A sentence: at least one non-space character, no NUL.", examples=["今天天气很好"]),
]
Score = Annotated[float, Meta(description="P(similar) in [0, 1], the model's softmax probability of label 1.")]


def check_sentence(value: str, where: str) -> None:
    """Refuse what the model cannot read meaningfully; `where` names the field in the message."""
    if not value.strip():
        raise ValueError(f"{where} is empty or only whitespace")
    if "\x00" in value:
        raise ValueError(f"{where} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where} is not valid Unicode (a lone surrogate escape)") from None


class _Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class SimilarityRequest(_Request):
    """One sentence pair."""

    sentence1: Sentence
    sentence2: Sentence

    def __post_init__(self) -> None:
        check_sentence(self.sentence1, "sentence1")
        check_sentence(self.sentence2, "sentence2")


class BatchSimilarityRequest(_Request):
    """Several pairs, scored in one request; the answer keeps their order."""

    pairs: Annotated[list[SimilarityRequest], Meta(min_length=1)]


class RankRequest(_Request):
    """One source sentence against many targets."""

    source: Sentence
    targets: Annotated[list[Sentence], Meta(min_length=1)]
    top_k: Annotated[int, Meta(ge=1, description="Return only the best k targets (all when unset).")] | None = None

    def __post_init__(self) -> None:
        check_sentence(self.source, "source")
        for i, target in enumerate(self.targets):
            check_sentence(target, f"targets[{i}]")


class LegacyBatchRequest(_Request):
    """The source article's `/batch_similarity` body."""

    source: Sentence
    targets: Annotated[list[Sentence], Meta(min_length=1)]

    def __post_init__(self) -> None:
        check_sentence(self.source, "source")
        for i, target in enumerate(self.targets):
            check_sentence(target, f"targets[{i}]")


class SimilarityResponse(msgspec.Struct, frozen=True):
    similarity: Score
    model: str
    precision: str


class BatchSimilarityResponse(msgspec.Struct, frozen=True):
    similarities: list[Score]  # in the order of the request's pairs
    model: str
    precision: str


class RankedTarget(msgspec.Struct, frozen=True):
    index: Annotated[int, Meta(description="Position of this target in the request's `targets`.")]
    sentence: str
    similarity: Score


class RankResponse(msgspec.Struct, frozen=True):
    source: str
    results: list[RankedTarget]  # most similar first; ties keep request order
    model: str
    precision: str


class HealthResponse(msgspec.Struct, frozen=True):
    status: Literal["ok"] = "ok"


class ReadyResponse(msgspec.Struct, frozen=True):
    status: Literal["ready"] = "ready"


class BatchingInfo(msgspec.Struct, frozen=True):
    max_batch_size: int
    max_wait_ms: float
    max_batch_tokens: int | None
    max_queue_pairs: int


class LimitsInfo(msgspec.Struct, frozen=True):
    max_body_bytes: int
    max_pairs_per_request: int
    max_chars_per_sentence: int
    max_rank_targets: int


class ProfileInfo(msgspec.Struct, frozen=True):
    path: str
    device_name: str
    tuned_at: str
    fingerprint: str
    matches_model: bool  # False: the profile was tuned for other weights or another max_seq_len


class ReplicaInfo(msgspec.Struct, frozen=True):
    """One engine replica: a copy of the model on one device, behind the shared batcher."""

    index: int
    device: str
    device_name: str
    compute_capability: str | None
    precision: str
    healthy: bool  # False once its last passes all failed: it gets no batches while another replica serves
    batches_run: int


class InfoResponse(msgspec.Struct, frozen=True):
    model: str
    revision: str | None
    fingerprint: str
    precision: str
    device: str
    device_name: str
    compute_capability: str | None
    max_seq_len: int
    batching: BatchingInfo  # the active config (autotune may have changed it since start)
    limits: LimitsInfo
    profile: ProfileInfo | None
    version: str
    replicas: list[ReplicaInfo]  # one per device; the fields above describe replica 0
    workers: int  # serving processes on this port (`structsim serve --workers`), each with its own replicas
    worker: int  # the one that answered: `replicas` and `batching` are its own


class LegacySimilarityResponse(msgspec.Struct, frozen=True):
    """The source article's `/similarity` answer, field for field."""

    similarity: Score
    sentence1: str
    sentence2: str
    inference_time_ms: float
    precision: str


class LegacyRankedSentence(msgspec.Struct, frozen=True):
    sentence: str
    similarity: Score


class LegacyBatchResponse(msgspec.Struct, frozen=True):
    """The source article's `/batch_similarity` answer: results sorted by similarity, most similar first."""

    source: str
    results: list[LegacyRankedSentence]
    total_time_ms: float
    avg_time_per_pair_ms: float


class LegacyHealthResponse(msgspec.Struct, frozen=True):
    """The source article's `/health` answer."""

    status: Literal["healthy", "loading", "unhealthy"]
    model_loaded: bool
    precision: str | None
    device: str | None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def decode_body(body: bytes, type_: type[T]) -> T:
    """Decode a JSON request body strictly: UTF-8 without BOM, no duplicate keys, no NaN, exact types.

    Stricter than Litestar's default (which coerces "5" to 5 and lets invalid UTF-8 or deep nesting
    escape as a 500): every failure here is a `BadRequest`.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("invalid_json", f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except RecursionError:
        raise BadRequest("invalid_json", "body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, NaN, over-long integers
        raise BadRequest("invalid_json", f"body is not valid JSON: {exc}") from None
    try:
        return msgspec.convert(data, type=type_, strict=True)
    except msgspec.ValidationError as exc:
        raise BadRequest("invalid_request", str(exc)) from None
    except UnicodeEncodeError:  # a key that is a lone surrogate escape, met before any field check
        raise BadRequest("invalid_request", "body holds a lone surrogate escape, which is not valid Unicode") from None
