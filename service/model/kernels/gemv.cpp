// The float32 linear for one or two rows (batch-1 decode), which only streams the weight: each thread takes a
// contiguous range of output rows and reads them once, one row after the next (a single sequential stream per
// thread: reading four rows at a time as four streams was 15-20 % slower on a 2-core Zen 4 EPYC), against the
// activation rows held in L1; the bias and the residual are added as each output is stored, a GELU by ATen's kernel after. Offered to
// linear.py's per-machine timing as the `gemv` kernel for fewer than three rows, kept only where it is the
// fastest; F.linear is its twin (the same products, summed in another order: ~1e-6 relative).
// Part of the kernels module (module.cpp, built by kernels/__init__.py).
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t kWidth = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec vabs(Vec v) { return _mm512_abs_ps(v); }
inline Vec vload_bf16(const uint16_t* p) {  // bfloat16 is float's top half
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int64_t kWidth = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline Vec vabs(Vec v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
inline Vec vload_bf16(const uint16_t* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
#else
#define GEMV_SCALAR 1
#endif

constexpr int64_t kMaxRows = 2;

// y[r, j] = sum_k x[r, k] w[j, k] for rows r < M, output rows [j0, j1).
template <int64_t M>
void dot_rows(const float* x, int64_t k, const float* w, int64_t j0, int64_t j1, float* y, int64_t n) {
#ifdef GEMV_SCALAR
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t r = 0; r < M; ++r) {
      float s = 0.f;
      for (int64_t i = 0; i < k; ++i) s += x[r * k + i] * w[j * k + i];
      y[r * n + j] = s;
    }
#else
  const int64_t kv = k - k % kWidth;
  for (int64_t j = j0; j < j1; ++j) {  // one weight row at a time: each thread reads one sequential stream
    const float* wj = w + j * k;
    Vec acc[M];
    for (int64_t r = 0; r < M; ++r) acc[r] = vzero();
    for (int64_t i = 0; i < kv; i += kWidth) {
      const Vec wv = vload(wj + i);
      for (int64_t r = 0; r < M; ++r) acc[r] = vfma(wv, vload(x + r * k + i), acc[r]);
    }
    for (int64_t r = 0; r < M; ++r) {
      float s = vsum(acc[r]);
      for (int64_t i = kv; i < k; ++i) s += x[r * k + i] * wj[i];
      y[r * n + j] = s;
    }
  }
#endif
}

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

// For rows r < M of x and weight rows [j0, j1) of the bfloat16 copy `screen`: approx[r, j] = sum_k x[r, k]
// screen[j, k] and mass[r, j] = sum_k |x[r, k]| |screen[j, k]|, in float32.
template <int64_t M>
void screen_rows(const float* x, int64_t k, const uint16_t* screen, int64_t j0, int64_t j1, float* approx,
                 float* mass, int64_t n) {
#ifdef GEMV_SCALAR
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t r = 0; r < M; ++r) {
      float z = 0.f, a = 0.f;
      for (int64_t i = 0; i < k; ++i) {
        const float w = bf16_to_float(screen[j * k + i]);
        z += x[r * k + i] * w;
        a += std::fabs(x[r * k + i]) * std::fabs(w);
      }
      approx[r * n + j] = z;
      mass[r * n + j] = a;
    }
#else
  const int64_t kv = k - k % kWidth;
  for (int64_t j = j0; j < j1; ++j) {
    const uint16_t* wj = screen + j * k;
    Vec z[M], a[M];
    for (int64_t r = 0; r < M; ++r) z[r] = a[r] = vzero();
    for (int64_t i = 0; i < kv; i += kWidth) {
      const Vec wv = vload_bf16(wj + i), wa = vabs(wv);
      for (int64_t r = 0; r < M; ++r) {
        const Vec xv = vload(x + r * k + i);
        z[r] = vfma(wv, xv, z[r]);
        a[r] = vfma(wa, vabs(xv), a[r]);
      }
    }
    for (int64_t r = 0; r < M; ++r) {
      float zs = vsum(z[r]), as = vsum(a[r]);
      for (int64_t i = kv; i < k; ++i) {
        const float w = bf16_to_float(wj[i]);
        zs += x[r * k + i] * w;
        as += std::fabs(x[r * k + i]) * std::fabs(w);
      }
      approx[r * n + j] = zs;
      mass[r * n + j] = as;
    }
  }
#endif
}

}  // namespace

// x (M, K) float32 with M <= 2, weight (N, K) float32 -> (M, N) = act(x W^T + bias) + residual; `gelu`: ""
// or an ATen GELU approximation ("tanh", "none"), not together with a residual.
at::Tensor linear_small(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::string& gelu, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) <= kMaxRows && x_in.scalar_type() == at::kFloat, "linear_small: x");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat && weight.size(1) == x_in.size(1),
              "linear_small: weight");
  TORCH_CHECK(gelu.empty() || !residual, "linear_small: an activation and a residual together");
  const auto x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  auto y = at::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto b = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const auto res = residual ? std::optional<at::Tensor>(residual->contiguous()) : std::nullopt;
  TORCH_CHECK(!b || b->numel() == n, "linear_small: bias");
  TORCH_CHECK(!res || res->sizes() == y.sizes(), "linear_small: residual");
  const float* bp = b ? b->data_ptr<float>() : nullptr;
  const float* rp = res ? res->data_ptr<float>() : nullptr;
  at::parallel_for(0, n, 64, [&](int64_t j0, int64_t j1) {
    if (m == 1) {
      dot_rows<1>(xp, k, wp, j0, j1, yp, n);
    } else if (m == 2) {
      dot_rows<2>(xp, k, wp, j0, j1, yp, n);
    }  // m == 0: nothing to compute
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = j0; j < j1; ++j) {
        float v = yp[r * n + j];
        if (bp) v += bp[j];
        if (rp) v += rp[r * n + j];
        yp[r * n + j] = v;
      }
  });
  return gelu.empty() ? y : at::gelu_(y, gelu);
}

// Greedy decoding's token from the LM head without reading its float32 weight whole: the argmax (first
// index of the maximum, as torch.max gives) of each row of x W^T as linear_small computes it, found exactly
// from a bfloat16 copy of W (half the bytes; batch-1 decode streams the head every step, a third of GPT-2
// small's weights). Each approximate logit z~_j comes with a bound e_j on its distance from linear_small's
// value z_j: bfloat16 rounding moves each weight by at most 2^-8 of itself, so |z~_j - z_j| <= (2^-8 + 3
// gamma) sum_k |x_k| |W_jk| (gamma: float32 summation error, K 2^-24), which the same pass bounds from
// the copy itself. Every j with z~_j + e_j below L = max_j (z~_j - e_j) is strictly below the maximum; the
// rest (a handful of rows, typically) are computed exactly as linear_small does and compared. Returns int64
// (M,), -1 for a row it cannot decide (a NaN or infinity in the screen, an overflow): the caller computes the
// logits. (Bit-equal to linear_small where every thread runs in the same denormal mode, as torch's do.)
at::Tensor greedy_head(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& screen) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) <= kMaxRows && x_in.scalar_type() == at::kFloat, "greedy_head: x");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat && weight.size(1) == x_in.size(1),
              "greedy_head: weight");
  TORCH_CHECK(screen.is_contiguous() && screen.scalar_type() == at::kBFloat16 && screen.sizes() == weight.sizes(),
              "greedy_head: screen");
  const auto x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  auto out = at::full({m}, -1, x.options().dtype(at::kLong));
  if (m == 0 || n == 0) return out;
  std::vector<float> approx(m * n), mass(m * n);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(screen.data_ptr<at::BFloat16>());
  at::parallel_for(0, n, 64, [&](int64_t j0, int64_t j1) {
    if (m == 1) {
      screen_rows<1>(xp, k, sp, j0, j1, approx.data(), mass.data(), n);
    } else {
      screen_rows<2>(xp, k, sp, j0, j1, approx.data(), mass.data(), n);
    }
  });
  const float gamma = static_cast<float>(k) * std::ldexp(1.f, -24);
  const float c = 1.01f * (std::ldexp(1.f, -8) + 3 * gamma) + std::ldexp(1.f, -18);  // + the comparisons' rounding
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < m; ++r) {
    const float* z = approx.data() + r * n;
    const float* a = mass.data() + r * n;
    // Absolute slack for what the relative bound misses: subnormal weights round to bfloat16 within 2^-134,
    // not 2^-8 of themselves, and products may underflow (2^-149 each).
    double l1 = 0;
    for (int64_t i = 0; i < k; ++i) l1 += std::fabs(xp[r * k + i]);
    const float tiny = static_cast<float>(2 * (std::ldexp(l1, -134) + k * std::ldexp(1.0, -149)));
    float floor = -std::numeric_limits<float>::infinity();
    bool finite = true;
    for (int64_t j = 0; j < n; ++j) {
      finite = finite && std::isfinite(z[j]) && std::isfinite(a[j]);
      floor = std::max(floor, z[j] - (c * a[j] + tiny));
    }
    if (!finite) continue;
    int64_t best = -1;
    float best_value = 0.f;
    for (int64_t j = 0; j < n && best != -2; ++j) {
      if (z[j] + (c * a[j] + tiny) < floor) continue;
      float exact;
      dot_rows<1>(xp + r * k, k, wp + j * k, 0, 1, &exact, 1);  // as linear_small computes row j
      if (std::isnan(exact)) best = -2;  // overflow in the float32 sum: the caller's logits decide
      else if (best < 0 || exact > best_value) best = j, best_value = exact;
    }
    op[r] = best < 0 ? -1 : best;
  }
  return out;
}
