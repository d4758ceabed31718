// One decoding step (one new token per row) through every layer of the LLaMA decoder in a
// single call, for the CPUs where janusvl's kernels run the decoder (bf16/fp16 emulated).
//
// A step of a 24-layer decoder is ~30 small tensor operations per layer; called from Python each
// costs microseconds of dispatch, together ~12% of a batch-1 step of Janus-Pro-1B. Here the same
// operations run in the same order on the same kernels (janusvl's norm, rotary, product and
// attention kernels, ATen's add, SiLU and multiply), so the result is the Python path's to the
// bit: janusvl.models.llama's DecoderLayer is the reference this mirrors, and the tests compare
// the two on every weight kind.
#include "ops.h"

#include <cmath>

namespace janusvl {
namespace {

// x's rows [.., K] in fp32 times one projection's weights, rounded back to x's dtype, as
// janusvl.models.layers.fp32_product calls the kernels. The operands say which kernel: the
// weight itself (bf16/fp16), int8 weights + row scales, or int4 weights + scales + lows.
torch::Tensor project(const Operands& w, const torch::Tensor& x) {
  const auto x2 = x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous();
  torch::Tensor y;
  switch (w.size()) {
    case 1: y = half_linear(x2, w[0]); break;
    case 2: y = int8_linear(x2, w[0], w[1]); break;
    case 3: y = int4_linear(x2, w[0], w[1], w[2]); break;
    default: TORCH_CHECK(false, "decode_layers: a projection has 1, 2 or 3 operands, got ", w.size());
  }
  auto shape = x.sizes().vec();
  shape.back() = y.size(1);
  return y.to(x.scalar_type()).view(shape);
}

struct Caches {
  const std::vector<std::vector<torch::Tensor>>& keys;    // [cache][layer] [rows, Hkv, capacity, D]
  const std::vector<std::vector<torch::Tensor>>& values;  // the same
  const std::vector<std::optional<torch::Tensor>>& valid; // [cache] bool [rows, length + 1] or None
  const std::vector<int64_t>& lengths;                    // [cache] tokens already held
};

// Store the new keys and values of every cache's rows and attend each row over its own cache,
// as janusvl.models.kv_cache's KVCache.attend (and RaggedBatch's split of the batch) does.
torch::Tensor attend(int64_t layer, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const Caches& caches) {
  std::vector<torch::Tensor> out;
  const double scale = std::pow(static_cast<double>(q.size(-1)), -0.5);
  int64_t row = 0;
  for (size_t c = 0; c < caches.lengths.size(); ++c) {
    const auto& K = caches.keys[c][layer];
    const auto& V = caches.values[c][layer];
    const int64_t rows = K.size(0), length = caches.lengths[c];
    TORCH_CHECK(length < K.size(2), "decode_layers: KV cache full (", length, " tokens)");
    K.narrow(2, length, 1).copy_(k.narrow(0, row, rows));
    V.narrow(2, length, 1).copy_(v.narrow(0, row, rows));
    const auto qc = q.narrow(0, row, rows).to(at::kFloat).contiguous();
    out.push_back(decode_attention(qc, K.narrow(2, 0, length + 1), V.narrow(2, 0, length + 1), caches.valid[c],
                                   scale).to(q.scalar_type()));
    row += rows;
  }
  TORCH_CHECK(row == q.size(0), "decode_layers: the caches hold ", row, " rows, the batch ", q.size(0));
  return out.size() == 1 ? out[0] : at::cat(out);
}

// One DecoderLayer: x + attention(norm(x)), then + MLP(norm(x)). layer = {input norm weight,
// post-attention norm weight, q/k/v (fused), o, gate/up (fused), down}.
torch::Tensor layer_step(int64_t l, const std::vector<Operands>& layer, const torch::Tensor& x,
                         const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads, int64_t kv_heads,
                         double eps, const Caches& caches) {
  const int64_t B = x.size(0), T = x.size(1);
  const int64_t D = cos.size(-1);
  const auto qkv = project(layer[2], rms_norm(x, layer[0][0], eps));  // [B, T, (H + 2 Hkv) D]
  const auto parts = qkv.split_with_sizes({heads * D, kv_heads * D, kv_heads * D}, -1);
  const auto q = rope(parts[0].view({B, T, heads, D}), cos, sin).transpose(1, 2);  // [B, H, T, D]
  const auto k = rope(parts[1].view({B, T, kv_heads, D}), cos, sin).transpose(1, 2);
  const auto v = parts[2].view({B, T, kv_heads, D}).transpose(1, 2);
  const auto out = attend(l, q, k, v, caches);  // [B, H, T, D]
  const auto h = x + project(layer[3], out.transpose(1, 2).reshape({B, T, heads * D}));
  const auto gate_up = project(layer[4], rms_norm(h, layer[1][0], eps)).chunk(2, -1);
  return h + project(layer[5], at::silu(gate_up[0]) * gate_up[1]);
}

}  // namespace

torch::Tensor decode_layers(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                            const std::vector<std::vector<Operands>>& layers, int64_t heads, int64_t kv_heads,
                            double eps, const std::vector<std::vector<torch::Tensor>>& keys,
                            const std::vector<std::vector<torch::Tensor>>& values,
                            const std::vector<std::optional<torch::Tensor>>& valid,
                            const std::vector<int64_t>& lengths) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "decode_layers: x must be [B, 1, hidden] (one token per row)");
  TORCH_CHECK(keys.size() == lengths.size() && values.size() == lengths.size() && valid.size() == lengths.size(),
              "decode_layers: keys, values, valid and lengths must name the same caches");
  const Caches caches{keys, values, valid, lengths};
  for (size_t l = 0; l < layers.size(); ++l) {
    TORCH_CHECK(layers[l].size() == 6 && layers[l][0].size() == 1 && layers[l][1].size() == 1,
                "decode_layers: each layer is {norm, norm, qkv, o, gate_up, down}");
    x = layer_step(static_cast<int64_t>(l), layers[l], x, cos, sin, heads, kv_heads, eps, caches);
  }
  return x;
}

}  // namespace janusvl
