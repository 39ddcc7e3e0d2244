// The model's forward for a decode step of one or two sequences in one call from Python. At batch 1 a
// step streams the weights once (memory-bound: ~16 ms for GPT-2 small in float32 on a 2-core EPYC) and
// Python's per-layer calls (modules, layer norms, the attention call, seven products) added about 1 ms
// more, during which memory idles, and each Python call after a step's weights have streamed through the
// caches runs cold (a 768-wide layer norm: 10 us warm, 170 us after a 100 MB read). The same ATen and kernel
// calls as GPT2.forward makes for such a step, in the same order (embeddings, blocks, ln_f), so the results
// are the same bits (tests/engine/test_engine.py compares them).
// Part of the kernels module (module.cpp, built by kernels/__init__.py).
#include "kernels.h"

#include <ATen/ATen.h>

namespace {

constexpr size_t kPerBlock = 4 + 4 * 7;  // ln_1, ln_2 (weight, bias); 4 linears x (weight, bias, 5 int8)

SmallDecoder::Linear linear_at(const std::vector<at::Tensor>& t, size_t first, bool int8) {
  SmallDecoder::Linear l;
  l.weight = t[first];
  l.bias = t[first + 1];
  l.int8 = int8;
  if (int8) {
    l.packed = t[first + 2];
    l.scales = t[first + 3];
    l.zero_points = t[first + 4];
    l.plain = t[first + 5];
    l.sums = t[first + 6];
  }
  return l;
}

}  // namespace

SmallDecoder::SmallDecoder(const std::vector<at::Tensor>& outer, const std::vector<std::vector<at::Tensor>>& blocks,
                           const std::vector<double>& scales, double eps, int64_t n_head, const std::string& gelu,
                           bool int8, int64_t gemv_rows)
    : eps_(eps), n_head_(n_head), gemv_rows_(gemv_rows), gelu_(gelu) {
  TORCH_CHECK(outer.size() == 4, "SmallDecoder: wte, wpe, ln_f weight and bias");
  wte_ = outer[0];
  wpe_ = outer[1];
  ln_f_weight_ = outer[2];
  ln_f_bias_ = outer[3];
  TORCH_CHECK(blocks.size() == scales.size(), "SmallDecoder: one scale per block");
  for (size_t i = 0; i < blocks.size(); ++i) {
    const auto& t = blocks[i];
    TORCH_CHECK(t.size() == kPerBlock, "SmallDecoder: ", kPerBlock, " tensors per block");
    Block b;
    b.ln1_weight = t[0];
    b.ln1_bias = t[1];
    b.ln2_weight = t[2];
    b.ln2_bias = t[3];
    b.qkv = linear_at(t, 4, int8);
    b.attn_proj = linear_at(t, 11, int8);
    b.fc = linear_at(t, 18, int8);
    b.mlp_proj = linear_at(t, 25, int8);
    b.scale = scales[i];
    blocks_.push_back(std::move(b));
  }
}

at::Tensor SmallDecoder::linear(const Linear& l, const at::Tensor& x, const std::string& gelu,
                                const std::optional<at::Tensor>& residual) const {
  if (l.int8)
    return int8_linear(x, l.packed, l.scales, l.zero_points, l.plain, l.sums, gemv_rows_, l.bias, gelu, residual);
  return linear_small(x, l.weight, l.bias, gelu, residual);
}

// input_ids, positions: int64 (B,), one decoding token per sequence; k_cache, v_cache: (n_layer, rows, H, D);
// write_rows: int64 (B,) where each new token's keys and values go; block_tables, context_lens: as
// paged_decode_attention takes them. Returns the final hidden states (B, n_embd), after ln_f.
at::Tensor SmallDecoder::forward(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& write_rows,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens,
                                 int64_t block_size) const {
  TORCH_CHECK(input_ids.dim() == 1 && k_cache.dim() == 4 && k_cache.size(0) == static_cast<int64_t>(blocks_.size()),
              "SmallDecoder: input_ids (B,) and a cache of one layer per block");
  at::Tensor x = at::embedding(wte_, input_ids) + at::embedding(wpe_, positions);
  const int64_t batch = x.size(0), embd = x.size(1), dim = embd / n_head_;
  for (size_t layer = 0; layer < blocks_.size(); ++layer) {
    const Block& b = blocks_[layer];
    const auto h = at::layer_norm(x, {embd}, b.ln1_weight, b.ln1_bias, eps_);
    const auto qkv = linear(b.qkv, h, "", std::nullopt).reshape({batch, 3, n_head_, dim}).unbind(1);
    auto k_pool = k_cache[layer], v_pool = v_cache[layer];
    k_pool.index_copy_(0, write_rows, qkv[1]);
    v_pool.index_copy_(0, write_rows, qkv[2]);
    const auto out = paged_decode_attention(qkv[0], k_pool, v_pool, block_tables, context_lens, block_size, b.scale);
    x = linear(b.attn_proj, out.flatten(1), "", x);
    const auto h2 = at::layer_norm(x, {embd}, b.ln2_weight, b.ln2_bias, eps_);
    x = linear(b.mlp_proj, linear(b.fc, h2, gelu_, std::nullopt), "", x);
  }
  return at::layer_norm(x, {embd}, ln_f_weight_, ln_f_bias_, eps_);
}
