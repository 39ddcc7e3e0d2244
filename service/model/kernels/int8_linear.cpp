// The int8 linear (QUANTIZATION=int8) in one call: each activation row quantized to 8 bits with its own
// scale, oneDNN's int8 product (onednn::qlinear_pointwise, called through the dispatcher), then the row
// scales, the bias and the residual applied in one pass over the output (a GELU by ATen's kernel after it). The same arithmetic
// as linear._int8 in PyTorch (its twin, tests/engine/test_quantization.py), with about ten fewer dispatches
// per linear: at batch 1 they were a third of the step.
// Part of the kernels module (module.cpp, built by kernels/__init__.py).
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

constexpr int64_t kZeroPoint = 128;  // rows are stored as uint8 = round(x / scale) + 128

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const at::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }

// x (T, K) -> q (T, K) uint8, scale (T, 1) float32, as linear.quantize_rows: scale = max|x| / 127 (at
// least the smallest normal float), q = round-half-even(x / scale) + 128. |x / scale| <= 127, so adding and
// subtracting 1.5 * 2^23 rounds half to even in float32 (the default rounding mode), in vector registers.
template <typename T>
void quantize(const T* x, int64_t rows, int64_t k, uint8_t* q, float* scale) {
  constexpr float kRound = 12582912.f;
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> buffer(k);
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * k;
      float* v = buffer.data();
      float amax = 0.f;
#pragma omp simd reduction(max : amax)
      for (int64_t i = 0; i < k; ++i) {
        v[i] = load(row, i);
        const float a = v[i] < 0.f ? -v[i] : v[i];
        amax = a > amax ? a : amax;
      }
      const float s = std::max(amax, std::numeric_limits<float>::min()) / 127.f;
      scale[r] = s;
      uint8_t* out = q + r * k;
#pragma omp simd
      for (int64_t i = 0; i < k; ++i) {
        const float rounded = (v[i] / s + kRound) - kRound;
        out[i] = static_cast<uint8_t>(static_cast<int32_t>(rounded) + kZeroPoint);
      }
    }
  });
}

// out[r, j] = y[r, j] * scale[r] + bias[j] (+ residual[r, j]), in float32, rounded once to T.
template <typename T>
void epilogue(const float* y, const float* scale, const T* bias, const T* residual, int64_t rows, int64_t n,
              T* out) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float s = scale[r];
      const float* yr = y + r * n;
      const T* res = residual ? residual + r * n : nullptr;
      T* o = out + r * n;
      if (bias && res) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) o[j] = static_cast<T>(yr[j] * s + load(bias, j) + load(res, j));
      } else if (bias) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) o[j] = static_cast<T>(yr[j] * s + load(bias, j));
      } else if (res) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) o[j] = static_cast<T>(yr[j] * s + load(res, j));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) o[j] = static_cast<T>(yr[j] * s);
      }
    }
  });
}

// y (M, N) float32 = float(sum_k (q[m, k] - 128) w[n, k]) * w_scales[n], for few rows: each thread streams
// a contiguous range of weight rows once (what bounds batch-1 decode is DRAM bandwidth; oneDNN's int8
// product reached 13-15 GB/s of the 22 a plain read gets on the 2-core Xeon), every row against all M
// activation rows while it is in L1. The products of uint8 and int8 summed in int32 are what VNNI's
// vpdpbusd computes; -128 * sum_k w[n, k] (`w_sums`) restores the zero point exactly.
// sum_i a[i] * b[i] for uint8 a, int8 b, exact in int32 (|a b| < 2^15, k < 2^16).
inline int32_t dot(const uint8_t* a, const int8_t* b, int64_t k) {
  int64_t i = 0;
  int32_t sum = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
  for (; i + 128 <= k; i += 128) {
    acc0 = _mm512_dpbusd_epi32(acc0, _mm512_loadu_si512(a + i), _mm512_loadu_si512(b + i));
    acc1 = _mm512_dpbusd_epi32(acc1, _mm512_loadu_si512(a + i + 64), _mm512_loadu_si512(b + i + 64));
  }
  for (; i + 64 <= k; i += 64) acc0 = _mm512_dpbusd_epi32(acc0, _mm512_loadu_si512(a + i), _mm512_loadu_si512(b + i));
  sum = _mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1));
#elif defined(__AVX2__)
  __m256i acc = _mm256_setzero_si256();
  for (; i + 16 <= k; i += 16) {  // widened to int16: AVX2's u8 x s8 pair sums (vpmaddubsw) saturate
    const __m256i av = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i)));
    const __m256i bv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(av, bv));
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
  sum = _mm_cvtsi128_si32(s4);
#endif
  for (; i < k; ++i) sum += static_cast<int32_t>(a[i]) * static_cast<int32_t>(b[i]);
  return sum;
}

void gemv(const uint8_t* q, int64_t m_rows, int64_t k, const int8_t* w, const int32_t* w_sums,
          const float* w_scales, int64_t n, float* y) {
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t j = n0; j < n1; ++j) {
      const int8_t* wr = w + j * k;
      for (int64_t r = 0; r < m_rows; ++r) {
        const int32_t acc = dot(q + r * k, wr, k) - kZeroPoint * w_sums[j];
        y[r * n + j] = static_cast<float>(acc) * w_scales[j];
      }
    }
  });
}

at::Tensor qlinear(const at::Tensor& q, const at::Tensor& packed, const at::Tensor& w_scales,
                   const at::Tensor& w_zero_points) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_pointwise", "");
  std::vector<c10::IValue> stack{q,
                                 1.0,
                                 kZeroPoint,
                                 packed,
                                 w_scales,
                                 w_zero_points,
                                 c10::IValue(),
                                 1.0,
                                 int64_t{0},
                                 c10::IValue(at::ScalarType::Float),
                                 std::string("none"),
                                 c10::List<std::optional<at::Scalar>>(),
                                 std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quantize_rows: x must be contiguous (T, K)");
  auto q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  auto scale = at::empty({x.size(0), 1}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat) {
    quantize(x.data_ptr<float>(), x.size(0), x.size(1), q.data_ptr<uint8_t>(), scale.data_ptr<float>());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "quantize_rows: float32 or bfloat16 only");
    quantize(x.data_ptr<at::BFloat16>(), x.size(0), x.size(1), q.data_ptr<uint8_t>(), scale.data_ptr<float>());
  }
  return {q, scale};
}

// x (T, K) float32 or bfloat16 -> (T, N) in x's dtype: act(x W^T + bias) + residual. activation: "" or an
// ATen GELU approximation ("tanh", "none"), applied by ATen's vectorized kernel; with a residual, none.
// plain (N, K) int8 and its row sums, when given, serve rows < gemv_rows by `gemv`; else oneDNN.
at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& w_scales,
                       const at::Tensor& w_zero_points, const std::optional<at::Tensor>& plain,
                       const std::optional<at::Tensor>& w_sums, int64_t gemv_rows,
                       const std::optional<at::Tensor>& bias, const std::string& gelu,
                       const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(gelu.empty() || !residual, "int8_linear: an activation and a residual together");
  const auto x = x_in.contiguous();
  auto [q, scale] = quantize_rows(x);
  at::Tensor y;  // (T, N) float32
  if (plain && x.size(0) < gemv_rows) {
    TORCH_CHECK(plain->is_contiguous() && plain->scalar_type() == at::kChar && plain->size(1) == x.size(1) &&
                    w_sums && w_sums->scalar_type() == at::kInt && w_scales.scalar_type() == at::kFloat,
                "int8_linear: plain weight");
    const int64_t n = plain->size(0);
    y = at::empty({x.size(0), n}, x.options().dtype(at::kFloat));
    gemv(q.data_ptr<uint8_t>(), x.size(0), x.size(1), plain->data_ptr<int8_t>(), w_sums->data_ptr<int32_t>(),
         w_scales.data_ptr<float>(), n, y.data_ptr<float>());
  } else {
    y = qlinear(q, packed, w_scales, w_zero_points);
  }
  const int64_t rows = y.size(0), n = y.size(1);
  TORCH_CHECK(!bias || (bias->scalar_type() == x.scalar_type() && bias->numel() == n), "int8_linear: bias");
  std::optional<at::Tensor> res;
  if (residual) {
    res = residual->contiguous();
    TORCH_CHECK(res->scalar_type() == x.scalar_type() && res->sizes() == y.sizes(), "int8_linear: residual");
  }
  const auto b = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  at::Tensor out;
  if (x.scalar_type() == at::kFloat) {
    epilogue<float>(y.data_ptr<float>(), scale.data_ptr<float>(), b ? b->data_ptr<float>() : nullptr,
                    res ? res->data_ptr<float>() : nullptr, rows, n, y.data_ptr<float>());
    out = y;
  } else if (gelu.empty()) {
    out = at::empty(y.sizes(), x.options());
    epilogue<at::BFloat16>(y.data_ptr<float>(), scale.data_ptr<float>(),
                           b ? b->data_ptr<at::BFloat16>() : nullptr, res ? res->data_ptr<at::BFloat16>() : nullptr,
                           rows, n, out.data_ptr<at::BFloat16>());
  } else {  // the activation in float32 first, then one rounding, as the twin does
    epilogue<float>(y.data_ptr<float>(), scale.data_ptr<float>(), nullptr, nullptr, rows, n, y.data_ptr<float>());
    if (b) y.add_(*b);
    return at::gelu_(y, gelu).to(x.scalar_type());
  }
  return gelu.empty() ? out : at::gelu_(out, gelu);
}
