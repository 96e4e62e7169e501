// AVX-512 micro-kernel: 14 rows x 32 centroids held in 28 zmm accumulators.
//
// Per depth step it loads two vectors of packed centroids and broadcasts one word per
// row straight from the packed x panel (an embedded-broadcast FMA operand), so the
// loop is 28 FMAs against 2 loads. With FASTSSL_DPBF16 the bf16 mode uses vdpbf16ps
// (two products per lane per instruction: twice the fp32 rate); without it bf16 words
// are widened to fp32 in registers.
#pragma once

#include <immintrin.h>

namespace fastssl::cpu {
// Internal linkage: each instruction-set translation unit gets its own copy, so the
// linker can never hand one compiled for AVX-512 to a CPU without it.
namespace {

struct Avx512Micro {
  static constexpr int MR = 14, NR = 32, KC = 192, MC = 14 * 16, NCP = 8;
#ifdef FASTSSL_DPBF16
  // vdpbf16ps: one pass over up to 1024 dimensions (512 words). The 64 KiB centroid
  // chunk then streams from L2 instead of sitting in L1, but the accumulators never
  // round-trip through the partial buffer; on a Zen 4 core (one thread, CPU time) d = 768
  // and 1024 ran 3-5% faster than with 192 words, while fp32 gained nothing (issue 22).
  static constexpr int KC_BF16 = 512;
#else
  static constexpr int KC_BF16 = KC;  // bf16 widened to fp32 in registers: not re-tuned
#endif

  template <bool BF16>
  static inline void tile(const uint32_t* a, const uint32_t* b, int64_t kc, float* partial,
                          bool first, bool last, const float* bias, int32_t j0, float alpha,
                          float* best_value, int32_t* best_index) {
    __m512 acc[MR][2];
    if (first) {
#pragma GCC unroll 14
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    } else {
#pragma GCC unroll 14
      for (int r = 0; r < MR; ++r) {
        acc[r][0] = _mm512_loadu_ps(partial + r * NR);
        acc[r][1] = _mm512_loadu_ps(partial + r * NR + 16);
      }
    }

    if constexpr (!BF16) {
      const float* af = reinterpret_cast<const float*>(a);
      const float* bf = reinterpret_cast<const float*>(b);
      for (int64_t s = 0; s < kc; ++s) {
        const __m512 b0 = _mm512_loadu_ps(bf + s * NR);
        const __m512 b1 = _mm512_loadu_ps(bf + s * NR + 16);
#pragma GCC unroll 14
        for (int r = 0; r < MR; ++r) {
          const __m512 av = _mm512_set1_ps(af[s * MR + r]);
          acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
        }
      }
    } else {
#ifdef FASTSSL_DPBF16
      for (int64_t s = 0; s < kc; ++s) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + s * NR);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + s * NR + 16);
#pragma GCC unroll 14
        for (int r = 0; r < MR; ++r) {
          const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[s * MR + r]));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
        }
      }
#else
      const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
      for (int64_t s = 0; s < kc; ++s) {
        const __m512i bw0 = _mm512_loadu_si512(b + s * NR);
        const __m512i bw1 = _mm512_loadu_si512(b + s * NR + 16);
        const __m512 b0lo = _mm512_castsi512_ps(_mm512_slli_epi32(bw0, 16));
        const __m512 b0hi = _mm512_castsi512_ps(_mm512_and_si512(bw0, high));
        const __m512 b1lo = _mm512_castsi512_ps(_mm512_slli_epi32(bw1, 16));
        const __m512 b1hi = _mm512_castsi512_ps(_mm512_and_si512(bw1, high));
#pragma GCC unroll 14
        for (int r = 0; r < MR; ++r) {
          const uint32_t w = a[s * MR + r];
          const __m512 alo = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(w << 16)));
          const __m512 ahi =
              _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(w & 0xffff0000u)));
          acc[r][0] = _mm512_fmadd_ps(alo, b0lo, _mm512_fmadd_ps(ahi, b0hi, acc[r][0]));
          acc[r][1] = _mm512_fmadd_ps(alo, b1lo, _mm512_fmadd_ps(ahi, b1hi, acc[r][1]));
        }
      }
#endif
    }

    if (!last) {
#pragma GCC unroll 14
      for (int r = 0; r < MR; ++r) {
        _mm512_storeu_ps(partial + r * NR, acc[r][0]);
        _mm512_storeu_ps(partial + r * NR + 16, acc[r][1]);
      }
      return;
    }
    const __m512 bias0 = _mm512_loadu_ps(bias), bias1 = _mm512_loadu_ps(bias + 16);
    const __m512 valpha = _mm512_set1_ps(alpha);
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i idx0 = _mm512_add_epi32(lanes, _mm512_set1_epi32(j0));
    const __m512i idx1 = _mm512_add_epi32(idx0, _mm512_set1_epi32(16));
#pragma GCC unroll 14
    for (int r = 0; r < MR; ++r) {
      float* value = best_value + r * NR;
      int32_t* index = best_index + r * NR;
      const __m512 s0 = _mm512_fnmadd_ps(acc[r][0], valpha, bias0);  // bias - alpha * acc
      const __m512 s1 = _mm512_fnmadd_ps(acc[r][1], valpha, bias1);
      const __m512 v0 = _mm512_loadu_ps(value), v1 = _mm512_loadu_ps(value + 16);
      const __mmask16 m0 = _mm512_cmp_ps_mask(s0, v0, _CMP_LT_OQ);
      const __mmask16 m1 = _mm512_cmp_ps_mask(s1, v1, _CMP_LT_OQ);
      _mm512_storeu_ps(value, _mm512_mask_mov_ps(v0, m0, s0));
      _mm512_storeu_ps(value + 16, _mm512_mask_mov_ps(v1, m1, s1));
      _mm512_mask_storeu_epi32(index, m0, idx0);
      _mm512_mask_storeu_epi32(index + 16, m1, idx1);
    }
  }
};

}  // namespace
}  // namespace fastssl::cpu
