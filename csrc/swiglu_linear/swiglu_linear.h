// Launchers of the SwiGLU GEMM: y = silu(x W_g^T) * (x W_u^T) for the fused weight W = [W_g | W_u]
// ([2I, K] row-major, nn.Linear's layout: the model's gate_up_proj.weight), x [M, K] row-major,
// y [M, I] row-major, fp32 accumulation, fp16 or bf16 operands. No torch headers here (see
// csrc/magicnorm_transition/magicnorm_transition.h); csrc/hrm_cuda/ops.cpp picks the launcher
// by the device's architecture.
//
// Weight layout and the epilogue: the weight is used as it is. A CTA that owns output columns
// [n0, n0 + BN) loads two B tiles per k step, rows [n0, n0 + BN) (gate) and [I + n0, I + n0 + BN)
// (up), and keeps two accumulators with the same register layout, so gate and up of an output
// element sit in the same thread at the same fragment index: the epilogue is element-wise
// (hrm::swiglu on each pair) and the [M, 2I] product never leaves registers.
#pragma once

#include <cuda_runtime.h>

#include "../common/dtype.h"

namespace hrm {

struct SwigluLinearArgs {
  DType dtype;     // kFloat16 or kBFloat16 (x, W and y alike)
  const void* x;   // [M, K]
  const void* w;   // [2I, K]
  void* y;         // [M, I]
  int m, k, intermediate;
};

// Requirements (checked by ops.cpp, cudaErrorInvalidValue here otherwise): K and I multiples of
// 8 and the three pointers 16-byte aligned (128-bit loads; TMA strides on sm_90a).
// Each is defined only when CMake compiles its file (HRM_SWIGLU_SM80 / HRM_SWIGLU_SM90, set from
// HRM_CUDA_ARCHS).
cudaError_t swiglu_linear_sm80(const SwigluLinearArgs& args, cudaStream_t stream);  // sm_80 .. sm_89
cudaError_t swiglu_linear_sm90(const SwigluLinearArgs& args, cudaStream_t stream);  // sm_90a

}  // namespace hrm
