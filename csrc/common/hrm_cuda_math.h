// Per-element math and indexing shared by the CUDA kernels, written once for the host and the
// device (HRM_HD) so the host unit test (csrc/tests/test_cuda_math.cpp, run by
// tests/test_cuda_kernels.py) checks exactly what the kernels execute:
//
// - 16-bit float storage (bf16, fp16) <-> fp32, round to nearest even, NaN kept quiet;
// - 128-bit vectors: Pack16 <-> VecElems<T> fp32 values (8 bf16/fp16 or 4 fp32 per vector);
// - the row plan of the row-wise kernels: how many 128-bit vectors a row holds, how many each
//   thread keeps in registers, which ones (strided by the block size so a warp's loads are
//   contiguous) and the block size;
// - the RMS statistics: rstd = 1 / sqrt(sum(t^2) / n + eps) and the norm's gradient
//   rstd * (dy - y * mean(dy * y));
// - the SwiGLU epilogue: silu(g) * u and its gradient, and where the gate and up rows of output
//   column n sit in the fused [gate | up] weight.
//
// Device-only code (shuffles, shared memory) lives in the kernels; the one device-specific
// branch here is fp16 <-> fp32, which uses the hardware conversion on the GPU (the same IEEE
// round to nearest even as the bit-level version the host test checks).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define HRM_HD __host__ __device__ __forceinline__
#define HRM_UNROLL _Pragma("unroll")
#include <cuda_fp16.h>
#else
#define HRM_HD inline
#define HRM_UNROLL
#include <cmath>
#endif

namespace hrm {

// Storage types: the bits of one element. The kernels never do arithmetic on them.
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

HRM_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

HRM_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

HRM_HD float to_float(float x) { return x; }
HRM_HD float to_float(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }

// fp16 -> fp32 by bits: normal, subnormal (renormalised), inf/NaN (exponent 31 -> 255).
HRM_HD float fp16_bits_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    int e = -1;  // normalise: shift the leading one up to bit 10
    do {
      man <<= 1;
      ++e;
    } while ((man & 0x400u) == 0);
    return bits_float(sign | (uint32_t(112 - e) << 23) | ((man & 0x3ffu) << 13));
  }
  return bits_float(sign | ((exp + 112) << 23) | (man << 13));
}

// fp32 -> fp16 bits, round to nearest even; overflow -> inf, NaN -> quiet NaN, subnormals exact.
HRM_HD uint16_t float_to_fp16_bits(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below the smallest normal (2^-14): a subnormal or zero
    if (a < 0x33000000u) return sign;  // <= 2^-25 rounds to zero (ties to even)
    uint32_t e = a >> 23;
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e;  // result = man >> (shift) with rounding; shift in 14..24
    uint32_t q = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u);  // rebias (-112 << 23) and round
  return uint16_t(sign | (r >> 13));
}

HRM_HD float to_float(fp16_t x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  return fp16_bits_to_float(x.bits);
#endif
}

template <class T>
HRM_HD T from_float(float x);

template <>
HRM_HD float from_float<float>(float x) {
  return x;
}

template <>
HRM_HD bf16_t from_float<bf16_t>(float x) {
  uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}

template <>
HRM_HD fp16_t from_float<fp16_t>(float x) {
#if defined(__CUDA_ARCH__)
  return fp16_t{__half_as_ushort(__float2half_rn(x))};
#else
  return fp16_t{float_to_fp16_bits(x)};
#endif
}

// Round through T and back: what storing an fp32 value in T and reloading it gives.
template <class T>
HRM_HD float round_to(float x) {
  return to_float(from_float<T>(x));
}

// -- 128-bit vectors ------------------------------------------------------------------------
struct alignas(16) Pack16 {
  uint32_t w[4];
};

template <class T>
struct VecElems {
  static constexpr int value = 16 / int(sizeof(T));
};

template <class T>
HRM_HD void unpack(const Pack16& p, float (&out)[VecElems<T>::value]) {
  const T* e = reinterpret_cast<const T*>(&p);
HRM_UNROLL
  for (int i = 0; i < VecElems<T>::value; ++i) out[i] = to_float(e[i]);
}

template <class T>
HRM_HD Pack16 pack(const float (&in)[VecElems<T>::value]) {
  Pack16 p;
  T* e = reinterpret_cast<T*>(&p);
HRM_UNROLL
  for (int i = 0; i < VecElems<T>::value; ++i) e[i] = from_float<T>(in[i]);
  return p;
}

// -- the row plan of the row-wise kernels ----------------------------------------------------
// One block per row; each thread keeps `vecs_per_thread` 128-bit vectors of the row in
// registers, so the row is read once. Thread t owns vectors t, t + threads, t + 2 * threads, ...
// (a warp's loads are 512 contiguous bytes). vecs_per_thread is a template parameter of the
// kernels (1, 2, 4 or 8): the smallest that keeps the block at kMaxThreads threads or fewer.
constexpr int kMaxThreads = 512;  // __launch_bounds__: up to 128 registers a thread for VPT = 8
constexpr int kMaxVecsPerThread = 8;

struct RowPlan {
  int vec_elems;        // elements per 128-bit vector
  int n_vecs;           // vectors per row
  int vecs_per_thread;  // 1, 2, 4 or 8; 0 when the row does not fit (or is not whole vectors)
  int threads;          // a multiple of 32
};

HRM_HD RowPlan row_plan(int n_cols, int elem_bytes) {
  RowPlan p{16 / elem_bytes, 0, 0, 0};
  if (n_cols <= 0 || n_cols % p.vec_elems != 0) return p;
  p.n_vecs = n_cols / p.vec_elems;
  for (int v = 1; v <= kMaxVecsPerThread; v *= 2) {
    int threads = (p.n_vecs + v - 1) / v;
    threads = (threads + 31) / 32 * 32;
    if (threads <= kMaxThreads) {
      p.vecs_per_thread = v;
      p.threads = threads;
      return p;
    }
  }
  return p;
}

// The vector that thread `tid` keeps in its slot `j`, or -1 when that slot is past the row.
HRM_HD int owned_vec(int tid, int j, int threads, int n_vecs) {
  int v = j * threads + tid;
  return v < n_vecs ? v : -1;
}

// -- RMS statistics ----------------------------------------------------------------------------
HRM_HD float rms_rstd(float sum_sq, int n, float eps) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(sum_sq / float(n) + eps);
#else
  return 1.0f / std::sqrt(sum_sq / float(n) + eps);
#endif
}

// d t for y = t * rstd(t): rstd * (dy - y * mean(dy * y)).
HRM_HD float rms_grad(float rstd, float dy, float y, float mean_dy_y) { return rstd * (dy - y * mean_dy_y); }

// -- SwiGLU --------------------------------------------------------------------------------
HRM_HD float sigmoid(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + __expf(-x));
#else
  return 1.0f / (1.0f + std::exp(-x));
#endif
}

HRM_HD float swiglu(float g, float u) { return g * sigmoid(g) * u; }

// (d g, d u) of y = silu(g) * u.
HRM_HD void swiglu_grad(float g, float u, float dy, float& dg, float& du) {
  float s = sigmoid(g);
  dg = dy * u * s * (1.0f + g * (1.0f - s));
  du = dy * g * s;
}

// The fused weight W is [2I, K] laid out [gate | up] (torch's nn.Linear(K, 2I).weight, the
// model's gate_up_proj): output column n of y = silu(x W_g^T) * (x W_u^T) takes gate row n and
// up row I + n. A CTA that owns output columns [n0, n0 + BN) loads both row ranges, so the
// pairs meet in the same accumulator position of two accumulators and the epilogue is
// element-wise: no re-layout of the weight, no [T, 2I] intermediate.
HRM_HD int gate_row(int n) { return n; }
HRM_HD int up_row(int n, int intermediate) { return intermediate + n; }

}  // namespace hrm
