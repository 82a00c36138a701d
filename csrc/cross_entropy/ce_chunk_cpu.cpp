// One chunk of the response-only cross-entropy on the CPU: per row of logits [C, V], the loss,
// the argmax and (with_grad) the gradient softmax - onehot written over the logits.
//
// Built at first use by hrm/ops/cpp_extension.py (-O3 -march=native -fopenmp); registers
// hrm_ce::ce_chunk and hrm_ce::accumulate. hrm/ops/impl/linear_cross_entropy.py calls ce_chunk
// for fp32 and bf16 logits (the head's dtype) from the chunk loop of the `cpu` backend, and
// accumulate to add each bf16 product of dW to its fp32 slab.
//
// A row of a 32K-152K vocabulary is 64-600 KB: it stays in the core's L2 while its passes run,
// so each row is read from memory once and written once, and the work is one exp per logit:
//   1. copy the row to fp32 scratch e; m = max, pred = the first index of m; x_t = e[target]
//   2. e = exp2((e - m) log2 e), s = sum e          (exp2v: |rel err| < 2e-7, 0 for -inf)
//   3. loss = m + ln s - x_t;  with_grad: logits = e / s - onehot(target), in the logits' dtype
//      (bf16 rounds to nearest even)
// Rows are split over the thread pool. Targets are checked (0 <= t < V) before anything is
// written. NaN logits give a NaN loss; their argmax is unspecified.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/cpu_vec.h"

namespace {

using namespace hrm_cpu;

// x[0, n) as fp32 into e (rounded up to VW: the tail is -inf, which exp2 takes to 0).
inline void to_float(const float* x, int64_t n, float* e) {
  std::copy(x, x + n, e);
  std::fill(e + n, e + round_up(n, VW), -INFINITY);
}

inline void to_float(const bf16* x, int64_t n, float* e) {
  int64_t j = 0;
#if defined(__AVX512BF16__)
  for (; j + VW <= n; j += VW) store(e + j, load_bf16(x + j, first(VW)));
#endif
  for (; j < n; ++j) e[j] = static_cast<float>(x[j]);
  std::fill(e + n, e + round_up(n, VW), -INFINITY);
}

// o[0, n) = e * inv, minus 1 at t, in o's dtype.
inline void store_grad(const float* e, float inv, int64_t n, int64_t t, float* o) {
  for (int64_t j = 0; j < n; ++j) o[j] = e[j] * inv;
  o[t] -= 1.0f;
}

inline void store_grad(const float* e, float inv, int64_t n, int64_t t, bf16* o) {
  int64_t j = 0;
#if defined(__AVX512BF16__)
  for (; j + VW <= n; j += VW) store_bf16(o + j, load(e + j) * inv);
#endif
  for (; j < n; ++j) o[j] = static_cast<bf16>(e[j] * inv);
  o[t] = static_cast<bf16>(e[t] * inv - 1.0f);
}

// The max of e[0, n) (n a multiple of VW): four independent chains, so that the loop runs at
// the loads' rate rather than at the max's latency.
inline float row_max(const float* e, int64_t n) {
  vec m0 = splat(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 * VW <= n; j += 4 * VW) {
    const vec a = load(e + j), b = load(e + j + VW), c = load(e + j + 2 * VW), d = load(e + j + 3 * VW);
    m0 = a > m0 ? a : m0;
    m1 = b > m1 ? b : m1;
    m2 = c > m2 ? c : m2;
    m3 = d > m3 ? d : m3;
  }
  for (; j < n; j += VW) {
    const vec a = load(e + j);
    m0 = a > m0 ? a : m0;
  }
  m0 = m1 > m0 ? m1 : m0;
  m2 = m3 > m2 ? m3 : m2;
  return hmax(m2 > m0 ? m2 : m0);
}

// The first index of m in e[0, n) (n a multiple of VW; m is there).
inline int64_t first_index(const float* e, int64_t n, float m) {
  for (int64_t j = 0; j < n; j += VW) {
#if defined(__AVX512F__)
    if (const __mmask16 hit = _mm512_cmpeq_ps_mask(_mm512_loadu_ps(e + j), _mm512_set1_ps(m)))
      return j + __builtin_ctz(hit);
#else
    for (int i = 0; i < VW; ++i)
      if (e[j + i] == m) return j + i;
#endif
  }
  return 0;  // NaN rows: unspecified
}

template <class E>
void rows(E* logits, const int64_t* targets, int64_t C, int64_t V, bool with_grad, float* loss, int64_t* pred) {
  const int64_t Vp = round_up(V, VW);
  at::parallel_for(0, C, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(Vp);
    float* e = scratch.data();
    for (int64_t r = r0; r < r1; ++r) {
      E* x = logits + r * V;
      const int64_t t = targets[r];
      to_float(x, V, e);
      const float m = row_max(e, Vp);
      const int64_t arg = first_index(e, Vp, m);
      const float xt = e[t];
      vec s0 = splat(0.0f), s1 = s0;
      int64_t j = 0;
      for (; j + 2 * VW <= Vp; j += 2 * VW) {  // two sum chains
        const vec p0 = exp2v((load(e + j) - m) * kLog2e), p1 = exp2v((load(e + j + VW) - m) * kLog2e);
        store(e + j, p0);
        store(e + j + VW, p1);
        s0 += p0;
        s1 += p1;
      }
      for (; j < Vp; j += VW) {
        const vec p = exp2v((load(e + j) - m) * kLog2e);
        store(e + j, p);
        s0 += p;
      }
      const float s = hsum(s0 + s1);
      loss[r] = m + std::log(s) - xt;
      pred[r] = arg;
      if (with_grad) store_grad(e, 1.0f / s, V, t, x);
    }
  });
}

std::vector<at::Tensor> ce_chunk(at::Tensor logits, const at::Tensor& targets, bool with_grad) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous(),
              "ce_chunk: contiguous CPU logits [C, V]");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "ce_chunk: fp32 or bf16 logits, got ", logits.scalar_type());
  const int64_t C = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "ce_chunk: an empty vocabulary");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == C,
              "ce_chunk: int64 targets [C]");
  const at::Tensor tg = targets.contiguous();
  const int64_t* tp = tg.data_ptr<int64_t>();
  for (int64_t r = 0; r < C; ++r)
    TORCH_CHECK(tp[r] >= 0 && tp[r] < V, "ce_chunk: target ", tp[r], " of row ", r, " is outside [0, ", V, ")");
  at::Tensor loss = at::empty({C}, logits.options().dtype(at::kFloat));
  at::Tensor pred = at::empty({C}, tg.options());
  if (logits.scalar_type() == at::kFloat)
    rows(logits.data_ptr<float>(), tp, C, V, with_grad, loss.data_ptr<float>(), pred.data_ptr<int64_t>());
  else
    rows(logits.data_ptr<bf16>(), tp, C, V, with_grad, loss.data_ptr<float>(), pred.data_ptr<int64_t>());
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
  m.def("ce_chunk(Tensor(a!) logits, Tensor targets, bool with_grad) -> Tensor[]");
  m.def("accumulate(Tensor(a!) out, Tensor part, bool overwrite) -> ()");
}

TORCH_LIBRARY_IMPL(hrm_ce, CPU, m) {
  m.impl("ce_chunk", &ce_chunk);
  m.impl("accumulate", &accumulate);
}
