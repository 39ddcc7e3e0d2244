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
#include <immintrin.h>

#include <string>

namespace {

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t kWidth = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
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
