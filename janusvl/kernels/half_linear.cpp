// y = x W^T for bf16, fp16 or int8 weights and fp32 activations, on AVX2 + FMA + F16C; and one-query
// attention over a half-precision KV cache.
//
// Every weight is widened to fp32 in registers (exact for all three) and multiplied in fp32,
// so the result is the fp32 product of the checkpoint's own weights. Up to kTileRows rows (all
// of decoding), each output is one dot product computed the same way whatever the number of
// rows: eight fp32 lanes, lane j summing k = j, j+8, j+16, ... in order with fused
// multiply-adds, then one fixed reduction tree. An output's value therefore depends only on its
// own row of x and of W, never on how many rows are multiplied together (a row decoded in a
// batch of eight equals the same row alone).
#include "ops.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace janusvl {
namespace {

// MB rows of x against NB rows of W, accumulators in registers over the whole of K.
template <typename W, int MB, int NB>
inline void tile(const float* x, int64_t K, const typename W::T* w, int64_t ldw, float* y, int64_t ldy) {
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    if (k % 32 == 0)  // the next tile's weight rows, a cache line of each per 32 columns (see int_linear.cpp)
      for (int n = 0; n < NB; ++n)
        _mm_prefetch(reinterpret_cast<const char*>(w + (NB + n) * ldw + k) , _MM_HINT_T0);
    __m256 wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = W::load(w + n * ldw + k);
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm256_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) y[m * ldy + n] = reduce(acc[m][n]);
}

template <typename W, int MB, int NB>
inline void span(const float* x, int64_t K, const typename W::T* w, int64_t ldw, float* y, int64_t ldy,
                 int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) tile<W, MB, NB>(x, K, w + n * ldw, ldw, y + n, ldy);
  for (; n < n1; ++n) tile<W, MB, 1>(x, K, w + n * ldw, ldw, y + n, ldy);
}

template <typename W>
void run(const float* x, int64_t M, int64_t K, const typename W::T* w, int64_t ldw, int64_t N, float* y) {
  // Blocks of 48 weight rows (192 KiB at K = 2048) stay in L2 while every group of rows of x
  // passes over them; threads share out the blocks.
  constexpr int64_t block = 48;
  janusvl::share_blocks((N + block - 1) / block, [&](int64_t b) {
    const int64_t n0 = b * block, n1 = std::min(N, n0 + block);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) span<W, 4, 3>(x + m * K, K, w, ldw, y + m * N, N, n0, n1);
    const float* xm = x + m * K;
    float* ym = y + m * N;
    switch (M - m) {
      case 3: span<W, 3, 4>(xm, K, w, ldw, ym, N, n0, n1); break;
      case 2: span<W, 2, 6>(xm, K, w, ldw, ym, N, n0, n1); break;
      case 1: span<W, 1, 8>(xm, K, w, ldw, ym, N, n0, n1); break;
      default: break;
    }
  });
}

constexpr int64_t kTileRows = 128;  // more rows than this take janusvl::panel_product (measured: faster from ~128)

template <typename W>
void run_panels(const torch::Tensor& x, const typename W::T* w, int64_t ldw, int64_t N, torch::Tensor& y) {
  const int64_t K = x.size(1);
  janusvl::panel_product(x, N, y, [&](int64_t n0, int64_t rows, float* out) {
    janusvl::widen<W>(w + n0 * ldw, ldw, rows, K, out);
  });
}

template <typename W>
void dispatch(const torch::Tensor& x, const torch::Tensor& weight, torch::Tensor& y) {
  const auto* w = static_cast<const typename W::T*>(weight.data_ptr());
  if (x.size(0) > kTileRows)
    run_panels<W>(x, w, weight.stride(0), weight.size(0), y);
  else
    run<W>(x.data_ptr<float>(), x.size(0), x.size(1), w, weight.stride(0), weight.size(0), y.data_ptr<float>());
}

}  // namespace

// y = x W^T for W bf16, fp16 or int8 (int8: the caller applies its row scales), x float32.
torch::Tensor half_linear(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "half_linear runs on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "half_linear: x must be a contiguous 2-D float32 tensor");
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kChar,
              "half_linear: the weight must be bfloat16, float16 or int8");
  TORCH_CHECK(weight.dim() == 2 && weight.stride(1) == 1 && weight.size(1) == x.size(1),
              "half_linear: the weight must be [out, in] with contiguous rows matching x");
  TORCH_CHECK(x.size(1) % 8 == 0, "half_linear: in_features must be a multiple of 8");
  auto y = torch::empty({x.size(0), weight.size(0)}, x.options());
  if (dtype == at::kBFloat16)
    dispatch<BF16>(x, weight, y);
  else if (dtype == at::kHalf)
    dispatch<FP16>(x, weight, y);
  else
    dispatch<INT8>(x, weight, y);
  return y;
}

namespace {

// One query per row (decoding) against a half-precision KV cache: out = softmax(q k^T * scale) v
// for each row and head, the keys and values widened to fp32 in registers (a bf16 cache then
// reads half the bytes of an fp32 one, and torch's attention has no fast half-precision path on
// these CPUs). Each (row, head) is computed alone, in a fixed order: batch-invariant as above.
template <typename W>
void attend_one(const float* q, const uint16_t* k, const uint16_t* v, int64_t kv_stride, const bool* valid,
                int64_t S, int64_t D, float scale, float* scores, float* out) {
  // Scores four keys at a time (eight independent accumulator chains instead of two: the
  // fused multiply-adds' latency, not the memory, bounded one key at a time); each key's score
  // is computed exactly as alone: two chains over d, then the same reduction.
  float top = -INFINITY;
  int64_t t = 0;
  for (; t + 4 <= S; t += 4) {
    __m256 a0[4], a1[4];
    for (int j = 0; j < 4; ++j) {
      a0[j] = _mm256_setzero_ps(), a1[j] = _mm256_setzero_ps();
      const char* ahead = reinterpret_cast<const char*>(k + (t + 16 + j) * kv_stride);
      for (int64_t byte = 0; byte < D * 2; byte += 64) _mm_prefetch(ahead + byte, _MM_HINT_T0);
    }
    for (int64_t d = 0; d < D; d += 16) {
      const __m256 q0 = _mm256_loadu_ps(q + d), q1 = _mm256_loadu_ps(q + d + 8);
      for (int j = 0; j < 4; ++j) {
        const uint16_t* kt = k + (t + j) * kv_stride;
        a0[j] = _mm256_fmadd_ps(q0, W::load(kt + d), a0[j]);
        a1[j] = _mm256_fmadd_ps(q1, W::load(kt + d + 8), a1[j]);
      }
    }
    for (int j = 0; j < 4; ++j) scores[t + j] = reduce(_mm256_add_ps(a0[j], a1[j])) * scale;
  }
  for (; t < S; ++t) {
    const uint16_t* kt = k + t * kv_stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), W::load(kt + d), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), W::load(kt + d + 8), a1);
    }
    scores[t] = reduce(_mm256_add_ps(a0, a1)) * scale;
  }
  for (t = 0; t < S; ++t) {
    if (valid != nullptr && !valid[t]) scores[t] = -INFINITY;
    top = std::max(top, scores[t]);
  }
  float total = 0.f;
  for (t = 0; t < S; ++t) {
    scores[t] = std::exp(scores[t] - top);  // exp(-inf) = 0 for masked positions
    total += scores[t];
  }
  constexpr int kMaxVectors = 32;  // head_dim up to 256
  __m256 acc[kMaxVectors];
  const int64_t vectors = D / 8;
  for (int64_t i = 0; i < vectors; ++i) acc[i] = _mm256_setzero_ps();
  for (t = 0; t < S; ++t) {
    if (scores[t] == 0.f) continue;
    const __m256 p = _mm256_set1_ps(scores[t]);
    const uint16_t* vt = v + t * kv_stride;
    const char* ahead = reinterpret_cast<const char*>(vt + 8 * kv_stride);
    for (int64_t byte = 0; byte < D * 2; byte += 64) _mm_prefetch(ahead + byte, _MM_HINT_T0);
    for (int64_t i = 0; i < vectors; ++i) acc[i] = _mm256_fmadd_ps(p, W::load(vt + 8 * i), acc[i]);
  }
  const __m256 inv = _mm256_set1_ps(1.f / total);
  for (int64_t i = 0; i < vectors; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(acc[i], inv));
}

}  // namespace

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const std::optional<torch::Tensor>& valid, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 4 && q.size(2) == 1 && q.is_contiguous(),
              "decode_attention: q must be contiguous float32 [B, H, 1, D]");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && k.sizes() == v.sizes() && k.strides() == v.strides() &&
              (k.scalar_type() == at::kBFloat16 || k.scalar_type() == at::kHalf) && k.dim() == 4 &&
              k.stride(3) == 1, "decode_attention: k and v must be bf16/fp16 [B, Hkv, S, D] alike");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && H % Hkv == 0 && D % 16 == 0 && D <= 256,
              "decode_attention: shapes of q, k and v disagree");
  const bool* mask = nullptr;
  torch::Tensor valid_c;
  if (valid.has_value()) {
    valid_c = valid->contiguous();
    TORCH_CHECK(valid_c.scalar_type() == at::kBool && valid_c.dim() == 2 && valid_c.size(0) == B &&
                valid_c.size(1) == S, "decode_attention: valid must be bool [B, S]");
    mask = valid_c.data_ptr<bool>();
  }
  auto out = torch::empty({B, H, 1, D}, q.options());
  const auto* kp = static_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = static_cast<const uint16_t*>(v.data_ptr());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / Hkv;
  const bool bf16 = k.scalar_type() == at::kBFloat16;
  auto buffers = torch::empty({at::get_num_threads(), S}, q.options());  // see janusvl::panel_product
  share_blocks(B * H, [&](int64_t i) {
    float* scores = buffers.data_ptr<float>() + at::get_thread_num() * S;
    const int64_t b = i / H, h = i % H;
    const int64_t offset = b * k.stride(0) + (h / group) * k.stride(1);
    const bool* row_valid = mask == nullptr ? nullptr : mask + b * S;
    if (bf16)
      attend_one<BF16>(qp + i * D, kp + offset, vp + offset, k.stride(2), row_valid, S, D,
                       static_cast<float>(scale), scores, op + i * D);
    else
      attend_one<FP16>(qp + i * D, kp + offset, vp + offset, k.stride(2), row_valid, S, D,
                       static_cast<float>(scale), scores, op + i * D);
  });
  return out;
}

namespace {

// --- small decoder ops in one call each (RMSNorm, rotary embedding) ------------------------------
// Decoding one token runs each of these on a few thousand values, where torch's several ops per
// call cost more in dispatch than in arithmetic. Both round as torch's half-precision ops do
// (each op's fp32 result rounded to nearest even).

template <typename H>
struct Half;

template <>
struct Half<at::BFloat16> {
  static inline float get(const at::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }
  static inline at::BFloat16 put(float f) { return at::BFloat16(f); }  // round to nearest even
};

template <>
struct Half<at::Half> {
  static inline float get(const at::Half* p, int64_t i) { return static_cast<float>(p[i]); }
  static inline at::Half put(float f) { return at::Half(f); }
};

template <typename T>
inline float round_to(float f) {
  return static_cast<float>(Half<T>::put(f));
}

// weight * (x * rsqrt(mean(x^2) + eps)) per row, the normalised row rounded to x's dtype first
// (as janusvl.models.llama.RMSNorm). The sum of squares runs in eight fp32 lanes in order, so a
// row's result does not depend on the other rows.
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t D, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= D; i += 8)
      for (int j = 0; j < 8; ++j) {
        const float v = Half<T>::get(xr, i + j);
        lanes[j] += v * v;
      }
    float total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (; i < D; ++i) total += Half<T>::get(xr, i) * Half<T>::get(xr, i);
    const float inv = 1.f / std::sqrt(total / static_cast<float>(D) + eps);
    for (i = 0; i < D; ++i)
      out[r * D + i] = Half<T>::put(Half<T>::get(w, i) * round_to<T>(Half<T>::get(xr, i) * inv));
  }
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) &&
              weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: x and weight must be bf16/fp16 CPU tensors alike, weight [D]");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t D = x.size(-1), rows = D == 0 ? 0 : xc.numel() / D;
  if (x.scalar_type() == at::kBFloat16)
    rms_norm_rows(xc.data_ptr<at::BFloat16>(), wc.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), rows, D,
                  static_cast<float>(eps));
  else
    rms_norm_rows(xc.data_ptr<at::Half>(), wc.data_ptr<at::Half>(), out.data_ptr<at::Half>(), rows, D,
                  static_cast<float>(eps));
  return out;
}

namespace {

// Rotate-half rotary embedding of x [B, T, H, D] (any strides but the last) with cos, sin
// [B, T, D]: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to x's dtype, as
// janusvl.models.llama.apply_rope computes it op by op. Returns a contiguous [B, T, H, D].
template <typename T>
void rope_rows(const torch::Tensor& x, const T* cos, const T* sin, T* out) {
  const int64_t B = x.size(0), Tn = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  const T* xp = x.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < Tn; ++t) {
      const T* c = cos + (b * Tn + t) * D;
      const T* s = sin + (b * Tn + t) * D;
      for (int64_t h = 0; h < H; ++h) {
        const T* xr = xp + b * x.stride(0) + t * x.stride(1) + h * x.stride(2);
        T* o = out + ((b * Tn + t) * H + h) * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = Half<T>::get(xr, i), x2 = Half<T>::get(xr, i + half);
          o[i] = Half<T>::put(round_to<T>(x1 * Half<T>::get(c, i)) + round_to<T>(-x2 * Half<T>::get(s, i)));
          o[i + half] = Half<T>::put(round_to<T>(x2 * Half<T>::get(c, i + half)) +
                                     round_to<T>(x1 * Half<T>::get(s, i + half)));
        }
      }
    }
}

}  // namespace

torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0 &&
              (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "rope: x must be a bf16/fp16 CPU tensor [B, T, H, D] with contiguous rows");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() && cos.dim() == 3 &&
              cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) && cos.size(1) == x.size(1) &&
              cos.size(2) == x.size(3), "rope: cos and sin must be [B, T, D] in x's dtype");
  auto c = cos.contiguous(), s = sin.contiguous();
  auto out = torch::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kBFloat16)
    rope_rows(x, c.data_ptr<at::BFloat16>(), s.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  else
    rope_rows(x, c.data_ptr<at::Half>(), s.data_ptr<at::Half>(), out.data_ptr<at::Half>());
  return out;
}

}  // namespace janusvl
