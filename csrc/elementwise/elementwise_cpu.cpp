// Memory-bound activations of the `cpu` backend, one pass over memory each: the SwiGLU
// (forward and backward), the split of the fused [gate | q | k | v] projection with RoPE on
// q and k (forward and backward), and the scaled embedding lookup and its table's gradient.
//
// Built at first use by hrm/ops/cpp_extension.py (-O3 -march=native -fopenmp); registers
// hrm_ew::swiglu_fwd, swiglu_bwd, split_rope_fwd, split_rope_bwd, embedding_fwd, embedding_bwd.
// hrm/ops/impl/swiglu.py, split_rope.py and embedding.py call them for fp32 and bf16 tensors
// on a CPU.
//
// Math in fp32, stored in the input's dtype (bf16 rounds to nearest even), as the compile
// backend's graphs compute it:
//   SwiGLU, gate_up = [g | u], s = sigmoid(g):  y = g s u
//                                               dg = dy u s (1 + g (1 - s)),  du = dy g s
//   RoPE on a head x = [x1 | x2], cos/sin [T, hd] fp32:
//     forward   y = x cos + rotate_half(x) sin,          rotate_half(x) = [-x2 | x1]
//     backward dx = dy cos - rotate_half(dy sin)       = [dy1 c1 + dy2 s2 | dy2 c2 - dy1 s1]
// Rows (tokens) are split over the thread pool; every row is independent, so results do not
// depend on the thread count. sigmoid uses exp2 (|rel err| < 1e-6 on AVX512, 2e-7 elsewhere).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/cpu_vec.h"

namespace {

using namespace hrm_cpu;

constexpr int64_t kGrain = 64;  // rows per work item at the least

inline vec sig(vec x) {
#if defined(__AVX512BF16__)
  return sigmoid(x);
#else
  return 1.0f / (1.0f + exp2v(x * -kLog2e));
#endif
}

template <typename E>
void swiglu_fwd_rows(const E* gu, E* y, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const E* g = gu + r * 2 * I;
      const E* u = g + I;
      E* o = y + r * I;
      for (int64_t j = 0; j < I; j += VW) {
        const int64_t n = std::min<int64_t>(VW, I - j);
        const vec gv = load_n(g + j, n);
        store_n(o + j, gv * sig(gv) * load_n(u + j, n), n);
      }
    }
  });
}

template <typename E>
void swiglu_bwd_rows(const E* gu, const E* dy, E* dgu, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const E* g = gu + r * 2 * I;
      const E* u = g + I;
      const E* d = dy + r * I;
      E* dg = dgu + r * 2 * I;
      E* du = dg + I;
      for (int64_t j = 0; j < I; j += VW) {
        const int64_t n = std::min<int64_t>(VW, I - j);
        const vec gv = load_n(g + j, n), uv = load_n(u + j, n), dv = load_n(d + j, n);
        const vec s = sig(gv);
        store_n(dg + j, dv * uv * s * (1.0f + gv * (1.0f - s)), n);
        store_n(du + j, dv * gv * s, n);
      }
    }
  });
}

// One head of one token: y = x c + rotate_half(x) s (adjoint = false), or the adjoint
// dx = dy c - rotate_half(dy s) (adjoint = true, which reads s at the other half).
template <bool adjoint, typename E>
inline void rope_head(const E* x, E* y, const float* c, const float* s, int64_t hd) {
  const int64_t h = hd / 2;
  for (int64_t j = 0; j < h; j += VW) {
    const int64_t n = std::min<int64_t>(VW, h - j);
    const vec x1 = load_n(x + j, n), x2 = load_n(x + h + j, n);
    const vec c1 = load_n(c + j, n), c2 = load_n(c + h + j, n);
    const vec s1 = load_n(s + j, n), s2 = load_n(s + h + j, n);
    if (adjoint) {
      store_n(y + j, x1 * c1 + x2 * s2, n);
      store_n(y + h + j, x2 * c2 - x1 * s1, n);
    } else {
      store_n(y + j, x1 * c1 - x2 * s1, n);
      store_n(y + h + j, x2 * c2 + x1 * s2, n);
    }
  }
}

void check_swiglu(const at::Tensor& gu) {
  TORCH_CHECK(gu.device().is_cpu() && gu.dim() == 2 && gu.is_contiguous(),
              "swiglu: gate_up must be a contiguous 2-d CPU tensor");
  TORCH_CHECK(gu.size(1) % 2 == 0, "swiglu: gate_up's width must be even, got ", gu.size(1));
  TORCH_CHECK(gu.scalar_type() == at::kFloat || gu.scalar_type() == at::kBFloat16, "swiglu: fp32 or bf16, got ",
              gu.scalar_type());
}

at::Tensor swiglu_fwd(const at::Tensor& gu) {
  check_swiglu(gu);
  const int64_t rows = gu.size(0), I = gu.size(1) / 2;
  at::Tensor y = at::empty({rows, I}, gu.options());
  if (gu.scalar_type() == at::kFloat)
    swiglu_fwd_rows(gu.data_ptr<float>(), y.data_ptr<float>(), rows, I);
  else
    swiglu_fwd_rows(gu.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), rows, I);
  return y;
}

at::Tensor swiglu_bwd(const at::Tensor& gu, const at::Tensor& dy_in) {
  check_swiglu(gu);
  const int64_t rows = gu.size(0), I = gu.size(1) / 2;
  TORCH_CHECK(dy_in.sizes() == at::IntArrayRef({rows, I}), "swiglu_bwd: dy must be [", rows, ", ", I, "]");
  const at::Tensor dy = dy_in.to(gu.scalar_type()).contiguous();
  at::Tensor dgu = at::empty_like(gu);
  if (gu.scalar_type() == at::kFloat)
    swiglu_bwd_rows(gu.data_ptr<float>(), dy.data_ptr<float>(), dgu.data_ptr<float>(), rows, I);
  else
    swiglu_bwd_rows(gu.data_ptr<at::BFloat16>(), dy.data_ptr<at::BFloat16>(), dgu.data_ptr<at::BFloat16>(), rows,
                    I);
  return dgu;
}

void check_rope(const at::Tensor& cos, const at::Tensor& sin, int64_t T, int64_t hd) {
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->sizes() == at::IntArrayRef({T, hd}),
                "split_rope: cos and sin must be contiguous fp32 [", T, ", ", hd, "]");
  TORCH_CHECK(hd % 2 == 0, "split_rope: the head dim must be even, got ", hd);
}

// gqkv [T, 4 nh, hd] = [gate | q | k | v] -> (gate, rope(q), rope(k), v), each [T, nh, hd].
template <typename E>
void split_rope_fwd_rows(const E* x, E* const* out, const float* cos, const float* sin, int64_t T, int64_t nh,
                         int64_t hd) {
  const int64_t w = nh * hd;
  at::parallel_for(0, T, kGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const E* row = x + t * 4 * w;
      const float* c = cos + t * hd;
      const float* s = sin + t * hd;
      std::copy(row, row + w, out[0] + t * w);
      for (int64_t p = 1; p < 3; ++p)
        for (int64_t i = 0; i < nh; ++i) rope_head<false>(row + p * w + i * hd, out[p] + t * w + i * hd, c, s, hd);
      std::copy(row + 3 * w, row + 4 * w, out[3] + t * w);
    }
  });
}

// The adjoint: (dgate, dq, dk, dv) -> dgqkv [T, 4 nh, hd].
template <typename E>
void split_rope_bwd_rows(const E* const* d, E* dx, const float* cos, const float* sin, int64_t T, int64_t nh,
                         int64_t hd) {
  const int64_t w = nh * hd;
  at::parallel_for(0, T, kGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      E* row = dx + t * 4 * w;
      const float* c = cos + t * hd;
      const float* s = sin + t * hd;
      std::copy(d[0] + t * w, d[0] + (t + 1) * w, row);
      for (int64_t p = 1; p < 3; ++p)
        for (int64_t i = 0; i < nh; ++i) rope_head<true>(d[p] + t * w + i * hd, row + p * w + i * hd, c, s, hd);
      std::copy(d[3] + t * w, d[3] + (t + 1) * w, row + 3 * w);
    }
  });
}

std::vector<at::Tensor> split_rope_fwd(const at::Tensor& gqkv, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(gqkv.device().is_cpu() && gqkv.dim() == 3 && gqkv.is_contiguous() && gqkv.size(1) % 4 == 0,
              "split_rope: gqkv must be a contiguous CPU [T, 4 * heads, head_dim] tensor");
  TORCH_CHECK(gqkv.scalar_type() == at::kFloat || gqkv.scalar_type() == at::kBFloat16,
              "split_rope: fp32 or bf16, got ", gqkv.scalar_type());
  const int64_t T = gqkv.size(0), nh = gqkv.size(1) / 4, hd = gqkv.size(2);
  check_rope(cos, sin, T, hd);
  std::vector<at::Tensor> outs;
  for (int i = 0; i < 4; ++i) outs.push_back(at::empty({T, nh, hd}, gqkv.options()));
  if (gqkv.scalar_type() == at::kFloat) {
    float* o[4] = {outs[0].data_ptr<float>(), outs[1].data_ptr<float>(), outs[2].data_ptr<float>(),
                   outs[3].data_ptr<float>()};
    split_rope_fwd_rows(gqkv.data_ptr<float>(), o, cos.data_ptr<float>(), sin.data_ptr<float>(), T, nh, hd);
  } else {
    bf16* o[4] = {outs[0].data_ptr<bf16>(), outs[1].data_ptr<bf16>(), outs[2].data_ptr<bf16>(),
                  outs[3].data_ptr<bf16>()};
    split_rope_fwd_rows(gqkv.data_ptr<bf16>(), o, cos.data_ptr<float>(), sin.data_ptr<float>(), T, nh, hd);
  }
  return outs;
}

at::Tensor split_rope_bwd(const at::Tensor& dgate, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                          const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(dq.device().is_cpu() && dq.dim() == 3, "split_rope_bwd: the gradients must be CPU [T, heads, head_dim]");
  TORCH_CHECK(dq.scalar_type() == at::kFloat || dq.scalar_type() == at::kBFloat16,
              "split_rope_bwd: fp32 or bf16, got ", dq.scalar_type());
  const int64_t T = dq.size(0), nh = dq.size(1), hd = dq.size(2);
  check_rope(cos, sin, T, hd);
  const auto as_dq = [&](const at::Tensor& t) { return t.to(dq.scalar_type()).contiguous(); };
  const at::Tensor g[4] = {as_dq(dgate), as_dq(dq), as_dq(dk), as_dq(dv)};
  for (const at::Tensor& t : g)
    TORCH_CHECK(t.sizes() == dq.sizes(), "split_rope_bwd: the four gradients must have one shape");
  at::Tensor dx = at::empty({T, 4 * nh, hd}, dq.options());
  if (dq.scalar_type() == at::kFloat) {
    const float* d[4] = {g[0].data_ptr<float>(), g[1].data_ptr<float>(), g[2].data_ptr<float>(),
                         g[3].data_ptr<float>()};
    split_rope_bwd_rows(d, dx.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), T, nh, hd);
  } else {
    const bf16* d[4] = {g[0].data_ptr<bf16>(), g[1].data_ptr<bf16>(), g[2].data_ptr<bf16>(), g[3].data_ptr<bf16>()};
    split_rope_bwd_rows(d, dx.data_ptr<bf16>(), cos.data_ptr<float>(), sin.data_ptr<float>(), T, nh, hd);
  }
  return dx;
}

void check_ids(const int64_t* ids, int64_t T, int64_t num_rows, const char* op) {
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(ids[t] >= 0 && ids[t] < num_rows, op, ": id ", ids[t], " of token ", t, " is outside [0, ", num_rows,
                ")");
}

// The scaled lookup out_t = scale * W[ids_t] in one pass (a gather, then a multiply, made
// two): the product in fp32, stored in W's dtype (bf16 rounds to nearest even), as
// `F.embedding(ids, W) * scale` computes it.
template <typename E>
void embedding_fwd_rows(const int64_t* ids, const E* w, E* out, int64_t T, int64_t d, float scale) {
  at::parallel_for(0, T, kGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const E* src = w + ids[t] * d;
      E* o = out + t * d;
      for (int64_t j = 0; j < d; j += VW) {
        const int64_t n = std::min<int64_t>(VW, d - j);
        store_n(o + j, load_n(src + j, n) * scale, n);
      }
    }
  });
}

at::Tensor embedding_fwd(const at::Tensor& ids_in, const at::Tensor& weight_in, double scale) {
  TORCH_CHECK(ids_in.device().is_cpu() && weight_in.device().is_cpu(), "embedding_fwd: CPU tensors");
  TORCH_CHECK(weight_in.dim() == 2, "embedding_fwd: the table must be [V, d], got ", weight_in.sizes());
  TORCH_CHECK(weight_in.scalar_type() == at::kFloat || weight_in.scalar_type() == at::kBFloat16,
              "embedding_fwd: an fp32 or bf16 table, got ", weight_in.scalar_type());
  const at::Tensor ids = ids_in.to(at::kLong).contiguous().view(-1), weight = weight_in.contiguous();
  const int64_t T = ids.numel(), V = weight.size(0), d = weight.size(1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  check_ids(ip, T, V, "embedding_fwd");
  std::vector<int64_t> shape(ids_in.sizes().begin(), ids_in.sizes().end());
  shape.push_back(d);
  at::Tensor out = at::empty(shape, weight.options());
  if (weight.scalar_type() == at::kFloat)
    embedding_fwd_rows(ip, weight.data_ptr<float>(), out.data_ptr<float>(), T, d, (float)scale);
  else
    embedding_fwd_rows(ip, weight.data_ptr<bf16>(), out.data_ptr<bf16>(), T, d, (float)scale);
  return out;
}

// The embedding table's gradient dW [V, d] (fp32) of out_t = scale * W[ids_t]:
//     dW_i = sum over t with ids_t = i, in token order, of scale * grad_t   (0 for the others)
// written once, row by row, instead of zeros plus an index_add_ (a pass of W's size fewer;
// the rows no token reads, nearly all of a large vocabulary, are zero-filled with streaming
// stores, which skip reading the lines first). The tokens are bucketed by id first (a
// counting sort, in order), so each row sums its tokens in token order: the result does not
// depend on the thread count.
template <typename E>
void embedding_bwd_rows(const int64_t* ids, const E* grad, float* dw, int64_t T, int64_t V, int64_t d, float scale) {
  std::vector<int64_t> start(V + 1, 0), order(T);
  for (int64_t t = 0; t < T; ++t) ++start[ids[t] + 1];
  for (int64_t i = 0; i < V; ++i) start[i + 1] += start[i];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t) order[fill[ids[t]]++] = t;
  }
  at::parallel_for(0, V, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* o = dw + i * d;
      int64_t j = 0;
      if (start[i] == start[i + 1]) {
#if defined(__AVX512F__)
        if (reinterpret_cast<uintptr_t>(o) % 64 == 0)
          for (; j + VW <= d; j += VW) _mm512_stream_ps(o + j, _mm512_setzero_ps());
#elif defined(__AVX2__)
        if (reinterpret_cast<uintptr_t>(o) % 32 == 0)
          for (; j + VW <= d; j += VW) _mm256_stream_ps(o + j, _mm256_setzero_ps());
#endif
        std::fill(o + j, o + d, 0.0f);
        continue;
      }
      for (; j < d; j += VW) {
        const int64_t n = std::min<int64_t>(VW, d - j);
        vec acc = splat(0.0f);
        for (int64_t k = start[i]; k < start[i + 1]; ++k) acc += load_n(grad + order[k] * d + j, n) * scale;
        store_n(o + j, acc, n);
      }
    }
  });
#if defined(__AVX512F__) || defined(__AVX2__)
  _mm_sfence();  // the streaming stores are visible before the op returns
#endif
}

at::Tensor embedding_bwd(const at::Tensor& ids_in, const at::Tensor& grad_in, int64_t num_rows, double scale) {
  TORCH_CHECK(ids_in.device().is_cpu() && grad_in.device().is_cpu(), "embedding_bwd: CPU tensors");
  TORCH_CHECK(grad_in.dim() == 2 && ids_in.numel() == grad_in.size(0),
              "embedding_bwd: grad must be [T, d] for T ids, got ", grad_in.sizes(), " for ", ids_in.numel());
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat || grad_in.scalar_type() == at::kBFloat16,
              "embedding_bwd: fp32 or bf16 gradients, got ", grad_in.scalar_type());
  const at::Tensor ids = ids_in.to(at::kLong).contiguous().view(-1), grad = grad_in.contiguous();
  const int64_t T = grad.size(0), d = grad.size(1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  check_ids(ip, T, num_rows, "embedding_bwd");
  at::Tensor dw = at::empty({num_rows, d}, grad.options().dtype(at::kFloat));
  if (grad.scalar_type() == at::kFloat)
    embedding_bwd_rows(ip, grad.data_ptr<float>(), dw.data_ptr<float>(), T, num_rows, d, (float)scale);
  else
    embedding_bwd_rows(ip, grad.data_ptr<bf16>(), dw.data_ptr<float>(), T, num_rows, d, (float)scale);
  return dw;
}

}  // namespace

TORCH_LIBRARY(hrm_ew, m) {
  m.def("swiglu_fwd(Tensor gate_up) -> Tensor");
  m.def("swiglu_bwd(Tensor gate_up, Tensor dy) -> Tensor");
  m.def("split_rope_fwd(Tensor gqkv, Tensor cos, Tensor sin) -> Tensor[]");
  m.def("split_rope_bwd(Tensor dgate, Tensor dq, Tensor dk, Tensor dv, Tensor cos, Tensor sin) -> Tensor");
  m.def("embedding_fwd(Tensor ids, Tensor weight, float scale) -> Tensor");
  m.def("embedding_bwd(Tensor ids, Tensor grad, int num_rows, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(hrm_ew, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("split_rope_fwd", &split_rope_fwd);
  m.impl("split_rope_bwd", &split_rope_bwd);
  m.impl("embedding_fwd", &embedding_fwd);
  m.impl("embedding_bwd", &embedding_bwd);
}
