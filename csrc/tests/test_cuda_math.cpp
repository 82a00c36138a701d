// Host unit test of csrc/common/hrm_cuda_math.h, the per-element math and indexing of the CUDA
// kernels. Built with the host C++ compiler and run by tests/test_cuda_kernels.py (and by
// `ctest` in a CMake build); prints one line per failed check and exits non-zero on any.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "../common/hrm_cuda_math.h"

using namespace hrm;

static int failures = 0;
static long checks = 0;

#define CHECK(cond, ...)                                     \
  do {                                                       \
    ++checks;                                                \
    if (!(cond)) {                                           \
      if (++failures <= 20) {                                \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                            \
        std::printf("\n");                                   \
      }                                                      \
    }                                                        \
  } while (0)

// Round-to-nearest-even of a finite double to a float with `man_bits` explicit mantissa bits,
// exponent range [min_exp, max_exp] of normals (subnormals below), computed independently of the
// bit tricks under test.
static double round_ref(double x, int man_bits, int min_exp, int max_exp) {
  if (x == 0.0 || std::isnan(x) || std::isinf(x)) return x;
  const double a = std::fabs(x);
  int e = std::ilogb(a);
  if (e < min_exp) e = min_exp;  // subnormal: the quantum is fixed
  const double quantum = std::ldexp(1.0, e - man_bits);
  double q = a / quantum;
  double f = std::floor(q);
  const double r = q - f;
  if (r > 0.5 || (r == 0.5 && std::fmod(f, 2.0) == 1.0)) f += 1.0;
  double out = f * quantum;
  const double max_finite = std::ldexp(2.0 - std::ldexp(1.0, -man_bits), max_exp);
  if (out > max_finite) out = std::numeric_limits<double>::infinity();
  return std::copysign(out, x);
}

static void test_fp16() {
  // Every fp16 bit pattern: to fp32 and back is the identity (NaNs stay NaN).
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = fp16_bits_to_float(uint16_t(h));
    const bool nan = ((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff);
    if (nan) {
      CHECK(std::isnan(f), "h=%04x", h);
      CHECK(std::isnan(fp16_bits_to_float(float_to_fp16_bits(f))), "h=%04x", h);
      continue;
    }
    CHECK(float_to_fp16_bits(f) == h, "h=%04x f=%a back=%04x", h, f, float_to_fp16_bits(f));
    if (!std::isinf(f)) {  // the value itself: sign * man * 2^(exp-25) for subnormals/normals
      const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
      const double v = e ? std::ldexp(1024.0 + m, int(e) - 25) : std::ldexp(double(m), -24);
      CHECK(double(f) == ((h & 0x8000) ? -v : v), "h=%04x f=%a", h, f);
    }
  }
  // fp32 -> fp16 rounding against the reference, on values around every fp16 (midpoints and
  // neighbours included), in the subnormal range, and near overflow.
  for (uint32_t h = 0; h < 0x7c00u; ++h) {
    const double lo = fp16_bits_to_float(uint16_t(h)), hi = fp16_bits_to_float(uint16_t(h + 1));
    const double mid = 0.5 * (lo + hi);
    for (double x : {mid, std::nextafter(float(mid), 0.0f) * 1.0, std::nextafter(float(mid), 1e9f) * 1.0, lo}) {
      for (double s : {1.0, -1.0}) {
        const float xf = float(s * x);
        const double want = round_ref(double(xf), 10, -14, 15);
        const float got = fp16_bits_to_float(float_to_fp16_bits(xf));
        CHECK(double(got) == want, "x=%a got=%a want=%a", double(xf), double(got), want);
      }
    }
  }
  CHECK(float_to_fp16_bits(65519.0f) == 0x7bffu, "65519 -> max finite");
  CHECK(float_to_fp16_bits(65520.0f) == 0x7c00u, "65520 -> inf");
  CHECK(float_to_fp16_bits(-1e30f) == 0xfc00u, "-1e30 -> -inf");
  CHECK(float_to_fp16_bits(std::ldexp(1.0f, -25)) == 0u, "2^-25 ties to even (0)");
  CHECK(float_to_fp16_bits(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 1u, "just above 2^-25 -> 1");
  CHECK(std::isnan(fp16_bits_to_float(float_to_fp16_bits(std::numeric_limits<float>::quiet_NaN()))), "nan");
}

static void test_bf16() {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const float f = to_float(bf16_t{uint16_t(b)});
    const bool nan = ((b >> 7) & 0xff) == 0xff && (b & 0x7f);
    if (nan) {
      CHECK(std::isnan(f), "b=%04x", b);
      CHECK(std::isnan(to_float(from_float<bf16_t>(f))), "b=%04x", b);
      continue;
    }
    CHECK(from_float<bf16_t>(f).bits == b, "b=%04x", b);
    if ((b & 0x7f80u) == 0x7f80u || (b & 0x7fffu) == 0x7f7fu) continue;  // inf, largest finite
    const float next = to_float(bf16_t{uint16_t(b + 1)});
    const float mid = 0.5f * (f + next);  // exact in fp32
    for (float x : {mid, std::nextafter(mid, f), std::nextafter(mid, next)}) {
      const double want = round_ref(double(x), 7, -126, 127);
      CHECK(double(to_float(from_float<bf16_t>(x))) == want, "x=%a", double(x));
    }
  }
  CHECK(std::isnan(round_to<bf16_t>(std::numeric_limits<float>::quiet_NaN())), "nan");
  CHECK(std::isinf(round_to<bf16_t>(3.4e38f)), "rounds up to inf");
}

template <class T>
static void test_pack_roundtrip() {
  constexpr int E = VecElems<T>::value;
  CHECK(E * int(sizeof(T)) == 16, "E=%d", E);
  float in[E], out[E];
  for (int i = 0; i < E; ++i) in[i] = round_to<T>(0.37f * float(i) - 1.1f);  // representable
  const Pack16 p = pack<T>(in);
  const T* e = reinterpret_cast<const T*>(&p);
  for (int i = 0; i < E; ++i) CHECK(to_float(e[i]) == in[i], "element %d in place", i);
  unpack<T>(p, out);
  for (int i = 0; i < E; ++i) CHECK(out[i] == in[i], "element %d back", i);
}

static void test_row_plan() {
  for (int bytes : {2, 4}) {
    const int E = 16 / bytes;
    for (int n_cols = E; n_cols <= 8 * kMaxThreads * E + 64; n_cols += E * (n_cols < 4096 ? 1 : 37)) {
      const RowPlan p = row_plan(n_cols, bytes);
      const int n_vecs = n_cols / E;
      if (n_vecs > kMaxVecsPerThread * kMaxThreads) {
        CHECK(p.vecs_per_thread == 0, "n_cols=%d too wide", n_cols);
        continue;
      }
      CHECK(p.vec_elems == E && p.n_vecs == n_vecs, "n_cols=%d", n_cols);
      CHECK(p.threads % 32 == 0 && p.threads >= 32 && p.threads <= kMaxThreads, "threads=%d", p.threads);
      CHECK(p.vecs_per_thread * p.threads >= n_vecs, "covers the row n_cols=%d", n_cols);
      if (p.vecs_per_thread > 1) {  // the smallest vecs_per_thread that fits
        const int fewer = (n_vecs + p.vecs_per_thread / 2 - 1) / (p.vecs_per_thread / 2);
        CHECK((fewer + 31) / 32 * 32 > kMaxThreads, "n_cols=%d could use fewer vectors a thread", n_cols);
      }
      // Every vector is owned by exactly one (thread, slot); warps read contiguous vectors.
      std::vector<int> owner(n_vecs, 0);
      for (int t = 0; t < p.threads; ++t)
        for (int j = 0; j < p.vecs_per_thread; ++j) {
          const int v = owned_vec(t, j, p.threads, n_vecs);
          if (v >= 0) {
            ++owner[v];
            CHECK(t % 32 == 0 || v == owned_vec(t - 1, j, p.threads, n_vecs) + 1, "contiguous v=%d", v);
          }
        }
      bool once = true;
      for (int c : owner) once = once && c == 1;
      CHECK(once, "each vector once, n_cols=%d", n_cols);
    }
  }
  CHECK(row_plan(1023, 2).vecs_per_thread == 0, "not whole vectors");
  CHECK(row_plan(0, 4).vecs_per_thread == 0, "empty row");
}

static void test_rms_and_swiglu() {
  // rstd and the norm gradient against double precision on a small row.
  const int n = 37;
  std::vector<float> t(n), dy(n), y(n);
  double ss = 0.0;
  for (int i = 0; i < n; ++i) {
    t[i] = std::sin(0.7f * float(i)) * 3.0f;
    dy[i] = std::cos(0.3f * float(i));
    ss += double(t[i]) * t[i];
  }
  const float eps = 1e-6f;
  float ss32 = 0.0f;
  for (float v : t) ss32 += v * v;
  const float r = rms_rstd(ss32, n, eps);
  const double r64 = 1.0 / std::sqrt(ss / n + eps);
  CHECK(std::fabs(r - r64) <= 1e-6 * r64, "rstd %g vs %g", r, r64);
  double dot = 0.0;
  for (int i = 0; i < n; ++i) {
    y[i] = float(t[i] * r64);
    dot += double(dy[i]) * y[i];
  }
  // Finite differences of L = sum(dy * t * rstd(t)) in double against rms_grad.
  for (int i = 0; i < n; i += 5) {
    auto loss = [&](double hstep) {
      double s = 0.0;
      for (int k = 0; k < n; ++k) {
        const double tk = t[k] + (k == i ? hstep : 0.0);
        s += tk * tk;
      }
      const double rr = 1.0 / std::sqrt(s / n + eps);
      double l = 0.0;
      for (int k = 0; k < n; ++k) l += dy[k] * (t[k] + (k == i ? hstep : 0.0)) * rr;
      return l;
    };
    const double fd = (loss(1e-4) - loss(-1e-4)) / 2e-4;
    const float g = rms_grad(r, dy[i], y[i], float(dot / n));
    CHECK(std::fabs(g - fd) <= 1e-4 + 1e-4 * std::fabs(fd), "rms_grad[%d] %g vs %g", i, g, fd);
  }
  // SwiGLU and its gradient against double precision and finite differences.
  for (float g : {-20.0f, -3.5f, -0.25f, 0.0f, 0.5f, 2.0f, 15.0f}) {
    for (float u : {-1.5f, 0.0f, 0.75f}) {
      const double s = 1.0 / (1.0 + std::exp(-double(g)));
      const double want = double(g) * s * u;
      CHECK(std::fabs(swiglu(g, u) - want) <= 1e-6 + 1e-6 * std::fabs(want), "swiglu(%g,%g)", g, u);
      float dg, du;
      swiglu_grad(g, u, 0.8f, dg, du);
      const double h = 1e-3;
      auto f = [&](double gg, double uu) { return gg / (1.0 + std::exp(-gg)) * uu * 0.8; };
      const double fdg = (f(g + h, u) - f(g - h, u)) / (2 * h), fdu = (f(g, u + h) - f(g, u - h)) / (2 * h);
      CHECK(std::fabs(dg - fdg) <= 1e-4 + 1e-4 * std::fabs(fdg), "dg(%g,%g) %g vs %g", g, u, dg, fdg);
      CHECK(std::fabs(du - fdu) <= 1e-4 + 1e-4 * std::fabs(fdu), "du(%g,%g) %g vs %g", g, u, du, fdu);
    }
  }
  // The epilogue's pairing: gate and up rows of every output column are distinct and cover
  // the fused weight's 2I rows once.
  const int I = 48;
  std::vector<int> seen(2 * I, 0);
  for (int c = 0; c < I; ++c) {
    ++seen[gate_row(c)];
    ++seen[up_row(c, I)];
    CHECK(gate_row(c) < I && up_row(c, I) >= I, "halves c=%d", c);
  }
  bool once = true;
  for (int s : seen) once = once && s == 1;
  CHECK(once, "each weight row once");
}

int main() {
  test_fp16();
  test_bf16();
  test_pack_roundtrip<float>();
  test_pack_roundtrip<bf16_t>();
  test_pack_roundtrip<fp16_t>();
  test_row_plan();
  test_rms_and_swiglu();
  std::printf("%ld checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
