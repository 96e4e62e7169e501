// AVX2 + FMA micro-kernel: 6 rows x 16 centroids in 12 ymm accumulators (Haswell and
// later, Zen). bf16 words are widened to fp32 in registers.
#pragma once

#include <immintrin.h>

namespace fastssl::cpu {
// Internal linkage: see cpu_common.h.
namespace {

struct Avx2Micro {
  static constexpr int MR = 6, NR = 16, KC = 256, MC = 6 * 32, NCP = 16;
  static constexpr int KC_BF16 = KC;  // bf16 words are widened to fp32: same chunk

  template <bool BF16>
  static inline void tile(const uint32_t* a, const uint32_t* b, int64_t kc, float* partial,
                          bool first, bool last, const float* bias, int32_t j0, float alpha,
                          float* best_value, int32_t* best_index) {
    __m256 acc[MR][2];
    if (first) {
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    } else {
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        acc[r][0] = _mm256_loadu_ps(partial + r * NR);
        acc[r][1] = _mm256_loadu_ps(partial + r * NR + 8);
      }
    }
    if constexpr (!BF16) {
      const float* af = reinterpret_cast<const float*>(a);
      const float* bf = reinterpret_cast<const float*>(b);
      for (int64_t s = 0; s < kc; ++s) {
        const __m256 b0 = _mm256_loadu_ps(bf + s * NR);
        const __m256 b1 = _mm256_loadu_ps(bf + s * NR + 8);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
          const __m256 av = _mm256_broadcast_ss(af + s * MR + r);
          acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
        }
      }
    } else {
      const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
      for (int64_t s = 0; s < kc; ++s) {
        const __m256i bw0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + s * NR));
        const __m256i bw1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + s * NR + 8));
        const __m256 b0lo = _mm256_castsi256_ps(_mm256_slli_epi32(bw0, 16));
        const __m256 b0hi = _mm256_castsi256_ps(_mm256_and_si256(bw0, high));
        const __m256 b1lo = _mm256_castsi256_ps(_mm256_slli_epi32(bw1, 16));
        const __m256 b1hi = _mm256_castsi256_ps(_mm256_and_si256(bw1, high));
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
          const uint32_t w = a[s * MR + r];
          const __m256 alo = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(w << 16)));
          const __m256 ahi =
              _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(w & 0xffff0000u)));
          acc[r][0] = _mm256_fmadd_ps(alo, b0lo, _mm256_fmadd_ps(ahi, b0hi, acc[r][0]));
          acc[r][1] = _mm256_fmadd_ps(alo, b1lo, _mm256_fmadd_ps(ahi, b1hi, acc[r][1]));
        }
      }
    }
    if (!last) {
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        _mm256_storeu_ps(partial + r * NR, acc[r][0]);
        _mm256_storeu_ps(partial + r * NR + 8, acc[r][1]);
      }
      return;
    }
    const __m256 bias0 = _mm256_loadu_ps(bias), bias1 = _mm256_loadu_ps(bias + 8);
    const __m256 valpha = _mm256_set1_ps(alpha);
    const __m256i idx0 = _mm256_add_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm256_set1_epi32(j0));
    const __m256i idx1 = _mm256_add_epi32(idx0, _mm256_set1_epi32(8));
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      float* value = best_value + r * NR;
      int32_t* index = best_index + r * NR;
      const __m256 s0 = _mm256_fnmadd_ps(acc[r][0], valpha, bias0);
      const __m256 s1 = _mm256_fnmadd_ps(acc[r][1], valpha, bias1);
      const __m256 v0 = _mm256_loadu_ps(value), v1 = _mm256_loadu_ps(value + 8);
      const __m256 m0 = _mm256_cmp_ps(s0, v0, _CMP_LT_OQ);
      const __m256 m1 = _mm256_cmp_ps(s1, v1, _CMP_LT_OQ);
      _mm256_storeu_ps(value, _mm256_blendv_ps(v0, s0, m0));
      _mm256_storeu_ps(value + 8, _mm256_blendv_ps(v1, s1, m1));
      __m256i* i0 = reinterpret_cast<__m256i*>(index);
      __m256i* i1 = reinterpret_cast<__m256i*>(index + 8);
      _mm256_storeu_si256(i0, _mm256_castps_si256(_mm256_blendv_ps(
                                  _mm256_castsi256_ps(_mm256_loadu_si256(i0)),
                                  _mm256_castsi256_ps(idx0), m0)));
      _mm256_storeu_si256(i1, _mm256_castps_si256(_mm256_blendv_ps(
                                  _mm256_castsi256_ps(_mm256_loadu_si256(i1)),
                                  _mm256_castsi256_ps(idx1), m1)));
    }
  }
};

}  // namespace
}  // namespace fastssl::cpu
