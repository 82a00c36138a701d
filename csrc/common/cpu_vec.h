// Vector helpers of the C++ CPU kernels (csrc/*/*_cpu.cpp): GCC vector types of the widest
// ISA the build targets (-march=native), exp2 and bf16 conversions. Header-only, included by
// each kernel's translation unit (hrm.ops.cpp_extension hashes csrc/common/ into every build).
#pragma once

#include <c10/util/BFloat16.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>

namespace hrm_cpu {

#if defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX__)
constexpr int VW = 8;
#else
constexpr int VW = 4;
#endif
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

typedef float vec __attribute__((vector_size(VW * 4)));
typedef int32_t ivec __attribute__((vector_size(VW * 4)));
using bf16 = c10::BFloat16;

inline vec load(const float* p) { vec v; __builtin_memcpy(&v, p, sizeof(vec)); return v; }
inline void store(float* p, vec v) { __builtin_memcpy(p, &v, sizeof(vec)); }
inline vec splat(float x) { return vec{} + x; }
inline ivec iota() { ivec r; for (int i = 0; i < VW; ++i) r[i] = i; return r; }

// The Cephes exp2f polynomial: 2**f for f in [-1/2, 1/2].
inline vec exp2_poly(vec f) {
  vec p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  return p * f + 1.0f;
}

// 2**x, |rel err| < 2e-7; x < -125 flushes to 0.
inline vec exp2v(vec x) {
  const ivec under = x < -125.0f;
  x = x < -125.0f ? splat(-125.0f) : x;
  x = x > 127.0f ? splat(127.0f) : x;
  const vec t = x + 0.5f;
  ivec n = __builtin_convertvector(t, ivec);
  n += (__builtin_convertvector(n, vec) > t);  // true is -1: floor for negative t
  vec p = exp2_poly(x - __builtin_convertvector(n, vec));
  ivec bits;
  __builtin_memcpy(&bits, &p, sizeof(vec));
  bits += n << 23;
  __builtin_memcpy(&p, &bits, sizeof(vec));
  return under ? splat(0.0f) : p;
}

// Lanes [0, n) of p (n <= VW) as fp32, the others 0; and the store of lanes [0, n).
inline vec load_n(const float* p, int64_t n) {
  if (n == VW) return load(p);
  vec v{};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
inline void store_n(float* p, vec v, int64_t n) {
  if (n == VW) return store(p, v);
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}

inline float hmax(vec v) { float m = v[0]; for (int i = 1; i < VW; ++i) m = std::max(m, v[i]); return m; }
inline float hsum(vec v) { float s = 0; for (int i = 0; i < VW; ++i) s += v[i]; return s; }
// The lanes' sum as a tree (another rounding order than hsum's left-to-right one), a few
// shuffles where hsum is a chain of VW dependent adds.
inline float hsum_tree(vec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  return hsum(v);
#endif
}
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

#if defined(__AVX512BF16__)
// VW bf16 <-> fp32 lanes; the mask first(n) takes lanes [0, n) (n may exceed VW): the others
// load as zero and are not stored.
inline __mmask16 first(int64_t n) { return n >= VW ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
inline vec load_bf16(const bf16* p, __mmask16 k) {  // exact
  return (vec)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16);
}
inline void store_bf16(bf16* p, vec x, __mmask16 k = 0xFFFF) {  // round to nearest even
  _mm256_mask_storeu_epi16(p, k, (__m256i)_mm512_cvtneps_pbh(x));
}
// 2**x as exp2v, in fewer instructions (vrndscaleps, vscalefps): x < -126 gives denormals
// and 0 instead of flushing to 0, and a -inf or NaN x gives NaN (masked lanes only).
inline vec exp2_avx512(vec x) {
  const __m512 n = _mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (vec)_mm512_scalef_ps((__m512)exp2_poly(x - (vec)n), n);
}
inline vec sigmoid(vec x) { return 1.0f / (1.0f + exp2_avx512(x * -kLog2e)); }  // |rel err| < 1e-6
#endif

#if defined(__AVX512F__)
// r[w] = the words w of r[0..15] before: a transpose of 16 x 16 32-bit words in registers.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // 2 x 2 blocks of words
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4 x 4 blocks within each 128-bit lane
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)  // then the lanes: 8 x 8, 16 x 16
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

#if defined(__AVX512BW__)
// A word row of 16-bit pairs (a0 b0 a1 b1 ... a15 b15) split into (a0 .. a15 | b0 .. b15): after
// a transpose16 of 16 rows of pairs, one column's 16 entries in the low 256 bits, the next
// column's in the high.
inline __m512i split_pairs(__m512i x) {
  const __m512i idx = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 30, 28, 26, 24, 22,
                                       20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  return _mm512_permutexvar_epi16(idx, x);
}
#endif

// o[w * ldo + i] = word w of row i, for w, i < 16, row i of the source at a + i * lda bytes.
inline void transpose16(const void* a, int64_t lda, uint32_t* o, int64_t ldo) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(static_cast<const char*>(a) + i * lda);
  transpose16(r);
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(o + i * ldo, r[i]);
}
#endif

// load_n / store_n for bf16 storage (exact loads; stores round to nearest even).
inline vec load_n(const bf16* p, int64_t n) {
#if defined(__AVX512BF16__)
  return load_bf16(p, first(n));
#else
  vec v{};
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}
inline void store_n(bf16* p, vec v, int64_t n) {
#if defined(__AVX512BF16__)
  store_bf16(p, v, first(n));
#else
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<bf16>(v[i]);
#endif
}

}  // namespace hrm_cpu
