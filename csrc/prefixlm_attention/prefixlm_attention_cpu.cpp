// PrefixLM varlen attention on the CPU: forward and backward, block-sparse, fp32 accumulation.
//
// Built at first use by hrm/ops/cpp_extension.py through torch.utils.cpp_extension
// (-O3 -march=native -fopenmp); registers the ops hrm_cpu::prefixlm_fwd and hrm_cpu::prefixlm_bwd.
//
// The mask is one key interval per query row: query t sees keys [row_lo[t], row_hi[t])
// (row_lo = start of t's sequence, row_hi = start + max(prefix, pos + 1); padding rows have
// an empty interval). Both arrays are non-decreasing in t, so the keys seen by any run of
// consecutive rows form one contiguous span. Transposed, key j is seen by the queries
// [col_lo[j], col_hi[j]), also non-decreasing. The kernels work on micro-blocks of kRows rows
// (keys in the dk/dv pass; 16 for bf16 on AMX, else 4) and touch only their span: empty tiles are never visited, fully
// visible tiles need no mask, and the partial ones are clipped per row to its interval (no
// mask arithmetic at all). A work item is one (head, block of rows); the pool's threads
// take items from a shared counter, so uneven spans and busy cores balance themselves.
//
// Forward, per row t (scale2 = scale * log2 e):
//     s = scale2 * q_t . k_j,  m = max_j s,  p = exp2(s - m),  l = sum_j p
//     out_t = sigmoid(gate_t) * (sum_j p v_j) / l,  lse_t = ln 2 * (m + log2 l)   (saved)
// Backward (dO = grad_out * sigmoid(gate), delta_t = grad_out_t . out_t):
//     p = exp2(scale2 q.k - log2e lse),  dp = dO_t . v_j,  ds = p (dp - delta_t)
//     dv_j = sum_t p dO_t,  dk_j = scale sum_t ds q_t,  dq_t = scale sum_j ds k_j,
//     dgate = grad_out * out * (1 - sigmoid(gate))
// For a group of heads at a time, a key-major pass computes dk, dv and stores ds as it makes it
// (per micro-block of keys, the kRows values of each query of its span side by side); a
// query-major pass then gathers it for dq, so nothing is recomputed and no two threads write
// the same row. A group holds as many heads as keep its ds within ds_budget() (64 MB: all of
// them at the bench shapes): two parallel regions per group, whose work items balance across heads.
//
// Operands. The six products (q k^T, dO v^T, p v, p^T dO, ds^T q, ds k) take operands of
// one type E and accumulate in fp32:
// - E = fp32 for fp32/fp16/fp64 inputs (and for bf16 ones where the CPU lacks AVX512_BF16):
//   the inputs are converted to fp32, the products are FMAs, the elementwise parts ATen ops.
// - E = bf16 for bf16 q, k, v on CPUs with AVX512_BF16, as flash attention does on GPUs: the
//   products run on AMX tiles where the CPU and the build have them (tdpbf16ps: a 16 x 16 x 32
//   product per instruction), else on vdpbf16ps (a pair of bf16 products per fp32 lane: twice
//   an FMA's work; HRM_CPU_AMX=0 picks it on AMX CPUs too); the scores, softmax statistics, exp2, lse, delta and every accumulator stay fp32, and p
//   and ds are rounded to bf16 (to nearest even) only as operands of the products over tokens.
//   sigmoid(gate), dO (rounded to bf16: an operand), delta and dgate come from fused passes in
//   fp32, and exp2 is computed with vscalefps (exp2_avx512, as accurate as exp2v).
// Outputs come back in the input dtypes (out and dq in q's, dk in k's, dv in v's, dgate in the
// gate's), lse in fp32.
//
// Layouts. A product C[kRows x n] = A . B reduces over r (the head dim for q k^T and dO v^T,
// tokens for the other four). A is kRows rows a fixed stride apart, r contiguous; the register
// blocks broadcast its entries, an AMX tile loads 16 rows of 32. B is streamed in vectors (or
// tiles of 16 columns) along its n columns. vdpbf16ps and tdpbf16ps multiply pairs along r,
// so a bf16 B is in "VNNI" layout [r / 2][n][2] (entries 2i and 2i+1 of a column side by
// side) and the A entry broadcast is the 32-bit pair (a[2i], a[2i + 1]); fp32 has no pairs
// (pair = 1). A reduction rounds up to kRed (32 on AMX, else VW): past its end one operand
// is zero and the other finite.
// q, k, v and dO are packed per head into (Packed: element (h, r, c) at
// h * hs + r / pair * ld + c * pair + r % pair; sizes rounded up, padding zero):
//     rows    [H, T, Dp]                   A of the products over d (Dp = round_up(D, kRed));
//     cols    [H, Dp / pair, T + VW, pair] B over d: k (forward), q and dO (backward);
//     tokens  [H, T / pair, Dp, pair]      B over tokens: v (forward), dO, q, k (backward);
//                                          for fp32 the same as rows.
// A product over the tokens of a span [c0, c0 + span) starts at c0 rounded down to a multiple
// of pair: the p and ds buffers are then laid out from that even c0, so their extra leading
// entry (and the one past the span when its end is odd) lies outside every row's interval and
// is exactly zero, and reads past T see the tokens panels' zero padding (kPad tokens after
// the last head).

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common/cpu_vec.h"

namespace {

using namespace hrm_cpu;

constexpr int MR = 4;                 // rows of a register block (FMA, vdpbf16ps)
constexpr int NV = VW == 16 ? 4 : 2;  // vectors per register block: MR * NV accumulators fit the register file
static_assert(NV <= 4, "mm finishes a row with at most 3 vectors");
// Zero (or finite) entries past the end of a token dimension: the score and gradient rows,
// lse and delta have this many past T, the token panels this many tokens past the last head.
constexpr int64_t kPad = 32;
// The backward's ds of a group of heads at most (one head's may exceed it: it is a group alone);
// HRM_CPU_ATTN_DS_BYTES overrides it (the tests take one head at a time with it).
constexpr int64_t kDsBytes = 64 << 20;
inline int64_t ds_budget() {
  const char* env = std::getenv("HRM_CPU_ATTN_DS_BYTES");
  return env ? std::atoll(env) : kDsBytes;
}

#if defined(__AVX512BF16__) && defined(__AMX_BF16__) && defined(__AMX_TILE__)
#define HRM_AMX 1
constexpr bool kAmxBuild = true;
#else
constexpr bool kAmxBuild = false;
#endif


template <class E>
constexpr int64_t kPair = std::is_same_v<E, bf16> ? 2 : 1;  // entries of E per 32-bit lane of a product
template <class E>
constexpr at::ScalarType kType = c10::CppTypeToScalarType<E>::value;
// Rows per micro-block, and the granularity of a product's reduction (its operands are zero
// or finite up to a multiple of it): one AMX tile (16 rows of 32 bf16) where the build has
// AMX, else a register block of MR rows and one vector.
template <class E>
constexpr int kRows = std::is_same_v<E, bf16> && kAmxBuild ? 16 : MR;
template <class E>
constexpr int64_t kRed = std::is_same_v<E, bf16> && kAmxBuild ? 32 : VW;
static_assert(kRed<bf16> <= kPad && kRows<bf16> <= kPad, "the paddings cover one tile");


// Starts fetching the cache lines of [p, p + bytes) (RW = 1: to be written). The rows of
// [T, H, D] tensors that a micro-block's epilogue touches lie H * D apart, out of the
// hardware prefetchers' reach: each would cost a miss at the end of the micro-block.
template <int RW>
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b, RW);
}


// Starts fetching rows [t0, t1) of x, s0 entries apart, bytes each: the packing passes read
// the model's [T, H, D] views, whose rows lie a page or more apart (a page holds a token or
// two), beyond the hardware prefetchers.
template <class U>
inline void prefetch_rows(const U* x, int64_t t0, int64_t t1, int64_t s0, int64_t bytes) {
  for (int64_t t = t0; t < t1; ++t) prefetch<0>(x + t * s0, bytes);
}
constexpr int64_t kPackAhead = 16;  // tokens the pack_tokens pass fetches ahead

// C[m][0:NVB*VW] = sum_{r < nr} a[m][r] * b[r * ldb + 0:NVB*VW] (fp32 FMAs).
template <int NVB>
inline void tile(const float* const* a, const float* b, int64_t ldb, int64_t nr, float* c, int64_t ldc) {
  vec acc[MR][NVB] = {};
  for (int64_t r = 0; r < nr; ++r) {
    vec x[NVB];
    for (int v = 0; v < NVB; ++v) x[v] = load(b + r * ldb + v * VW);
    for (int m = 0; m < MR; ++m) {
      const float s = a[m][r];  // scalar * vector: one broadcast
      for (int v = 0; v < NVB; ++v) acc[m][v] += s * x[v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NVB; ++v) store(c + m * ldc + v * VW, acc[m][v]);
}

#if defined(__AVX512BF16__)
// The same over bf16 in pairs: C[m][c] = sum_{i < nr/2} a[m][2i] b[i][c][0] + a[m][2i+1] b[i][c][1],
// b[i] at b + i * ldb (VNNI: VW columns are one 32-entry vector). nr rounds up to even: the
// entry past an odd nr must be zero in a or in b (and finite in the other).
template <int NVB>
inline void tile(const bf16* const* a, const bf16* b, int64_t ldb, int64_t nr, float* c, int64_t ldc) {
  static_assert(VW == 16, "vdpbf16ps works on 16 fp32 lanes");
  __m512 acc[MR][NVB];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NVB; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < (nr + 1) / 2; ++i) {
    __m512bh x[NVB];
    for (int v = 0; v < NVB; ++v) x[v] = (__m512bh)_mm512_loadu_si512(b + i * ldb + v * 2 * VW);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, a[m] + 2 * i, sizeof(pair));
      const __m512bh s = (__m512bh)_mm512_set1_epi32(pair);  // (a[2i], a[2i+1]) in every lane
      for (int v = 0; v < NVB; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], s, x[v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NVB; ++v) _mm512_storeu_ps(c + m * ldc + v * VW, acc[m][v]);
}
#endif

// C[MR x ncols] = A[MR x nr] . B[nr x ncols] on register blocks, A as MR row pointers, B's
// column block j at b + j * pair; writes ncols rounded up to VW (b rows and c rows must have
// that much room).
template <class E>
void mm_rows(const E* const* a, const E* b, int64_t ldb, int64_t nr, int64_t ncols, float* c, int64_t ldc) {
  const int64_t nc = round_up(ncols, VW);
  int64_t j = 0;
  for (; j + NV * VW <= nc; j += NV * VW) tile<NV>(a, b + j * kPair<E>, ldb, nr, c + j, ldc);
  switch ((nc - j) / VW) {  // the last 0 .. NV - 1 vectors in one pass
    case 3: tile<3>(a, b + j * kPair<E>, ldb, nr, c + j, ldc); break;
    case 2: tile<2>(a, b + j * kPair<E>, ldb, nr, c + j, ldc); break;
    case 1: tile<1>(a, b + j * kPair<E>, ldb, nr, c + j, ldc); break;
  }
}

#if defined(HRM_AMX)
// AMX (Sapphire Rapids and later): eight tile registers of 16 rows x 64 bytes. A bf16 tile
// product C[16 x 16] (fp32) += A[16 x 32] . B, with B in pairs [16][16][2] (the VNNI layout of
// the cols and tokens panels), is one tdpbf16ps: 8192 multiply-adds, where one vdpbf16ps does 32.
// Linux hands out the tile state only to a process that asks (arch_prctl); a thread uses the
// tiles between a configuration and a release (AmxScope, around each thread's share of a pass).
constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;

bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

// HRM_CPU_AMX=0 turns the tiles off (the vdpbf16ps register blocks then run the products).
bool amx_wanted() {
  const char* env = std::getenv("HRM_CPU_AMX");
  return !(env && std::strcmp(env, "0") == 0);
}

thread_local bool amx_active = false;

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3 accumulate C (16 columns each), 4 holds A, 5 and 6 take turns holding B.
struct AmxScope {
  explicit AmxScope(bool want) {
    if (!want) return;
    TileConfig cfg{};
    cfg.palette = 1;
    for (int t = 0; t < 7; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
    amx_active = true;
  }
  ~AmxScope() {
    if (amx_active) _tile_release();
    amx_active = false;
  }
  AmxScope(const AmxScope&) = delete;
  AmxScope& operator=(const AmxScope&) = delete;
};

// C[16 x 16 NT] = A[16 x nk] . B over nk (a multiple of 32): A's rows lda entries apart, B's
// pair-rows ldb entries apart, C's rows ldc floats apart.
template <int NT>
inline void amx_block(const bf16* a, int64_t lda, const bf16* b, int64_t ldb, int64_t nk, float* c, int64_t ldc) {
  static_assert(NT >= 1 && NT <= 4, "four accumulator tiles");
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (NT > 2) _tile_zero(2);
  if constexpr (NT > 3) _tile_zero(3);
  const int64_t sa = lda * 2, sb = ldb * 2;  // bytes
  for (int64_t k = 0; k < nk; k += 32) {
    const bf16* bk = b + k / 2 * ldb;
    _tile_loadd(4, a + k, sa);
    _tile_loadd(5, bk, sb);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NT > 1) { _tile_loadd(6, bk + 32, sb); _tile_dpbf16ps(1, 4, 6); }
    if constexpr (NT > 2) { _tile_loadd(5, bk + 64, sb); _tile_dpbf16ps(2, 4, 5); }
    if constexpr (NT > 3) { _tile_loadd(6, bk + 96, sb); _tile_dpbf16ps(3, 4, 6); }
  }
  _tile_stored(0, c, ldc * 4);
  if constexpr (NT > 1) _tile_stored(1, c + 16, ldc * 4);
  if constexpr (NT > 2) _tile_stored(2, c + 32, ldc * 4);
  if constexpr (NT > 3) _tile_stored(3, c + 48, ldc * 4);
}

// C[16 x ncols] = A[16 x nr] . B: nr rounds up to 32, ncols to 16 (A or B must be zero past
// nr and the other finite; b and c rows must have the room).
inline void amx_mm(const bf16* a, int64_t lda, const bf16* b, int64_t ldb, int64_t nr, int64_t ncols, float* c,
                   int64_t ldc) {
  const int64_t nk = round_up(nr, 32), nc = round_up(ncols, 16);
  int64_t j = 0;
  for (; j + 64 <= nc; j += 64) amx_block<4>(a, lda, b + j * 2, ldb, nk, c + j, ldc);
  switch ((nc - j) / 16) {
    case 3: amx_block<3>(a, lda, b + j * 2, ldb, nk, c + j, ldc); break;
    case 2: amx_block<2>(a, lda, b + j * 2, ldb, nk, c + j, ldc); break;
    case 1: amx_block<1>(a, lda, b + j * 2, ldb, nk, c + j, ldc); break;
  }
}
#else
struct AmxScope {
  explicit AmxScope(bool) {}
};
#endif

// Whether a product of operands E runs on AMX tiles here (bf16, an AMX build, the process
// allowed the tile state, HRM_CPU_AMX not 0).
template <class E>
bool use_amx() {
#if defined(HRM_AMX)
  return std::is_same_v<E, bf16> && amx_wanted() && amx_permitted();
#else
  return false;
#endif
}

// C[kRows x ncols] = A[kRows x nr] . B[nr x ncols]: A's rows lda entries apart, B as for
// mm_rows; writes ncols rounded up to 16 (AMX) or VW (b rows and c rows must have that room).
// On AMX (inside an AmxScope) nr rounds up to kRed: A must be zero from nr to there, or B.
template <class E>
void mm(const E* a, int64_t lda, const E* b, int64_t ldb, int64_t nr, int64_t ncols, float* c, int64_t ldc) {
#if defined(HRM_AMX)
  if constexpr (std::is_same_v<E, bf16>) {
    if (amx_active) return amx_mm(a, lda, b, ldb, nr, ncols, c, ldc);
  }
#endif
  for (int g = 0; g < kRows<E>; g += MR) {
    const E* rows[MR];
    for (int m = 0; m < MR; ++m) rows[m] = a + (g + m) * lda;
    mm_rows(rows, b, ldb, nr, ncols, c + g * ldc, ldc);
  }
}

// exp2 for the softmax of the path with operands E: exp2v (fp32, as ever), exp2_avx512 (bf16).
template <class E>
inline vec exp2_of(vec x) { return exp2v(x); }
#if defined(__AVX512BF16__)
template <>
inline vec exp2_of<bf16>(vec x) { return exp2_avx512(x); }
#endif

// Lanes [0, n) of x (n may exceed VW) as operand entries: fp32 stores the whole vector (the
// rows have the room, and the lanes past n are zero), bf16 rounds to nearest even.
inline void store_operand(float* o, vec x, int64_t) { store(o, x); }
#if defined(__AVX512BF16__)
inline void store_operand(bf16* o, vec x, int64_t n) { store_bf16(o, x, first(n)); }
#endif

// The scores' rows become the A operands of the products over tokens in one pass each: row
// entries [a, b) are a row's interval, everything else in [0, round_up(width, kRed)) is zero.
// For fp32 the outputs may be the inputs themselves (each vector is read before it is written).
struct RowStats { float max, sum; };

// Forward, one row of s = q.k: p = exp2(mul s - m) with m = mul max s, into pe; returns (m, sum p).
// Whole vectors run unmasked in pairs (two independent max and sum chains), the last partial
// one masked.
template <class E>
RowStats forward_row(const float* s, E* pe, int64_t a, int64_t b, int64_t width, float mul) {
  const ivec lane = iota();
  vec m0 = splat(-INFINITY), m1 = m0;
  int64_t c = a;
  for (; c + 2 * VW <= b; c += 2 * VW) {
    const vec x0 = load(s + c), x1 = load(s + c + VW);
    m0 = x0 > m0 ? x0 : m0;
    m1 = x1 > m1 ? x1 : m1;
  }
  for (; c < b; c += VW) {
    const vec x = load(s + c);
    m0 = (lane < (int32_t)(b - c)) & (x > m0) ? x : m0;
  }
  const float mx = hmax(m1 > m0 ? m1 : m0) * mul;  // mul > 0: the max of the scaled scores
  std::fill(pe, pe + a, E(0.0f));
  vec s0 = splat(0.0f), s1 = s0;
  for (c = a; c + 2 * VW <= b; c += 2 * VW) {
    const vec p0 = exp2_of<E>(load(s + c) * mul - mx), p1 = exp2_of<E>(load(s + c + VW) * mul - mx);
    store_operand(pe + c, p0, VW);
    store_operand(pe + c + VW, p1, VW);
    s0 += p0;
    s1 += p1;
  }
  for (; c < b; c += VW) {
    vec p = exp2_of<E>(load(s + c) * mul - mx);
    p = (lane < (int32_t)(b - c)) ? p : splat(0.0f);
    store_operand(pe + c, p, b - c);
    s0 += p;
  }
  std::fill(pe + b, pe + round_up(width, kRed<E>), E(0.0f));
  return {mx, hsum(s0 + s1)};
}

// Backward, one row of s = q.k (a key's, over queries) and dp = dO.v: p = exp2(mul s - l2)
// with l2 the queries' log2-sum-exp, ds = p (dp - dl) with dl their delta (both indexed by
// column); p into pe, ds into dse. Whole vectors unmasked, the last partial one masked.
template <class E>
void backward_row(const float* s, const float* dp, const float* l2, const float* dl, E* pe, E* dse, int64_t a,
                  int64_t b, int64_t width, float mul) {
  std::fill(pe, pe + a, E(0.0f));
  std::fill(dse, dse + a, E(0.0f));
  int64_t c = a;
  for (; c + VW <= b; c += VW) {
    const vec p = exp2_of<E>(load(s + c) * mul - load(l2 + c));
    store_operand(pe + c, p, VW);
    store_operand(dse + c, p * (load(dp + c) - load(dl + c)), VW);
  }
  if (c < b) {
    vec p = exp2_of<E>(load(s + c) * mul - load(l2 + c));
    p = (iota() < (int32_t)(b - c)) ? p : splat(0.0f);
    store_operand(pe + c, p, b - c);
    store_operand(dse + c, p * (load(dp + c) - load(dl + c)), b - c);
  }
  std::fill(pe + b, pe + round_up(width, kRed<E>), E(0.0f));
  std::fill(dse + b, dse + round_up(width, kRed<E>), E(0.0f));
}

// The operand buffer of the path with operands E: fp32 works in place (f), bf16 in its own (e).
template <class E>
E* operands(float* f, E* e) {
  if constexpr (std::is_same_v<E, float>) return f;
  else return e;
}

// A [T, H, D] tensor packed per head (see the layouts at the top): element (h, r, c) at
// p + h * hs + r / pair * ld + c * pair + r % pair. Head-major, so the rows of one head that
// a micro-block streams through are contiguous (the model's q/k/v are strided views whose
// token stride, a multiple of 4 KiB, would alias in the caches).
template <class E>
struct Packed {
  at::Tensor buf;
  const E* p;
  int64_t hs, ld, pair;
  const E* at(int64_t h, int64_t r, int64_t c) const { return p + h * hs + r / pair * ld + c * pair; }
};

// x as E with unit stride along D (a conversion pass only for other dtypes).
template <class E>
at::Tensor as_type(const at::Tensor& x) {
  const at::Tensor y = x.scalar_type() == kType<E> ? x : x.to(kType<E>);
  return y.stride(2) == 1 ? y : y.contiguous();
}

// Token-major [H, T / P, Dp, P]: P = 1 gives the rows, P = 2 (bf16) the tokens panel, whose
// entry pair (t, t + 1) of column d is one 32-bit word; then kPad zero tokens, so that the
// rows of a micro-block and the pairs of a reduction rounded up to kRed may run past T (in a
// head but the last they read the next head's finite entries). Packing moves bits (any E of
// 2 or 4 bytes).
template <class E, int P>
Packed<E> pack_tokens(const at::Tensor& x, int64_t Dp) {
  static_assert(P == 1 || (P == 2 && sizeof(E) == 2), "pairs are of 16-bit entries");
  using U = std::conditional_t<sizeof(E) == 2, uint16_t, uint32_t>;
  const at::Tensor xe = as_type<E>(x);
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), Tk = (T + P - 1) / P;
  const int64_t s0 = xe.stride(0), s1 = xe.stride(1);
  at::Tensor buf = at::empty({H * Tk * Dp * P + kPad * Dp}, x.options().dtype(kType<E>));
  const U* src = reinterpret_cast<const U*>(xe.data_ptr<E>());
  U* dst = reinterpret_cast<U*>(buf.data_ptr<E>());
  std::fill(dst + H * Tk * Dp * P, dst + buf.numel(), U(0));
  // Token-major: each step reads the P tokens' rows of every head (adjacent in the model's
  // [T, H, D] views) and appends one row to each head's panel, so that reads and writes
  // stream; the rows kPackAhead tokens on are fetched by hand (prefetch_rows).
  at::parallel_for(0, Tk, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t t = i * P, ahead = t + kPackAhead;
        prefetch_rows(src + h * s1, ahead, std::min(ahead + P, T), s0, D * sizeof(E));
        const U* a = src + t * s0 + h * s1;
        U* b = dst + (h * Tk + i) * Dp * P;
        if constexpr (P == 1) {
          std::copy(a, a + D, b);
        } else {
          uint32_t* w = reinterpret_cast<uint32_t*>(b);
          if (t + 1 < T)
            for (int64_t d = 0; d < D; ++d) w[d] = a[d] | (uint32_t)a[d + s0] << 16;
          else
            for (int64_t d = 0; d < D; ++d) w[d] = a[d];  // T odd: the pair's second token is zero
        }
        std::fill(b + D * P, b + Dp * P, U(0));
      }
  });
  return {buf, buf.data_ptr<E>(), Tk * Dp * P, Dp * P, P};
}

// dst[t * R + m] = s[m * lds + t] for t < n, m < R: the R rows of a micro-block's ds turned
// query-major (the backward's ds store). s must be readable up to n rounded up to 32.
template <int R, class E>
void store_transposed(const E* s, int64_t lds, int64_t n, E* dst) {
#if defined(__AVX512BF16__)
  if constexpr (R == 16 && std::is_same_v<E, bf16>) {
    // 32 tokens at a time: 16 rows of 16 words (token pairs) transposed, then each word row
    // (the pairs (t, t + 1) of the 16 rows) split into token t's 16 entries and t + 1's
    for (int64_t c = 0; c < n; c += 32) {
      __m512i r[16];
      for (int m = 0; m < 16; ++m) r[m] = _mm512_loadu_si512(s + m * lds + c);
      transpose16(r);
      for (int w = 0; w < 16 && c + 2 * w < n; ++w) {
        const __m512i x = split_pairs(r[w]);
        E* o = dst + (c + 2 * w) * 16;
        if (c + 2 * w + 1 < n) _mm512_storeu_si512(o, x);
        else _mm512_mask_storeu_epi16(o, 0xFFFF, x);  // the last token alone
      }
    }
    return;
  }
#endif
  for (int64_t t = 0; t < n; ++t, dst += R)
    for (int m = 0; m < R; ++m) dst[m] = s[m * lds + t];
}

// [T, H, D] -> cols [H, Dp / P, T + VW, P] (P = kPair<E>; transposed, zero past T so that
// vector loads and tiles of 16 columns may overrun, and zero past D up to Dp, the reduction
// rounded up to kRed). Each (h, d / P, t) is one 32-bit word: an fp32 entry or a bf16 pair.
template <class E>
Packed<E> pack_cols(const at::Tensor& x, int64_t Dp) {
  constexpr int64_t P = kPair<E>;
  const at::Tensor xe = as_type<E>(x);
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), ld = T + VW, tb = 64;
  const int64_t Dd = (D + P - 1) / P, Dk = Dp / P;  // words with data, words in all
  const int64_t s0 = xe.stride(0), s1 = xe.stride(1), nb = (T + tb - 1) / tb;
  at::Tensor out = at::empty({H, Dk, ld, P}, x.options().dtype(kType<E>));
  const E* src = xe.data_ptr<E>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<E>());
  at::parallel_for(0, nb * H, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // token-major: a block's heads one after the other
      const int64_t h = i % H, t0 = i / H * tb, t1 = std::min(t0 + tb, T);
      prefetch_rows(src + h * s1, t1, std::min(t1 + tb, T), s0, D * sizeof(E));  // the head's next block
      const E* a = src + h * s1;         // token t's row at a + t * s0
      uint32_t* o = dst + h * Dk * ld;  // word w of token t at o[w * ld + t]
      int64_t w = 0;
#if defined(__AVX512F__)
      for (; w + 16 <= D / P; w += 16) {  // blocks of 16 x 16 words, then the tokens left
        int64_t t = t0;
        for (; t + 16 <= t1; t += 16) transpose16(a + t * s0 + w * P, s0 * sizeof(E), o + w * ld + t, ld);
        for (int64_t v = w; v < w + 16; ++v)
          for (int64_t u = t; u < t1; ++u) std::memcpy(o + v * ld + u, a + u * s0 + v * P, 4);
      }
#endif
      for (; w < Dd; ++w) {
        if ((w + 1) * P <= D)
          for (int64_t t = t0; t < t1; ++t) std::memcpy(o + w * ld + t, a + t * s0 + w * P, 4);
        else  // bf16 with D odd: the last pair is (x[D - 1], 0)
          for (int64_t t = t0; t < t1; ++t) {
            uint16_t last;
            std::memcpy(&last, a + t * s0 + w * P, 2);
            o[w * ld + t] = last;
          }
      }
      for (; w < Dk; ++w) std::fill(o + w * ld + t0, o + w * ld + t1, 0u);
      if (t1 == T)
        for (w = 0; w < Dk; ++w) std::fill(o + w * ld + T, o + (w + 1) * ld, 0u);
    }
  });
  return {out, out.data_ptr<E>(), Dk * ld * P, ld * P, P};
}

// [H, T] fp32 with a zero tail of kPad (vector loads may overrun).
at::Tensor pad_tokens(const at::Tensor& x) {
  auto out = at::zeros({x.size(0), x.size(1) + kPad}, x.options().dtype(at::kFloat));
  out.narrow(1, 0, x.size(1)).copy_(x);
  return out;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lo,
                  const at::Tensor& hi) {
  TORCH_CHECK(q.dim() == 3 && q.sizes() == k.sizes() && q.sizes() == v.sizes(), "q, k, v must be [T, H, D]");
  TORCH_CHECK(q.device().is_cpu(), "hrm_cpu kernels run on CPU tensors");
  TORCH_CHECK(lo.scalar_type() == at::kInt && hi.scalar_type() == at::kInt && lo.is_contiguous() &&
                  hi.is_contiguous() && lo.numel() == q.size(0) && hi.numel() == q.size(0),
              "row intervals must be contiguous int32 [T]");
}

// Whether this build has the bf16 products (vdpbf16ps): bf16 q, k and v then take them.
bool bf16_dots() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// Whether bf16 products run on AMX tiles here (see use_amx).
bool amx_tiles() { return use_amx<bf16>(); }

#if defined(__AVX512BF16__)
bool bf16_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16;
}
#endif

// Rows [i0, i0 + n) of a block: how many have a non-empty interval (they come first).
inline int count_real(const int32_t* lo, const int32_t* hi, int64_t i0, int64_t n) {
  int r = 0;
  while (r < n && lo[i0 + r] < hi[i0 + r]) ++r;
  return r;
}

// Rows [t0, t1) of head h of a [T, H, D] output (the padding rows at the end of T, which no
// micro-block writes): zero.
template <class E>
void zero_rows(E* o, int64_t t0, int64_t t1, int64_t h, int64_t H, int64_t D) {
  for (int64_t t = t0; t < t1; ++t) std::fill_n(o + (t * H + h) * D, D, E(0.0f));
}

// A row of a gradient: o = acc * scale over D (acc holds round_up(D, VW) entries).
inline void store_row(float* o, const float* acc, float scale, int64_t D) {
  for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * scale;
}

#if defined(__AVX512BF16__)
inline void store_row(bf16* o, const float* acc, float scale, int64_t D) {
  for (int64_t c = 0; c < D; c += VW) store_bf16(o + c, load(acc + c) * scale, first(D - c));
}
#endif

// Row (t, h) of the output: o = acc * inv * sigmoid(gate) over D (acc * inv without a gate).
// fp32 takes the sigmoid from ATen (g: its row), bit for bit as ever.
inline void finish_row(float* o, const float* acc, float inv, const float* g, int64_t D) {
  for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv * (g ? g[d] : 1.0f);
}

#if defined(__AVX512BF16__)
// bf16 computes it from the gate's row g (acc holds round_up(D, VW) entries).
inline void finish_row(bf16* o, const float* acc, float inv, const bf16* g, int64_t D) {
  for (int64_t c = 0; c < D; c += VW) {
    const __mmask16 k = first(D - c);
    vec x = load(acc + c) * inv;
    if (g) x *= sigmoid(load_bf16(g + c, k));
    store_bf16(o + c, x, k);
  }
}
#endif

template <class E>
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& gate, const at::Tensor& row_lo,
                                const at::Tensor& row_hi, double scale, int64_t block) {
  constexpr int64_t P = kPair<E>;
  constexpr int RB = kRows<E>;
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Dp = round_up(D, kRed<E>), lds = T + kPad;
  const Packed<E> Q = pack_tokens<E, 1>(q, Dp), Kt = pack_cols<E>(k, Dp), V = pack_tokens<E, P>(v, Dp);
  at::Tensor gs;  // what finish_row takes: fp32 the gate's sigmoid from ATen, bf16 the gate itself
  if (gate.has_value()) gs = P == 1 ? at::sigmoid(gate->to(at::kFloat)).contiguous() : as_type<E>(*gate);
  at::Tensor out = at::empty({T, H, D}, q.options().dtype(kType<E>));
  auto lse = at::empty({H, T}, q.options().dtype(at::kFloat));
  const int32_t* lo = row_lo.data_ptr<int32_t>();
  const int32_t* hi = row_hi.data_ptr<int32_t>();
  const E* G = gs.defined() ? gs.data_ptr<E>() : nullptr;
  E* O = out.data_ptr<E>();
  float* L = lse.data_ptr<float>();
  const float mul = (float)scale * kLog2e;
  const int64_t nblk = (T + block - 1) / block;
  const bool amx = use_amx<E>();

  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const AmxScope tiles(amx);
    std::vector<float> S(RB * lds), acc(RB * Dp);
    std::vector<E> Pe(P == 1 ? 0 : RB * lds);  // bf16 p (fp32 multiplies S itself)
    for (int64_t item; (item = next++) < H * nblk;) {
      const int64_t h = item / nblk, r0 = item % nblk * block, r1 = std::min(r0 + block, T);
      for (int64_t i0 = r0; i0 < r1; i0 += RB) {
        const int n = count_real(lo, hi, i0, std::min<int64_t>(RB, r1 - i0));
        if (n < std::min<int64_t>(RB, r1 - i0)) {  // padding from i0 + n on: zero out and lse
          zero_rows(O, i0 + n, r1, h, H, D);
          std::fill(L + h * T + i0 + n, L + h * T + r1, 0.0f);
          if (n == 0) break;
        }
        for (int m = 0; m < n; ++m) {
          if (G) prefetch<0>(G + (i0 + m) * gs.stride(0) + h * gs.stride(1), D * sizeof(E));
          prefetch<1>(O + ((i0 + m) * H + h) * D, D * sizeof(E));
        }
        // rows i0 + m for m >= n (past T: the panel's zero tail) are computed and dropped
        const int64_t c0 = lo[i0] / P * P, span = hi[i0 + n - 1] - c0;
        mm(Q.at(h, i0, 0), Q.ld, Kt.at(h, 0, c0), Kt.ld, D, span, S.data(), lds);
        float rmax[RB], rsum[RB];
        E* const p = operands<E>(S.data(), Pe.data());
        for (int m = 0; m < RB; ++m) {
          E* pm = p + m * lds;
          if (m < n) {
            const RowStats st = forward_row(S.data() + m * lds, pm, lo[i0 + m] - c0, hi[i0 + m] - c0, span, mul);
            rmax[m] = st.max, rsum[m] = st.sum;
          } else {
            std::fill(pm, pm + round_up(span, kRed<E>), E(0.0f));
          }
        }
        mm<E>(p, lds, V.at(h, c0, 0), V.ld, span, Dp, acc.data(), Dp);
        for (int m = 0; m < n; ++m) {
          const int64_t t = i0 + m;
          const float inv = 1.0f / rsum[m];
          const E* g = G ? G + t * gs.stride(0) + h * gs.stride(1) : nullptr;
          finish_row(O + (t * H + h) * D, acc.data() + m * Dp, inv, g, D);
          L[h * T + t] = (rmax[m] + std::log2(rsum[m])) * kLn2;
        }
      }
    }
  });
  return {out.to(q.scalar_type()), lse};
}

// The backward's elementwise part: dO = grad_out * sigmoid(gate) (as E), delta = rowsum(grad_out *
// out) ([H, T + kPad] fp32, zero tail) and dgate = grad_out * out * (1 - sigmoid(gate)) (empty
// without a gate). fp32 operands: ATen ops in fp32, bit for bit as ever.
struct Prologue { at::Tensor dO, delta, dgate; };

template <class E>
Prologue prologue(const at::Tensor& grad_out, const at::Tensor& out, const c10::optional<at::Tensor>& gate) {
  const at::Tensor go = grad_out.to(at::kFloat), of = out.to(at::kFloat);
  at::Tensor dO = go, dgate;
  if (gate.has_value()) {
    const at::Tensor sg = at::sigmoid(gate->to(at::kFloat));
    dO = go * sg;
    dgate = (go * of * (1 - sg)).to(gate->scalar_type()).contiguous();
  } else {
    dgate = at::empty({0}, out.options());
  }
  return {as_type<E>(dO), pad_tokens((go * of).sum(-1).transpose(0, 1)), dgate};
}

#if defined(__AVX512BF16__)
// bf16: one pass over the rows instead of a dozen ATen ops and their fp32 temporaries (the
// inputs are read as bf16, dgate comes out in bf16 and then in the gate's dtype).
template <>
Prologue prologue<bf16>(const at::Tensor& grad_out, const at::Tensor& out, const c10::optional<at::Tensor>& gate) {
  const at::Tensor go = as_type<bf16>(grad_out), of = as_type<bf16>(out);
  const at::Tensor gt = gate.has_value() ? as_type<bf16>(*gate) : at::Tensor();
  const int64_t T = out.size(0), H = out.size(1), D = out.size(2);
  const at::TensorOptions bf = out.options().dtype(at::kBFloat16);
  at::Tensor dO = at::empty({T, H, D}, bf), delta = at::zeros({H, T + kPad}, out.options().dtype(at::kFloat));
  at::Tensor dgate = gt.defined() ? at::empty({T, H, D}, bf) : at::empty({0}, out.options());
  const bf16 *G = go.data_ptr<bf16>(), *O = of.data_ptr<bf16>(), *X = gt.defined() ? gt.data_ptr<bf16>() : nullptr;
  bf16 *DO = dO.data_ptr<bf16>(), *DG = gt.defined() ? dgate.data_ptr<bf16>() : nullptr;
  float* Dl = delta.data_ptr<float>();
  at::parallel_for(0, T * H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / H, h = i % H;
      const bf16 *g = G + t * go.stride(0) + h * go.stride(1), *o = O + t * of.stride(0) + h * of.stride(1);
      const bf16* x = X ? X + t * gt.stride(0) + h * gt.stride(1) : nullptr;
      vec dot = splat(0.0f);
      for (int64_t c = 0; c < D; c += VW) {
        const __mmask16 k = first(D - c);
        const vec gv = load_bf16(g + c, k), ov = load_bf16(o + c, k);
        dot += gv * ov;
        if (x) {
          const vec sg = sigmoid(load_bf16(x + c, k));
          store_bf16(DO + i * D + c, gv * sg, k);
          store_bf16(DG + i * D + c, gv * ov * (1.0f - sg), k);
        } else {
          store_bf16(DO + i * D + c, gv, k);
        }
      }
      Dl[h * (T + kPad) + t] = hsum(dot);
    }
  });
  return {dO, delta, gt.defined() ? dgate.to(gate->scalar_type()) : dgate};
}
#endif

template <class E>
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const c10::optional<at::Tensor>& gate, const at::Tensor& row_lo,
                                 const at::Tensor& row_hi, const at::Tensor& col_lo, const at::Tensor& col_hi,
                                 double scale, int64_t block) {
  constexpr int64_t P = kPair<E>;
  constexpr int RB = kRows<E>;
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Dp = round_up(D, kRed<E>), ldt = T + kPad;
  const Prologue pro = prologue<E>(grad_out, out, gate);
  const at::Tensor &dO = pro.dO, &delta = pro.delta, &dgate = pro.dgate;
  const at::Tensor lse2 = pad_tokens(lse * kLog2e);  // [H, T + kPad]
  const Packed<E> K = pack_tokens<E, 1>(k, Dp), V = pack_tokens<E, 1>(v, Dp);  // rows: A of pass 1
  const Packed<E> Qt = pack_cols<E>(q, Dp), DOt = pack_cols<E>(dO, Dp);
  const Packed<E> Qn = pack_tokens<E, P>(q, Dp), DOn = pack_tokens<E, P>(dO, Dp);
  const Packed<E> Kn = P == 1 ? K : pack_tokens<E, P>(k, Dp);  // fp32: tokens are the rows
  at::Tensor dq = at::empty({T, H, D}, q.options().dtype(kType<E>));
  at::Tensor dk = at::empty({T, H, D}, q.options().dtype(kType<E>));
  at::Tensor dv = at::empty({T, H, D}, q.options().dtype(kType<E>));
  const int32_t *lo = row_lo.data_ptr<int32_t>(), *hi = row_hi.data_ptr<int32_t>();
  const int32_t *clo = col_lo.data_ptr<int32_t>(), *chi = col_hi.data_ptr<int32_t>();
  // ds is stored as pass 1 makes it, by micro-block (group) g of RB keys: for each query t of
  // the group's span [cs[g], ce[g]), the RB values ds[t][RB g + m] side by side (zero for the
  // keys t does not see), at off[g] + (t - cs[g]) * RB.
  const int64_t ng = (T + RB - 1) / RB;
  std::vector<int64_t> cs(ng), ce(ng), off(ng + 1, 0);
  for (int64_t g = 0; g < ng; ++g) {
    const int n = count_real(clo, chi, g * RB, std::min<int64_t>(RB, T - g * RB));
    cs[g] = clo[g * RB] / P * P, ce[g] = n > 0 ? chi[g * RB + n - 1] : cs[g];  // cs: pass 1's c0
    off[g + 1] = off[g] + (ce[g] - cs[g]) * RB;
  }
  const int64_t nnz = off[ng];
  const int64_t group = std::clamp<int64_t>(ds_budget() / std::max<int64_t>(nnz * sizeof(E), 1), 1, H);
  std::unique_ptr<E[]> ds(new E[group * nnz]);  // head h's at (h - h0) * nnz; all written by pass 1
  const float *Dl = delta.data_ptr<float>(), *L2 = lse2.data_ptr<float>();
  E *DQ = dq.data_ptr<E>(), *DK = dk.data_ptr<E>(), *DV = dv.data_ptr<E>();
  const float mul = (float)scale * kLog2e, fscale = (float)scale;
  const int64_t nblk = (T + block - 1) / block;
  const bool amx = use_amx<E>();

  const int64_t lda = ldt + RB;  // pass 2's rows of ds (see there)
  for (int64_t h0 = 0; h0 < H; h0 += group) {
    const int64_t nh = std::min(group, H - h0);
    // Pass 1, key-major: micro-blocks of RB keys against the queries that see them.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      const AmxScope tiles(amx);
      std::vector<float> Pf(RB * ldt), dS(RB * ldt), acc(RB * Dp);
      std::vector<E> Pe(P == 1 ? 0 : RB * ldt), dSe(P == 1 ? 0 : RB * ldt);  // bf16 p, ds
      for (int64_t item; (item = next++) < nh * nblk;) {
        const int64_t h = h0 + item / nblk, j0b = item % nblk * block, j1b = std::min(j0b + block, T);
        E* const dsh = ds.get() + (h - h0) * nnz;
        for (int64_t j0 = j0b; j0 < j1b; j0 += RB) {
          const int n = count_real(clo, chi, j0, std::min<int64_t>(RB, j1b - j0));
          if (n < std::min<int64_t>(RB, j1b - j0)) {  // keys nobody sees (padding) from j0 + n on
            zero_rows(DK, j0 + n, j1b, h, H, D);
            zero_rows(DV, j0 + n, j1b, h, H, D);
            if (n == 0) break;
          }
          for (int m = 0; m < n; ++m) {
            prefetch<1>(DK + ((j0 + m) * H + h) * D, D * sizeof(E));
            prefetch<1>(DV + ((j0 + m) * H + h) * D, D * sizeof(E));
          }
          // keys j0 + m for m >= n (past T: the panels' zero tail) are computed and dropped
          const int64_t c0 = clo[j0] / P * P, span = chi[j0 + n - 1] - c0;
          mm(K.at(h, j0, 0), K.ld, Qt.at(h, 0, c0), Qt.ld, D, span, Pf.data(), ldt);    // s^T
          mm(V.at(h, j0, 0), V.ld, DOt.at(h, 0, c0), DOt.ld, D, span, dS.data(), ldt);  // dp^T
          const float* l2 = L2 + h * ldt + c0;
          const float* dl = Dl + h * ldt + c0;
          E *const p = operands<E>(Pf.data(), Pe.data()), *const s = operands<E>(dS.data(), dSe.data());
          for (int m = 0; m < RB; ++m) {
            E *pm = p + m * ldt, *sm = s + m * ldt;
            if (m < n) {
              backward_row(Pf.data() + m * ldt, dS.data() + m * ldt, l2, dl, pm, sm, clo[j0 + m] - c0,
                           chi[j0 + m] - c0, span, mul);
            } else {
              std::fill(pm, pm + round_up(span, kRed<E>), E(0.0f));
              std::fill(sm, sm + round_up(span, kRed<E>), E(0.0f));
            }
          }
          mm<E>(p, ldt, DOn.at(h, c0, 0), DOn.ld, span, Dp, acc.data(), Dp);
          for (int m = 0; m < n; ++m)
            store_row(DV + ((j0 + m) * H + h) * D, acc.data() + m * Dp, 1.0f, D);
          mm<E>(s, ldt, Qn.at(h, c0, 0), Qn.ld, span, Dp, acc.data(), Dp);
          for (int m = 0; m < n; ++m)
            store_row(DK + ((j0 + m) * H + h) * D, acc.data() + m * Dp, fscale, D);
          // ds is zero at the keys a query does not see (the query c0 < clo[j0] sees none), and at m >= n
          store_transposed<RB>(s, ldt, span, dsh + off[j0 / RB]);
        }
      }
    });

    // Pass 2, query-major: dq = scale * ds . k over each row's interval.
    next = 0;
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      const AmxScope tiles(amx);
      std::vector<E> A(RB * lda);
      std::vector<float> acc(RB * Dp);
      for (int64_t item; (item = next++) < nh * nblk;) {
        const int64_t h = h0 + item / nblk, r0 = item % nblk * block, r1 = std::min(r0 + block, T);
        const E* const dsh = ds.get() + (h - h0) * nnz;
        for (int64_t i0 = r0; i0 < r1; i0 += RB) {
          const int n = count_real(lo, hi, i0, std::min<int64_t>(RB, r1 - i0));
          if (n < std::min<int64_t>(RB, r1 - i0)) {  // padding from i0 + n on
            zero_rows(DQ, i0 + n, r1, h, H, D);
            if (n == 0) break;
          }
          for (int m = 0; m < n; ++m) prefetch<1>(DQ + ((i0 + m) * H + h) * D, D * sizeof(E));
          const int64_t c0 = lo[i0] / P * P, span = hi[i0 + n - 1] - c0;
          // Row m of A holds keys from c0 at A + m * lda + RB: whole groups, the first of which
          // may start up to RB - 1 keys before c0 (the zeros past the span land in the slack),
          // then zeros up to the span rounded up to kRed.
          int64_t g = c0 / RB;
          for (; g * RB < c0 + span; ++g)
            for (int m = 0; m < RB; ++m) {
              const int64_t t = i0 + m;
              E* dst = A.data() + m * lda + RB + (g * RB - c0);
              if (cs[g] <= t && t < ce[g])
                std::copy_n(dsh + off[g] + (t - cs[g]) * RB, RB, dst);
              else  // t sees no key of the group (or is padding)
                std::fill_n(dst, RB, E(0.0f));
            }
          for (int m = 0; m < RB; ++m) {
            E* row = A.data() + m * lda + RB;
            std::fill(row + (g * RB - c0), row + std::max(g * RB - c0, round_up(span, kRed<E>)), E(0.0f));
          }
          mm(A.data() + RB, lda, Kn.at(h, c0, 0), Kn.ld, span, Dp, acc.data(), Dp);
          for (int m = 0; m < n; ++m)
            store_row(DQ + ((i0 + m) * H + h) * D, acc.data() + m * Dp, fscale, D);
        }
      }
    });
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), dgate};
}

std::vector<at::Tensor> prefixlm_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const c10::optional<at::Tensor>& gate, const at::Tensor& row_lo,
                                     const at::Tensor& row_hi, double scale, int64_t block) {
  check_inputs(q, k, v, row_lo, row_hi);
#if defined(__AVX512BF16__)
  if (bf16_operands(q, k, v)) return forward<bf16>(q, k, v, gate, row_lo, row_hi, scale, block);
#endif
  return forward<float>(q, k, v, gate, row_lo, row_hi, scale, block);
}

std::vector<at::Tensor> prefixlm_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const c10::optional<at::Tensor>& gate, const at::Tensor& row_lo,
                                     const at::Tensor& row_hi, const at::Tensor& col_lo, const at::Tensor& col_hi,
                                     double scale, int64_t block) {
  check_inputs(q, k, v, row_lo, row_hi);
  TORCH_CHECK(block > 0 && block % 16 == 0, "block must be a positive multiple of 16");
#if defined(__AVX512BF16__)
  if (bf16_operands(q, k, v))
    return backward<bf16>(grad_out, q, k, v, out, lse, gate, row_lo, row_hi, col_lo, col_hi, scale, block);
#endif
  return backward<float>(grad_out, q, k, v, out, lse, gate, row_lo, row_hi, col_lo, col_hi, scale, block);
}

}  // namespace

TORCH_LIBRARY(hrm_cpu, m) {
  m.def("prefixlm_fwd(Tensor q, Tensor k, Tensor v, Tensor? gate, Tensor row_lo, Tensor row_hi, float scale, "
        "int block) -> Tensor[]");
  m.def("prefixlm_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? gate, "
        "Tensor row_lo, Tensor row_hi, Tensor col_lo, Tensor col_hi, float scale, int block) -> Tensor[]");
  m.def("bf16_dots() -> bool", &bf16_dots);
  m.def("amx_tiles() -> bool", &amx_tiles);
}

TORCH_LIBRARY_IMPL(hrm_cpu, CPU, m) {
  m.impl("prefixlm_fwd", &prefixlm_fwd);
  m.impl("prefixlm_bwd", &prefixlm_bwd);
}
