// The AMX engine for bf16 compute (Sapphire Rapids and later): x.c on the tile unit.
//
// One micro-tile is 32 rows x 32 centroids held in four 16x16 fp32 tiles (tmm0-3),
// fed per 32-deep step by two A tiles (rows of x, bf16, row-major) and two B tiles
// (centroid pairs in the VNNI layout the CPU engine already packs: [step][32] words).
// The accumulators are stored once per micro-tile and folded into the same lane-wise
// running minimum as the AVX-512 engine, so the n x k matrix never exists.
//
// fp16 rows are multiplied exactly too: each value is split into a bf16 head and a bf16
// tail (x = hi + lo holds exactly: fp16 has 11 significant bits, the tail at most 3),
// laid out as a row of twice the depth, [hi | lo], against centroids repeated as [c | c].
// The tile unit then computes hi.c + lo.c = x.c at twice the bf16 cost, still several
// times the fp32 rate. fp32 rows never come here: they keep fp32 on AVX-512.
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <limits>
#include <vector>

#include "kmeans/assign.h"
#include "kmeans/cpu_common.h"

namespace fastssl::cpu::amx {
namespace {

constexpr int kTileRows = 16;
constexpr int MR = 32;          // rows per micro-tile (two A tiles)
constexpr int NR = 32;          // centroids per panel (two B tiles)
constexpr int kStepWords = 16;  // 32-bit words (bf16 pairs) per tile step: 32 deep
constexpr int MC = 256;         // rows per block: the bf16 x block stays in L2

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void load_tile_config() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = kTileRows;
  }
  // Inline asm, not _tile_loadconfig: GCC 12 treats the intrinsic's operand as unread
  // and deletes the stores that fill the config (seen here: ldtilecfg then faults).
  asm volatile("ldtilecfg %0" : : "m"(cfg) : "memory");
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Tile rows start on cache lines (AlignedVector): a tile load whose 64-byte rows straddle
// two lines costs twice the traffic; with malloc's 16-byte alignment throughput was
// bimodal between runs (1.1 vs 1.7 TFLOP/s on one problem; aligned, 2.1).
using TileWords = AlignedVector<uint32_t>;

// bf16 words of one row (RNE from fp32/fp16, copied from bf16), padded with zeros to
// `words_out` words; returns the squared norm of the rounded values.
float row_to_bf16_words(const MatrixView& m, int64_t row, float* tmp, uint32_t* words,
                        int64_t words_out) {
  const int64_t d = m.cols;
  uint16_t* out = reinterpret_cast<uint16_t*>(words);
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  if (m.dtype == DType::BF16) {
    const uint16_t* src = static_cast<const uint16_t*>(m.data) + row * m.ld;
    std::memcpy(out, src, d * sizeof(uint16_t));
    for (; i + 16 <= d; i += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      acc = _mm512_fmadd_ps(f, f, acc);
    }
  } else {
    load_row(m, row, tmp);
    for (; i + 32 <= d; i += 32) {
      const __m512 lo = _mm512_loadu_ps(tmp + i), hi = _mm512_loadu_ps(tmp + i + 16);
      const __m512bh packed = _mm512_cvtne2ps_pbh(hi, lo);
      _mm512_storeu_si512(out + i, (__m512i)packed);
      const __m512i wide = (__m512i)packed;
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
      const __m512 odd = _mm512_castsi512_ps(
          _mm512_and_si512(wide, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
      acc = _mm512_fmadd_ps(even, even, _mm512_fmadd_ps(odd, odd, acc));
    }
    for (int64_t j = i; j < d; ++j) out[j] = float_to_bf16(tmp[j]);
  }
  float sq = _mm512_reduce_add_ps(acc);
  for (; i < d; ++i) {
    const float v = bf16_to_float(out[i]);
    sq += v * v;
  }
  std::memset(out + d, 0, (words_out * 2 - d) * sizeof(uint16_t));
  return sq;
}

// The split layout of one fp16 row: [hi(d), 0 ... | lo(d), 0 ...], each half `half`
// bf16 long (a multiple of the tile depth). Returns the squared norm of the exact values.
float row_to_split_words(const MatrixView& m, int64_t row, uint32_t* words, int64_t half) {
  const int64_t d = m.cols;
  const uint16_t* src = static_cast<const uint16_t*>(m.data) + row * m.ld;
  uint16_t* hi = reinterpret_cast<uint16_t*>(words);
  uint16_t* lo = hi + half;
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    const __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    const __m512 b =
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 16)));
    acc = _mm512_fmadd_ps(a, a, _mm512_fmadd_ps(b, b, acc));
    const __m512bh head = _mm512_cvtne2ps_pbh(b, a);
    const __m512i head_bits = (__m512i)head;
    // Widen the heads back to fp32 (even lanes: low halves, odd lanes: high halves is
    // the pair layout; here the 32 heads are in element order, so unpack by halves).
    const __m512 head_a = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(head_bits)), 16));
    const __m512 head_b = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(head_bits, 1)), 16));
    const __m512bh tail = _mm512_cvtne2ps_pbh(_mm512_sub_ps(b, head_b), _mm512_sub_ps(a, head_a));
    _mm512_storeu_si512(hi + i, head_bits);
    _mm512_storeu_si512(lo + i, (__m512i)tail);
  }
  float sq = _mm512_reduce_add_ps(acc);
  for (; i < d; ++i) {
    const float v = half_to_float(src[i]);
    sq += v * v;
    hi[i] = float_to_bf16(v);
    lo[i] = float_to_bf16(v - bf16_to_float(hi[i]));
  }
  std::memset(hi + d, 0, (half - d) * sizeof(uint16_t));
  std::memset(lo + d, 0, (half - d) * sizeof(uint16_t));
  return sq;
}

struct Panels {
  TileWords words;  // [panel][steps][NR]
  std::vector<float> bias;      // [panel * NR]
  int64_t panel_count = 0;
  int64_t steps = 0;            // a multiple of kStepWords
};

// Depth in words of the packed rows: bf16 pairs, or for split fp16 rows two halves of
// round_up(d, 32) bf16 each (so each half starts on a tile step).
int64_t packed_steps(int64_t d, bool split) {
  return split ? round_up(d, 2 * kStepWords) : round_up(depth_steps(d, true), kStepWords);
}

void pack_centroids(const MatrixView& c, int64_t c0, int64_t k, Metric metric, Panels& out,
                    bool parallel, bool split) {
  out.steps = packed_steps(c.cols, split);
  out.panel_count = (k + NR - 1) / NR;
  out.words.assign(static_cast<size_t>(out.panel_count * out.steps * NR), 0u);
  out.bias.assign(static_cast<size_t>(out.panel_count * NR),
                  std::numeric_limits<float>::infinity());
#pragma omp parallel if (parallel && out.panel_count > 1)
  {
    std::vector<float> tmp(c.cols);
    std::vector<uint32_t> row(out.steps);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < k; ++j) {
      // Split rows: the centroid is repeated in both halves, so [hi | lo].[c | c] = x.c.
      const int64_t words = split ? out.steps / 2 : out.steps;
      const float sq = row_to_bf16_words(c, c0 + j, tmp.data(), row.data(), words);
      if (split) std::memcpy(row.data() + words, row.data(), words * sizeof(uint32_t));
      out.bias[j] = metric == Metric::L2 ? sq : 0.0f;
      uint32_t* panel = out.words.data() + (j / NR) * out.steps * NR + (j % NR);
      for (int64_t s = 0; s < out.steps; ++s) panel[s * NR] = row[s];
    }
  }
}

struct Workspace {
  TileWords a;  // [MC][steps] bf16 pairs, row-major
  std::vector<float> x_sqnorm;
  std::vector<float> best_value;  // [MC][NR]
  std::vector<int32_t> best_index;
  std::vector<float> tmp;
  alignas(64) float scores[MR * NR];
};

// scores[32][32] = A[32 rows][steps] . B panel, accumulated over the whole depth.
inline void micro_tile(const uint32_t* a, int64_t lda_bytes, const uint32_t* b, int64_t steps,
                       float* scores) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const char* a_bytes = reinterpret_cast<const char*>(a);
  const char* b_bytes = reinterpret_cast<const char*>(b);
  for (int64_t s = 0; s < steps; s += kStepWords) {
    _tile_loadd(4, a_bytes + s * 4, lda_bytes);
    _tile_loadd(5, a_bytes + 16 * lda_bytes + s * 4, lda_bytes);
    _tile_loadd(6, b_bytes + s * NR * 4, NR * 4);
    _tile_loadd(7, b_bytes + s * NR * 4 + 64, NR * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, scores, NR * 4);
  _tile_stored(1, scores + 16, NR * 4);
  _tile_stored(2, scores + 16 * NR, NR * 4);
  _tile_stored(3, scores + 16 * NR + 16, NR * 4);
}

inline void fold(const float* scores, int rows, const float* bias, int32_t j0, float alpha,
                 float* best_value, int32_t* best_index) {
  const __m512 bias0 = _mm512_loadu_ps(bias), bias1 = _mm512_loadu_ps(bias + 16);
  const __m512 valpha = _mm512_set1_ps(alpha);
  const __m512i idx0 = _mm512_add_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(j0));
  const __m512i idx1 = _mm512_add_epi32(idx0, _mm512_set1_epi32(16));
  for (int r = 0; r < rows; ++r) {
    float* value = best_value + r * NR;
    int32_t* index = best_index + r * NR;
    const __m512 s0 = _mm512_fnmadd_ps(_mm512_loadu_ps(scores + r * NR), valpha, bias0);
    const __m512 s1 = _mm512_fnmadd_ps(_mm512_loadu_ps(scores + r * NR + 16), valpha, bias1);
    const __m512 v0 = _mm512_loadu_ps(value), v1 = _mm512_loadu_ps(value + 16);
    const __mmask16 m0 = _mm512_cmp_ps_mask(s0, v0, _CMP_LT_OQ);
    const __mmask16 m1 = _mm512_cmp_ps_mask(s1, v1, _CMP_LT_OQ);
    _mm512_storeu_ps(value, _mm512_mask_mov_ps(v0, m0, s0));
    _mm512_storeu_ps(value + 16, _mm512_mask_mov_ps(v1, m1, s1));
    _mm512_mask_storeu_epi32(index, m0, idx0);
    _mm512_mask_storeu_epi32(index + 16, m1, idx1);
  }
}

void run_rows(const MatrixView& x, int64_t row0, int64_t rows, const Panels& pc,
              int64_t label_base, Metric metric, AssignOutput out, Workspace& ws) {
  const float alpha = metric == Metric::L2 ? 2.0f : 1.0f;
  const int64_t steps = pc.steps;
  const int64_t lda_bytes = steps * 4;
  ws.tmp.resize(x.cols);
  for (int64_t block0 = 0; block0 < rows; block0 += MC) {
    const int64_t block_rows = std::min<int64_t>(MC, rows - block0);
    const int64_t padded_rows = round_up(block_rows, MR);
    // Every real row is written in full (padding included) below; only the rows that
    // pad the block to a whole micro-tile need zeros. (Zero-filling the whole block was
    // a third of the time when k is small, as in the per-parent split.)
    ws.a.resize(static_cast<size_t>(padded_rows * steps));
    std::fill(ws.a.begin() + block_rows * steps, ws.a.end(), 0u);
    ws.x_sqnorm.resize(static_cast<size_t>(block_rows));
    const bool split = x.dtype == DType::F16;
    for (int64_t r = 0; r < block_rows; ++r)
      ws.x_sqnorm[r] = split ? row_to_split_words(x, row0 + block0 + r, ws.a.data() + r * steps,
                                                  steps)
                             : row_to_bf16_words(x, row0 + block0 + r, ws.tmp.data(),
                                                 ws.a.data() + r * steps, steps);
    ws.best_value.assign(static_cast<size_t>(padded_rows * NR),
                         std::numeric_limits<float>::infinity());
    ws.best_index.assign(static_cast<size_t>(padded_rows * NR), 0);

    for (int64_t panel = 0; panel < pc.panel_count; ++panel) {
      const uint32_t* b = pc.words.data() + panel * steps * NR;
      for (int64_t r0 = 0; r0 < padded_rows; r0 += MR) {
        micro_tile(ws.a.data() + r0 * steps, lda_bytes, b, steps, ws.scores);
        const int valid = static_cast<int>(std::min<int64_t>(MR, block_rows - r0));
        fold(ws.scores, valid, pc.bias.data() + panel * NR, static_cast<int32_t>(panel * NR),
             alpha, ws.best_value.data() + r0 * NR, ws.best_index.data() + r0 * NR);
      }
    }

    for (int64_t r = 0; r < block_rows; ++r) {
      const float* values = ws.best_value.data() + r * NR;
      const int32_t* index = ws.best_index.data() + r * NR;
      float best = values[0];
      int32_t best_j = index[0];
      for (int lane = 1; lane < NR; ++lane) {
        if (values[lane] < best || (values[lane] == best && index[lane] < best_j)) {
          best = values[lane];
          best_j = index[lane];
        }
      }
      const int64_t row = row0 + block0 + r;
      out.labels[row] = label_base + best_j;
      const double xsq = ws.x_sqnorm[r];
      out.distances[row] = metric == Metric::L2
                               ? static_cast<float>(std::max(0.0, xsq + static_cast<double>(best)))
                               : -best;
      if (out.x_sqnorm) out.x_sqnorm[row] = static_cast<float>(xsq);
    }
  }
}

}  // namespace

bool available() {
  // The kernel must grant this process the tile data state before the first AMX
  // instruction; without it (old kernels, some VMs) the AVX-512 engine is used.
  static const bool granted = [] {
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile")) return false;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

void assign_entry(const MatrixView& x, const MatrixView& c, Metric metric, AssignOutput out,
                  int num_threads) {
  Panels pc;
  pack_centroids(c, 0, c.rows, metric, pc, true, x.dtype == DType::F16);
  const int64_t blocks = (x.rows + MC - 1) / MC;
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(threads) if (blocks > 1)
  {
    load_tile_config();  // tile state is per thread
    Workspace ws;
#pragma omp for schedule(dynamic, 1)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t row0 = block * MC;
      run_rows(x, row0, std::min<int64_t>(MC, x.rows - row0), pc, 0, metric, out, ws);
    }
    _tile_release();
  }
}

void assign_grouped_entry(const MatrixView& x, const int64_t* x_offsets, const MatrixView& c,
                          const int64_t* c_offsets, int64_t groups, Metric metric,
                          AssignOutput out, int num_threads) {
  constexpr int64_t kItemRows = 4 * MC;
  std::vector<int64_t> item_group, item_row;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t r = x_offsets[g]; r < x_offsets[g + 1]; r += kItemRows) {
      item_group.push_back(g);
      item_row.push_back(r);
    }
  const int64_t items = static_cast<int64_t>(item_group.size());
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(threads) if (items > 1)
  {
    load_tile_config();
    Workspace ws;
    Panels pc;
    int64_t packed_group = -1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t g = item_group[item];
      if (g != packed_group) {
        pack_centroids(c, c_offsets[g], c_offsets[g + 1] - c_offsets[g], metric, pc, false,
                       x.dtype == DType::F16);
        packed_group = g;
      }
      const int64_t row0 = item_row[item];
      run_rows(x, row0, std::min(kItemRows, x_offsets[g + 1] - row0), pc, c_offsets[g], metric,
               out, ws);
    }
    _tile_release();
  }
}

}  // namespace fastssl::cpu::amx
