// Portable micro-kernel: plain loops that the compiler vectorises for whatever the
// target offers. Used on non-x86 machines and on x86 CPUs without AVX2.
#pragma once

#include <cstring>

namespace fastssl::cpu {
// Internal linkage: each instruction-set translation unit gets its own copy, so the
// linker can never hand one compiled for AVX-512 to a CPU without it.
namespace {

// Lane-wise running minimum for MR rows x NR lanes, shared by every micro-kernel that
// keeps its tile in a float array.
template <int MR, int NR>
inline void fold_scores(const float* acc, const float* bias, int32_t j0, float alpha,
                        float* best_value, int32_t* best_index) {
  for (int r = 0; r < MR; ++r) {
    for (int lane = 0; lane < NR; ++lane) {
      const float score = bias[lane] - alpha * acc[r * NR + lane];
      if (score < best_value[r * NR + lane]) {
        best_value[r * NR + lane] = score;
        best_index[r * NR + lane] = j0 + lane;
      }
    }
  }
}

struct GenericMicro {
  static constexpr int MR = 4, NR = 16, KC = 256, MC = 64, NCP = 8;
  static constexpr int KC_BF16 = KC;  // bf16 words are widened to fp32: same chunk

  static inline void unpack(uint32_t word, bool bf16, float& lo, float& hi) {
    if (!bf16) {
      std::memcpy(&lo, &word, 4);
      hi = 0.f;
      return;
    }
    const uint32_t l = word << 16, h = word & 0xffff0000u;
    std::memcpy(&lo, &l, 4);
    std::memcpy(&hi, &h, 4);
  }

  template <bool BF16>
  static void tile(const uint32_t* a, const uint32_t* b, int64_t kc, float* partial,
                   bool first, bool last, const float* bias, int32_t j0, float alpha,
                   float* best_value, int32_t* best_index) {
    float acc[MR * NR];
    if (first)
      for (float& v : acc) v = 0.f;
    else
      std::memcpy(acc, partial, sizeof(acc));
    for (int64_t s = 0; s < kc; ++s) {
      float blo[NR], bhi[NR];
      for (int lane = 0; lane < NR; ++lane) unpack(b[s * NR + lane], BF16, blo[lane], bhi[lane]);
      for (int r = 0; r < MR; ++r) {
        float alo, ahi;
        unpack(a[s * MR + r], BF16, alo, ahi);
        for (int lane = 0; lane < NR; ++lane) {
          acc[r * NR + lane] += alo * blo[lane];
          if (BF16) acc[r * NR + lane] += ahi * bhi[lane];
        }
      }
    }
    if (!last) {
      std::memcpy(partial, acc, sizeof(acc));
      return;
    }
    fold_scores<MR, NR>(acc, bias, j0, alpha, best_value, best_index);
  }
};

}  // namespace
}  // namespace fastssl::cpu
