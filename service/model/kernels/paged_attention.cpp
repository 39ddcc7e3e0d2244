// Decode attention that reads the paged KV cache in place: one query token per sequence attends over its
// context_len cached keys, found through its block table, without gathering them into a contiguous copy.
// Per sequence (or group of its heads, when there are few sequences): the scores of every cached token and
// their softmax in float32, then the weighted sum of values; each token's keys, then values, read as one
// contiguous run (measured 24 -> 30 GB/s against one (sequence, head) at a time).
// Part of the kernels module (module.cpp, built by kernels/__init__.py); attention.py has the
// pure-PyTorch path it must equal (tests/parity/test_paged_attention.py).
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
extern "C" __m512 Sleef_expf16_u10(__m512);  // torch's SLEEF (exported by libtorch_cpu): exp of 16 floats
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// A row of keys or values as float32: the row itself for float, else converted into `buffer`.
inline const float* as_float(const float* row, float*, int64_t) { return row; }

template <typename T>
inline const float* as_float(const T* row, float* buffer, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(row[i]);
  return buffer;
}

inline const float* as_float(const at::BFloat16* row, float* buffer, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  uint32_t* out = reinterpret_cast<uint32_t*>(buffer);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;  // bf16 is float's top half
  return buffer;
}

// One work item: sequence b, heads [h0, h1). Reads each cached token's keys (then values) for those heads as
// one contiguous run, so DRAM streams them.
template <typename T>
void attend_item(const T* qp, const T* kp, const T* vp, const int32_t* table, int64_t len, int64_t block_size,
                 int64_t b, int64_t h0, int64_t h1, int64_t heads, int64_t dim, float scale, T* op,
                 std::vector<float>& scores, std::vector<float>& row_buffer, std::vector<float>& query,
                 std::vector<float>& acc) {
  const int64_t nh = h1 - h0, width = nh * dim, row_stride = heads * dim;
  const float* q = as_float(qp + (b * heads + h0) * dim, query.data(), width);
  if (q != query.data()) std::copy(q, q + width, query.data());
  scores.resize(nh * len);
  for (int64_t t = 0; t < len; ++t) {
    const int64_t row = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
    const float* key = as_float(kp + row * row_stride + h0 * dim, row_buffer.data(), width);
    for (int64_t h = 0; h < nh; ++h) {
      float s = 0.f;
      const float* kh = key + h * dim;
      const float* qh = query.data() + h * dim;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < dim; ++d) s += qh[d] * kh[d];
      scores[h * len + t] = s * scale;
    }
  }
  std::vector<float> inv_total(nh);
  for (int64_t h = 0; h < nh; ++h) {
    float* sh = scores.data() + h * len;
    const float m = *std::max_element(sh, sh + len);
    float total = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      sh[t] = std::exp(sh[t] - m);
      total += sh[t];
    }
    inv_total[h] = 1.f / total;
  }
  std::fill(acc.begin(), acc.begin() + width, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    const int64_t row = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
    const float* value = as_float(vp + row * row_stride + h0 * dim, row_buffer.data(), width);
    for (int64_t h = 0; h < nh; ++h) {
      const float p = scores[h * len + t];
      float* ah = acc.data() + h * dim;
      const float* vh = value + h * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) ah[d] += p * vh[d];
    }
  }
  for (int64_t h = 0; h < nh; ++h)
    for (int64_t d = 0; d < dim; ++d)
      op[(b * heads + h0 + h) * dim + d] = static_cast<T>(acc[h * dim + d] * inv_total[h]);
}

#if defined(__AVX512F__)
// The AVX-512 path for head_dim 64 (every GPT-2 size): keys and values converted to float32 as they load
// (no conversion buffer), 512-bit products, and the softmax's exponentials 16 at a time.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  alignas(64) float f[16];
  _mm512_store_ps(f, v);
  for (int i = 0; i < 16; ++i) p[i] = static_cast<at::BFloat16>(f[i]);
}

template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

constexpr int64_t kAhead = 2;  // tokens ahead to prefetch: a sequence's blocks sit anywhere in the pool

// Heads [h0, h1) of sequence b, token by token (each token's keys, then values, for those heads are one
// contiguous run, which DRAM streams), with the scores exponentiated 16 at a time.
template <typename T>
void attend_rows_64(const T* qp, const T* kp, const T* vp, const std::vector<int64_t>& rows, int64_t b,
                    int64_t h0, int64_t h1, int64_t heads, float scale, T* op, std::vector<float>& scores,
                    std::vector<float>& query, std::vector<float>& acc) {
  constexpr int64_t dim = 64;
  const int64_t len = static_cast<int64_t>(rows.size()), nh = h1 - h0, width = nh * dim;
  const int64_t row_stride = heads * dim, stride = len + 16;  // scores: one row of `stride` per head
  scores.resize(nh * stride);
  float* sc = scores.data();
  float* qf = query.data();
  for (int64_t i = 0; i < width; i += 16) _mm512_storeu_ps(qf + i, load16(qp + (b * heads + h0) * dim + i));
  for (int64_t t = 0; t < len; ++t) {
    const T* kr = kp + rows[t] * row_stride + h0 * dim;
    if (t + kAhead < len) prefetch_row(kp + rows[t + kAhead] * row_stride + h0 * dim, width);
    for (int64_t h = 0; h < nh; ++h) {
      const T* kh = kr + h * dim;
      const float* qh = qf + h * dim;
      __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qh), load16(kh));
      a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16), load16(kh + 16), a);
      a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 32), load16(kh + 32), a);
      a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 48), load16(kh + 48), a);
      sc[h * stride + t] = _mm512_reduce_add_ps(a) * scale;
    }
  }
  std::vector<float> inv_total(nh);
  for (int64_t h = 0; h < nh; ++h) {
    float* sh = sc + h * stride;
    const float m = *std::max_element(sh, sh + len);
    const __m512 mv = _mm512_set1_ps(m);
    __m512 total = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) {
      const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_loadu_ps(sh + t), mv));
      _mm512_storeu_ps(sh + t, e);
      total = _mm512_add_ps(total, e);
    }
    float sum = _mm512_reduce_add_ps(total);
    for (; t < len; ++t) {
      sh[t] = std::exp(sh[t] - m);
      sum += sh[t];
    }
    inv_total[h] = 1.f / sum;
  }
  float* ac = acc.data();
  std::fill(ac, ac + width, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    const T* vr = vp + rows[t] * row_stride + h0 * dim;
    if (t + kAhead < len) prefetch_row(vp + rows[t + kAhead] * row_stride + h0 * dim, width);
    for (int64_t h = 0; h < nh; ++h) {
      const __m512 p = _mm512_set1_ps(sc[h * stride + t]);
      const T* vh = vr + h * dim;
      float* ah = ac + h * dim;
      for (int64_t c = 0; c < dim; c += 16)
        _mm512_storeu_ps(ah + c, _mm512_fmadd_ps(p, load16(vh + c), _mm512_loadu_ps(ah + c)));
    }
  }
  for (int64_t h = 0; h < nh; ++h) {
    const __m512 inv = _mm512_set1_ps(inv_total[h]);
    T* oh = op + (b * heads + h0 + h) * dim;
    for (int64_t c = 0; c < dim; c += 16) store16(oh + c, _mm512_mul_ps(_mm512_loadu_ps(ac + h * dim + c), inv));
  }
}
#endif

template <typename T>
constexpr bool kVectorized =
#if defined(__AVX512F__)
    std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;
#else
    false;
#endif

template <typename T>
void decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                      const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                      double scale, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t max_blocks = block_tables.size(1);
  // Whole sequences per item when there are enough of them to keep every thread busy; else head groups.
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t groups = std::min<int64_t>(heads, std::max<int64_t>(1, (want + batch - 1) / batch));
  const int64_t per_group = (heads + groups - 1) / groups;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, row_buffer(heads * dim), query(heads * dim), acc(heads * dim);
    std::vector<int64_t> rows;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / groups, h0 = (item % groups) * per_group, h1 = std::min(heads, h0 + per_group);
      if (h0 >= h1) continue;
#if defined(__AVX512F__)
      if constexpr (kVectorized<T>) {
        if (dim == 64) {
          const int32_t* table = tables + b * max_blocks;
          rows.resize(lens[b]);
          for (int64_t t = 0; t < lens[b]; ++t)
            rows[t] = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
          attend_rows_64<T>(qp, kp, vp, rows, b, h0, h1, heads, static_cast<float>(scale), op, scores, query, acc);
          continue;
        }
      }
#endif
      attend_item<T>(qp, kp, vp, tables + b * max_blocks, lens[b], block_size, b, h0, h1, heads, dim,
                     static_cast<float>(scale), op, scores, row_buffer, query, acc);
    }
  });
}

}  // namespace

// q: (B, H, D); k_pool, v_pool: (rows, H, D); block_tables: int32 (B, max_blocks); context_lens: int32 (B,),
// each >= 1 and <= max_blocks * block_size. Returns (B, H, D) in q's dtype.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  int64_t block_size, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && k_pool.dim() == 3 && v_pool.dim() == 3, "CPU 3-D tensors");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "the KV pools must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == v_pool.scalar_type(), "one dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt, "int32 indices");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && context_lens.dim() == 1 &&
                  context_lens.size(0) == q.size(0),
              "one block table and one length per query");
  auto qc = q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_attention<scalar_t>(qc, k_pool, v_pool, tables, lens, block_size, scale, out);
  });
  return out;
}
