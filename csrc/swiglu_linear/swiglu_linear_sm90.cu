// SwiGLU GEMM for sm_90a: warp-specialised TMA + WGMMA with the SwiGLU in the epilogue.
//
//     y[m, n] = silu(sum_k x[m, k] W[n, k]) * (sum_k x[m, k] W[I + n, k])      (fp32 accumulation)
//
// One CTA computes a BM x BN tile of y (BM = 128, BN = 128: a 128 x 256 slice of the [M, 2I]
// product) with three warpgroups:
// - warpgroup 0, the producer, gives up registers (setmaxnreg 40) and one elected thread issues
//   the TMA loads of each k step (x: BM x BK, gate rows: BN x BK, up rows: BN x BK, 128-byte
//   swizzled) into a STAGES-deep ring of shared-memory buffers, each with a "full" mbarrier
//   (TMA transaction bytes) and an "empty" one (released by the consumers);
// - warpgroups 1 and 2, the consumers, take registers (setmaxnreg 232), each owns 64 rows of
//   the tile and issues per k step two WGMMAs (64 x BN x BK each) into its two fp32
//   accumulators, gate and up, which share one register layout;
// - the epilogue (consumers) applies hrm::swiglu to each (gate, up) pair in registers and stores
//   y, predicated on the M and I edges (TMA zero-fills out-of-range rows and the K tail); the
//   backward instance (kBackward) reads dy's element instead and stores hrm::swiglu_grad's pair
//   into d(gate_up) = [dg | du] (see swiglu_linear.h).
// The weight is the model's [gate | up] weight unchanged (see swiglu_linear.h). Without a GPU
// this file is compiled and resource-checked only (docs/cuda.md).
#include "swiglu_linear.h"

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/device_kernel.h>

#include "swiglu_linear_epilogue.cuh"

namespace hrm {
namespace {

using namespace cute;

constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 4;
constexpr int kThreads = 384;  // producer warpgroup + two consumer warpgroups

// 1024-byte alignment: the period of the 128-byte swizzle, which TMA and the WGMMA descriptors
// (base offset 0) assume.
template <class T, class SmemLayoutA, class SmemLayoutB>
struct SharedStorage {
  alignas(1024) ArrayEngine<T, cosize_v<SmemLayoutA>> a;
  alignas(1024) ArrayEngine<T, cosize_v<SmemLayoutB>> gate;
  alignas(1024) ArrayEngine<T, cosize_v<SmemLayoutB>> up;
  uint64_t full[kStages];
  uint64_t empty[kStages];
};

// Y = swiglu(x W^T) ([M, N]); with kBackward, Y = d(gate_up) ([M, 2N]) from DY ([M, N]).
template <class T, bool kBackward, class SmemLayoutA, class SmemLayoutB, class TmaA, class TmaB, class TiledMma>
__global__ void __launch_bounds__(kThreads, 1)
    swiglu_linear_kernel(int M, int N, int K, CUTLASS_GRID_CONSTANT TmaA const tma_a,
                         CUTLASS_GRID_CONSTANT TmaB const tma_gate, CUTLASS_GRID_CONSTANT TmaB const tma_up,
                         const T* __restrict__ DY, T* __restrict__ Y, TiledMma mma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<SharedStorage<T, SmemLayoutA, SmemLayoutB>*>(smem_raw);
  Tensor sA = make_tensor(make_smem_ptr(smem.a.begin()), SmemLayoutA{});     // (BM, BK, STAGES)
  Tensor sG = make_tensor(make_smem_ptr(smem.gate.begin()), SmemLayoutB{});  // (BN, BK, STAGES)
  Tensor sU = make_tensor(make_smem_ptr(smem.up.begin()), SmemLayoutB{});    // (BN, BK, STAGES)

  auto tiler = make_shape(Int<kBM>{}, Int<kBN>{}, Int<kBK>{});
  auto cta = make_coord(blockIdx.x, blockIdx.y, _);
  const int k_tiles = (K + kBK - 1) / kBK;
  const int warp_group = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&smem.full[s], 1);
      Barrier::init(&smem.empty[s], 2 * 128);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (warp_group == 0) {  // producer
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (threadIdx.x == 0) {
      Tensor mA = tma_a.get_tma_tensor(make_shape(M, K));
      Tensor mG = tma_gate.get_tma_tensor(make_shape(N, K));
      Tensor mU = tma_up.get_tma_tensor(make_shape(N, K));
      Tensor gA = local_tile(mA, tiler, cta, Step<_1, X, _1>{});  // (BM, BK, k)
      Tensor gG = local_tile(mG, tiler, cta, Step<X, _1, _1>{});  // (BN, BK, k)
      Tensor gU = local_tile(mU, tiler, cta, Step<X, _1, _1>{});
      auto [tAgA, tAsA] = tma_partition(tma_a, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sA), group_modes<0, 2>(gA));
      auto [tGgG, tGsG] =
          tma_partition(tma_gate, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sG), group_modes<0, 2>(gG));
      auto [tUgU, tUsU] = tma_partition(tma_up, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sU), group_modes<0, 2>(gU));
      constexpr int bytes = int(sizeof(T)) * (kBM + 2 * kBN) * kBK;
      for (int k = 0; k < k_tiles; ++k) {
        const int s = k % kStages;
        if (k >= kStages) Barrier::wait(&smem.empty[s], ((k / kStages) - 1) & 1);
        Barrier::arrive_and_expect_tx(&smem.full[s], bytes);
        copy(tma_a.with(smem.full[s]), tAgA(_, k), tAsA(_, s));
        copy(tma_gate.with(smem.full[s]), tGgG(_, k), tGsG(_, s));
        copy(tma_up.with(smem.full[s]), tUgU(_, k), tUsU(_, s));
      }
    }
  } else {  // consumers
    cutlass::arch::warpgroup_reg_alloc<232>();
    const int tid = threadIdx.x - 128;
    ThrMMA thr = mma.get_thread_slice(tid);
    Tensor tCsA = thr.partition_A(sA);  // (MMA, MMA_M, MMA_K, STAGES)
    Tensor tCsG = thr.partition_B(sG);
    Tensor tCsU = thr.partition_B(sU);
    Tensor tCrA = thr.make_fragment_A(tCsA);  // smem descriptors
    Tensor tCrG = thr.make_fragment_B(tCsG);
    Tensor tCrU = thr.make_fragment_B(tCsU);

    // The output's (m, n): y, or the dg half of d(gate_up)'s rows (the du half is N further on).
    const int64_t ldy = kBackward ? 2 * int64_t(N) : int64_t(N);
    Tensor mY = make_tensor(make_gmem_ptr(Y), make_shape(M, N), make_stride(ldy, Int<1>{}));
    Tensor gY = local_tile(mY, tiler, cta, Step<_1, _1, X>{});  // (BM, BN)
    Tensor cY = local_tile(make_identity_tensor(make_shape(M, N)), tiler, cta, Step<_1, _1, X>{});
    Tensor tCgY = thr.partition_C(gY);
    Tensor tCcY = thr.partition_C(cY);
    Tensor acc_g = thr.make_fragment_C(tCgY);  // (MMA, MMA_M, MMA_N) fp32
    Tensor acc_u = thr.make_fragment_C(tCgY);
    clear(acc_g);
    clear(acc_u);

    for (int k = 0; k < k_tiles; ++k) {
      const int s = k % kStages;
      Barrier::wait(&smem.full[s], (k / kStages) & 1);
      warpgroup_fence_operand(acc_g);
      warpgroup_fence_operand(acc_u);
      warpgroup_arrive();
      gemm(mma, tCrA(_, _, _, s), tCrG(_, _, _, s), acc_g);
      gemm(mma, tCrA(_, _, _, s), tCrU(_, _, _, s), acc_u);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_g);
      warpgroup_fence_operand(acc_u);
      Barrier::arrive(&smem.empty[s]);
    }

    swiglu_linear_epilogue<kBackward>(thr, tiler, cta, M, N, Y, DY, acc_g, acc_u, tCcY, tCgY);
  }
#endif
}

template <class T, bool kBackward>
cudaError_t launch(const SwigluLinearArgs& a, cudaStream_t stream) {
  const int M = a.m, N = a.intermediate, K = a.k;
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.w);
  auto sA = tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, make_shape(Int<kBM>{}, Int<kBK>{}, Int<kStages>{}));
  auto sB = tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, make_shape(Int<kBN>{}, Int<kBK>{}, Int<kStages>{}));
  auto mma = make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kBN>, Int<kBK>>>(),
                            Layout<Shape<_2, _1, _1>>{});  // two consumer warpgroups along M
  Tensor mA = make_tensor(make_gmem_ptr(x), make_shape(M, K), make_stride(K, Int<1>{}));
  Tensor mG = make_tensor(make_gmem_ptr(w), make_shape(N, K), make_stride(K, Int<1>{}));
  Tensor mU = make_tensor(make_gmem_ptr(w + size_t(N) * K), make_shape(N, K), make_stride(K, Int<1>{}));
  auto tma_a = make_tma_atom(SM90_TMA_LOAD{}, mA, sA(_, _, 0), make_shape(Int<kBM>{}, Int<kBK>{}));
  auto tma_g = make_tma_atom(SM90_TMA_LOAD{}, mG, sB(_, _, 0), make_shape(Int<kBN>{}, Int<kBK>{}));
  auto tma_u = make_tma_atom(SM90_TMA_LOAD{}, mU, sB(_, _, 0), make_shape(Int<kBN>{}, Int<kBK>{}));

  using Storage = SharedStorage<T, decltype(sA), decltype(sB)>;
  // 4 stages x (128 + 2 x 128) x 64 x 2 bytes = 192 KiB of dynamic shared memory (ptxas reports
  // only static shared memory; the resource report adds this figure, see docs/cuda.md).
  static_assert(sizeof(Storage) <= 227 * 1024, "over sm_90's shared memory per block");
  auto* kernel = &swiglu_linear_kernel<T, kBackward, decltype(sA), decltype(sB), decltype(tma_a),
                                       decltype(tma_g), decltype(mma)>;
  const int smem = int(sizeof(Storage));
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  dim3 grid((M + kBM - 1) / kBM, (N + kBN - 1) / kBN);
  kernel<<<grid, kThreads, smem, stream>>>(M, N, K, tma_a, tma_g, tma_u, static_cast<const T*>(a.dy),
                                           static_cast<T*>(a.y), mma);
  return cudaGetLastError();
}

}  // namespace

cudaError_t swiglu_linear_sm90(const SwigluLinearArgs& a, cudaStream_t stream) {
  return dispatch_swiglu_linear<false>(a, [&](auto t) { return launch<decltype(t), false>(a, stream); });
}
cudaError_t swiglu_linear_bwd_sm90(const SwigluLinearArgs& a, cudaStream_t stream) {
  return dispatch_swiglu_linear<true>(a, [&](auto t) { return launch<decltype(t), true>(a, stream); });
}

}  // namespace hrm
