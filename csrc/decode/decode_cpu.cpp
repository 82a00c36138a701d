// Decode attention for the `cpu` backend: one new query per (sequence, head) against its
// KV cache.
//
// Built at first use by hrm/ops/cpp_extension.py through torch.utils.cpp_extension
// (-O3 -march=native -fopenmp); registers hrm_decode::decode_attention. In a decode step the
// new key and value of sequence b are written into the cache at pos[b] (in place), then its
// query attends to cache positions 0..pos[b] (the prompt's keys and every generated one):
//     s_j = scale * q . k_j,  p = softmax(s),  out = g * sum_j p_j v_j
// where g = sigmoid(gate) comes in computed (hrm/ops/impl/decode_attention.py; under
// torch.compile inductor fuses it with the ops that make the gate).
// One work item per (b, h); only the pos[b] + 1 visible positions are read, where the
// reference (hrm/ops/impl/decode_attention.py) masks the whole cache length to keep one
// shape per step. Storage is fp32 or bf16 (q, k, v, g and both caches of one dtype, the
// output too); the arithmetic is fp32 on vectors of csrc/common/cpu_vec.h: the scores, the
// exponentials (exp2 of log2e-scaled scores) and the weighted sum of the values. A step
// streams the visible cache from memory once, so bf16 caches halve its traffic.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/cpu_vec.h"

namespace {

using namespace hrm_cpu;

constexpr int64_t kMaxHeadDim = 256;

// Lanes [c * VW, c * VW + VW) of a row of D, zero past D (a whole vector of zeros when the
// chunk starts past D); FULL: D is a multiple of VW and c < D / VW, so no lane is masked.
template <bool FULL, typename T>
inline vec chunk(const T* row, int64_t c, int64_t D) {
  if constexpr (FULL) return load_n(row + c * VW, VW);
  const int64_t w = std::min<int64_t>(VW, D - c * VW);
  return w > 0 ? load_n(row + c * VW, w) : splat(0.0f);
}

// Strides (elements) of a [B, H, D] tensor whose last dimension is dense.
struct Rows {
  const void* p;
  int64_t sb, sh;
};

// NC vectors hold a head (NC * VW >= D, the lanes past D zero): the query and the
// accumulator of the values stay in registers across the keys. FULL: D == NC * VW.
template <typename T, int NC, bool FULL>
void attend(const Rows& q, const Rows& kn, const Rows& vn, const Rows& g, T* kc, T* vc, T* out, const int64_t* pos,
            int64_t B, int64_t H, int64_t S, int64_t D) {
  const float scale2 = kLog2e / std::sqrt(static_cast<float>(D));  // softmax in base 2
  at::parallel_for(0, B * H, 4, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(round_up(S, VW));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, n = pos[b] + 1;
      auto row = [&](const Rows& r) { return static_cast<const T*>(r.p) + b * r.sb + h * r.sh; };
      T* kb = kc + i * S * D;
      T* vb = vc + i * S * D;
      std::copy(row(kn), row(kn) + D, kb + (n - 1) * D);
      std::copy(row(vn), row(vn) + D, vb + (n - 1) * D);
      vec qv[NC], acc[NC];
      for (int c = 0; c < NC; ++c) qv[c] = chunk<FULL>(row(q), c, D) * scale2;
      float m = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        const T* kj = kb + j * D;
        vec dot = qv[0] * chunk<FULL>(kj, 0, D);
        for (int c = 1; c < NC; ++c) dot += qv[c] * chunk<FULL>(kj, c, D);
        s[j] = hsum_tree(dot);
        m = std::max(m, s[j]);
      }
      vec vl = splat(0.0f);
      for (int64_t j = 0; j < n; j += VW) {
        const int64_t w = std::min<int64_t>(VW, n - j);
        const vec e = iota() < static_cast<int32_t>(w) ? exp2v(load(s.data() + j) - m) : splat(0.0f);
        store(s.data() + j, e);  // s has room for whole vectors; lanes past n are 0
        vl += e;
      }
      for (int c = 0; c < NC; ++c) acc[c] = splat(0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const T* vj = vb + j * D;
        const vec pj = splat(s[j]);
        for (int c = 0; c < NC; ++c) acc[c] += pj * chunk<FULL>(vj, c, D);
      }
      const float inv_l = 1.0f / hsum(vl);
      T* o = out + i * D;
      for (int c = 0; c < NC && c * VW < D; ++c)
        store_n(o + c * VW, acc[c] * inv_l * chunk<FULL>(row(g), c, D), std::min<int64_t>(VW, D - c * VW));
    }
  });
}

// attend with the smallest power-of-two NC that holds D.
template <typename T, int NC = 1>
void dispatch(const Rows& q, const Rows& kn, const Rows& vn, const Rows& g, T* kc, T* vc, T* out,
              const int64_t* pos, int64_t B, int64_t H, int64_t S, int64_t D) {
  if constexpr (NC * VW < kMaxHeadDim) {
    if (D > NC * VW) return dispatch<T, 2 * NC>(q, kn, vn, g, kc, vc, out, pos, B, H, S, D);
  }
  if (D == NC * VW) return attend<T, NC, true>(q, kn, vn, g, kc, vc, out, pos, B, H, S, D);
  attend<T, NC, false>(q, kn, vn, g, kc, vc, out, pos, B, H, S, D);
}

// q, k_new, v_new, g (the sigmoid of the gate): [B, H, D], any strides but a dense last
// dimension; k_cache, v_cache: [B, H, S, D] contiguous, written at pos[b]; pos: [B] int64.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_new_in, const at::Tensor& v_new_in,
                            const at::Tensor& g_in, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& pos_in) {
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4, "decode_attention: q [B, H, D] and a cache [B, H, S, D]");
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(2), S = k_cache.size(2);
  for (const auto* t : {&k_new_in, &v_new_in, &g_in})
    TORCH_CHECK(t->sizes() == q_in.sizes(), "decode_attention: q, k, v and g must have the same shape");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == B && k_cache.size(1) == H &&
                  k_cache.size(3) == D,
              "decode_attention: caches of shape [B, H, S, D] = [", B, ", ", H, ", S, ", D, "], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: contiguous caches only");
  TORCH_CHECK(D <= kMaxHeadDim, "decode_attention: head dim ", D, " > ", kMaxHeadDim);
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode_attention: fp32 or bf16 only");
  for (const at::Tensor* t : {&q_in, &k_new_in, &v_new_in, &g_in, static_cast<const at::Tensor*>(&v_cache)})
    TORCH_CHECK(t->scalar_type() == dtype, "decode_attention: q, k, v, g and the caches must share one dtype");
  TORCH_CHECK(pos_in.dim() == 1 && pos_in.size(0) == B && pos_in.scalar_type() == at::kLong,
              "decode_attention: pos must be int64 [B]");
  const at::Tensor pos = pos_in.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pp[b] >= 0 && pp[b] < S, "decode_attention: position ", pp[b], " of sequence ", b,
                " is outside the cache (", S, " positions)");
  at::Tensor out = at::empty({B, H, D}, q_in.options());
  if (out.numel() == 0) return out;
  std::vector<at::Tensor> keep;  // dense copies of inputs whose last dimension is strided
  keep.reserve(4);
  auto rows = [&](const at::Tensor& t) {
    const at::Tensor& d = t.stride(2) == 1 ? t : keep.emplace_back(t.contiguous());
    return Rows{d.data_ptr(), d.stride(0), d.stride(1)};
  };
  const Rows q = rows(q_in), kn = rows(k_new_in), vn = rows(v_new_in), g = rows(g_in);
  if (dtype == at::kFloat)
    dispatch<float>(q, kn, vn, g, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), out.data_ptr<float>(), pp,
                    B, H, S, D);
  else
    dispatch<bf16>(q, kn, vn, g, k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(),
                   out.data_ptr<at::BFloat16>(), pp, B, H, S, D);
  return out;
}

}  // namespace

TORCH_LIBRARY(hrm_decode, m) {
  m.def("decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor g, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor pos) -> Tensor");
}

TORCH_LIBRARY_IMPL(hrm_decode, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
