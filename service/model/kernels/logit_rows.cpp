// Reductions over each row of the logits (B, vocab), AVX-512 only (elsewhere they call the ATen ops):
// - argmax_rows: greedy decoding's argmax, the first index of the largest value, as
//   torch.max(dim=-1).indices gives (a NaN counts as the largest; the first NaN wins). ATen's reduction read
//   bfloat16 logits at about 5 GB/s (64 x 50257: 1.2-1.5 ms, ~5 % of a 64-sequence bf16 decode step).
// - target_logprobs: scoring's logprob of each row's target token and whether it is the argmax, without
//   writing the (B, vocab) log_softmax (its float32 log_softmax and max were 8 % of a scoring run).
// Part of the kernels module (module.cpp, built by kernels/__init__.py); the sampler's and the runner's
// tests compare them with the ATen ops.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
extern "C" __m512 Sleef_expf16_u10(__m512);  // torch's SLEEF (exported by libtorch_cpu): exp of 16 floats
#endif

#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>

namespace {

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

template <typename T>
int64_t row_argmax(const T* row, int64_t n) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = load16(row + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_max_ps(best, v);
  }
  float m = _mm512_reduce_max_ps(best);
  for (int64_t j = i; j < n; ++j) {
    const float v = static_cast<float>(row[j]);
    if (std::isnan(v)) nan = 1;
    m = std::max(m, v);
  }
  if (nan) {  // torch.max's rule: the first NaN
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(static_cast<float>(row[j]))) return j;
  }
  const __m512 mv = _mm512_set1_ps(m);
  for (i = 0; i + 16 <= n; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(load16(row + i), mv, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  for (; i < n; ++i)
    if (static_cast<float>(row[i]) == m) return i;
  return 0;
}

// log(sum_j exp(row[j] - m)) + m for a row without NaN whose maximum is m.
template <typename T>
float row_logsumexp(const T* row, int64_t n, float m) {
  if (std::isinf(m)) return m;  // every entry -inf: the target's -inf - (-inf) is NaN, as log_softmax gives
  const __m512 mv = _mm512_set1_ps(m);
  __m512 total = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) total = _mm512_add_ps(total, Sleef_expf16_u10(_mm512_sub_ps(load16(row + i), mv)));
  float sum = _mm512_reduce_add_ps(total);
  for (; i < n; ++i) sum += std::exp(static_cast<float>(row[i]) - m);
  return m + std::log(sum);
}
#endif

}  // namespace

// logits: (B, V) float32 or bfloat16. Returns int64 (B,).
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu(), "argmax_rows: a CPU (B, V) tensor");
#if defined(__AVX512F__)
  const auto type = logits.scalar_type();
  if (type == at::kFloat || type == at::kBFloat16) {
    const auto x = logits.contiguous();
    const int64_t rows = x.size(0), n = x.size(1);
    auto out = at::empty({rows}, x.options().dtype(at::kLong));
    int64_t* o = out.data_ptr<int64_t>();
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        o[r] = type == at::kFloat ? row_argmax(x.data_ptr<float>() + r * n, n)
                                  : row_argmax(x.data_ptr<at::BFloat16>() + r * n, n);
    });
    return out;
  }
#endif
  return std::get<1>(at::max(logits, -1));
}

// logits (B, V) float32 or bfloat16, targets (B,) int64 -> (logprob of each target, float32 (B,); whether
// it is the row's first argmax, bool (B,)).
std::tuple<at::Tensor, at::Tensor> target_logprobs(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu() && targets.dim() == 1 &&
                  targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong,
              "target_logprobs: CPU (B, V) logits and (B,) int64 targets");
#if defined(__AVX512F__)
  const auto type = logits.scalar_type();
  if (type == at::kFloat || type == at::kBFloat16) {
    const auto x = logits.contiguous();
    const auto t = targets.contiguous();
    const int64_t rows = x.size(0), n = x.size(1);
    auto chosen = at::empty({rows}, x.options().dtype(at::kFloat));
    auto greedy = at::empty({rows}, x.options().dtype(at::kBool));
    const int64_t* tp = t.data_ptr<int64_t>();
    float* cp = chosen.data_ptr<float>();
    bool* gp = greedy.data_ptr<bool>();
    std::atomic<bool> bad{false};
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (tp[r] < 0 || tp[r] >= n) {
          bad = true;
          continue;
        }
        auto score = [&](const auto* row) {
          const int64_t best = row_argmax(row, n);
          const float m = static_cast<float>(row[best]);
          gp[r] = best == tp[r];
          // A row holding +inf is NaN throughout under log_softmax (inf - inf), as one holding NaN.
          cp[r] = std::isnan(m) || m == std::numeric_limits<float>::infinity()
                      ? std::numeric_limits<float>::quiet_NaN()
                      : static_cast<float>(row[tp[r]]) - row_logsumexp(row, n, m);
        };
        if (type == at::kFloat) {
          score(x.data_ptr<float>() + r * n);
        } else {
          score(x.data_ptr<at::BFloat16>() + r * n);
        }
      }
    });
    TORCH_CHECK(!bad, "target_logprobs: a target outside the vocabulary");
    return {chosen, greedy};
  }
#endif
  const auto lp = at::log_softmax(logits.to(at::kFloat), -1);
  return {lp.gather(1, targets.unsqueeze(1)).squeeze(1), std::get<1>(at::max(logits, -1)) == targets};
}
