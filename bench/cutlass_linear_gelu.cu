// y = act(x W^T + b) for the bulk forward's ffn_in, as Hopper (sm_90a) CUTLASS GEMMs with the bias and the
// activation in the epilogue: CUTLASS's GELU is the exact erf form (epilogue/thread/activation.h), which
// cuBLASLt's GELU epilogue is not. Built and loaded by bench/cutlass_gelu_probe.py (C entry points, ctypes).
// x [M, K] row-major, W [N, K] row-major (nn.Linear's), b [N], y [M, N] row-major; fp16, fp32 accumulation.

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

template <template <class> class Activation, class TileShape, class ClusterShape, class KernelSchedule,
          class EpilogueSchedule>
struct LinearAct {
  using Half = cutlass::half_t;
  static constexpr int kAlignment = 8;  // 16 bytes of fp16: TMA
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Activation, Half, float, Half>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, kAlignment,
      Half, cutlass::layout::RowMajor, kAlignment, EpilogueSchedule, Fusion>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Half, cutlass::layout::RowMajor, kAlignment, Half,
      cutlass::layout::ColumnMajor, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const void* x, const void* w, const void* b, void* y, int m, int n,
                                            int k) {
    using Kernel_ = typename Gemm::GemmKernel;
    auto stride_a = cutlass::make_cute_packed_stride(typename Kernel_::StrideA{}, make_shape(m, k, 1));
    auto stride_b = cutlass::make_cute_packed_stride(typename Kernel_::StrideB{}, make_shape(n, k, 1));
    auto stride_d = cutlass::make_cute_packed_stride(typename Kernel_::StrideD{}, make_shape(m, n, 1));
    cutlass::KernelHardwareInfo hw_info;
    static const int sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(0);
    hw_info.sm_count = sm_count;
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {m, n, k, 1},
                                  {static_cast<const Half*>(x), stride_a, static_cast<const Half*>(w), stride_b},
                                  {{}, nullptr, stride_d, static_cast<Half*>(y), stride_d},
                                  hw_info};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.thread.bias_ptr = static_cast<const Half*>(b);
    return args;
  }

  static size_t workspace(int m, int n, int k) {
    return Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, m, n, k));
  }

  // 0 on success, else the cutlass::Status (or 100 + the CUDA error) that stopped it.
  static int run(const void* x, const void* w, const void* b, void* y, int m, int n, int k, void* workspace,
                 cudaStream_t stream) {
    auto args = arguments(x, w, b, y, m, n, k);
    Gemm gemm;
    cutlass::Status status = gemm.can_implement(args);
    if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
    status = gemm.initialize(args, workspace, stream);
    if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
    status = gemm.run(stream);
    if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
    cudaError_t error = cudaGetLastError();
    return error == cudaSuccess ? 0 : 100 + static_cast<int>(error);
  }
};

using Cooperative = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CooperativeEpilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingpongEpilogue = cutlass::epilogue::TmaWarpSpecialized;

using GeluCoop = LinearAct<cutlass::epilogue::thread::GELU, Shape<_128, _256, _64>, Shape<_2, _1, _1>, Cooperative,
                           CooperativeEpilogue>;
using GeluPingpong = LinearAct<cutlass::epilogue::thread::GELU, Shape<_64, _256, _64>, Shape<_2, _1, _1>, Pingpong,
                               PingpongEpilogue>;
using GeluPingpong128 = LinearAct<cutlass::epilogue::thread::GELU, Shape<_128, _128, _64>, Shape<_2, _1, _1>,
                                  Pingpong, PingpongEpilogue>;
using GeluCoop256x128 = LinearAct<cutlass::epilogue::thread::GELU, Shape<_256, _128, _64>, Shape<_1, _2, _1>,
                                  Cooperative, CooperativeEpilogue>;
using BiasCoop = LinearAct<cutlass::epilogue::thread::Identity, Shape<_128, _256, _64>, Shape<_2, _1, _1>,
                           Cooperative, CooperativeEpilogue>;

#define ENTRY_POINTS(NAME, TYPE)                                                                                \
  extern "C" size_t NAME##_workspace(int m, int n, int k) { return TYPE::workspace(m, n, k); }                 \
  extern "C" int NAME##_run(const void* x, const void* w, const void* b, void* y, int m, int n, int k,         \
                            void* workspace, cudaStream_t stream) {                                            \
    return TYPE::run(x, w, b, y, m, n, k, workspace, stream);                                                  \
  }

ENTRY_POINTS(gelu_coop, GeluCoop)
ENTRY_POINTS(gelu_pingpong, GeluPingpong)
ENTRY_POINTS(gelu_pingpong_128, GeluPingpong128)
ENTRY_POINTS(gelu_coop_256x128, GeluCoop256x128)
ENTRY_POINTS(bias_coop, BiasCoop)
