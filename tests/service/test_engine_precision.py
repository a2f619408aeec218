"""Precision modes against compute capability (simulated: no GPU needed), and device resolution."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch

from similarity_service.precision import (
    DeviceError,
    PrecisionError,
    matmul_precision,
    resolve_device,
    resolve_precision,
    supported_precisions,
    torch_dtype,
)
from similarity_service.model import load_model, resolve_model
from similarity_service.packed import reference_varlen_attention
from similarity_service.packed_executor import PackedExecutor
from similarity_service.runner import FIRST_SCORE_CHUNK_PAIRS, Engine


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((6, 1), ["fp32"]),  # Pascal: no Tensor Cores
        ((7, 0), ["fp32", "fp16"]),  # V100
        ((7, 5), ["fp32", "fp16"]),  # T4
        ((8, 0), ["fp32", "tf32", "fp16", "bf16"]),  # A100
        ((9, 0), ["fp32", "tf32", "fp16", "bf16"]),  # H100
    ],
)
def test_supported_precisions_follow_compute_capability(capability: tuple[int, int], expected: list[str]) -> None:
    assert supported_precisions("cuda", capability=capability) == expected


def test_cpu_runs_fp32_only() -> None:
    assert supported_precisions("cpu") == ["fp32"]
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(PrecisionError, match="precision fp16 is not available on the CPU, which runs fp32 only"):
        resolve_precision("fp16", "cpu")


def test_auto_is_fp16_from_capability_7_and_fp32_below() -> None:
    assert resolve_precision("auto", "cuda", capability=(7, 0)) == "fp16"
    assert resolve_precision("auto", "cuda", capability=(9, 0)) == "fp16"
    assert resolve_precision("auto", "cuda", capability=(6, 1)) == "fp32"


def test_refusal_names_the_gpu_its_capability_and_what_it_supports() -> None:
    with pytest.raises(PrecisionError) as caught:
        resolve_precision("bf16", "cuda:0", capability=(7, 5), device_name="Tesla T4")
    message = str(caught.value)
    assert "precision bf16 needs CUDA compute capability >= 8.0" in message
    assert "Tesla T4 (cuda:0) has 7.5" in message
    assert message.endswith("it supports: fp32, fp16")
    with pytest.raises(PrecisionError, match=r"tf32 needs .* >= 8\.0, but Tesla T4"):
        resolve_precision("tf32", "cuda:0", capability=(7, 5), device_name="Tesla T4")
    with pytest.raises(PrecisionError, match=r"fp16 needs .* >= 7\.0, .* has 6\.1; it supports: fp32$"):
        resolve_precision("fp16", "cuda:0", capability=(6, 1), device_name="Tesla P100")
    assert resolve_precision("fp16", "cuda:0", capability=(7, 5), device_name="Tesla T4") == "fp16"


def test_unknown_precision_lists_the_choices() -> None:
    with pytest.raises(PrecisionError, match="unknown precision 'fp8': choose one of auto, fp32, tf32, fp16, bf16"):
        resolve_precision("fp8", "cpu")


def test_dtypes() -> None:
    assert [torch_dtype(p) for p in ("fp32", "tf32", "fp16", "bf16")] == [
        torch.float32,
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ]


def test_tf32_switches_matmul_precision_only_inside_the_block() -> None:
    before = torch.get_float32_matmul_precision()
    with matmul_precision("tf32"):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with matmul_precision("fp16"):
        assert torch.get_float32_matmul_precision() == before


def test_device_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="torch sees no CUDA GPU here"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(DeviceError, match="device 'meta' is not supported"):
        resolve_device("meta")


def test_engine_refuses_a_precision_before_reading_the_model(tmp_path: Path) -> None:
    # The model path does not even exist: the precision check comes first, so a bad flag fails fast.
    with pytest.raises(PrecisionError, match="runs fp32 only"):
        Engine.load(tmp_path / "absent", device="cpu", precision="bf16")


def test_engine_auto_precision_on_cpu_is_fp32(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_model_dir, device="cpu", precision="auto")
    assert engine.info.precision == "fp32"


@pytest.mark.parametrize("packed_reference", [False, True], ids=["padded-fp32", "packed-fp32"])
def test_pairs_near_an_exact_threshold_take_fp32_scores_and_no_decision_flips(
    tiny_model_dir: Path, chinese_pairs: list[tuple[str, str]], packed_reference: bool
) -> None:
    """bf16 weights on the CPU stand in for a lossy precision (Engine.load runs only fp32 on the CPU). The fp32
    copy rescores padded, or packed as Engine.load sets it up where the engine's own path is packed (CUDA)."""
    fp32 = Engine.load(tiny_model_dir, device="cpu", precision="fp32")
    reference = fp32.score(chinese_pairs)
    lossy = load_model(resolve_model(tiny_model_dir)).module.to(torch.bfloat16).keep_head_fp32()

    def engine(thresholds: tuple[float, ...], margin: float) -> Engine:
        return Engine(
            module=lossy,
            tokenizer=fp32._tokenizer,  # noqa: SLF001 - the same tokenizer
            info=msgspec.structs.replace(fp32.info, precision="bf16"),
            max_batch_size=64,
            max_batch_tokens=32_768,
            bucket_multiple=16,
            reference=fp32._module,  # noqa: SLF001 - the fp32 copy Engine.load would make
            reference_packed=PackedExecutor(
                fp32._module, torch.device("cpu"), reference_varlen_attention, max_seq_len=512, latency_kernels=False  # noqa: SLF001
            )
            if packed_reference
            else None,
            exact_thresholds=thresholds,
            threshold_margin=margin,
        )

    plain = engine((), 0.0).score(chinese_pairs)
    errors = [abs(a - b) for a, b in zip(plain, reference, strict=True)]
    assert max(errors) > 1e-3  # bf16 moves these scores visibly
    threshold = sorted(plain)[len(plain) // 2]  # a threshold among the scores, so pairs lie close to it
    margin = max(errors)  # over the precision's error on these pairs: no pair outside it can flip
    exact = engine((threshold,), margin)
    got = exact.score(chinese_pairs)
    near = {i for i, score in enumerate(plain) if abs(score - threshold) <= margin}
    assert near and exact.rescored_pairs == len(near) < len(chinese_pairs)
    for i, score in enumerate(got):
        assert score == (pytest.approx(reference[i], abs=1e-6) if i in near else plain[i])
    assert [score >= threshold for score in got] == [score >= threshold for score in reference]
    assert exact.score([chinese_pairs[min(near)]]) == pytest.approx([reference[min(near)]], abs=1e-6)  # alone too
    # a list long enough to be scored chunk by chunk: its near pairs are rescored once, together, at the end
    copies = FIRST_SCORE_CHUNK_PAIRS // len(chinese_pairs) + 2
    before = exact.rescored_pairs
    assert exact.score(chinese_pairs * copies) == pytest.approx(got * copies, abs=1e-6)
    assert exact.rescored_pairs - before == copies * len(near)


def test_exact_thresholds_are_checked_and_change_nothing_in_fp32(
    tiny_model_dir: Path, tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        Engine.load(tiny_model_dir, device="cpu", precision="fp32", exact_thresholds=(0.5, 1.0))
    engine = Engine.load(tiny_model_dir, device="cpu", precision="fp32", exact_thresholds=(0.5,))
    assert engine.score(chinese_pairs) == pytest.approx(tiny_engine.score(chinese_pairs), abs=1e-7)
    assert engine.rescored_pairs == 0  # fp32 has no copy to rescore with
