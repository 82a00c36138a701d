// SwiGLU GEMM for sm_80 .. sm_89: CuTe mma.sync (16x8x16, fp32 accumulation) with a cp.async
// multistage pipeline and the SwiGLU in the epilogue.
//
//     y[m, n] = silu(sum_k x[m, k] W[n, k]) * (sum_k x[m, k] W[I + n, k])
//
// One CTA (8 warps, 4 x 2 over M x N) computes a BM x BN = 128 x 64 tile of y, a 128 x 128 slice
// of the [M, 2I] product: per k step (BK = 32) it loads the x tile and the gate and up weight
// tiles with 128-bit cp.async (zero-filled past the M, I and K edges) into a 3-stage ring of
// swizzled shared-memory buffers, reads them with ldmatrix and accumulates two fp32
// accumulators, gate and up, of one register layout. The epilogue applies hrm::swiglu to each
// pair in registers and stores y predicated on the edges; the backward instance (kBackward)
// reads dy's element instead and stores hrm::swiglu_grad's pair into d(gate_up) = [dg | du]
// (swiglu_linear.h, swiglu_linear_epilogue.cuh). Compiled and resource-checked only without a
// GPU (docs/cuda.md).
#include "swiglu_linear.h"

#include <cute/tensor.hpp>

#include "swiglu_linear_epilogue.cuh"

namespace hrm {
namespace {

using namespace cute;

constexpr int kBM = 128, kBN = 64, kBK = 32, kStages = 3;
constexpr int kThreads = 256;

template <class T>
struct Config {
  // 64-byte rows (BK = 32 16-bit values), swizzled so ldmatrix and the 128-bit stores are
  // bank-conflict free.
  using SmemAtom = decltype(composition(Swizzle<2, 3, 3>{}, Layout<Shape<_8, _32>, Stride<_32, _1>>{}));
  using SmemA = decltype(tile_to_shape(SmemAtom{}, make_shape(Int<kBM>{}, Int<kBK>{}, Int<kStages>{})));
  using SmemB = decltype(tile_to_shape(SmemAtom{}, make_shape(Int<kBN>{}, Int<kBK>{}, Int<kStages>{})));
  using MmaOp = std::conditional_t<std::is_same_v<T, cute::bfloat16_t>, SM80_16x8x16_F32BF16BF16F32_TN,
                                   SM80_16x8x16_F32F16F16F32_TN>;
  using Mma = decltype(make_tiled_mma(MmaOp{}, Layout<Shape<_4, _2, _1>>{}, Tile<_64, _32, _16>{}));
  // 256 threads x 8 values: a 64 x 32 slab per copy, k-major.
  using G2S = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>, T>{},
                                       Layout<Shape<_64, _4>, Stride<_4, _1>>{}, Layout<Shape<_1, _8>>{}));
  using S2R = Copy_Atom<SM75_U32x4_LDSM_N, T>;
};

template <class T>
struct SharedStorage {
  alignas(128) ArrayEngine<T, cosize_v<typename Config<T>::SmemA>> a;
  alignas(128) ArrayEngine<T, cosize_v<typename Config<T>::SmemB>> gate;
  alignas(128) ArrayEngine<T, cosize_v<typename Config<T>::SmemB>> up;
};

// Issue the cp.async of k tile `k` of `g` (rows x BK, coordinates `c`) into stage `s` of `sm`,
// zero-filling the vectors whose (row, column) lies outside `bound`.
template <class Copy, class GT, class CT, class ST, class Bound>
__device__ __forceinline__ void load_tile(const Copy& copy_op, const GT& tg, const CT& tc, ST& ts, int k, int s,
                                          const Bound& bound) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tg); ++m) {
    CUTE_UNROLL
    for (int kk = 0; kk < size<2>(tg); ++kk) {
      const bool in = elem_less(tc(0, m, kk, k), bound);
      copy(copy_op.with(in), tg(_, m, kk, k), ts(_, m, kk, s));
    }
  }
}

// y = swiglu(x W^T) ([M, N]); with kBackward, y = d(gate_up) ([M, 2N]) from dy ([M, N]).
template <class T, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    swiglu_linear_kernel(int M, int N, int K, const T* __restrict__ x, const T* __restrict__ w,
                         const T* __restrict__ dy, T* __restrict__ y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using C = Config<T>;
  extern __shared__ char smem_raw[];
  auto& smem = *reinterpret_cast<SharedStorage<T>*>(smem_raw);
  Tensor sA = make_tensor(make_smem_ptr(smem.a.begin()), typename C::SmemA{});  // (BM, BK, STAGES)
  Tensor sG = make_tensor(make_smem_ptr(smem.gate.begin()), typename C::SmemB{});
  Tensor sU = make_tensor(make_smem_ptr(smem.up.begin()), typename C::SmemB{});

  auto tiler = make_shape(Int<kBM>{}, Int<kBN>{}, Int<kBK>{});
  auto cta = make_coord(blockIdx.x, blockIdx.y, _);
  Tensor mA = make_tensor(make_gmem_ptr(x), make_shape(M, K), make_stride(int64_t(K), Int<1>{}));
  Tensor mG = make_tensor(make_gmem_ptr(w), make_shape(N, K), make_stride(int64_t(K), Int<1>{}));
  Tensor mU = make_tensor(make_gmem_ptr(w + size_t(N) * K), make_shape(N, K), make_stride(int64_t(K), Int<1>{}));
  Tensor gA = local_tile(mA, tiler, cta, Step<_1, X, _1>{});  // (BM, BK, k)
  Tensor gG = local_tile(mG, tiler, cta, Step<X, _1, _1>{});  // (BN, BK, k)
  Tensor gU = local_tile(mU, tiler, cta, Step<X, _1, _1>{});
  Tensor cA = local_tile(make_identity_tensor(make_shape(M, K)), tiler, cta, Step<_1, X, _1>{});
  Tensor cB = local_tile(make_identity_tensor(make_shape(N, K)), tiler, cta, Step<X, _1, _1>{});

  typename C::G2S g2s;
  auto thr_copy = g2s.get_slice(threadIdx.x);
  Tensor tAgA = thr_copy.partition_S(gA);
  Tensor tAcA = thr_copy.partition_S(cA);
  Tensor tAsA = thr_copy.partition_D(sA);
  Tensor tGgG = thr_copy.partition_S(gG);
  Tensor tBcB = thr_copy.partition_S(cB);
  Tensor tGsG = thr_copy.partition_D(sG);
  Tensor tUgU = thr_copy.partition_S(gU);
  Tensor tUsU = thr_copy.partition_D(sU);
  const auto a_bound = make_coord(M, K);
  const auto b_bound = make_coord(N, K);

  typename C::Mma mma;
  auto thr_mma = mma.get_slice(threadIdx.x);
  // The output's (m, n): y, or the dg half of d(gate_up)'s rows (the du half is N further on).
  const int64_t ldy = kBackward ? 2 * int64_t(N) : int64_t(N);
  Tensor mY = make_tensor(make_gmem_ptr(y), make_shape(M, N), make_stride(ldy, Int<1>{}));
  Tensor gY = local_tile(mY, tiler, cta, Step<_1, _1, X>{});
  Tensor cY = local_tile(make_identity_tensor(make_shape(M, N)), tiler, cta, Step<_1, _1, X>{});
  Tensor tCgY = thr_mma.partition_C(gY);
  Tensor tCcY = thr_mma.partition_C(cY);
  Tensor acc_g = thr_mma.make_fragment_C(tCgY);
  Tensor acc_u = thr_mma.make_fragment_C(tCgY);
  clear(acc_g);
  clear(acc_u);

  Tensor rA = thr_mma.partition_fragment_A(sA(_, _, 0));  // (MMA, MMA_M, MMA_K)
  Tensor rG = thr_mma.partition_fragment_B(sG(_, _, 0));
  Tensor rU = thr_mma.partition_fragment_B(sU(_, _, 0));
  auto s2r_a = make_tiled_copy_A(typename C::S2R{}, mma);
  auto s2r_b = make_tiled_copy_B(typename C::S2R{}, mma);
  auto thr_s2r_a = s2r_a.get_slice(threadIdx.x);
  auto thr_s2r_b = s2r_b.get_slice(threadIdx.x);
  Tensor xsA = thr_s2r_a.partition_S(sA);  // (CPY, MMA_M, MMA_K, STAGES)
  Tensor xrA = thr_s2r_a.retile_D(rA);
  Tensor xsG = thr_s2r_b.partition_S(sG);
  Tensor xrG = thr_s2r_b.retile_D(rG);
  Tensor xsU = thr_s2r_b.partition_S(sU);
  Tensor xrU = thr_s2r_b.retile_D(rU);

  const int k_tiles = (K + kBK - 1) / kBK;
  CUTE_UNROLL
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) {
      load_tile(g2s, tAgA, tAcA, tAsA, s, s, a_bound);
      load_tile(g2s, tGgG, tBcB, tGsG, s, s, b_bound);
      load_tile(g2s, tUgU, tBcB, tUsU, s, s, b_bound);
    }
    cp_async_fence();
  }
  for (int k = 0; k < k_tiles; ++k) {
    cp_async_wait<kStages - 2>();  // tile k has landed
    __syncthreads();               // ... for every thread, and stage (k - 1) % S is free again
    const int next = k + kStages - 1;
    if (next < k_tiles) {
      const int s = next % kStages;
      load_tile(g2s, tAgA, tAcA, tAsA, next, s, a_bound);
      load_tile(g2s, tGgG, tBcB, tGsG, next, s, b_bound);
      load_tile(g2s, tUgU, tBcB, tUsU, next, s, b_bound);
    }
    cp_async_fence();
    const int s = k % kStages;
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(rA); ++kb) {
      copy(s2r_a, xsA(_, _, kb, s), xrA(_, _, kb));
      copy(s2r_b, xsG(_, _, kb, s), xrG(_, _, kb));
      copy(s2r_b, xsU(_, _, kb, s), xrU(_, _, kb));
      gemm(mma, rA(_, _, kb), rG(_, _, kb), acc_g);
      gemm(mma, rA(_, _, kb), rU(_, _, kb), acc_u);
    }
  }

  swiglu_linear_epilogue<kBackward>(thr_mma, tiler, cta, M, N, y, dy, acc_g, acc_u, tCcY, tCgY);
#endif
}

template <class T, bool kBackward>
cudaError_t launch(const SwigluLinearArgs& a, cudaStream_t stream) {
  auto* kernel = &swiglu_linear_kernel<T, kBackward>;
  const int smem = int(sizeof(SharedStorage<T>));  // 3 x (128 + 2 x 64) x 32 x 2 = 48 KiB
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  dim3 grid((a.m + kBM - 1) / kBM, (a.intermediate + kBN - 1) / kBN);
  kernel<<<grid, kThreads, smem, stream>>>(a.m, a.intermediate, a.k, static_cast<const T*>(a.x),
                                           static_cast<const T*>(a.w), static_cast<const T*>(a.dy),
                                           static_cast<T*>(a.y));
  return cudaGetLastError();
}

}  // namespace

cudaError_t swiglu_linear_sm80(const SwigluLinearArgs& a, cudaStream_t stream) {
  return dispatch_swiglu_linear<false>(a, [&](auto t) { return launch<decltype(t), false>(a, stream); });
}
cudaError_t swiglu_linear_bwd_sm80(const SwigluLinearArgs& a, cudaStream_t stream) {
  return dispatch_swiglu_linear<true>(a, [&](auto t) { return launch<decltype(t), true>(a, stream); });
}

}  // namespace hrm
