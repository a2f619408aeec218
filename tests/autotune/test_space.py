"""The search space follows the hardware: supported precisions only, batch bounded by memory, pins."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from similarity_service.precision import PrecisionError

from similarity_autotune.hardware import Hardware, product_label
from similarity_autotune.space import (
    MAX_BATCH_SIZE,
    SearchSpace,
    ServingConfig,
    build_space,
    default_config,
    memory_batch_limit,
)

CPU = Hardware(device="cpu", name="Test CPU", cpu_cores=2)


def gpu(capability: str, memory_gib: float = 16.0) -> Hardware:
    """A simulated GPU: the space needs only its capability and memory."""
    return Hardware(device="cuda", name="Simulated GPU", compute_capability=capability, memory_gib=memory_gib)


@pytest.mark.parametrize(
    ("hardware", "expected"),
    [
        (CPU, ("fp32",)),
        (gpu("6.1"), ("fp32",)),  # Pascal: no Tensor Cores
        (gpu("7.5"), ("fp32", "fp16")),  # Turing: fp16, but no tf32/bf16
        (gpu("8.0"), ("fp32", "tf32", "fp16", "bf16")),
        (gpu("9.0"), ("fp32", "tf32", "fp16", "bf16")),
    ],
)
def test_auto_searches_exactly_the_precisions_the_device_supports(hardware: Hardware, expected: tuple[str, ...]) -> None:
    assert build_space(hardware).precisions == expected


def test_sampling_never_proposes_an_unsupported_precision_or_an_out_of_range_knob() -> None:
    space = build_space(gpu("7.5"), batch_limit=300)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    configs = []
    for _ in range(200):
        trial = study.ask()
        configs.append(space.suggest(trial))
        study.tell(trial, 1.0)
    assert {c.precision for c in configs} == {"fp32", "fp16"}
    assert all(1 <= c.max_batch_size <= 300 and 0 <= c.max_wait_ms <= 20 for c in configs)
    # Log scale: small batches are sampled as often as large ones.
    assert sum(c.max_batch_size <= 17 for c in configs) > 50


def test_a_named_precision_pins_it_and_an_unsupported_one_is_refused() -> None:
    assert build_space(gpu("8.0"), precision="bf16").precisions == ("bf16",)
    with pytest.raises(PrecisionError, match=r"bf16 needs CUDA compute capability >= 8.0.*7.5"):
        build_space(gpu("7.5"), precision="bf16")
    with pytest.raises(PrecisionError, match="CPU"):
        build_space(CPU, precision="fp16")


def test_pinned_batch_and_wait_are_one_value_ranges() -> None:
    space = build_space(CPU, max_batch_size=48, max_wait_ms=3.5)
    assert space.max_batch_size == (48, 48) and space.max_wait_ms == (3.5, 3.5)
    study = optuna.create_study()
    assert space.suggest(study.ask()) == ServingConfig(precision="fp32", max_batch_size=48, max_wait_ms=3.5)


def test_the_default_is_the_untuned_service_config_inside_the_space() -> None:
    assert default_config(gpu("8.6"), build_space(gpu("8.6"))) == ServingConfig(
        precision="fp16", max_batch_size=128, max_wait_ms=0.0
    )
    assert default_config(CPU, build_space(CPU)).precision == "fp32"
    # Pinned knobs win over the defaults.
    pinned = build_space(gpu("8.6"), precision="bf16", max_batch_size=64)
    assert default_config(gpu("8.6"), pinned) == ServingConfig(precision="bf16", max_batch_size=64, max_wait_ms=0.0)


def test_the_largest_batch_is_bounded_by_device_memory(tiny_model_dir: Path) -> None:
    # BERT-tiny activations at 512 tokens: a few MB a pair, so 1 GiB bounds the batch well below 1024.
    small = memory_batch_limit(gpu("8.0", memory_gib=1.0), tiny_model_dir, 512)
    assert 1 <= small < MAX_BATCH_SIZE
    assert memory_batch_limit(gpu("8.0", memory_gib=80.0), tiny_model_dir, 512) == MAX_BATCH_SIZE
    # Shorter sequences leave room for more pairs.
    assert memory_batch_limit(gpu("8.0", memory_gib=1.0), tiny_model_dir, 64) > small
    assert build_space(gpu("8.0"), batch_limit=small).max_batch_size == (1, small)


def test_the_grid_covers_every_precision_with_log_spaced_batches() -> None:
    grid = SearchSpace(precisions=("fp32", "fp16")).grid(batch_points=11, wait_points=(0, 2, 10, 50))
    assert {c.max_batch_size for c in grid} == {2**i for i in range(11)}
    assert {c.max_wait_ms for c in grid} == {0.0, 2.0, 10.0, 20.0}  # 50 clamped to the range's 20
    assert len(grid) == 2 * 11 * 4


def test_gpu_products_are_spelled_as_the_node_label() -> None:
    assert product_label("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert gpu("9.0").product == "Simulated-GPU"
    assert CPU.product == "cpu-Test-CPU"
