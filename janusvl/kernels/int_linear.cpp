// y = x W^T for int8 and int4 weights on AVX2, by integer dot products.
//
// Widening every weight to fp32 costs two or three instructions per eight weights, which bounds
// an AVX2 core well below the memory's rate once weights take a byte or half a byte. Here the
// activations are quantised instead, once per call: each row of x in blocks (32 values for int8,
// the weights' group for int4), one fp32 scale per block (absmax / 127, rounded to nearest). 32
// weights then meet 32 values of x in one multiply-add of bytes into pairs (vpmaddubsw) and one
// into int32 (vpmaddwd), exact integer arithmetic, and a block's int32 sums are scaled into fp32
// accumulators.
//
// int8: w = q * scale[n] (q in -127..127, one scale per output row).
// int4: w = q * scale[n, g] + low[n, g] (q in 0..15, groups of G = 32 or 64 inputs), stored two
//       to a byte: in each block of 32, byte j holds q[j] in its low nibble and q[j + 16] in its
//       high nibble. The `low` term multiplies the group's exact sum of x (see int4_tile).
//
// As in half_linear.cpp, every output up to kRows rows is computed in one fixed order whatever
// the number of rows (a row's value depends only on its own row of x and of W). More rows
// (prompts, compute bound) widen weight panels to fp32 and take MKL's product: weight-only error.
#include "ops.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace janusvl {
namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kRows = 128;

// Rows of x quantised in blocks of `block` values (32 or 64): q int8 [M, K], scale [M, K/block].
// With `halves` (int4, blocks of 64) each block's values are stored in the order its weights
// unpack in: 0..15, 32..47, 16..31, 48..63 (see int4_tile). With `sums` (int4) also, per block,
// the sum of x and 8 times the sum's quantisation error, sum(x) - scale * sum(q) (see int4_tile).
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t block, bool halves, int8_t* q, float* scale,
                   float* sums = nullptr, float* residual = nullptr) {
  const int64_t blocks = K / block;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + m * K + b * block;
      float top = 0.f;
      bool finite = true;
      for (int64_t i = 0; i < block; ++i) {
        top = std::max(top, std::fabs(xb[i]));
        finite = finite && std::isfinite(xb[i]);
      }
      // A block holding inf or NaN gets a NaN scale: its rows' outputs are NaN, as a float
      // product's would be non-finite, never finite garbage.
      const float inv = top > 0.f && finite ? 127.f / top : 0.f;
      const float step = finite ? top / 127.f : std::numeric_limits<float>::quiet_NaN();
      scale[m * blocks + b] = step;
      int8_t* qb = q + m * K + b * block;
      double total = 0.0;
      int64_t qtotal = 0;
      for (int64_t i = 0; i < block; ++i) {
        const int64_t at = halves ? (i & ~int64_t{48}) | ((i & 16) << 1) | ((i & 32) >> 1) : i;
        const float v = std::max(-127.f, std::min(127.f, std::nearbyint(xb[i] * inv)));
        qb[at] = static_cast<int8_t>(v);
        total += xb[i];
        qtotal += static_cast<int64_t>(v);
      }
      if (sums != nullptr) {
        sums[m * blocks + b] = static_cast<float>(total);
        residual[m * blocks + b] = static_cast<float>(8.0 * (total - static_cast<double>(step) * qtotal));
      }
    }
  }
}

// The weight rows after a tile's are the next tile's, contiguous: fetch them while this one
// computes, a slice per step. Rows of a few hundred bytes to a few KB are too short for the
// hardware prefetcher to find on its own (measured: int4 rows read at ~18 GB/s cold without this).
inline void prefetch_next(const void* tile_end, int64_t bytes_per_step, int64_t step) {
  const char* p = static_cast<const char*>(tile_end) + step * bytes_per_step;
  for (int64_t off = 0; off < bytes_per_step; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

inline __m256i pair_sums(__m256i u8, __m256i s8) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u8, s8), _mm256_set1_epi16(1));
}

// MB rows of x against NB int8 weight rows.
template <int MB, int NB>
inline void int8_tile(const int8_t* qx, const float* sx, int64_t K, const int8_t* w, int64_t ldw,
                      const float* wscale, float* y, int64_t ldy) {
  const int64_t blocks = K / kBlock;
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_next(w + NB * ldw, NB * kBlock, b);
    __m256i wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * ldw + b * kBlock));
    for (int m = 0; m < MB; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + m * K + b * kBlock));
      const __m256i xa = _mm256_sign_epi8(xv, xv);  // |x| (no -128 among quantised values)
      const __m256 s = _mm256_broadcast_ss(sx + m * blocks + b);
      for (int n = 0; n < NB; ++n) {
        // |x| * (w with x's sign) = x * w, pairs of which fit int16 (2 * 127 * 127)
        const __m256i p = pair_sums(xa, _mm256_sign_epi8(wv[n], xv));
        acc[m][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[m][n]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) y[m * ldy + n] = reduce(acc[m][n]) * wscale[n];
}

struct Int4Weights {
  const uint8_t* q;       // [N, K/2]
  const uint16_t* scale;  // bf16 [N, K/G]
  const uint16_t* low;    // bf16 [N, K/G]
  int64_t ldq, G;
};

// The terms of int4_tile's sum that do not depend on the 4-bit values: over groups, low[g] times
// the sum of x plus scale[g] times 8 times that sum's quantisation error, in a fixed order
// (eight lanes, then the tail).
inline float group_terms(const uint16_t* low, const uint16_t* scale, const float* xsum, const float* xres,
                         int64_t groups) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    acc = _mm256_fmadd_ps(BF16::load(low + g), _mm256_loadu_ps(xsum + g), acc);
    acc = _mm256_fmadd_ps(BF16::load(scale + g), _mm256_loadu_ps(xres + g), acc);
  }
  float out = reduce(acc);
  for (; g < groups; ++g) {
    out = std::fma(bf16_to_float(low[g]), xsum[g], out);
    out = std::fma(bf16_to_float(scale[g]), xres[g], out);
  }
  return out;
}

// MB rows of x against NB int4 weight rows from n0. x is quantised in blocks of the group size
// G (32 or 64), so each group is one integer dot product: the weights' 4-bit values (unsigned)
// times x's bytes (signed) pairwise into int16 (at most 2 * 15 * 127 per pair, so the two
// halves of a 64-group add in int16 too), then into int32, then scaled once by both scales.
// With x ~ sx * qx per group, sum(w x) = scale * sum(q qx) * sx + low * sum(x), but q in 0..15
// is off centre: its mean (~8) would multiply x's quantisation error. group_terms adds
// scale * 8 * (sum(x) - sx * sum(qx)), so that error meets only q - 8, as with signed weights.
// A 64-group's 32 bytes unpack in one load: low nibbles are values 0..15 and 32..47, high
// nibbles 16..31 and 48..63, the order quantize_rows stores x in.
template <int G, int MB, int NB>
inline void int4_tile(const int8_t* qx, const float* sx, const float* xsum, const float* xres, int64_t K,
                      const Int4Weights& W, int64_t n0, float* y, int64_t ldy) {
  const int64_t groups = K / G;
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_next(W.q + (n0 + NB) * W.ldq, NB * G / 2, g);
    __m256i lo[NB], hi[NB];
    __m256 ws[NB];
    for (int n = 0; n < NB; ++n) {
      const uint8_t* p = W.q + (n0 + n) * W.ldq + g * (G / 2);
      if constexpr (G == 64) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        lo[n] = _mm256_and_si256(bytes, mask);
        hi[n] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
      } else {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        lo[n] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), mask);
        hi[n] = lo[n];
      }
      ws[n] = _mm256_set1_ps(bf16_to_float(W.scale[(n0 + n) * groups + g]));
    }
    for (int m = 0; m < MB; ++m) {
      const int8_t* xg = qx + m * K + g * G;
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg));
      const __m256 s = _mm256_broadcast_ss(sx + m * groups + g);
      for (int n = 0; n < NB; ++n) {
        __m256i p16 = _mm256_maddubs_epi16(lo[n], x0);
        if constexpr (G == 64)
          p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(hi[n], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 32))));
        const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        acc[m][n] = _mm256_fmadd_ps(p, _mm256_mul_ps(s, ws[n]), acc[m][n]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n)
      y[m * ldy + n0 + n] = reduce(acc[m][n]) + group_terms(W.low + (n0 + n) * groups, W.scale + (n0 + n) * groups,
                                                            xsum + m * groups, xres + m * groups, groups);
}

// Weight rows are shared out in blocks of 64 (a block's int8 rows stay in L2 while every group
// of rows of x passes over them); rows of x go four at a time.
constexpr int64_t kWeightBlock = 64;

template <template <int, int> class Tile, typename Args>
void tiles(int64_t M, int64_t N, const Args& args) {
  share_blocks((N + kWeightBlock - 1) / kWeightBlock, [&](int64_t blk) {
    const int64_t n0 = blk * kWeightBlock, n1 = std::min(N, n0 + kWeightBlock);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) Tile<4, 2>::span(args, m, n0, n1);
    switch (M - m) {
      case 3: Tile<3, 2>::span(args, m, n0, n1); break;
      case 2: Tile<2, 3>::span(args, m, n0, n1); break;
      case 1: Tile<1, 4>::span(args, m, n0, n1); break;
      default: break;
    }
  });
}

struct Int8Args {
  const int8_t* qx; const float* sx; int64_t K; const int8_t* w; int64_t ldw; const float* wscale;
  float* y; int64_t N;
};

template <int MB, int NB>
struct Int8Span {
  static void span(const Int8Args& a, int64_t m, int64_t n0, int64_t n1) {
    const int8_t* qx = a.qx + m * a.K;
    const float* sx = a.sx + m * (a.K / kBlock);
    float* y = a.y + m * a.N;
    int64_t n = n0;
    for (; n + NB <= n1; n += NB) int8_tile<MB, NB>(qx, sx, a.K, a.w + n * a.ldw, a.ldw, a.wscale + n, y + n, a.N);
    for (; n < n1; ++n) int8_tile<MB, 1>(qx, sx, a.K, a.w + n * a.ldw, a.ldw, a.wscale + n, y + n, a.N);
  }
};

struct Int4Args {
  const int8_t* qx; const float* sx; const float* xsum; const float* xres; int64_t K; Int4Weights W; float* y;
  int64_t N;
};

template <int G>
struct Int4 {
  template <int MB, int NB>
  struct Span {
    static void span(const Int4Args& a, int64_t m, int64_t n0, int64_t n1) {
      const int64_t groups = a.K / G;
      const int8_t* qx = a.qx + m * a.K;
      const float* sx = a.sx + m * groups;
      const float* xsum = a.xsum + m * groups;
      const float* xres = a.xres + m * groups;
      float* y = a.y + m * a.N;
      int64_t n = n0;
      for (; n + NB <= n1; n += NB) int4_tile<G, MB, NB>(qx, sx, xsum, xres, a.K, a.W, n, y, a.N);
      for (; n < n1; ++n) int4_tile<G, MB, 1>(qx, sx, xsum, xres, a.K, a.W, n, y, a.N);
    }
  };
};

void check_x(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              name, ": x must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(x.size(1) % kBlock == 0, name, ": in_features must be a multiple of 32, got ", x.size(1));
}

// Widen rows [n0, n0 + rows) of int4 weights to fp32 [rows, K].
void widen_int4(const Int4Weights& W, int64_t K, int64_t n0, int64_t rows, float* out) {
  const int64_t groups = K / W.G;
  const __m256i mask = _mm256_set1_epi32(0x0F);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 s = _mm256_set1_ps(bf16_to_float(W.scale[n * groups + g]));
      const __m256 lo = _mm256_set1_ps(bf16_to_float(W.low[n * groups + g]));
      for (int64_t b = g * W.G / kBlock; b < (g + 1) * W.G / kBlock; ++b) {
        const uint8_t* p = W.q + n * W.ldq + b * (kBlock / 2);
        float* o = out + r * K + b * kBlock;
        for (int half = 0; half < 2; ++half) {  // bytes 8*half..8*half+7, low then high nibbles
          const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * half)));
          const __m256 q_lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
          const __m256 q_hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
          _mm256_storeu_ps(o + 8 * half, _mm256_fmadd_ps(q_lo, s, lo));
          _mm256_storeu_ps(o + 16 + 8 * half, _mm256_fmadd_ps(q_hi, s, lo));
        }
      }
    }
  }
}

}  // namespace

// x float32 [M, K] times int8 weights [N, K] with row scales [N]: float32 [M, N].
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scale) {
  check_x(x, "int8_linear");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.stride(1) == 1 &&
              qweight.size(1) == x.size(1), "int8_linear: qweight must be int8 [out, in] with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "int8_linear: scale must be float32 [out]");
  auto y = torch::empty({M, N}, x.options());
  if (M > kRows) {
    const int8_t* w = qweight.data_ptr<int8_t>();
    panel_product(x, N, y, [&](int64_t n0, int64_t rows, float* out) {
      widen<INT8>(w + n0 * qweight.stride(0), qweight.stride(0), rows, K, out);
    });
    return y.mul_(scale);
  }
  auto qx = torch::empty({M, K}, x.options().dtype(at::kChar));
  auto sx = torch::empty({M, K / kBlock}, x.options());
  quantize_rows(x.data_ptr<float>(), M, K, kBlock, false, qx.data_ptr<int8_t>(), sx.data_ptr<float>());
  const Int8Args args{qx.data_ptr<int8_t>(), sx.data_ptr<float>(), K, qweight.data_ptr<int8_t>(),
                      qweight.stride(0), scale.data_ptr<float>(), y.data_ptr<float>(), N};
  tiles<Int8Span>(M, N, args);
  return y;
}

// x float32 [M, K] times int4 weights (q uint8 [N, K/2], scale and low bf16 [N, K/G]): float32 [M, N].
torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const torch::Tensor& low) {
  check_x(x, "int4_linear");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.scalar_type() == at::kByte && q.dim() == 2 && q.is_contiguous() && 2 * q.size(1) == K,
              "int4_linear: q must be contiguous uint8 [out, in / 2]");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && low.scalar_type() == at::kBFloat16 && scale.dim() == 2 &&
              scale.sizes() == low.sizes() && scale.is_contiguous() && low.is_contiguous() && scale.size(0) == N,
              "int4_linear: scale and low must be contiguous bfloat16 [out, groups] alike");
  const int64_t groups = scale.size(1);
  TORCH_CHECK(groups > 0 && (K == 32 * groups || K == 64 * groups),
              "int4_linear: groups of 32 or 64 inputs, got ", groups, " groups of ", K, " inputs");
  const Int4Weights W{q.data_ptr<uint8_t>(), static_cast<const uint16_t*>(scale.data_ptr()),
                      static_cast<const uint16_t*>(low.data_ptr()), q.stride(0), K / groups};
  auto y = torch::empty({M, N}, x.options());
  if (M > kRows) {
    panel_product(x, N, y, [&](int64_t n0, int64_t rows, float* out) { widen_int4(W, K, n0, rows, out); });
    return y;
  }
  const int64_t G = K / groups;
  auto qx = torch::empty({M, K}, x.options().dtype(at::kChar));
  auto sx = torch::empty({M, groups}, x.options());
  auto xsum = torch::empty({M, groups}, x.options()), xres = torch::empty({M, groups}, x.options());
  quantize_rows(x.data_ptr<float>(), M, K, G, G == 64, qx.data_ptr<int8_t>(), sx.data_ptr<float>(),
                xsum.data_ptr<float>(), xres.data_ptr<float>());
  const Int4Args args{qx.data_ptr<int8_t>(), sx.data_ptr<float>(), xsum.data_ptr<float>(), xres.data_ptr<float>(),
                      K, W, y.data_ptr<float>(), N};
  if (G == 64)
    tiles<Int4<64>::Span>(M, N, args);
  else
    tiles<Int4<32>::Span>(M, N, args);
  return y;
}

// The fp32 weights int4_linear multiplies by, [N, K] (tests, error figures, kernel-less fallback).
torch::Tensor int4_dequantize(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& low) {
  const int64_t N = q.size(0), K = 2 * q.size(1), groups = scale.size(1);
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && scale.scalar_type() == at::kBFloat16 &&
              low.scalar_type() == at::kBFloat16 && scale.is_contiguous() && low.is_contiguous() &&
              K % groups == 0 && (K / groups) % kBlock == 0, "int4_dequantize: operands as int4_linear's");
  const Int4Weights W{q.data_ptr<uint8_t>(), static_cast<const uint16_t*>(scale.data_ptr()),
                      static_cast<const uint16_t*>(low.data_ptr()), q.stride(0), K / groups};
  auto out = torch::empty({N, K}, torch::kFloat);
  widen_int4(W, K, 0, N, out.data_ptr<float>());
  return out;
}

}  // namespace janusvl
