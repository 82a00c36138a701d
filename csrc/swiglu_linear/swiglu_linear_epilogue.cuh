// What the SwiGLU GEMMs share (swiglu_linear_sm80.cu, swiglu_linear_sm90.cu): the launchers'
// argument checks and dtype dispatch, and the epilogue. In the epilogue each
// thread holds its part of the BM x BN tile's gate and up accumulators in one register layout
// (acc_g, acc_u), at the coordinates tCcY of the [M, N] output, and stores
//     forward:  y[m, n] = swiglu(g, u)                      (tCgY: y, rows N apart)
//     backward: dg[m, n], du[m, n] = swiglu_grad(g, u, dy[m, n])
// into d(gate_up) = [dg | du] (tCgY: its dg half, rows 2N apart; the du half is N further on),
// every store predicated on the M and N edges.
#pragma once

#include <cute/tensor.hpp>

#include "../common/hrm_cuda_math.h"
#include "swiglu_linear.h"

namespace hrm {

// cudaErrorInvalidValue for arguments the kernels do not take; nothing to do without rows or
// columns (an empty dy may then have no storage); else launch(T{}) for the dtype's CuTe type.
template <bool kBackward, class Launch>
cudaError_t dispatch_swiglu_linear(const SwigluLinearArgs& a, Launch launch) {
  if (a.k % 8 || a.intermediate % 8 || a.m < 0) return cudaErrorInvalidValue;
  if (a.m == 0 || a.intermediate == 0) return cudaSuccess;
  if (kBackward && a.dy == nullptr) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kBFloat16: return launch(cute::bfloat16_t{});
    case DType::kFloat16: return launch(cute::half_t{});
    default: return cudaErrorInvalidValue;
  }
}

template <bool kBackward, class T, class ThrMma, class Tiler, class Cta, class Acc, class CTensor, class YTensor>
__device__ __forceinline__ void swiglu_linear_epilogue(const ThrMma& thr, const Tiler& tiler, const Cta& cta, int M,
                                                       int N, T* y, const T* dy, const Acc& acc_g, const Acc& acc_u,
                                                       const CTensor& tCcY, YTensor& tCgY) {
  using namespace cute;
  if constexpr (kBackward) {
    Tensor mU = make_tensor(make_gmem_ptr(y + N), make_shape(M, N), make_stride(2 * int64_t(N), Int<1>{}));
    Tensor mDY = make_tensor(make_gmem_ptr(dy), make_shape(M, N), make_stride(int64_t(N), Int<1>{}));
    Tensor tCgU = thr.partition_C(local_tile(mU, tiler, cta, Step<_1, _1, X>{}));
    Tensor tCgDY = thr.partition_C(local_tile(mDY, tiler, cta, Step<_1, _1, X>{}));
    CUTE_UNROLL
    for (int i = 0; i < size(acc_g); ++i) {
      if (elem_less(tCcY(i), make_coord(M, N))) {
        float dg, du;
        swiglu_grad(acc_g(i), acc_u(i), float(tCgDY(i)), dg, du);
        tCgY(i) = T(dg);
        tCgU(i) = T(du);
      }
    }
  } else {
    CUTE_UNROLL
    for (int i = 0; i < size(acc_g); ++i) {
      if (elem_less(tCcY(i), make_coord(M, N))) tCgY(i) = T(swiglu(acc_g(i), acc_u(i)));
    }
  }
}

}  // namespace hrm
