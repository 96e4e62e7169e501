// Pieces of the CPU engine that do not depend on the instruction set: element
// conversion, packing of x and centroids into micro-panels, and the final lane reduction.
#pragma once

#include <cmath>
#include <cstdint>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <cstdlib>
#include <cstring>
#include <new>
#include <limits>
#include <vector>

#include "assign.h"

namespace fastssl::cpu {
// Internal linkage: each instruction-set translation unit gets its own copy, so the
// linker can never hand one compiled for AVX-512 to a CPU without it.
namespace {

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even; inputs are finite (the Python layer checks unless told not to).
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// std::vector storage that starts on a cache line. Packed panels are read with full
// 64-byte vector (or tile) loads; from malloc's 16-byte alignment every such load
// straddles two lines.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    const std::size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// Element (row, col) of a matrix view as float.
inline float load_element(const MatrixView& m, int64_t row, int64_t col) {
  const int64_t at = row * m.ld + col;
  switch (m.dtype) {
    case DType::F32: return static_cast<const float*>(m.data)[at];
    case DType::F16: return half_to_float(static_cast<const uint16_t*>(m.data)[at]);
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(m.data)[at]);
  }
  return 0.f;
}

// One row of m, converted to float into `dst` (cols entries).
inline void load_row(const MatrixView& m, int64_t row, float* dst) {
  const int64_t cols = m.cols;
  switch (m.dtype) {
    case DType::F32: {
      std::memcpy(dst, static_cast<const float*>(m.data) + row * m.ld, cols * sizeof(float));
      return;
    }
    case DType::F16: {
      const uint16_t* src = static_cast<const uint16_t*>(m.data) + row * m.ld;
      for (int64_t i = 0; i < cols; ++i) dst[i] = half_to_float(src[i]);
      return;
    }
    case DType::BF16: {
      const uint16_t* src = static_cast<const uint16_t*>(m.data) + row * m.ld;
      for (int64_t i = 0; i < cols; ++i) dst[i] = bf16_to_float(src[i]);
      return;
    }
  }
}

// The packed depth unit is one 32-bit word: a float (fp32 mode) or a pair of bf16
// (bf16 mode, depth 2p in the low half and 2p+1 in the high half, as vdpbf16ps reads).
inline int64_t depth_steps(int64_t d, bool bf16) { return bf16 ? (d + 1) / 2 : d; }

// Converts one row to packed words, returning its squared norm over the values as
// multiplied (after any rounding to bf16). `tmp` holds d floats.
inline double row_to_words(const MatrixView& m, int64_t row, bool bf16, float* tmp,
                           uint32_t* words) {
  const int64_t d = m.cols;
  double sq = 0.0;
  if (!bf16) {
    load_row(m, row, tmp);
    for (int64_t p = 0; p < d; ++p) {
      sq += static_cast<double>(tmp[p]) * tmp[p];
      std::memcpy(&words[p], &tmp[p], 4);
    }
    return sq;
  }
  const int64_t steps = depth_steps(d, true);
  if (m.dtype == DType::BF16) {
    const uint16_t* src = static_cast<const uint16_t*>(m.data) + row * m.ld;
    int64_t s = 0;
#ifdef __AVX512F__
    // 16 words per iteration (the scalar loop below cost ~2% of a d = 768, k = 4096 run
    // on Zen 4). Squares of bf16 values (8 significant bits) are exact in double, and so
    // is their sum while a row's nonzero magnitudes span less than ~2^13; beyond that the
    // two summation orders can differ in the last bit of the double, far below the
    // float32 in which the norm leaves the engine.
    __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    const auto add_squares = [&](__m512 v) {
      const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d b = _mm512_cvtps_pd(
          _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
      acc0 = _mm512_fmadd_pd(a, a, acc0);
      acc1 = _mm512_fmadd_pd(b, b, acc1);
    };
    for (; s + 16 <= d / 2; s += 16) {
      const __m512i w = _mm512_loadu_si512(src + 2 * s);
      _mm512_storeu_si512(words + s, w);
      add_squares(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
      add_squares(_mm512_castsi512_ps(_mm512_and_si512(w, high)));
    }
    sq = _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
#endif
    for (; s < steps; ++s) {
      const uint16_t lo = src[2 * s];
      const uint16_t hi = (2 * s + 1 < d) ? src[2 * s + 1] : 0;
      const float a = bf16_to_float(lo), b = bf16_to_float(hi);
      sq += static_cast<double>(a) * a + static_cast<double>(b) * b;
      words[s] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    return sq;
  }
  load_row(m, row, tmp);
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t lo = float_to_bf16(tmp[2 * s]);
    const uint16_t hi = (2 * s + 1 < d) ? float_to_bf16(tmp[2 * s + 1]) : 0;
    const float a = bf16_to_float(lo), b = bf16_to_float(hi);
    sq += static_cast<double>(a) * a + static_cast<double>(b) * b;
    words[s] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  return sq;
}

// Packs rows [row0, row0 + rows) of m into panels of `width` rows, each panel laid out
// [steps][width] (the micro-kernel reads one step of all rows at a time). Rows past
// the end are zero. Writes the squared norms of the packed rows to sqnorm (may be null).
inline void pack_panels(const MatrixView& m, int64_t row0, int64_t rows, int width,
                        bool bf16, uint32_t* dst, double* sqnorm,
                        std::vector<float>& tmp, std::vector<uint32_t>& words) {
  const int64_t steps = depth_steps(m.cols, bf16);
  tmp.resize(m.cols);
  words.resize(steps);
  const int64_t panels = (rows + width - 1) / width;
  for (int64_t panel = 0; panel < panels; ++panel) {
    uint32_t* out = dst + panel * steps * width;
    for (int r = 0; r < width; ++r) {
      const int64_t row = panel * width + r;
      if (row < rows) {
        const double sq = row_to_words(m, row0 + row, bf16, tmp.data(), words.data());
        if (sqnorm) sqnorm[row] = sq;
        for (int64_t s = 0; s < steps; ++s) out[s * width + r] = words[s];
      } else {
        for (int64_t s = 0; s < steps; ++s) out[s * width + r] = 0;
      }
    }
  }
}

}  // namespace
}  // namespace fastssl::cpu
