"""Compiles every Triton kernel of the service for a Hopper GPU, here, without one (run by test_triton_builds.py).

The tests run the kernels in Triton's interpreter, which executes Python and never compiles them: a kernel the
interpreter runs may still fail to build for a GPU (a global that is not a constexpr, an unsupported op), and then
the engine falls back to library kernels at load, slower and with only a warning. Triton's compiler needs no GPU to
build for a target, so this builds each kernel as the engine launches it (fp16, the tiles it uses), down to a
cubin. Run without TRITON_INTERPRET (it swaps @triton.jit for the interpreter). Prints one line per kernel.
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "the interpreter replaces the kernels this builds"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from similarity_service import latency_kernels, triton_attention  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def build(kernel: triton.JITFunction, types: dict[str, str], constants: dict[str, object], num_warps: int, num_stages: int) -> None:
    """`types`: each runtime argument's Triton type; `constants`: each constexpr's value; in any order."""
    names = kernel.arg_names
    assert set(names) == set(types) | set(constants), sorted(set(names) ^ (set(types) | set(constants)))
    signature = {name: types.get(name, "constexpr") for name in names}
    constexprs = {(names.index(name),): value for name, value in constants.items()}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
        target=HOPPER,
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    assert compiled.asm.get("cubin"), kernel.__name__
    print(f"built {kernel.__name__} {constants}", flush=True)


def main() -> None:
    i32, f32 = "i32", "fp32"
    for config, gelu, accumulate in (
        (latency_kernels.QKV, False, False),
        (latency_kernels.FFN_IN, True, False),
        (latency_kernels.ATTENTION_OUT, False, True),
        (latency_kernels.FFN_OUT, False, True),
    ):
        build(
            latency_kernels.linear_kernel,
            {"x_ptr": "*fp16", "w_ptr": "*fp16", "b_ptr": "*fp16", "out_ptr": "*fp32" if accumulate else "*fp16",
             "M": i32, "N": i32, "K": i32, "k_chunk": i32, "stride_xm": i32, "stride_wn": i32, "stride_om": i32},
            {"GELU": gelu, "ACCUMULATE": accumulate, "EVEN_K": True, "BLOCK_M": latency_kernels.MAX_TOKENS,
             "BLOCK_N": config.block_n, "BLOCK_K": config.block_k},
            config.num_warps, config.num_stages,
        )  # fmt: skip
    norm_types = {"H": i32, "eps": f32, "x_ptr": "*fp32", "x16_ptr": "*fp16", "gamma_ptr": "*fp32", "beta_ptr": "*fp32"}
    build(
        latency_kernels._embed_norm_kernel,  # noqa: SLF001
        norm_types | {"ids_ptr": "*i32", "types_ptr": "*i32", "positions_ptr": "*i32",
                      "word_ptr": "*fp16", "position_ptr": "*fp16", "type_ptr": "*fp16"},
        {"BLOCK_H": 1024}, 4, 2,
    )  # fmt: skip
    build(
        latency_kernels._residual_norm_kernel,  # noqa: SLF001
        norm_types | {"acc_ptr": "*fp32", "bias_ptr": "*fp16"}, {"BLOCK_H": 1024}, 4, 2,
    )
    strides = {name: i32 for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ot", "stride_oh")}
    build(
        latency_kernels._attention_kernel,  # noqa: SLF001
        strides | {f"{t}_ptr": "*fp16" for t in "qkvo"} | {"cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "scale_log2": f32},
        {"HEAD_DIM": 64, "BLOCK_Q": 64, "BLOCK_K": 64}, 4, 2,
    )
    for dtype, ieee in (("fp16", False), ("fp32", True)):  # the engine's fp16 path, and its fp32 rescoring copy
        tiles = triton_attention.tiles_for(512, 512)
        build(
            triton_attention._varlen_attention_kernel,  # noqa: SLF001
            strides | {f"{t}_ptr": f"*{dtype}" for t in "qkvo"}
            | {"cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "scale_log2": f32, "q_blocks": i32},
            {"HEAD_DIM": 64, "BLOCK_Q": tiles.block_q, "BLOCK_K": tiles.block_k, "IEEE": ieee},
            tiles.num_warps, tiles.num_stages,
        )  # fmt: skip


if __name__ == "__main__":
    main()
    sys.exit(0)
