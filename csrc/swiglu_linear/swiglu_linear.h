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
//
// The backward kernels run the same product again and put the SwiGLU's gradient in the
// epilogue instead: with dy [M, I] they write d(gate_up) = [dg | du] ([M, 2I], rows 2I apart;
// hrm::swiglu_grad on each pair and dy's element), so the recomputed gate_up never reaches
// memory either and the gradient costs one launch; the two GEMMs after it (dx = d(gate_up) W,
// dW = d(gate_up)^T x) are torch's.
#pragma once

#include <cuda_runtime.h>

#include "../common/dtype.h"

namespace hrm {

struct SwigluLinearArgs {
  DType dtype;     // kFloat16 or kBFloat16 (x, W and y alike)
  const void* x;   // [M, K]
  const void* w;   // [2I, K]
  void* y;         // forward: [M, I]; backward: d(gate_up) [M, 2I]
  int m, k, intermediate;
  const void* dy = nullptr;  // backward only: [M, I]
};

// Requirements (checked by ops.cpp, cudaErrorInvalidValue here otherwise): K and I multiples of
// 8 and the pointers 16-byte aligned (128-bit loads; TMA strides on sm_90a); the backward
// launchers also need dy.
// Each is defined only when CMake compiles its file (HRM_SWIGLU_SM80 / HRM_SWIGLU_SM90, set from
// HRM_CUDA_ARCHS).
cudaError_t swiglu_linear_sm80(const SwigluLinearArgs& args, cudaStream_t stream);  // sm_80 .. sm_89
cudaError_t swiglu_linear_sm90(const SwigluLinearArgs& args, cudaStream_t stream);  // sm_90a
cudaError_t swiglu_linear_bwd_sm80(const SwigluLinearArgs& args, cudaStream_t stream);
cudaError_t swiglu_linear_bwd_sm90(const SwigluLinearArgs& args, cudaStream_t stream);

}  // namespace hrm
