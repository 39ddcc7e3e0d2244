// Decode attention that reads the paged KV cache in place: one query token per sequence attends over its
// context_len cached keys, found through its block table, without gathering them into a contiguous copy.
// Two passes per (sequence, head): scores and their softmax in float32, then the weighted sum of values.
// Built by service/model/kernels/__init__.py with torch.utils.cpp_extension; attention.py has the
// pure-PyTorch path it must equal (tests/parity/test_paged_attention.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
void decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                      const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                      double scale, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t max_blocks = block_tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  const int64_t row_stride = heads * dim;  // k_pool, v_pool: (rows, heads, dim), contiguous
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, query(dim), acc(dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / heads, h = item % heads, len = lens[b];
      const int32_t* table = tables + b * max_blocks;
      for (int64_t d = 0; d < dim; ++d) query[d] = static_cast<float>(qp[(b * heads + h) * dim + d]);
      scores.resize(len);
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < len; ++t) {
        const T* key = kp + (table[t / block_size] * block_size + t % block_size) * row_stride + h * dim;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < dim; ++d) s += query[d] * static_cast<float>(key[d]);
        scores[t] = s * fscale;
        max_score = std::max(max_score, scores[t]);
      }
      float total = 0.f;
      for (int64_t t = 0; t < len; ++t) {
        scores[t] = std::exp(scores[t] - max_score);
        total += scores[t];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const T* value = vp + (table[t / block_size] * block_size + t % block_size) * row_stride + h * dim;
        const float p = scores[t];
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) acc[d] += p * static_cast<float>(value[d]);
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < dim; ++d) op[(b * heads + h) * dim + d] = static_cast<T>(acc[d] * inv);
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
  auto qc = q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_attention<scalar_t>(qc, k_pool, v_pool, tables, lens, block_size, scale, out);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache, in place");
}
