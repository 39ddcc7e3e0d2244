// The compiled kernels as one Python module: each source's entry points (kernels.h), built once per
// instruction set by service/model/kernels/__init__.py with torch.utils.cpp_extension.
#include "kernels.h"

#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // None of them touches a Python object: the engine thread lets the event loop run while they compute.
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("linear_small", &linear_small, "float32 x W^T + bias (+ GELU) (+ residual) for one or two rows", nogil);
  m.def("greedy_head", &greedy_head, "exact first argmax of x W^T for one or two rows, screened in bfloat16", nogil);
  m.def("quantize_rows", &quantize_rows, "per-row symmetric 8-bit quantization, stored as uint8 + 128", nogil);
  m.def("int8_linear", &int8_linear, "quantize rows, oneDNN int8 product, rescale + bias + activation + residual", nogil);
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache, in place", nogil);
  m.def("argmax_rows", &argmax_rows, "first index of each row's maximum, as torch.max(dim=-1).indices", nogil);
  m.def("target_logprobs", &target_logprobs, "each row's target logprob and whether it is the first argmax", nogil);
  pybind11::class_<SmallDecoder>(m, "SmallDecoder")
      .def(pybind11::init<const std::vector<at::Tensor>&, const std::vector<std::vector<at::Tensor>>&,
                          const std::vector<double>&, double, int64_t, const std::string&, bool, int64_t>())
      .def("forward", &SmallDecoder::forward, "the model's forward for a decode step of one or two sequences", nogil);
}
