// The torch side of the CUDA kernels: TORCH_LIBRARY(hrm_cuda) schemas and their CUDA
// implementations (shape, dtype and layout checks, allocation, the launch on torch's current
// stream). Built into libhrm_cuda.so by the top-level CMakeLists.txt for a CUDA build of torch;
// hrm/ops/cuda_extension.py loads it and adds the fake (meta) implementations and autograd.
//
//   magicnorm_transition(x, delta, other, eps) -> (z, u, n, rstd_h, rstd_u)
//   magicnorm_transition_backward(dz?, du?, dn?, z, n, rstd_h, rstd_u) -> (dh, dother)
//   swiglu_linear(x, weight) -> y = silu(x W_g^T) * (x W_u^T), weight [2I, K] = [gate | up]
//   swiglu_linear_backward(x, weight, dy) -> d(gate_up) [..., 2I]: the product recomputed, the
//       SwiGLU's gradient in its epilogue (dx and dW are then two GEMMs, in hrm/ops/impl/swiglu.py)
//   kernels() -> the kernels this build holds, e.g. "magicnorm_transition swiglu_linear_sm80"
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../common/hrm_cuda_math.h"
#include "../magicnorm_transition/magicnorm_transition.h"
#include "../swiglu_linear/swiglu_linear.h"

namespace hrm {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "hrm_cuda: unsupported dtype ", t.scalar_type());
  }
}

void check_aligned(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), "hrm_cuda: ", name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "hrm_cuda: ", name, " must be 16-byte aligned");
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "hrm_cuda: ", what, " failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> transition_fwd(const at::Tensor& x,
                                                                                       const at::Tensor& delta,
                                                                                       const at::Tensor& other,
                                                                                       double eps) {
  for (auto* t : {&x, &delta, &other}) {
    check_aligned(*t, "x, delta and other");
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type(),
                "hrm_cuda: x, delta and other must share shape and dtype");
  }
  const int64_t n_cols = x.size(-1), n_rows = x.numel() / std::max<int64_t>(n_cols, 1);
  TORCH_CHECK(row_plan(int(n_cols), int(x.element_size())).vecs_per_thread > 0,
              "hrm_cuda: magicnorm_transition takes rows of whole 16-byte vectors, at most ",
              kMaxVecsPerThread * kMaxThreads, " of them (got ", n_cols, " columns of ", x.scalar_type(), ")");
  TORCH_CHECK(n_rows <= 0x7fffffff, "hrm_cuda: too many rows");
  const c10::cuda::CUDAGuard guard(x.device());
  auto z = at::empty_like(x), u = at::empty_like(x), n = at::empty_like(x);
  auto rows = x.sizes().vec();
  rows.pop_back();
  auto rstd_h = at::empty(rows, x.options().dtype(at::kFloat)), rstd_u = at::empty(rows, x.options().dtype(at::kFloat));
  TransitionFwdArgs a{dtype_of(x), x.data_ptr(), delta.data_ptr(), other.data_ptr(), z.data_ptr(), u.data_ptr(),
                      n.data_ptr(), rstd_h.data_ptr<float>(), rstd_u.data_ptr<float>(), int(n_rows), int(n_cols),
                      float(eps)};
  check_cuda(magicnorm_transition_fwd(a, c10::cuda::getCurrentCUDAStream()), "magicnorm_transition");
  return {z, u, n, rstd_h, rstd_u};
}

std::tuple<at::Tensor, at::Tensor> transition_bwd(const std::optional<at::Tensor>& dz,
                                                  const std::optional<at::Tensor>& du,
                                                  const std::optional<at::Tensor>& dn, const at::Tensor& z,
                                                  const at::Tensor& n, const at::Tensor& rstd_h,
                                                  const at::Tensor& rstd_u) {
  check_aligned(z, "z");
  check_aligned(n, "n");
  TORCH_CHECK(n.sizes() == z.sizes() && n.scalar_type() == z.scalar_type(), "hrm_cuda: z and n must match");
  for (auto* g : {&dz, &du, &dn}) {
    if (!g->has_value()) continue;
    check_aligned(**g, "the gradients");
    TORCH_CHECK((*g)->sizes() == z.sizes() && (*g)->scalar_type() == z.scalar_type(),
                "hrm_cuda: the gradients must match z in shape and dtype");
  }
  TORCH_CHECK(rstd_h.scalar_type() == at::kFloat && rstd_u.scalar_type() == at::kFloat && rstd_h.is_contiguous() &&
                  rstd_u.is_contiguous(),
              "hrm_cuda: rstd_h and rstd_u must be contiguous fp32");
  const int64_t n_cols = z.size(-1), n_rows = z.numel() / std::max<int64_t>(n_cols, 1);
  TORCH_CHECK(rstd_h.numel() == n_rows && rstd_u.numel() == n_rows, "hrm_cuda: one rstd per row");
  TORCH_CHECK(row_plan(int(n_cols), int(z.element_size())).vecs_per_thread > 0,
              "hrm_cuda: magicnorm_transition_backward: unsupported row width ", n_cols);
  const c10::cuda::CUDAGuard guard(z.device());
  auto dh = at::empty_like(z), dother = at::empty_like(z);
  auto ptr = [](const std::optional<at::Tensor>& g) -> const void* { return g.has_value() ? g->data_ptr() : nullptr; };
  TransitionBwdArgs a{dtype_of(z),           ptr(dz),  ptr(du),          ptr(dn),         z.data_ptr(),
                      n.data_ptr(),          rstd_h.data_ptr<float>(),   rstd_u.data_ptr<float>(),
                      dh.data_ptr(),         dother.data_ptr(),          int(n_rows),     int(n_cols)};
  check_cuda(magicnorm_transition_bwd(a, c10::cuda::getCurrentCUDAStream()), "magicnorm_transition_backward");
  return {dh, dother};
}

// The checks of swiglu_linear and its backward; returns (M, K, I).
std::tuple<int64_t, int64_t, int64_t> swiglu_linear_sizes(const at::Tensor& x, const at::Tensor& weight) {
  check_aligned(x, "x");
  check_aligned(weight, "weight");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "hrm_cuda: swiglu_linear takes bf16 or fp16 x and weight of one dtype");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % 2 == 0 && weight.size(1) == x.size(-1),
              "hrm_cuda: weight must be [2I, K] with K = x.shape[-1]");
  const int64_t k = x.size(-1), inter = weight.size(0) / 2, m = x.numel() / std::max<int64_t>(k, 1);
  TORCH_CHECK(k % 8 == 0 && inter % 8 == 0, "hrm_cuda: swiglu_linear needs K and I multiples of 8");
  TORCH_CHECK(m <= 0x7fffffff && inter * k <= 0x7fffffffLL * 8, "hrm_cuda: problem too large");
  return {m, k, inter};
}

// Launches the forward or the backward kernel of the device's architecture.
void launch_swiglu_linear(const SwigluLinearArgs& a, bool backward, int device) {
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "device query");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
#if defined(HRM_SWIGLU_SM90)
  if (major == 9) {
    check_cuda(backward ? swiglu_linear_bwd_sm90(a, stream) : swiglu_linear_sm90(a, stream), "swiglu_linear (sm_90a)");
    return;
  }
#endif
#if defined(HRM_SWIGLU_SM80)
  if (major == 8) {
    check_cuda(backward ? swiglu_linear_bwd_sm80(a, stream) : swiglu_linear_sm80(a, stream), "swiglu_linear (sm_80)");
    return;
  }
#endif
  int minor = 0;
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "device query");
  TORCH_CHECK(false, "hrm_cuda: this build has no swiglu_linear kernel for sm_", major, minor,
              " (HRM_CUDA_ARCHS at build time; see kernels())");
}

at::Tensor swiglu_linear(const at::Tensor& x, const at::Tensor& weight) {
  const auto [m, k, inter] = swiglu_linear_sizes(x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  auto shape = x.sizes().vec();
  shape.back() = inter;
  auto y = at::empty(shape, x.options());
  SwigluLinearArgs a{dtype_of(x), x.data_ptr(), weight.data_ptr(), y.data_ptr(), int(m), int(k), int(inter)};
  launch_swiglu_linear(a, false, x.get_device());
  return y;
}

at::Tensor swiglu_linear_backward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& dy) {
  const auto [m, k, inter] = swiglu_linear_sizes(x, weight);
  check_aligned(dy, "dy");
  auto shape = x.sizes().vec();
  shape.back() = inter;
  TORCH_CHECK(dy.sizes() == at::IntArrayRef(shape) && dy.scalar_type() == x.scalar_type(),
              "hrm_cuda: dy must have swiglu_linear's output shape and x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  shape.back() = 2 * inter;
  auto dgu = at::empty(shape, x.options());
  SwigluLinearArgs a{dtype_of(x), x.data_ptr(), weight.data_ptr(), dgu.data_ptr(), int(m), int(k), int(inter),
                     dy.data_ptr()};
  launch_swiglu_linear(a, true, x.get_device());
  return dgu;
}

std::string kernels() {
  std::string s = "magicnorm_transition";
#if defined(HRM_SWIGLU_SM80)
  s += " swiglu_linear_sm80";
#endif
#if defined(HRM_SWIGLU_SM90)
  s += " swiglu_linear_sm90";
#endif
  return s;
}

}  // namespace
}  // namespace hrm

TORCH_LIBRARY(hrm_cuda, m) {
  m.def("magicnorm_transition(Tensor x, Tensor delta, Tensor other, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("magicnorm_transition_backward(Tensor? dz, Tensor? du, Tensor? dn, Tensor z, Tensor n, Tensor rstd_h, "
        "Tensor rstd_u) -> (Tensor, Tensor)");
  m.def("swiglu_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("swiglu_linear_backward(Tensor x, Tensor weight, Tensor dy) -> Tensor");
  m.def("kernels() -> str", &hrm::kernels);
}

TORCH_LIBRARY_IMPL(hrm_cuda, CUDA, m) {
  m.impl("magicnorm_transition", &hrm::transition_fwd);
  m.impl("magicnorm_transition_backward", &hrm::transition_bwd);
  m.impl("swiglu_linear", &hrm::swiglu_linear);
  m.impl("swiglu_linear_backward", &hrm::swiglu_linear_backward);
}
