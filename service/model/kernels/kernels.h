// The compiled kernels' entry points, shared by their sources and module.cpp (which exposes them to Python).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

// gemv.cpp: float32 act(x W^T + bias) + residual for one or two rows.
at::Tensor linear_small(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::string& gelu, const std::optional<at::Tensor>& residual);
// gemv.cpp: greedy decoding's exact argmax of x W^T for one or two rows, screened by a bfloat16 copy of W.
at::Tensor greedy_head(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& screen);

// int8_linear.cpp: the int8 linear (QUANTIZATION=int8) in one call.
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scales,
                       const at::Tensor& w_zero_points, const std::optional<at::Tensor>& plain,
                       const std::optional<at::Tensor>& w_sums, int64_t gemv_rows,
                       const std::optional<at::Tensor>& bias, const std::string& gelu,
                       const std::optional<at::Tensor>& residual);

// paged_attention.cpp: decode attention over the paged KV cache, in place.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  int64_t block_size, double scale);

// logit_rows.cpp: reductions over rows of logits.
at::Tensor argmax_rows(const at::Tensor& logits);
std::tuple<at::Tensor, at::Tensor> target_logprobs(const at::Tensor& logits, const at::Tensor& targets);

// decode_small.cpp: the model's forward for a decode step of one or two sequences in one call.
class SmallDecoder {
 public:
  // One entry per block, 32 tensors each: ln_1 weight, bias, ln_2 weight, bias; then per linear (qkv,
  // attention proj, fc, mlp proj) its weight, bias and the five int8 ones below (empty for float32).
  struct Linear {
    at::Tensor weight, bias;
    bool int8 = false;
    at::Tensor packed, scales, zero_points, plain, sums;  // int8 only (linear.Int8Weight)
  };
  struct Block {
    at::Tensor ln1_weight, ln1_bias, ln2_weight, ln2_bias;
    Linear qkv, attn_proj, fc, mlp_proj;
    double scale;
  };

  // `outer`: wte, wpe, ln_f weight, ln_f bias.
  SmallDecoder(const std::vector<at::Tensor>& outer, const std::vector<std::vector<at::Tensor>>& blocks,
               const std::vector<double>& scales, double eps, int64_t n_head, const std::string& gelu, bool int8,
               int64_t gemv_rows);
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& write_rows, const at::Tensor& block_tables,
                     const at::Tensor& context_lens, int64_t block_size) const;

 private:
  at::Tensor linear(const Linear& l, const at::Tensor& x, const std::string& gelu,
                    const std::optional<at::Tensor>& residual) const;
  at::Tensor wte_, wpe_, ln_f_weight_, ln_f_bias_;
  std::vector<Block> blocks_;
  double eps_;
  int64_t n_head_, gemv_rows_;
  std::string gelu_;
};
