// What janusvl's two kernel sources share: widening stored weights to fp32 lanes (AVX2, F16C),
// the horizontal sum, and the product of many rows through weight panels widened in cache.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <vector>
#include <cstdint>
#include <cstring>

namespace janusvl {

struct BF16 {
  using T = uint16_t;
  static inline __m256 load(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
};

struct FP16 {
  using T = uint16_t;
  static inline __m256 load(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

// int8 weights (a scale per output row applied by the caller): exact in fp32.
struct INT8 {
  using T = int8_t;
  static inline __m256 load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// The sum of eight lanes, always in the same order.
inline float reduce(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// fn(b) for every b in [0, blocks) on the pool's threads. Each thread owns a contiguous run of
// blocks and takes them in order (rows streamed in order, the next tile prefetched, as a static
// split does); a thread done with its own run takes the last blocks of the others' runs, so
// neither waits when the two vCPUs of a VM stream memory at different rates (1-2% over the
// static split at 1 and 8 rows). Blocks handed out one by one in order lost ~10%: a thread's
// next block was rarely the one its prefetches had read. Which thread computes a block never
// changes its values.
class BlockRuns {
 public:
  BlockRuns(int64_t blocks, int64_t runs) : runs_(runs), bounds_(runs) {
    for (int64_t r = 0; r < runs; ++r) bounds_[r].store(pack(blocks * r / runs, blocks * (r + 1) / runs));
  }
  // The next block of run r from its front (its owner) or from its back (another thread); -1 when empty.
  int64_t take(int64_t r, bool front) {
    uint64_t cur = bounds_[r].load();
    for (;;) {
      const int64_t first = static_cast<uint32_t>(cur), end = static_cast<int64_t>(cur >> 32);
      if (first >= end) return -1;
      const uint64_t next = front ? pack(first + 1, end) : pack(first, end - 1);
      if (bounds_[r].compare_exchange_weak(cur, next)) return front ? first : end - 1;
    }
  }
  int64_t runs() const { return runs_; }

 private:
  static uint64_t pack(int64_t first, int64_t end) {
    return static_cast<uint64_t>(end) << 32 | static_cast<uint32_t>(first);
  }
  struct alignas(64) Bound : std::atomic<uint64_t> {};  // one cache line each: owners do not collide
  int64_t runs_;
  std::vector<Bound> bounds_;
};

template <typename Fn>
void share_blocks(int64_t blocks, Fn fn) {
  BlockRuns runs(blocks, std::max<int64_t>(1, std::min<int64_t>(blocks, at::get_num_threads())));
  at::parallel_for(0, runs.runs(), 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = runs.take(r, true); b >= 0; b = runs.take(r, true)) fn(b);
    for (int64_t r = 0; r < runs.runs(); ++r)
      for (int64_t b = runs.take(r, false); b >= 0; b = runs.take(r, false)) fn(b);
  });
}

// y [M, N] = x [M, K] (fp32, many rows: prompts) times W^T, where widen(n0, rows, out) writes
// W's rows n0 .. n0 + rows - 1 as fp32 [rows, K]: each panel of kPanel rows is widened once into
// a buffer that stays in L2, and MKL's fp32 product takes it from there, at the speed of the
// machine's fp32 GEMM. The sums' order is then MKL's, so decoding-sized products never come here.
constexpr int64_t kPanel = 256;

template <typename Widen>
void panel_product(const torch::Tensor& x, int64_t N, torch::Tensor& y, Widen widen) {
  const int64_t K = x.size(1);
  // Buffers are allocated here, not in the pool's threads (each allocating thread would grow
  // its own malloc arena): one panel per thread.
  auto buffers = torch::empty({at::get_num_threads(), kPanel, K}, x.options());
  at::parallel_for(0, (N + kPanel - 1) / kPanel, 1, [&](int64_t p0, int64_t p1) {
    c10::InferenceMode guard;  // thread-local: the pool's threads must not track these tensors
    auto panel = buffers[at::get_thread_num()];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, rows = std::min(N - n0, kPanel);
      widen(n0, rows, panel.data_ptr<float>());
      y.narrow(1, n0, rows).copy_(at::mm(x, panel.narrow(0, 0, rows).t()));
    }
  });
}

// W's rows [rows, K] from `w` (row stride ldw) as fp32, for panel_product.
template <typename W>
void widen(const typename W::T* w, int64_t ldw, int64_t rows, int64_t K, float* out) {
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(out + n * K + k, W::load(w + n * ldw + k));
}

}  // namespace janusvl
