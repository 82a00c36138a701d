// MagicNorm transition, forward and backward, one block per row, one pass over memory.
//
// Forward (hrm/ops/impl/magicnorm_transition.py has the reference and the derivation):
//     h = x + delta,  z = h * rstd(h),  u = z + other,  n = u * rstd(u)
// with rstd(t) = 1 / sqrt(mean(t^2) + eps) in fp32, h rounded to z's dtype before its norm and
// u rounded to its dtype before its norm (as the torch reference and the Triton kernel do).
// Stores z, u, n and the two fp32 rstd per row (saved for the backward).
// Backward, given any of dz, du, dn (a missing one is a null pointer and is not read):
//     du' = du + rstd_u * (dn - n * mean(dn * n))          -> d other
//     dh  = rstd_h * (dz' - z * mean(dz' * z)),  dz' = dz + du'   -> d x = d delta
//
// Every thread keeps VPT 128-bit vectors of the row in registers (RowPlan in
// csrc/common/hrm_cuda_math.h), so each input is loaded once; the two row sums per pass are
// fp32 warp shuffles, then one shared-memory step across the warps. This version takes one
// dtype for all tensors (fp32, fp16 or bf16); the Python side sends mixed dtypes to Triton.
#include "magicnorm_transition.h"

#include "../common/hrm_cuda_math.h"

namespace hrm {
namespace {

// Sum of `v` over the block (all threads get it). `red` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();  // `red` may still be read by the previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < warps ? red[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T>
__device__ __forceinline__ void load_vec(const T* base, int vec, float (&out)[VecElems<T>::value]) {
  Pack16 p = reinterpret_cast<const Pack16*>(base)[vec];
  unpack<T>(p, out);
}

template <class T>
__device__ __forceinline__ void store_vec(T* base, int vec, const float (&in)[VecElems<T>::value]) {
  reinterpret_cast<Pack16*>(base)[vec] = pack<T>(in);
}

template <class T, int VPT>
__global__ void __launch_bounds__(kMaxThreads, 1)
    transition_fwd_kernel(const T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ other,
                          T* __restrict__ z, T* __restrict__ u, T* __restrict__ n, float* __restrict__ rstd_h,
                          float* __restrict__ rstd_u, int n_cols, int n_vecs, float eps) {
  constexpr int E = VecElems<T>::value;
  __shared__ float red[32];
  const long long off = (long long)blockIdx.x * n_cols;
  x += off, delta += off, other += off, z += off, u += off, n += off;
  float v[VPT][E];  // h, then u
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int vec = owned_vec(threadIdx.x, j, blockDim.x, n_vecs);
    if (vec < 0) continue;
    float b[E];
    load_vec(x, vec, v[j]);
    load_vec(delta, vec, b);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      v[j][i] = round_to<T>(v[j][i] + b[i]);
      ss += v[j][i] * v[j][i];
    }
  }
  const float rh = rms_rstd(block_sum(ss, red), n_cols, eps);
  ss = 0.0f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int vec = owned_vec(threadIdx.x, j, blockDim.x, n_vecs);
    if (vec < 0) continue;
    float zv[E], o[E];
    load_vec(other, vec, o);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      zv[i] = round_to<T>(v[j][i] * rh);
      v[j][i] = round_to<T>(zv[i] + o[i]);
      ss += v[j][i] * v[j][i];
    }
    store_vec(z, vec, zv);
    store_vec(u, vec, v[j]);
  }
  const float ru = rms_rstd(block_sum(ss, red), n_cols, eps);
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int vec = owned_vec(threadIdx.x, j, blockDim.x, n_vecs);
    if (vec < 0) continue;
#pragma unroll
    for (int i = 0; i < E; ++i) v[j][i] *= ru;
    store_vec(n, vec, v[j]);
  }
  if (threadIdx.x == 0) {
    rstd_h[blockIdx.x] = rh;
    rstd_u[blockIdx.x] = ru;
  }
}

template <class T, int VPT>
__global__ void __launch_bounds__(kMaxThreads, 1)
    transition_bwd_kernel(const T* __restrict__ dz, const T* __restrict__ du, const T* __restrict__ dn,
                          const T* __restrict__ z, const T* __restrict__ n, const float* __restrict__ rstd_h,
                          const float* __restrict__ rstd_u, T* __restrict__ dh, T* __restrict__ dother, int n_cols,
                          int n_vecs) {
  constexpr int E = VecElems<T>::value;
  __shared__ float red[32];
  const long long off = (long long)blockIdx.x * n_cols;
  z += off, n += off, dh += off, dother += off;
  // A gradient that is absent is a null pointer: the test is uniform across the grid.
  const bool has_dz = dz != nullptr, has_du = du != nullptr, has_dn = dn != nullptr;
  if (has_dz) dz += off;
  if (has_du) du += off;
  if (has_dn) dn += off;
  float g[VPT][E];  // du', then dz'
  float dot = 0.0f;
  if (has_dn) {  // the pre-norm's gradient: g = dn, dot = sum(dn * n)
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int vec = owned_vec(threadIdx.x, j, blockDim.x, n_vecs);
      if (vec < 0) continue;
      float nv[E];
      load_vec(dn, vec, g[j]);
      load_vec(n, vec, nv);
#pragma unroll
      for (int i = 0; i < E; ++i) dot += g[j][i] * nv[i];
    }
    const float mean = block_sum(dot, red) / float(n_cols);
    const float ru = rstd_u[blockIdx.x];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int vec = owned_vec(threadIdx.x, j, blockDim.x, n_vecs);
      if (vec < 0) continue;
      float nv[E];
      load_vec(n, vec, nv);  // a second read of n: L1/L2-resident, and it frees VPT * E registers
#pragma unroll
      for (int i = 0; i < E; ++i) g[j][i] = rms_grad(ru, g[j][i], nv[i], mean);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VPT; ++j)
#pragma unroll
      for (int i = 0; i < E; ++i) g[j][i] = 0.0f;
  }
  dot = 0.0f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int vec = owned_vec(threadIdx.x, j, blockDim.x, n_vecs);
    if (vec < 0) continue;
    float t[E];
    if (has_du) {
      load_vec(du, vec, t);
#pragma unroll
      for (int i = 0; i < E; ++i) g[j][i] += t[i];
    }
    store_vec(dother, vec, g[j]);
    if (has_dz) {
      load_vec(dz, vec, t);
#pragma unroll
      for (int i = 0; i < E; ++i) g[j][i] += t[i];
    }
    load_vec(z, vec, t);
#pragma unroll
    for (int i = 0; i < E; ++i) dot += g[j][i] * t[i];
  }
  const float mean = block_sum(dot, red) / float(n_cols);
  const float rh = rstd_h[blockIdx.x];
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int vec = owned_vec(threadIdx.x, j, blockDim.x, n_vecs);
    if (vec < 0) continue;
    float t[E];
    load_vec(z, vec, t);
#pragma unroll
    for (int i = 0; i < E; ++i) t[i] = rms_grad(rh, g[j][i], t[i], mean);
    store_vec(dh, vec, t);
  }
}

template <class T, int VPT>
void launch_fwd(const TransitionFwdArgs& a, const RowPlan& p, cudaStream_t stream) {
  transition_fwd_kernel<T, VPT><<<a.n_rows, p.threads, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.delta), static_cast<const T*>(a.other),
      static_cast<T*>(a.z), static_cast<T*>(a.u), static_cast<T*>(a.n), a.rstd_h, a.rstd_u, a.n_cols, p.n_vecs,
      a.eps);
}

template <class T, int VPT>
void launch_bwd(const TransitionBwdArgs& a, const RowPlan& p, cudaStream_t stream) {
  transition_bwd_kernel<T, VPT><<<a.n_rows, p.threads, 0, stream>>>(
      static_cast<const T*>(a.dz), static_cast<const T*>(a.du), static_cast<const T*>(a.dn),
      static_cast<const T*>(a.z), static_cast<const T*>(a.n), a.rstd_h, a.rstd_u, static_cast<T*>(a.dh),
      static_cast<T*>(a.dother), a.n_cols, p.n_vecs);
}

template <class T>
cudaError_t fwd_typed(const TransitionFwdArgs& a, cudaStream_t s) {
  const RowPlan p = row_plan(a.n_cols, sizeof(T));
  if (p.vecs_per_thread == 0) return cudaErrorInvalidValue;
  if (a.n_rows == 0) return cudaSuccess;
  switch (p.vecs_per_thread) {
    case 1: launch_fwd<T, 1>(a, p, s); break;
    case 2: launch_fwd<T, 2>(a, p, s); break;
    case 4: launch_fwd<T, 4>(a, p, s); break;
    default: launch_fwd<T, 8>(a, p, s); break;
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t bwd_typed(const TransitionBwdArgs& a, cudaStream_t s) {
  const RowPlan p = row_plan(a.n_cols, sizeof(T));
  if (p.vecs_per_thread == 0) return cudaErrorInvalidValue;
  if (a.n_rows == 0) return cudaSuccess;
  switch (p.vecs_per_thread) {
    case 1: launch_bwd<T, 1>(a, p, s); break;
    case 2: launch_bwd<T, 2>(a, p, s); break;
    case 4: launch_bwd<T, 4>(a, p, s); break;
    default: launch_bwd<T, 8>(a, p, s); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t magicnorm_transition_fwd(const TransitionFwdArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return fwd_typed<float>(a, stream);
    case DType::kFloat16: return fwd_typed<fp16_t>(a, stream);
    case DType::kBFloat16: return fwd_typed<bf16_t>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t magicnorm_transition_bwd(const TransitionBwdArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return bwd_typed<float>(a, stream);
    case DType::kFloat16: return bwd_typed<fp16_t>(a, stream);
    case DType::kBFloat16: return bwd_typed<bf16_t>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hrm
