// One chunk of the response-only cross-entropy on the CPU: per row of the chunk the loss, the
// argmax and (with_grad) the gradient softmax - onehot, from the chunk's logits transposed
// ([V, C]), and the dW slab add.
//
// Built at first use by hrm/ops/cpp_extension.py (-O3 -march=native -fopenmp); registers
// hrm_ce::ce_chunk_t and hrm_ce::accumulate. hrm/ops/impl/linear_cross_entropy.py calls
// ce_chunk_t for fp32 and bf16 logits (the head's dtype) from the chunk loop of the `cpu`
// backend, and accumulate to add each bf16 product of dW to its fp32 slab.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/cpu_vec.h"

namespace {

using namespace hrm_cpu;

// The chunk's logits come transposed, lt [V, C]: column c holds row c's logits. The head's
// product is then W z^T, which streams the weight once (z W^T re-reads it for each block of
// rows), and the dW product reads g^T as a row-major operand (oneDNN runs g^T z from a
// transposed view of g well below its row-major speed); dz = g W takes the row-major g that
// pass 2 also writes. Columns from n = targets.size(0) on are padding (zero rows of the
// product); C is a multiple of kCols. Both passes walk the vocabulary in tiles of kTile rows,
// each tile whole (C contiguous entries per row):
//   1. per column, online over the tiles: m = max, pred = its first index, s = sum exp2((x - m)
//      log2 e) (rescaled by exp2((m_old - m) log2 e) when a tile raises m; one exp per logit
//      plus one per tile and column), over parts of kPartTiles tiles in parallel, the parts'
//      (m, s, pred) then merged in order (results do not depend on the thread count);
//      loss = m + ln s - x_t
//   2. with_grad: g = exp2((x - m) log2 e) / s - onehot(target) (0 in padding columns), written
//      over lt (g^T, the A of dW = g^T z) and into grad [C, V] (g, the A of dz = g W), each
//      kTile x kCols block turned row-major in registers
// Targets are checked (0 <= t < V) before anything is written. NaN logits give a NaN loss;
// their argmax is unspecified.
#if defined(__AVX512F__)
constexpr bool kAvx512 = true;
#else
constexpr bool kAvx512 = false;
#endif
constexpr int64_t kCols = 32;   // columns per transposed block: whole cache lines of bf16
constexpr int NC = kCols / VW;  // vectors per row of a block
constexpr int64_t kTile = 32;   // vocabulary rows per tile: one 64-byte line of bf16 g per column
constexpr int64_t kPartTiles = 64;  // tiles per part of pass 1 (a fixed split: work items whose sums merge in order)

inline vec load_e(const float* p) { return load(p); }
inline void store_e(float* p, vec x) { store(p, x); }
#if defined(__AVX512BF16__)
inline vec load_e(const bf16* p) { return load_bf16(p, first(VW)); }
inline void store_e(bf16* p, vec x) { store_bf16(p, x); }
#else
inline vec load_e(const bf16* p) { return load_n(p, VW); }
inline void store_e(bf16* p, vec x) { store_n(p, x, VW); }
#endif

// 2**x (x = -inf gives 0: -inf logits have zero probability).
inline vec exp_of(vec x) {
#if defined(__AVX512BF16__)
  return exp2_avx512(x < -150.0f ? splat(-150.0f) : x);  // 2**-150 rounds to 0
#else
  return exp2v(x);
#endif
}

// grad[c * V + v0 + j] = t[j * kCols + c] for j < rows, c < kCols: a [rows, kCols] block of
// g^T stored row-major. A whole block (kTile rows) is turned by register transposes where the
// ISA has them and lands as one 64-byte line per column, stored past the caches (stream) when
// the lines are aligned: g is read again only by the next product, and a partial line
// written through the cache would first be read from memory.
#if defined(__AVX512F__)
inline void put_line(void* p, __m512i x, bool stream) {
  if (stream) _mm512_stream_si512(static_cast<__m512i*>(p), x);
  else _mm512_storeu_si512(p, x);
}
#endif

template <class E>
inline void store_block_scalar(const E* t, int64_t rows, E* grad, int64_t V, int64_t v0) {
  for (int64_t c = 0; c < kCols; ++c)
    for (int64_t j = 0; j < rows; ++j) grad[c * V + v0 + j] = t[j * kCols + c];
}

inline void store_block(const float* t, int64_t rows, float* grad, int64_t V, int64_t v0, bool stream) {
#if defined(__AVX512F__)
  if (rows == kTile) {
    for (int h = 0; h < kTile; h += 16)    // 16 rows: one line of each column
      for (int q = 0; q < kCols; q += 16) {  // 16 columns at a time
        __m512i r[16];
        for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(t + (h + j) * kCols + q);
        transpose16(r);
        for (int c = 0; c < 16; ++c) put_line(grad + (q + c) * V + v0 + h, r[c], stream);
      }
    return;
  }
#endif
  store_block_scalar(t, rows, grad, V, v0);
}

inline void store_block(const bf16* t, int64_t rows, bf16* grad, int64_t V, int64_t v0, bool stream) {
#if defined(__AVX512BF16__)
  if (rows == kTile) {
    static_assert(kCols == 32 && kTile == 32, "two 16-row halves of 16 words");
    // word w of a row is the pair of columns (2w, 2w + 1): after a half's transpose, r[w]
    // holds that pair for its 16 rows, split_pairs gives column 2w's 16 entries (low 256
    // bits) and column 2w + 1's; the two halves' parts then join into one line per column
    __m512i lo[16], r[16];
    for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(t + j * kCols);
    transpose16(r);
    for (int w = 0; w < 16; ++w) lo[w] = split_pairs(r[w]);
    for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(t + (16 + j) * kCols);
    transpose16(r);
    for (int w = 0; w < 16; ++w) {
      const __m512i hi = split_pairs(r[w]);
      put_line(grad + (2 * w) * V + v0, _mm512_shuffle_i64x2(lo[w], hi, 0x44), stream);
      put_line(grad + (2 * w + 1) * V + v0, _mm512_shuffle_i64x2(lo[w], hi, 0xEE), stream);
    }
    return;
  }
#endif
  store_block_scalar(t, rows, grad, V, v0);
}

// The running max, its first index and the sum of exp2((x - max) log2 e) of KB column vectors
// (m, a, s at those columns) over rows [v0, v1) of the tile (rows C entries apart): KB
// independent chains, since one column's max-and-blend chain would run at its latency.
constexpr int KB = 2;
static_assert(kCols / VW % KB == 0, "a block of columns is whole groups of KB vectors");

template <class E>
inline void tile_stats(const E* lt, int64_t C, int64_t v0, int64_t v1, float* M, float* S, int32_t* A) {
  vec m_old[KB], m[KB], s[KB];
  ivec a[KB];
  for (int k = 0; k < KB; ++k) {
    m_old[k] = m[k] = load(M + k * VW);
    std::memcpy(&a[k], A + k * VW, sizeof(ivec));
  }
  for (int64_t v = v0; v < v1; ++v)
    for (int k = 0; k < KB; ++k) {
      const vec x = load_e(lt + v * C + k * VW);
      const ivec gt = x > m[k];
      m[k] = gt ? x : m[k];
      a[k] = gt ? ivec{} + (int32_t)v : a[k];
    }
  for (int k = 0; k < KB; ++k) {  // rescaled to the new max (m_old = -inf at the start: s = 0)
    const vec s_old = load(S + k * VW);
    s[k] = m_old[k] == m[k] ? s_old : s_old * exp_of((m_old[k] - m[k]) * kLog2e);
  }
  vec mx[KB];  // the max the exps subtract: 0 while a column has seen only -inf (whose exps are 0)
  for (int k = 0; k < KB; ++k) mx[k] = m[k] == -INFINITY ? splat(0.0f) : m[k];
  for (int64_t v = v0; v < v1; ++v)
    for (int k = 0; k < KB; ++k) s[k] += exp_of((load_e(lt + v * C + k * VW) - mx[k]) * kLog2e);
  for (int k = 0; k < KB; ++k) {
    store(M + k * VW, m[k]);
    store(S + k * VW, s[k]);
    std::memcpy(A + k * VW, &a[k], sizeof(ivec));
  }
}

// Starts fetching rows [v0, v1) of lt (C entries each): the next tile, whose rows lie C
// entries apart, a stride the hardware prefetchers do not follow far enough.
template <class E>
inline void prefetch_rows(const E* lt, int64_t C, int64_t v0, int64_t v1) {
  const char* a = reinterpret_cast<const char*>(lt + v0 * C);
  const char* b = reinterpret_cast<const char*>(lt + v1 * C);
  for (; a < b; a += 64) __builtin_prefetch(a);
}

template <class E>
void cols(E* lt, const int64_t* targets, int64_t n, int64_t C, int64_t V, bool with_grad, E* grad, float* loss,
          int64_t* pred) {
  const int64_t CV = C / VW, tiles = (V + kTile - 1) / kTile, parts = (tiles + kPartTiles - 1) / kPartTiles;
  // per part of the vocabulary and column: the running max, sum and first argmax
  std::vector<float> pm(parts * C, -INFINITY), ps(parts * C, 0.0f);
  std::vector<int32_t> pa(parts * C, 0);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t q = p0; q < p1; ++q) {
      float *M = pm.data() + q * C, *S = ps.data() + q * C;
      int32_t* A = pa.data() + q * C;
      for (int64_t t = q * kPartTiles; t < std::min((q + 1) * kPartTiles, tiles); ++t) {
        const int64_t v0 = t * kTile, v1 = std::min(v0 + kTile, V);
        prefetch_rows(lt, C, v1, std::min(v1 + kTile, V));
        for (int64_t k = 0; k < CV; k += KB) tile_stats(lt + k * VW, C, v0, v1, M + k * VW, S + k * VW, A + k * VW);
      }
    }
  });
  // the parts merged in vocabulary order (the first maximum keeps its index): the same sums
  // whatever the thread count
  std::vector<float> m(pm.begin(), pm.begin() + C), s(ps.begin(), ps.begin() + C);
  std::vector<int32_t> arg(pa.begin(), pa.begin() + C);
  for (int64_t q = 1; q < parts; ++q)
    for (int64_t c = 0; c < C; ++c) {
      const float mt = pm[q * C + c], st = ps[q * C + c];
      if (mt == -INFINITY) continue;  // a part of -inf logits only: nothing to add
      if (mt > m[c]) {
        s[c] = s[c] * std::exp2((m[c] - mt) * kLog2e) + st;
        m[c] = mt, arg[c] = pa[q * C + c];
      } else {
        s[c] += st * std::exp2((mt - m[c]) * kLog2e);
      }
    }
  for (int64_t c = 0; c < n; ++c) {
    loss[c] = m[c] + std::log(s[c]) - static_cast<float>(lt[targets[c] * C + c]);
    pred[c] = arg[c];
  }
  if (!with_grad) return;
  std::vector<float> inv(C);
  std::vector<int32_t> tg(C);
  for (int64_t c = 0; c < C; ++c) inv[c] = 1.0f / s[c], tg[c] = c < n ? (int32_t)targets[c] : -1;
  const bool stream = kAvx512 && reinterpret_cast<uintptr_t>(grad) % 64 == 0 && V * sizeof(E) % 64 == 0;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) E block[kTile * kCols];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t v0 = t * kTile, rows = std::min(kTile, V - v0);
      prefetch_rows(lt, C, v0 + kTile, std::min(v0 + 2 * kTile, V));
      for (int64_t c0 = 0; c0 < C; c0 += kCols) {
        for (int64_t j = 0; j < rows; ++j) {
          E* row = lt + (v0 + j) * C + c0;
          for (int k = 0; k < NC; ++k) {
            const int64_t c = c0 + k * VW;
            ivec tk;
            std::memcpy(&tk, tg.data() + c, sizeof(tk));
            const vec p = exp_of((load_e(row + k * VW) - load(m.data() + c)) * kLog2e) * load(inv.data() + c);
            vec g = tk == (int32_t)(v0 + j) ? p - 1.0f : p;
            g = tk >= 0 ? g : splat(0.0f);  // padding columns
            store_e(row + k * VW, g);
            store_e(block + j * kCols + k * VW, g);
          }
        }
        store_block(block, rows, grad + c0 * V, V, v0, stream);
      }
    }
#if defined(__AVX512F__)
    _mm_sfence();  // this thread's streamed lines are visible before the region ends
#endif
  });
}

std::vector<at::Tensor> ce_chunk_t(at::Tensor lt, const at::Tensor& targets, const c10::optional<at::Tensor>& grad_,
                                   bool with_grad) {
  TORCH_CHECK(lt.device().is_cpu() && lt.dim() == 2 && lt.is_contiguous(), "ce_chunk_t: contiguous CPU logits [V, C]");
  TORCH_CHECK(lt.scalar_type() == at::kFloat || lt.scalar_type() == at::kBFloat16,
              "ce_chunk_t: fp32 or bf16 logits, got ", lt.scalar_type());
  const int64_t V = lt.size(0), C = lt.size(1), n = targets.numel();
  TORCH_CHECK(V > 0, "ce_chunk_t: an empty vocabulary");
  TORCH_CHECK(C % kCols == 0, "ce_chunk_t: the columns must be a multiple of ", kCols, ", got ", C);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && n <= C,
              "ce_chunk_t: int64 targets [n], n <= ", C);
  TORCH_CHECK(!with_grad || grad_.has_value(), "ce_chunk_t: with_grad needs a grad buffer");
  const at::Tensor grad = grad_.has_value() ? *grad_ : at::Tensor();
  if (with_grad)
    TORCH_CHECK(grad.device().is_cpu() && grad.is_contiguous() && grad.scalar_type() == lt.scalar_type() &&
                    grad.sizes() == at::IntArrayRef({C, V}),
                "ce_chunk_t: grad must be a contiguous [", C, ", ", V, "] tensor of the logits' dtype");
  const at::Tensor tg = targets.contiguous();
  const int64_t* tp = tg.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(tp[r] >= 0 && tp[r] < V, "ce_chunk_t: target ", tp[r], " of column ", r, " is outside [0, ", V, ")");
  at::Tensor loss = at::empty({n}, lt.options().dtype(at::kFloat));
  at::Tensor pred = at::empty({n}, tg.options());
  if (lt.scalar_type() == at::kFloat)
    cols(lt.data_ptr<float>(), tp, n, C, V, with_grad, with_grad ? grad.data_ptr<float>() : nullptr,
         loss.data_ptr<float>(), pred.data_ptr<int64_t>());
  else
    cols(lt.data_ptr<bf16>(), tp, n, C, V, with_grad, with_grad ? grad.data_ptr<bf16>() : nullptr,
         loss.data_ptr<float>(), pred.data_ptr<int64_t>());
  return {loss, pred};
}

// out = part (overwrite) or out += part, fp32 out and bf16 part of one shape, contiguous, in
// one pass (torch's mixed-dtype add_ converts part to a new fp32 tensor first: two passes).
void accumulate(const at::Tensor& out, const at::Tensor& part, bool overwrite) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous(),
              "accumulate: out must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(part.device().is_cpu() && part.scalar_type() == at::kBFloat16 && part.is_contiguous() &&
                  part.sizes() == out.sizes(),
              "accumulate: part must be a contiguous bf16 CPU tensor of out's shape");
  float* o = out.data_ptr<float>();
  const bf16* p = part.data_ptr<bf16>();
  at::parallel_for(0, out.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
#if defined(__AVX512BF16__)
    for (; i + VW <= i1; i += VW) {
      const vec x = load_bf16(p + i, first(VW));
      store(o + i, overwrite ? x : load(o + i) + x);
    }
#endif
    for (; i < i1; ++i) o[i] = overwrite ? static_cast<float>(p[i]) : o[i] + static_cast<float>(p[i]);
  });
}

}  // namespace

TORCH_LIBRARY(hrm_ce, m) {
  m.def("ce_chunk_t(Tensor(a!) logits_t, Tensor targets, Tensor(b!)? grad, bool with_grad) -> Tensor[]");
  m.def("accumulate(Tensor(a!) out, Tensor part, bool overwrite) -> ()");
}

TORCH_LIBRARY_IMPL(hrm_ce, CPU, m) {
  m.impl("ce_chunk_t", &ce_chunk_t);
  m.impl("accumulate", &accumulate);
}
