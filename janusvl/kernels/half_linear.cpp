// y = x W^T for half-precision weights (bf16 or fp16) and fp32 activations, on AVX2 + FMA + F16C.
//
// Every weight is widened to fp32 in registers (exact for both formats) and multiplied in fp32,
// so the result is the fp32 product of the checkpoint's own weights. Up to kTileRows rows (all
// of decoding), each output is one dot product computed the same way whatever the number of
// rows: eight fp32 lanes, lane j summing k = j, j+8, j+16, ... in order with fused
// multiply-adds, then one fixed reduction tree. An output's value therefore depends only on its
// own row of x and of W, never on how many rows are multiplied together (a row decoded in a
// batch of eight equals the same row alone).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

struct BF16 {
  static inline __m256 load(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
};

struct FP16 {
  static inline __m256 load(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

inline float reduce(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MB rows of x against NB rows of W, accumulators in registers over the whole of K.
template <typename W, int MB, int NB>
inline void tile(const float* x, int64_t K, const uint16_t* w, int64_t ldw, float* y, int64_t ldy) {
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
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
inline void span(const float* x, int64_t K, const uint16_t* w, int64_t ldw, float* y, int64_t ldy,
                 int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) tile<W, MB, NB>(x, K, w + n * ldw, ldw, y + n, ldy);
  for (; n < n1; ++n) tile<W, MB, 1>(x, K, w + n * ldw, ldw, y + n, ldy);
}

template <typename W>
void run(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t ldw, int64_t N, float* y) {
  // Blocks of 48 weight rows (192 KiB at K = 2048) stay in L2 while every group of rows of x
  // passes over them; threads share out the blocks.
  constexpr int64_t block = 48;
  at::parallel_for(0, (N + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
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
    }
  });
}

// Many rows (prompts): a panel of W's rows is widened to fp32 once into a buffer that stays in
// L2, and MKL's fp32 product takes it from there, at the speed of the machine's fp32 GEMM. The
// sums' order is then MKL's, so this path is kept for products of more rows than decoding uses.
constexpr int64_t kPanel = 256;
constexpr int64_t kTileRows = 128;  // more rows than this take the panels (measured: faster from ~128)

template <typename W>
void widen(const uint16_t* w, int64_t ldw, int64_t rows, int64_t K, float* out) {
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(out + n * K + k, W::load(w + n * ldw + k));
}

template <typename W>
void run_panels(const torch::Tensor& x, const uint16_t* w, int64_t ldw, int64_t N, torch::Tensor& y) {
  const int64_t K = x.size(1);
  at::parallel_for(0, (N + kPanel - 1) / kPanel, 1, [&](int64_t p0, int64_t p1) {
    c10::InferenceMode guard;  // thread-local: the pool's threads must not track these tensors
    auto panel = torch::empty({kPanel, K}, x.options());
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, rows = std::min(N - n0, kPanel);
      widen<W>(w + n0 * ldw, ldw, rows, K, panel.data_ptr<float>());
      y.narrow(1, n0, rows).copy_(at::mm(x, panel.narrow(0, 0, rows).t()));
    }
  });
}

torch::Tensor half_linear(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "half_linear runs on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "half_linear: x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf,
              "half_linear: the weight must be bfloat16 or float16");
  TORCH_CHECK(weight.dim() == 2 && weight.stride(1) == 1 && weight.size(1) == x.size(1),
              "half_linear: the weight must be [out, in] with contiguous rows matching x");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(K % 8 == 0, "half_linear: in_features must be a multiple of 8");
  auto y = torch::empty({M, N}, x.options());
  const auto* w = static_cast<const uint16_t*>(weight.data_ptr());
  if (M > kTileRows) {
    if (weight.scalar_type() == at::kBFloat16)
      run_panels<BF16>(x, w, weight.stride(0), N, y);
    else
      run_panels<FP16>(x, w, weight.stride(0), N, y);
    return y;
  }
  if (weight.scalar_type() == at::kBFloat16)
    run<BF16>(x.data_ptr<float>(), M, K, w, weight.stride(0), N, y.data_ptr<float>());
  else
    run<FP16>(x.data_ptr<float>(), M, K, w, weight.stride(0), N, y.data_ptr<float>());
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("half_linear", &half_linear, "y = x W^T, x float32 [M, K], W bfloat16/float16 [N, K]; float32 [M, N]");
}
