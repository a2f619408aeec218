"""Every knob of `structsim serve`, documented once, read from flags, environment and a tuned profile.

`Settings` is the single source: each field's description states its unit, default and trade-off,
and the CLI flags (`--max-batch-size`), environment variables (`STRUCTSIM_MAX_BATCH_SIZE`) and the
table in docs/configuration.md are all generated from it. Precedence, highest first:
command-line flag > `STRUCTSIM_*` environment variable > tuned profile file (`--profile`: precision,
max_batch_size, max_wait_ms) > the default below. No torch here.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from similarity_service.profile import Profile, ProfileError, read_profile

ENV_PREFIX = "STRUCTSIM_"
DEFAULT_MODEL = "iic/nlp_structbert_sentence-similarity_chinese-base"

PrecisionChoice = Literal["auto", "fp32", "tf32", "fp16", "bf16"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class SettingsError(ValueError):
    """A setting that cannot be parsed or a combination that cannot work; the message names its source."""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The service's configuration. Field descriptions become flag help and docs/configuration.md."""

    model: Annotated[
        str,
        Meta(
            min_length=1,
            description="ModelScope hub id or local directory of the StructBERT checkpoint. A hub id is "
            "downloaded once into `cache_dir`; a directory is read as is.",
        ),
    ] = DEFAULT_MODEL
    revision: Annotated[
        str | None,
        Meta(
            description="Hub revision (tag or commit) to load; unset = the hub's default. Pin it in "
            "production so every pod serves the same weights. Ignored for a local directory.",
        ),
    ] = None
    cache_dir: Annotated[
        str | None,
        Meta(
            description="Directory for downloaded models; unset = ModelScope's default cache. Put it on a "
            "persistent volume so restarts skip the download.",
        ),
    ] = None
    offline: Annotated[
        bool,
        Meta(
            description="Never contact the model hub: the model must already be in `cache_dir` or be a "
            "local directory. Set it in air-gapped clusters.",
        ),
    ] = False
    precision: Annotated[
        PrecisionChoice,
        Meta(
            description="Inference precision. `auto` picks the fastest mode that passes the engine's "
            "accuracy guard; fp16/bf16 are several times faster on GPUs at ~1e-4/1e-3 score error; "
            "tf32/fp16/bf16 need a GPU that supports them. A tuned profile sets it per GPU type.",
        ),
    ] = "auto"
    device: Annotated[
        str,
        Meta(
            pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
            description="`auto` (the first CUDA GPU if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`.",
        ),
    ] = "auto"
    devices: Annotated[
        Annotated[str, Meta(pattern=r"^(auto|(cpu|cuda(:[0-9]+)?)(,(cpu|cuda(:[0-9]+)?))*)$")] | None,
        Meta(
            description="Serve with one engine replica per device behind one batcher: `auto` = every visible "
            "CUDA GPU (one CPU replica when there is none), or a list such as `cuda:0,cuda:1`. Unset = one "
            "replica on `device`. Each replica holds its own copy of the model; each batch goes to a free "
            "replica. The operator sets `auto` when a pod gets several GPUs.",
        ),
    ] = None
    workers: Annotated[
        Annotated[int, Meta(ge=1, le=16)] | Literal["auto"],
        Meta(
            description="Serving processes on the one port, each a whole service (HTTP, tokenizer, batcher) with "
            "its own engine on the same device(s). One Python process caps HTTP throughput well before a fast "
            "GPU is busy; more processes share the GPU and multiply the host's work. Each holds its own copy "
            "of the model and its CUDA graphs and warms up on its own; readiness turns 200 when all are warm, "
            "and metrics are summed over them. `auto`: where a GPU serves, one per 4 CPU cores the process may "
            "use, at most 3, and fewer where the GPU's memory (16 GiB a worker) or the container's memory "
            "limit (8 GiB a worker) is smaller; 1 on the CPU.",
        ),
    ] = "auto"
    max_seq_len: Annotated[
        int,
        Meta(
            ge=8,
            le=512,
            description="Tokens per pair (`[CLS] a [SEP] b [SEP]`); longer pairs are truncated "
            "longest-first. Lower it to bound latency and memory when sentences are short; 512 is the "
            "model's limit.",
        ),
    ] = 512
    exact_thresholds: Annotated[
        Annotated[str, Meta(pattern=r"^0?\.[0-9]*[1-9][0-9]*(,0?\.[0-9]*[1-9][0-9]*)*$")] | None,
        Meta(
            description="Decision thresholds, comma-separated (e.g. `0.5,0.8`), at which fp16/bf16/tf32 "
            "must decide as fp32 does: a pair scored within the precision's error margin of one is scored "
            "again by an fp32 copy of the model (~0.4 GB more GPU memory; each rescored pair costs an fp32 "
            "forward). Unset = none; nothing changes in fp32.",
        ),
    ] = None
    max_batch_size: Annotated[
        int,
        Meta(
            ge=1,
            le=4096,
            description="Most pairs in one forward pass. Bigger batches raise GPU throughput but also every "
            "request's latency under load; batches are only as big as the queue when the runner frees up. "
            "A tuned profile sets it per GPU type.",
        ),
    ] = 128
    max_batch_tokens: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        Meta(
            description="Token budget of one forward pass (sum of the pairs' lengths); unset = no budget. "
            "Bounds memory and latency when many long pairs arrive together; one pair over the budget "
            "still runs, alone.",
        ),
    ] = None
    max_wait_ms: Annotated[
        float,
        Meta(
            ge=0,
            le=10_000,
            description="Milliseconds the first queued pair waits for others to join its batch. 0 runs "
            "whatever is queued as soon as the runner is free (lowest latency at low load; under load "
            "batches still fill behind the running pass); a few ms fills batches at moderate load. A tuned "
            "profile sets it per GPU type.",
        ),
    ] = 0.0
    max_queue_pairs: Annotated[
        int,
        Meta(
            ge=1,
            description="Pairs that may wait for the runner; past it requests get 429 with Retry-After. "
            "Bounds memory and the worst queueing delay; must be at least `max_pairs_per_request` and "
            "`max_rank_targets`.",
        ),
    ] = 4096
    max_body_bytes: Annotated[
        int,
        Meta(ge=1024, description="Largest request body in bytes; larger bodies get 413."),
    ] = 1_048_576
    max_pairs_per_request: Annotated[
        int,
        Meta(
            ge=1,
            description="Most pairs in one `/v1/similarity/batch` request; more get 413. Big requests are "
            "split across forward passes, but one caller can then hold the queue for longer.",
        ),
    ] = 256
    max_chars_per_sentence: Annotated[
        int,
        Meta(
            ge=1,
            description="Longest sentence in characters; longer ones get 413. The model reads at most "
            "`max_seq_len` tokens (one per Chinese character), so this only bounds tokenizer work.",
        ),
    ] = 2000
    max_rank_targets: Annotated[
        int,
        Meta(
            ge=1,
            description="Most targets in one `/v1/rank` or `/batch_similarity` request; more get 413.",
        ),
    ] = 256
    host: Annotated[
        str,
        Meta(min_length=1, description="Address to listen on; `0.0.0.0` in a container."),
    ] = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535, description="TCP port to listen on.")] = 8000
    profile: Annotated[
        str | None,
        Meta(
            description="Tuned profile JSON written by `structsim autotune` (or copied from the "
            "operator's status); supplies precision, max_batch_size and max_wait_ms where no flag or "
            "environment variable sets them.",
        ),
    ] = None
    drain_timeout_s: Annotated[
        float,
        Meta(
            ge=0,
            description="Seconds to finish admitted requests after SIGTERM before exiting anyway. Keep it "
            "below the pod's terminationGracePeriodSeconds (30 s by default).",
        ),
    ] = 25.0
    log_level: Annotated[
        LogLevel,
        Meta(description="Log verbosity; `debug` also turns on the per-request access log."),
    ] = "info"

    def __post_init__(self) -> None:
        # A request larger than the queue could never be admitted: refuse the combination up front.
        for name in ("max_pairs_per_request", "max_rank_targets"):
            if getattr(self, name) > self.max_queue_pairs:
                raise ValueError(f"{name} ({getattr(self, name)}) exceeds max_queue_pairs ({self.max_queue_pairs})")

    @property
    def exact_threshold_values(self) -> tuple[float, ...]:
        """`exact_thresholds` as numbers (the pattern admits only decimals strictly between 0 and 1)."""
        return tuple(float(value) for value in self.exact_thresholds.split(",")) if self.exact_thresholds else ()


# What a tuned profile may set: the knobs autotune searches.
PROFILE_FIELDS = ("precision", "max_batch_size", "max_wait_ms")


class FieldSpec(msgspec.Struct, frozen=True):
    """One setting as the CLI, the environment and the docs see it."""

    name: str
    type: Any  # the annotation, constraints included
    default: Any
    description: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def base_type(self) -> Any:
        """The annotation without its description (`int`, `str | None`, a `Literal`)."""
        return typing.get_args(self.type)[0]

    @property
    def choices(self) -> tuple[str, ...] | None:
        return typing.get_args(self.base_type) if typing.get_origin(self.base_type) is Literal else None


def field_specs() -> Iterator[FieldSpec]:
    """The settings in declaration order, with their descriptions."""
    for field in msgspec.structs.fields(Settings):
        meta = next(m for m in typing.get_args(field.type)[1:] if isinstance(m, Meta))
        yield FieldSpec(field.name, field.type, field.default, meta.description or "")


def _coerce(spec: FieldSpec, raw: object, source: str) -> object:
    """Convert one raw value (an environment string, a flag) to the field's type, naming its source on error."""
    try:
        return msgspec.convert(raw, type=spec.type, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"{source}={raw!r}: {exc}") from exc


def _profile_values(path: str) -> dict[str, object]:
    try:
        profile: Profile = read_profile(path)
    except ProfileError as exc:
        raise SettingsError(str(exc)) from exc
    return {name: getattr(profile, name) for name in PROFILE_FIELDS}


def load_settings(cli: Mapping[str, object] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Resolve settings: `cli` (field name → value given on the command line) > `env` > profile > defaults.

    Empty environment variables count as unset (manifests often template empty values).
    """
    specs = {spec.name: spec for spec in field_specs()}
    from_cli = {name: _coerce(specs[name], value, specs[name].flag) for name, value in (cli or {}).items()}
    from_env = {
        name: _coerce(spec, value, spec.env_var)
        for name, spec in specs.items()
        if (value := (env or {}).get(spec.env_var, "")) != ""
    }
    values: dict[str, object] = {}
    profile = from_cli.get("profile") or from_env.get("profile")
    if profile:
        values.update(_profile_values(str(profile)))
    values.update(from_env)
    values.update(from_cli)
    try:
        return msgspec.convert(values, type=Settings)
    except msgspec.ValidationError as exc:
        raise SettingsError(str(exc)) from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; unset flags are absent from the parsed namespace (so lower layers show through)."""
    for spec in field_specs():
        help_text = f"{spec.description} [env {spec.env_var}; default {_show(spec.default)}]"
        if spec.base_type is bool:
            parser.add_argument(
                spec.flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            metavar = None if spec.choices else spec.name.upper()
            parser.add_argument(
                spec.flag, default=argparse.SUPPRESS, choices=spec.choices, metavar=metavar, help=help_text
            )


def _show(value: object) -> str:
    return "unset" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def markdown_table() -> str:
    """The settings table of docs/configuration.md (a test checks the file holds exactly this)."""
    rows = ["| setting | flag | environment variable | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for spec in field_specs():
        description = spec.description.replace("|", "\\|")
        rows.append(f"| `{spec.name}` | `{spec.flag}` | `{spec.env_var}` | `{_show(spec.default)}` | {description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # regenerate the docs table: python -m similarity_service.settings
    print(markdown_table(), end="")
