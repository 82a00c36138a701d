// Launchers of the MagicNorm transition kernels (magicnorm_transition.cu). Plain pointers and a
// stream: no torch headers here, so the kernels compile (and are resource-checked) on machines
// whose torch has no CUDA. csrc/hrm_cuda/ops.cpp checks shapes and dtypes and calls these.
#pragma once

#include <cuda_runtime.h>

#include "../common/dtype.h"

namespace hrm {

// Row-major [n_rows, n_cols] tensors of one dtype, 16-byte aligned, n_cols a whole number of
// 128-bit vectors (8 bf16/fp16 or 4 fp32) and at most 8 * 512 vectors (32768 bf16/fp16 or 16384 fp32 columns).
struct TransitionFwdArgs {
  DType dtype;
  const void *x, *delta, *other;
  void *z, *u, *n;
  float *rstd_h, *rstd_u;  // [n_rows] fp32
  int n_rows, n_cols;
  float eps;
};

struct TransitionBwdArgs {
  DType dtype;
  const void *dz, *du, *dn;  // any may be null (no gradient)
  const void *z, *n;
  const float *rstd_h, *rstd_u;
  void *dh, *dother;
  int n_rows, n_cols;
};

// cudaErrorInvalidValue when the row does not fit the plan (see hrm::row_plan).
cudaError_t magicnorm_transition_fwd(const TransitionFwdArgs& args, cudaStream_t stream);
cudaError_t magicnorm_transition_bwd(const TransitionBwdArgs& args, cudaStream_t stream);

}  // namespace hrm
