// Decode attention for the `cpu` backend: one new query per (sequence, head) against its
// KV cache.
//
// Built at first use by hrm/ops/cpp_extension.py through torch.utils.cpp_extension
// (-O3 -march=native -fopenmp); registers hrm_decode::decode_attention. In a decode step the
// new key and value of sequence b are written into the cache at pos[b] (in place), then its
// query attends to cache positions 0..pos[b] (the prompt's keys and every generated one):
//     s_j = scale * q . k_j,  p = softmax(s) (fp32),  out = g * sum_j p_j v_j
// where g = sigmoid(gate) comes in computed (hrm/ops/impl/decode_attention.py; under
// torch.compile inductor fuses it with the ops that make the gate).
// One work item per (b, h); only the pos[b] + 1 visible positions are read, where the
// reference (hrm/ops/impl/decode_attention.py) masks the whole cache length to keep one
// shape per step. The dot products keep 8 partial sums so that -O3 vectorizes them without
// reassociating (no -ffast-math).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t LANES = 8;

float dot(const float* a, const float* b, int64_t n) {
  float part[LANES] = {};
  int64_t d = 0;
  for (; d + LANES <= n; d += LANES)
    for (int64_t l = 0; l < LANES; ++l) part[l] += a[d + l] * b[d + l];
  for (; d < n; ++d) part[0] += a[d] * b[d];
  float s = 0.0f;
  for (int64_t l = 0; l < LANES; ++l) s += part[l];
  return s;
}

// q, k_new, v_new, g (the sigmoid of the gate): [B, H, D]; k_cache, v_cache: [B, H, S, D],
// written at pos[b]; pos: [B] int64.
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
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat &&
                  q_in.scalar_type() == at::kFloat,
              "decode_attention: fp32 only");
  TORCH_CHECK(pos_in.dim() == 1 && pos_in.size(0) == B && pos_in.scalar_type() == at::kLong,
              "decode_attention: pos must be int64 [B]");
  const at::Tensor q = q_in.contiguous(), kn = k_new_in.contiguous().to(at::kFloat),
                   vn = v_new_in.contiguous().to(at::kFloat), g = g_in.contiguous().to(at::kFloat),
                   pos = pos_in.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pp[b] >= 0 && pp[b] < S, "decode_attention: position ", pp[b], " of sequence ", b,
                " is outside the cache (", S, " positions)");
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float *qp = q.data_ptr<float>(), *knp = kn.data_ptr<float>(), *vnp = vn.data_ptr<float>(),
              *gp = g.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>(), *op = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * H, 8, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(S);
    std::vector<float> acc(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, n = pp[b] + 1;
      float* kb = kc + i * S * D;
      float* vb = vc + i * S * D;
      std::copy(knp + i * D, knp + (i + 1) * D, kb + (n - 1) * D);
      std::copy(vnp + i * D, vnp + (i + 1) * D, vb + (n - 1) * D);
      const float* qi = qp + i * D;
      float m = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = dot(qi, kb + j * D, D) * scale;
        m = std::max(m, p[j]);
      }
      float l = 0.0f;
      for (int64_t j = 0; j < n; ++j) l += (p[j] = std::exp(p[j] - m));
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < D; ++d) acc[d] += p[j] * vb[j * D + d];
      const float* gi = gp + i * D;
      const float inv_l = 1.0f / l;
      for (int64_t d = 0; d < D; ++d) op[i * D + d] = acc[d] * inv_l * gi[d];
    }
  });
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
