// PrefixLM varlen attention on the CPU: forward and backward in fp32, block-sparse.
//
// Built at first use by hrm/ops/prefixlm_attention.py through torch.utils.cpp_extension
// (-O3 -march=native -fopenmp); registers the ops hrm_cpu::prefixlm_fwd and hrm_cpu::prefixlm_bwd.
//
// The mask is one key interval per query row: query t sees keys [row_lo[t], row_hi[t])
// (row_lo = start of t's sequence, row_hi = start + max(prefix, pos + 1); padding rows have
// an empty interval). Both arrays are non-decreasing in t, so the keys seen by any run of
// consecutive rows form one contiguous span. Transposed, key j is seen by the queries
// [col_lo[j], col_hi[j]), also non-decreasing. The kernels work on micro-blocks of MR rows
// (keys in the dk/dv pass) and touch only their span: empty tiles are never visited, fully
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
// A key-major pass computes dk, dv and stores ds in a row-compressed buffer (exactly the
// allowed pairs); a query-major pass then reads it for dq, so nothing is recomputed and
// no two threads write the same row.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX__)
constexpr int VW = 8;
#else
constexpr int VW = 4;
#endif
constexpr int MR = 4;                 // rows per micro-block
constexpr int NV = VW == 16 ? 4 : 2;  // vectors per register block: MR * NV accumulators fit the register file
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

typedef float vec __attribute__((vector_size(VW * 4)));
typedef int32_t ivec __attribute__((vector_size(VW * 4)));

inline vec load(const float* p) { vec v; __builtin_memcpy(&v, p, sizeof(vec)); return v; }
inline void store(float* p, vec v) { __builtin_memcpy(p, &v, sizeof(vec)); }
inline vec splat(float x) { return vec{} + x; }
inline ivec iota() { ivec r; for (int i = 0; i < VW; ++i) r[i] = i; return r; }

// 2**x, |rel err| < 2e-7; x < -125 flushes to 0 (Cephes exp2f polynomial on [-1/2, 1/2]).
inline vec exp2v(vec x) {
  const ivec under = x < -125.0f;
  x = x < -125.0f ? splat(-125.0f) : x;
  x = x > 127.0f ? splat(127.0f) : x;
  const vec t = x + 0.5f;
  ivec n = __builtin_convertvector(t, ivec);
  n += (__builtin_convertvector(n, vec) > t);  // true is -1: floor for negative t
  const vec f = x - __builtin_convertvector(n, vec);
  vec p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  ivec bits;
  __builtin_memcpy(&bits, &p, sizeof(vec));
  bits += n << 23;
  __builtin_memcpy(&p, &bits, sizeof(vec));
  return under ? splat(0.0f) : p;
}

inline float hmax(vec v) { float m = v[0]; for (int i = 1; i < VW; ++i) m = std::max(m, v[i]); return m; }
inline float hsum(vec v) { float s = 0; for (int i = 0; i < VW; ++i) s += v[i]; return s; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[m][c] = sum_{d < D} a[m][d] * bt[d * ldb + c] for m < MR and c < NVB * VW.
template <int NVB>
inline void nt_tile(const float* const* a, const float* bt, int64_t ldb, int D, float* c, int64_t ldc) {
  vec acc[MR][NVB] = {};
  for (int d = 0; d < D; ++d) {
    vec b[NVB];
    for (int v = 0; v < NVB; ++v) b[v] = load(bt + d * ldb + v * VW);
    for (int m = 0; m < MR; ++m) {
      const float x = a[m][d];  // scalar * vector: one broadcast
      for (int v = 0; v < NVB; ++v) acc[m][v] += x * b[v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NVB; ++v) store(c + m * ldc + v * VW, acc[m][v]);
}

// C[MR x ncols] = A[MR x D] . Bt[D x ncols]; writes ncols rounded up to VW (bt rows and c
// rows must have that much room).
void nt(const float* const* a, const float* bt, int64_t ldb, int D, int64_t ncols, float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + NV * VW <= ncols; j += NV * VW) nt_tile<NV>(a, bt + j, ldb, D, c + j, ldc);
  for (; j < ncols; j += VW) nt_tile<1>(a, bt + j, ldb, D, c + j, ldc);
}

// C[m][0:NVB*VW] = sum_{r < nr} a[m * lda + r] * b[r * ldb + 0:NVB*VW].
template <int NVB>
inline void nn_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t nr, float* c, int64_t ldc) {
  vec acc[MR][NVB] = {};
  for (int64_t r = 0; r < nr; ++r) {
    vec x[NVB];
    for (int v = 0; v < NVB; ++v) x[v] = load(b + r * ldb + v * VW);
    for (int m = 0; m < MR; ++m) {
      const float s = a[m * lda + r];
      for (int v = 0; v < NVB; ++v) acc[m][v] += s * x[v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NVB; ++v) store(c + m * ldc + v * VW, acc[m][v]);
}

// C[MR x Dp] = A[MR x nr] . B[nr x Dp]; Dp is a multiple of VW.
void nn(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t nr, int64_t Dp, float* c, int64_t ldc) {
  int64_t d = 0;
  for (; d + NV * VW <= Dp; d += NV * VW) nn_tile<NV>(a, lda, b + d, ldb, nr, c + d, ldc);
  for (; d < Dp; d += VW) nn_tile<1>(a, lda, b + d, ldb, nr, c + d, ldc);
}

// Row r of a [MR x width] score block: x = x * mul - sub[c] inside [a, b), then
// p = exp2(x - max) there and 0 elsewhere in [0, width); returns (max, sum p). With
// sub == nullptr the row max is subtracted (forward); otherwise sub is the row's
// log-sum-exp and the max is not used (backward).
struct RowStats { float max, sum; };

RowStats softmax_row(float* x, int64_t a, int64_t b, int64_t width, float mul, const float* sub) {
  const ivec lane = iota();
  std::fill(x, x + a, 0.0f);
  float mx = 0.0f;
  if (sub == nullptr) {
    vec vm = splat(-INFINITY);
    for (int64_t c = a; c < b; c += VW) {
      vec s = load(x + c) * mul;
      s = (lane < (int32_t)(b - c)) ? s : splat(-INFINITY);
      store(x + c, s);
      vm = s > vm ? s : vm;
    }
    mx = hmax(vm);
  }
  vec vs = splat(0.0f);
  for (int64_t c = a; c < b; c += VW) {
    const vec s = sub == nullptr ? load(x + c) - mx : load(x + c) * mul - load(sub + c);
    vec p = exp2v(s);
    p = (lane < (int32_t)(b - c)) ? p : splat(0.0f);
    store(x + c, p);
    vs += p;
  }
  std::fill(x + b, x + round_up(width, VW), 0.0f);
  return {mx, hsum(vs)};
}

// Rows of a [T, H, D] tensor, packed head-major into fp32 [H, T, Dp] (Dp = round_up(D, VW),
// zero-padded): row (t, h) starts at p + (h * T + t) * Dp, so the rows of one head that a
// micro-block streams through are contiguous (the model's q/k/v are strided views whose
// token stride, a multiple of 4 KiB, would alias in the caches).
struct Rows {
  at::Tensor buf;
  const float* p;
  int64_t T, st;
  const float* row(int64_t t, int64_t h) const { return p + (h * T + t) * st; }
};

// x as fp32 (a conversion pass only for 16-bit inputs); any strides.
at::Tensor as_float(const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat); }

Rows rows_of(const at::Tensor& x, int64_t Dp) {
  const at::Tensor xf = as_float(x);
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  const int64_t s0 = xf.stride(0), s1 = xf.stride(1), s2 = xf.stride(2);
  auto buf = at::empty({H, T, Dp}, x.options().dtype(at::kFloat));
  const float* src = xf.data_ptr<float>();
  float* dst = buf.data_ptr<float>();
  at::parallel_for(0, H * T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / T, t = i % T;
      const float* a = src + t * s0 + h * s1;
      float* b = dst + i * Dp;
      for (int64_t d = 0; d < D; ++d) b[d] = a[d * s2];
      std::fill(b + D, b + Dp, 0.0f);
    }
  });
  return {buf, dst, T, Dp};
}

// [T, H, D] -> [H, D, T + VW] fp32 (transposed; a zero tail so that vector loads may overrun).
at::Tensor pack_cols(const at::Tensor& x) {
  const at::Tensor xf = as_float(x);
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), ld = T + VW, tb = 64;
  const int64_t s0 = xf.stride(0), s1 = xf.stride(1), s2 = xf.stride(2), nb = (T + tb - 1) / tb;
  auto out = at::empty({H, D, ld}, x.options().dtype(at::kFloat));
  const float* src = xf.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, H * nb, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / nb, t0 = i % nb * tb, t1 = std::min(t0 + tb, T);
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t d = 0; d < D; ++d) dst[(h * D + d) * ld + t] = src[t * s0 + h * s1 + d * s2];
      if (t1 == T)
        for (int64_t d = 0; d < D; ++d) std::fill(dst + (h * D + d) * ld + T, dst + (h * D + d + 1) * ld, 0.0f);
    }
  });
  return out;
}

// [H, T] fp32 with a zero tail of VW (vector loads may overrun).
at::Tensor pad_tokens(const at::Tensor& x) {
  auto out = at::zeros({x.size(0), x.size(1) + VW}, x.options().dtype(at::kFloat));
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

// Rows [i0, i0 + n) of a block: how many have a non-empty interval (they come first).
inline int count_real(const int32_t* lo, const int32_t* hi, int64_t i0, int64_t n) {
  int r = 0;
  while (r < n && lo[i0 + r] < hi[i0 + r]) ++r;
  return r;
}

std::vector<at::Tensor> prefixlm_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const c10::optional<at::Tensor>& gate, const at::Tensor& row_lo,
                                     const at::Tensor& row_hi, double scale, int64_t block) {
  check_inputs(q, k, v, row_lo, row_hi);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Dp = round_up(D, VW), ldk = T + VW;
  const Rows Q = rows_of(q, Dp), V = rows_of(v, Dp);
  const at::Tensor kt = pack_cols(k);
  at::Tensor gf;
  if (gate.has_value()) gf = at::sigmoid(gate->to(at::kFloat)).contiguous();
  auto out = at::zeros({T, H, D}, q.options().dtype(at::kFloat));
  auto lse = at::zeros({H, T}, q.options().dtype(at::kFloat));
  const int32_t* lo = row_lo.data_ptr<int32_t>();
  const int32_t* hi = row_hi.data_ptr<int32_t>();
  const float* Kt = kt.data_ptr<float>();
  const float* G = gf.defined() ? gf.data_ptr<float>() : nullptr;
  float *O = out.data_ptr<float>(), *L = lse.data_ptr<float>();
  const float mul = (float)scale * kLog2e;
  const int64_t nblk = (T + block - 1) / block, lds = ldk;

  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> S(MR * lds), acc(MR * Dp);
    for (int64_t item; (item = next++) < H * nblk;) {
      const int64_t h = item / nblk, r0 = item % nblk * block, r1 = std::min(r0 + block, T);
      for (int64_t i0 = r0; i0 < r1; i0 += MR) {
        const int n = count_real(lo, hi, i0, std::min<int64_t>(MR, r1 - i0));
        if (n == 0) break;  // padding rows stay zero
        const int64_t c0 = lo[i0], span = hi[i0 + n - 1] - c0;
        const float* a[MR];
        for (int m = 0; m < MR; ++m) a[m] = Q.row(i0 + std::min(m, n - 1), h);
        nt(a, Kt + h * D * ldk + c0, ldk, (int)D, span, S.data(), lds);
        float rmax[MR], rsum[MR];
        for (int m = 0; m < MR; ++m) {
          float* row = S.data() + m * lds;
          if (m < n) {
            const RowStats st = softmax_row(row, lo[i0 + m] - c0, hi[i0 + m] - c0, span, mul, nullptr);
            rmax[m] = st.max, rsum[m] = st.sum;
          } else {
            std::fill(row, row + round_up(span, VW), 0.0f);
          }
        }
        nn(S.data(), lds, V.row(c0, h), V.st, span, Dp, acc.data(), Dp);
        for (int m = 0; m < n; ++m) {
          const int64_t t = i0 + m;
          const float inv = 1.0f / rsum[m];
          float* o = O + (t * H + h) * D;
          const float* g = G ? G + (t * H + h) * D : nullptr;
          for (int64_t d = 0; d < D; ++d) o[d] = acc[m * Dp + d] * inv * (g ? g[d] : 1.0f);
          L[h * T + t] = (rmax[m] + std::log2(rsum[m])) * kLn2;
        }
      }
    }
  });
  return {out.to(q.scalar_type()), lse};
}

std::vector<at::Tensor> prefixlm_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const c10::optional<at::Tensor>& gate, const at::Tensor& row_lo,
                                     const at::Tensor& row_hi, const at::Tensor& col_lo, const at::Tensor& col_hi,
                                     double scale, int64_t block) {
  check_inputs(q, k, v, row_lo, row_hi);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Dp = round_up(D, VW), ldt = T + VW;
  const at::Tensor go = grad_out.to(at::kFloat), of = out.to(at::kFloat);
  at::Tensor dO = go, dgate;
  if (gate.has_value()) {
    const at::Tensor sg = at::sigmoid(gate->to(at::kFloat));
    dO = go * sg;
    dgate = (go * of * (1 - sg)).to(gate->scalar_type()).contiguous();
  } else {
    dgate = at::empty({0}, q.options());
  }
  const at::Tensor delta = pad_tokens((go * of).sum(-1).transpose(0, 1));  // [H, T + VW]
  const at::Tensor lse2 = pad_tokens(lse * kLog2e);                         // [H, T + VW]
  const Rows Q = rows_of(q, Dp), K = rows_of(k, Dp), V = rows_of(v, Dp), DO = rows_of(dO, Dp);
  const at::Tensor qt = pack_cols(q), dot = pack_cols(dO);
  auto dq = at::zeros({T, H, D}, q.options().dtype(at::kFloat));
  auto dk = at::zeros({T, H, D}, q.options().dtype(at::kFloat));
  auto dv = at::zeros({T, H, D}, q.options().dtype(at::kFloat));
  const int32_t *lo = row_lo.data_ptr<int32_t>(), *hi = row_hi.data_ptr<int32_t>();
  const int32_t *clo = col_lo.data_ptr<int32_t>(), *chi = col_hi.data_ptr<int32_t>();
  std::vector<int64_t> off(T + 1, 0);  // ds of row t lives at off[t] + (j - lo[t])
  for (int64_t t = 0; t < T; ++t) off[t + 1] = off[t] + (hi[t] - lo[t]);
  const int64_t nnz = off[T];
  std::unique_ptr<float[]> ds(new float[H * nnz]);  // every entry is written by pass 1
  const float *Qt = qt.data_ptr<float>(), *DOt = dot.data_ptr<float>();
  const float *Dl = delta.data_ptr<float>(), *L2 = lse2.data_ptr<float>();
  float *DQ = dq.data_ptr<float>(), *DK = dk.data_ptr<float>(), *DV = dv.data_ptr<float>();
  const float mul = (float)scale * kLog2e, fscale = (float)scale;
  const int64_t nblk = (T + block - 1) / block;

  // Pass 1, key-major: micro-blocks of MR keys against the queries that see them.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> P(MR * ldt), dS(MR * ldt), acc(MR * Dp);
    for (int64_t item; (item = next++) < H * nblk;) {
      const int64_t h = item / nblk, j0b = item % nblk * block, j1b = std::min(j0b + block, T);
      float* dsh = ds.get() + h * nnz;
      for (int64_t j0 = j0b; j0 < j1b; j0 += MR) {
        const int n = count_real(clo, chi, j0, std::min<int64_t>(MR, j1b - j0));
        if (n == 0) break;  // keys nobody sees (padding) keep zero gradients
        const int64_t c0 = clo[j0], span = chi[j0 + n - 1] - c0;
        const float *ka[MR], *va[MR];
        for (int m = 0; m < MR; ++m) {
          const int64_t j = j0 + std::min(m, n - 1);
          ka[m] = K.row(j, h), va[m] = V.row(j, h);
        }
        nt(ka, Qt + h * D * ldt + c0, ldt, (int)D, span, P.data(), ldt);    // s^T
        nt(va, DOt + h * D * ldt + c0, ldt, (int)D, span, dS.data(), ldt);  // dp^T
        const float* l2 = L2 + h * ldt + c0;
        const float* dl = Dl + h * ldt + c0;
        for (int m = 0; m < MR; ++m) {
          float* p = P.data() + m * ldt;
          float* s = dS.data() + m * ldt;
          if (m < n) softmax_row(p, clo[j0 + m] - c0, chi[j0 + m] - c0, span, mul, l2);
          else std::fill(p, p + round_up(span, VW), 0.0f);
          for (int64_t c = 0; c < span; c += VW) store(s + c, load(p + c) * (load(s + c) - load(dl + c)));
        }
        nn(P.data(), ldt, DO.row(c0, h), DO.st, span, Dp, acc.data(), Dp);
        for (int m = 0; m < n; ++m)
          std::copy(acc.data() + m * Dp, acc.data() + m * Dp + D, DV + ((j0 + m) * H + h) * D);
        nn(dS.data(), ldt, Q.row(c0, h), Q.st, span, Dp, acc.data(), Dp);
        for (int m = 0; m < n; ++m)
          for (int64_t d = 0; d < D; ++d) DK[((j0 + m) * H + h) * D + d] = acc[m * Dp + d] * fscale;
        // Row t sees keys [lo[t], hi[t]): of this micro-block, m in [lo[t] - j0, hi[t] - j0).
        for (int64_t t = c0; t < c0 + span; ++t) {
          const int64_t m0 = std::max<int64_t>(0, lo[t] - j0), m1 = std::min<int64_t>(n, hi[t] - j0);
          float* dst = dsh + off[t] + (j0 - lo[t]);
          for (int64_t m = m0; m < m1; ++m) dst[m] = dS[m * ldt + (t - c0)];
        }
      }
    }
  });

  // Pass 2, query-major: dq = scale * ds . k over each row's interval.
  next = 0;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> A(MR * ldt), acc(MR * Dp);
    for (int64_t item; (item = next++) < H * nblk;) {
      const int64_t h = item / nblk, r0 = item % nblk * block, r1 = std::min(r0 + block, T);
      const float* dsh = ds.get() + h * nnz;
      for (int64_t i0 = r0; i0 < r1; i0 += MR) {
        const int n = count_real(lo, hi, i0, std::min<int64_t>(MR, r1 - i0));
        if (n == 0) break;
        const int64_t c0 = lo[i0], span = hi[i0 + n - 1] - c0;
        for (int m = 0; m < MR; ++m) {
          float* row = A.data() + m * ldt;
          std::fill(row, row + span, 0.0f);
          if (m < n) std::copy(dsh + off[i0 + m], dsh + off[i0 + m + 1], row + (lo[i0 + m] - c0));
        }
        nn(A.data(), ldt, K.row(c0, h), K.st, span, Dp, acc.data(), Dp);
        for (int m = 0; m < n; ++m)
          for (int64_t d = 0; d < D; ++d) DQ[((i0 + m) * H + h) * D + d] = acc[m * Dp + d] * fscale;
      }
    }
  });
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), dgate};
}

}  // namespace

TORCH_LIBRARY(hrm_cpu, m) {
  m.def("prefixlm_fwd(Tensor q, Tensor k, Tensor v, Tensor? gate, Tensor row_lo, Tensor row_hi, float scale, "
        "int block) -> Tensor[]");
  m.def("prefixlm_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? gate, "
        "Tensor row_lo, Tensor row_hi, Tensor col_lo, Tensor col_hi, float scale, int block) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hrm_cpu, CPU, m) {
  m.impl("prefixlm_fwd", &prefixlm_fwd);
  m.impl("prefixlm_bwd", &prefixlm_bwd);
}
