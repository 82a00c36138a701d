// One Adam-atan2 step on one fp32 tensor, in place, in one pass over memory (the `cpu`
// backend of hrm/ops/impl/adam_atan2.py, which calls it per parameter):
//
//   g = s g                       (with a gradient scale s: gradient clipping's factor)
//   m = lerp(m, g, w1)            v = b2 v + w2 g^2
//   p = decay p - lr atan2(m / bc1, sqrt(v / bc2))
//   e = lerp(e, p, ema_w)         (with an EMA average e)
//
// with torch.lerp's formula (a + w (b - a) for w < 0.5, else b - (b - a)(1 - w)).
// atan2(y, x) for x >= 0 (x is a square root): t = min(|y|, x) / max(|y|, x) in [0, 1],
// Cephes' atanf on t (reduced to |u| <= tan(pi/8) around pi/4, a degree-9 odd polynomial;
// |err| about 1 ulp), then pi/2 - r where |y| > x, and y's sign. atan2(+-0, 0) = +-0, as
// torch's; NaN in gives NaN out.
//
// Also the global L2 norm of a list of fp32 tensors (the gradient clipping's norm): squares
// summed over fixed chunks of kNormChunk elements (fp32 lanes over kNormBlock elements, then
// fp64), the chunk sums added in order, so the result does not depend on the thread count.
//
// Built at first use by hrm/ops/cpp_extension.py (-O3 -march=native -fopenmp); registers
// hrm_opt::adam_atan2_step and hrm_opt::global_norm.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "../common/cpu_vec.h"

namespace {

using namespace hrm_cpu;

constexpr int64_t kGrain = 1 << 14;  // elements per work item at the least

inline vec vmin(vec a, vec b) { return a < b ? a : b; }
inline vec vmax(vec a, vec b) { return a > b ? a : b; }
inline vec vabs(vec a) { return a < 0.0f ? -a : a; }
inline vec copysign_of(vec r, vec y) {  // |r| with y's sign bit
  ivec ri, yi;
  __builtin_memcpy(&ri, &r, sizeof(vec));
  __builtin_memcpy(&yi, &y, sizeof(vec));
  ri = (ri & 0x7fffffff) | (yi & (int32_t)0x80000000);
  __builtin_memcpy(&r, &ri, sizeof(vec));
  return r;
}

// atan2(y, x) for x >= 0 (or NaN).
inline vec atan2_nonneg_x(vec y, vec x) {
  const vec a = vabs(y);
  const vec hi = vmax(a, x), lo = vmin(a, x);
  vec t = lo / hi;                          // 0/0 = NaN where both are 0
  t = (hi == 0.0f) ? splat(0.0f) : t;       // atan2(+-0, 0) = +-0
  t = (a != a) | (x != x) ? a + x : t;      // NaN stays NaN (min/max would drop it)
  const auto big = t > 0.41421356237309503f;  // tan(pi/8)
  const vec u = big ? (t - 1.0f) / (t + 1.0f) : t;
  const vec z = u * u;
  vec p = splat(8.05374449538e-2f);
  p = p * z - 1.38776856032e-1f;
  p = p * z + 1.99777106478e-1f;
  p = p * z - 3.33329491539e-1f;
  vec r = p * z * u + u + (big ? splat(0.78539816339744831f) : splat(0.0f));
  r = a > x ? 1.5707963267948966f - r : r;
  return copysign_of(r, y);
}

inline vec vsqrt(vec x) {
#if defined(__AVX512F__)
  return (vec)_mm512_sqrt_ps((__m512)x);
#else
  for (int i = 0; i < VW; ++i) x[i] = std::sqrt(x[i]);
  return x;
#endif
}

inline vec lerp(vec a, vec b, float w) {
  return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

void check(const at::Tensor& t, const at::Tensor& p, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == p.numel(),
              "adam_atan2_step: ", name, " must be a contiguous fp32 CPU tensor of the parameter's size");
}

// scalars: [1 - b1, b2, 1 - b2, 1 - lr wd, lr, 1 - b1^t, 1 - b2^t] (+ [ema_w] with an EMA);
// grad_scale: a one-element fp32 CPU tensor (the gradient is read as grad_scale * g) or none.
void adam_atan2_step(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                     const std::optional<at::Tensor>& e, const std::optional<at::Tensor>& grad_scale,
                     at::ArrayRef<double> scalars) {
  check(p, p, "the parameter");
  check(g, p, "the gradient");
  check(m, p, "exp_avg");
  check(v, p, "exp_avg_sq");
  if (e) check(*e, p, "the EMA average");
  TORCH_CHECK(!grad_scale || (grad_scale->device().is_cpu() && grad_scale->scalar_type() == at::kFloat &&
                              grad_scale->numel() == 1),
              "adam_atan2_step: grad_scale must be a one-element fp32 CPU tensor");
  const float gs = grad_scale ? *grad_scale->data_ptr<float>() : 1.0f;  // g * 1 is g, bit for bit
  TORCH_CHECK(scalars.size() == (e ? 8u : 7u), "adam_atan2_step: expected ", e ? 8 : 7, " scalars, got ",
              scalars.size());
  const float w1 = scalars[0], b2 = scalars[1], w2 = scalars[2], decay = scalars[3], lr = scalars[4];
  const float bc1 = scalars[5], bc2 = scalars[6], ema_w = e ? scalars[7] : 0.0f;
  float* pp = p.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  float* ep = e ? e->data_ptr<float>() : nullptr;
  at::parallel_for(0, p.numel(), kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i += VW) {
      const int64_t n = std::min<int64_t>(VW, i1 - i);
      const vec gv = load_n(gp + i, n) * gs;
      const vec mv = lerp(load_n(mp + i, n), gv, w1);
      const vec vv = load_n(vp + i, n) * b2 + w2 * gv * gv;
      const vec pv = load_n(pp + i, n) * decay - lr * atan2_nonneg_x(mv / bc1, vsqrt(vv / bc2));
      store_n(mp + i, mv, n);
      store_n(vp + i, vv, n);
      store_n(pp + i, pv, n);
      if (ep) store_n(ep + i, lerp(load_n(ep + i, n), pv, ema_w), n);
    }
  });
}

constexpr int64_t kNormBlock = 16 * VW;  // elements summed in fp32 lanes before going to fp64
constexpr int64_t kNormChunk = 1 << 16;  // elements per work item (and per partial sum)

// sqrt(sum of x^2 over every element of xs), fp32 0-d, each x a contiguous fp32 CPU tensor.
at::Tensor global_norm(at::TensorList xs) {
  std::vector<int64_t> first{0};  // the first chunk of each tensor
  for (const at::Tensor& x : xs) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
                "global_norm: every tensor must be a contiguous fp32 CPU tensor");
    first.push_back(first.back() + (x.numel() + kNormChunk - 1) / kNormChunk);
  }
  std::vector<double> part(first.back(), 0.0);
  at::parallel_for(0, first.back(), 1, [&](int64_t c0, int64_t c1) {
    size_t i = std::upper_bound(first.begin(), first.end(), c0) - first.begin() - 1;
    for (int64_t c = c0; c < c1; ++c) {
      while (first[i + 1] <= c) ++i;
      const float* x = xs[i].data_ptr<float>();
      const int64_t begin = (c - first[i]) * kNormChunk, end = std::min(begin + kNormChunk, xs[i].numel());
      double sum = 0.0;
      for (int64_t b = begin; b < end; b += kNormBlock) {
        vec acc = splat(0.0f);
        for (int64_t j = b; j < std::min(b + kNormBlock, end); j += VW) {
          const vec v = load_n(x + j, std::min<int64_t>(VW, end - j));
          acc += v * v;
        }
        for (int l = 0; l < VW; ++l) sum += acc[l];
      }
      part[c] = sum;
    }
  });
  double total = 0.0;
  for (const double p : part) total += p;
  return at::scalar_tensor(std::sqrt(total), at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY(hrm_opt, m) {
  m.def("adam_atan2_step(Tensor(a!) p, Tensor g, Tensor(b!) m, Tensor(c!) v, Tensor(d!)? e, Tensor? grad_scale, "
        "float[] scalars) -> ()");
  m.def("global_norm(Tensor[] xs) -> Tensor", &global_norm);
}

TORCH_LIBRARY_IMPL(hrm_opt, CPU, m) { m.impl("adam_atan2_step", &adam_atan2_step); }
