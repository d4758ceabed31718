// The kernels janusvl's Python code calls (bindings.cpp), declared once for every source.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace janusvl {

// half_linear.cpp
torch::Tensor half_linear(const torch::Tensor& x, const torch::Tensor& weight);
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const std::optional<torch::Tensor>& valid, double scale);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

// int_linear.cpp
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scale);
torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const torch::Tensor& low);
torch::Tensor int4_dequantize(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& low);

// decoder_step.cpp
using Operands = std::vector<torch::Tensor>;
torch::Tensor decode_layers(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                            const std::vector<std::vector<Operands>>& layers, int64_t heads, int64_t kv_heads,
                            double eps, const std::vector<std::vector<torch::Tensor>>& keys,
                            const std::vector<std::vector<torch::Tensor>>& values,
                            const std::vector<std::optional<torch::Tensor>>& valid,
                            const std::vector<int64_t>& lengths);

}  // namespace janusvl
