// CUDA k-means assignment: fused x.c on tensor cores + running argmin, never the n x k matrix.
//
// One block owns BM = 128 rows of x (of one group, in the grouped variant) and walks over
// all of that group's centroids in tiles of BN (128, or 64 when every group has <= 64
// centroids). For every (centroid tile, depth chunk) pair the block stages an x chunk
// (BM x BK) and a centroid chunk (BN x BK) in shared memory with cp.async, 4 stages deep,
// prefetching straight across centroid-tile boundaries so the pipeline never drains.
// 8 warps split the BM x BN tile (2 x 4 warps of 64 x 32 for BN = 128; 4 x 2 warps of
// 32 x 32 for BN = 64) and multiply with mma.sync:
//   bf16 / fp16  m16n8k16, operands via ldmatrix.x4, fp32 accumulation;
//   fp32         m16n8k8 tf32, either one product (Tf32) or the split big/small
//                "3xtf32" scheme (Tf32x3) that recovers ~fp32 accuracy.
// After the last depth chunk of a centroid tile each thread folds its accumulators into a
// per-row running (score, index) held in registers: score = ||c||^2 - 2 x.c (L2) or -x.c
// (IP), strict < in increasing index order, so ties keep the lowest index. At the end the
// 4 lanes of a quad and the warps along N are merged lexicographically (score, index)
// through shared memory, and only labels, distances (and ||x||^2) are written.
// ||x||^2 is accumulated from the staged x chunks during the first centroid tile.
//
// Grouped scheduling: one launch for all groups. The host turns the CSR offsets into
// tile_start[g] (a prefix sum of ceil(rows_g / BM)) and uploads (x_offsets, c_offsets,
// tile_start); block b binary-searches its group and handles rows
// x_offsets[g] + (b - tile_start[g]) * BM onward against that group's centroids. For the
// curation shape (groups of ~3.5k rows x ~35 centroids) that is one centroid tile per
// block: x is read exactly once, the group's centroid chunks come from L2.
#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "kmeans/assign_cuda.h"

namespace fastssl {
namespace {

constexpr int kBM = 128;      // rows of x per block
constexpr int kThreads = 256;  // 8 warps
constexpr int kStages = 4;    // cp.async pipeline depth
constexpr int kRowBytes = 64;  // one depth chunk of one row: BK elements = 64 bytes
constexpr int kPitchBytes = kRowBytes + 16;  // padded row: ldmatrix / lds conflict-free

enum Kind : int { kTf32 = 0, kTf32x3 = 1, kF16 = 2, kBF16 = 3 };

template <int KIND>
struct Traits;
template <>
struct Traits<kTf32> {
  using Elem = float;
  static constexpr int kMinBlocks = 2;
};
template <>
struct Traits<kTf32x3> {
  using Elem = float;
  static constexpr int kMinBlocks = 1;
};
template <>
struct Traits<kF16> {
  using Elem = uint16_t;
  static constexpr int kMinBlocks = 2;
};
template <>
struct Traits<kBF16> {
  using Elem = uint16_t;
  static constexpr int kMinBlocks = 2;
};

struct Params {
  const void* x;
  const void* c;
  int64_t ldx, ldc;  // elements
  int64_t n, k;
  int d;
  int metric;           // 0 = L2, 1 = IP
  const float* c_sqnorm;  // L2 only
  int64_t* labels;
  float* distances;
  float* x_sqnorm;       // may be null
  const int64_t* meta;   // grouped: [x_offsets | c_offsets | tile_start], each groups+1; null = plain
  int64_t groups;
};

__host__ __device__ constexpr size_t stage_bytes(int bn) { return static_cast<size_t>(kBM + bn) * kPitchBytes; }
__host__ __device__ constexpr size_t smem_bytes(int bn) { return kStages * stage_bytes(bn); }

// ------------------------------------------------------------------ PTX wrappers
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; bytes < 16 reads only `bytes` and zero-fills the rest (0 reads nothing).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <int KIND>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4],
                                            uint32_t b0, uint32_t b1) {
  if constexpr (KIND == kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
}

template <int KIND>
__device__ __forceinline__ float elem_to_float(uint16_t bits) {
  if constexpr (KIND == kBF16) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  } else {
    return __half2float(__ushort_as_half(bits));
  }
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// (value, index) lexicographic minimum: the smaller score, the lower index among equals.
__device__ __forceinline__ void merge_best(float& v, int& i, float ov, int oi) {
  if (ov < v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

// Stage `rows` x 64-byte chunks of a matrix (rows [row_base, row_base + valid)) into a
// padded shared tile; rows past `valid` and columns past d are zero-filled.
template <int ROWS, typename E>
__device__ __forceinline__ void load_chunk(unsigned char* dst, const E* g, int64_t ld,
                                           int64_t row_base, int valid, int col0, int d,
                                           int tid) {
  constexpr int kEPC = 16 / sizeof(E);  // elements per 16-byte copy
  constexpr int kCPR = kRowBytes / 16;  // copies per row
  constexpr int kTotal = ROWS * kCPR;
  static_assert(kTotal % kThreads == 0, "tile copies must divide evenly among threads");
#pragma unroll
  for (int q = 0; q < kTotal / kThreads; ++q) {
    const int idx = tid + q * kThreads;
    const int r = idx / kCPR, ch = idx % kCPR;
    const int col = col0 + ch * kEPC;
    const E* src = g;
    int bytes = 0;
    if (r < valid && col < d) {
      bytes = min(kEPC, d - col) * static_cast<int>(sizeof(E));
      src = g + (row_base + r) * ld + col;
    }
    cp_async_16(smem_addr(dst + r * kPitchBytes + ch * 16), src, bytes);
  }
}

// ------------------------------------------------------------------------ kernel
template <int KIND, int BN>
__global__ void __launch_bounds__(kThreads, Traits<KIND>::kMinBlocks)
    assign_kernel(const Params p) {
  using E = typename Traits<KIND>::Elem;
  constexpr bool kHalf = KIND == kF16 || KIND == kBF16;
  constexpr int kBK = kRowBytes / sizeof(E);        // 32 halves or 16 floats
  constexpr int kPitch = kPitchBytes / sizeof(E);   // in elements
  constexpr int kWarpsN = BN == 128 ? 4 : 2;
  constexpr int kWarpsM = 8 / kWarpsN;
  constexpr int kWM = kBM / kWarpsM, kWN = BN / kWarpsN;
  constexpr int kMT = kWM / 16, kNT = kWN / 8;
  constexpr int kSlots = kMT * 2;  // rows each thread tracks
  static_assert(kNT % 2 == 0, "B fragments are loaded in pairs of n8 tiles");
  constexpr float kInf = __builtin_huge_valf();

  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int g = lane >> 2, t = lane & 3;

  // ---- this block's work: rows [row0, row0 + rows) against centroids [c0, c0 + kcount)
  int64_t row0, c0, kcount;
  int rows;
  if (p.meta == nullptr) {
    row0 = static_cast<int64_t>(blockIdx.x) * kBM;
    rows = static_cast<int>(min64(kBM, p.n - row0));
    c0 = 0;
    kcount = p.k;
  } else {
    const int64_t* xo = p.meta;
    const int64_t* co = p.meta + (p.groups + 1);
    const int64_t* ts = p.meta + 2 * (p.groups + 1);
    const int64_t b = blockIdx.x;
    int64_t lo = 0, hi = p.groups - 1;  // largest group with tile_start <= b
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) >> 1;
      if (ts[mid] <= b) lo = mid; else hi = mid - 1;
    }
    row0 = xo[lo] + (b - ts[lo]) * kBM;
    rows = static_cast<int>(min64(kBM, xo[lo + 1] - row0));
    c0 = co[lo];
    kcount = co[lo + 1] - co[lo];
  }

  const E* X = static_cast<const E*>(p.x);
  const E* C = static_cast<const E*>(p.c);
  const int kchunks = (p.d + kBK - 1) / kBK;
  const int ntiles = static_cast<int>((kcount + BN - 1) / BN);
  const int total = ntiles * kchunks;

  auto load_stage = [&](int it) {
    unsigned char* xs = smem + (it % kStages) * stage_bytes(BN);
    unsigned char* cs = xs + kBM * kPitchBytes;
    const int nt = it / kchunks;
    const int col0 = (it - nt * kchunks) * kBK;
    load_chunk<kBM>(xs, X, p.ldx, row0, rows, col0, p.d, tid);
    const int valid_c = static_cast<int>(min64(BN, kcount - static_cast<int64_t>(nt) * BN));
    load_chunk<BN>(cs, C, p.ldc, c0 + static_cast<int64_t>(nt) * BN, valid_c, col0, p.d, tid);
  };

  float acc[kMT][kNT][4];
  float best_v[kSlots];
  int best_i[kSlots];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    best_v[s] = kInf;
    best_i[s] = 0;
  }
  float xsq = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total) load_stage(s);
    cp_async_commit();
  }

  for (int it = 0; it < total; ++it) {
    const int nt = it / kchunks;
    const int kc = it - nt * kchunks;
    if (kc == 0) {
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
    }

    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `it` visible to all; stage `it - 1` free for reuse
    if (it + kStages - 1 < total) load_stage(it + kStages - 1);
    cp_async_commit();

    const unsigned char* xs = smem + (it % kStages) * stage_bytes(BN);
    const unsigned char* cs = xs + kBM * kPitchBytes;

    if (nt == 0) {  // ||x||^2 from the staged chunk: two threads per row, 32 bytes each
      const uint4* src = reinterpret_cast<const uint4*>(xs + (tid >> 1) * kPitchBytes +
                                                        (tid & 1) * (kRowBytes / 2));
#pragma unroll
      for (int v = 0; v < 2; ++v) {
        const uint4 q = src[v];
        const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if constexpr (kHalf) {
            const float lo = elem_to_float<KIND>(static_cast<uint16_t>(w[e] & 0xffffu));
            const float hi = elem_to_float<KIND>(static_cast<uint16_t>(w[e] >> 16));
            xsq = fmaf(lo, lo, xsq);
            xsq = fmaf(hi, hi, xsq);
          } else {
            const float f = __uint_as_float(w[e]);
            xsq = fmaf(f, f, xsq);
          }
        }
      }
    }

    if constexpr (kHalf) {
      const uint32_t xs_a = smem_addr(xs), cs_a = smem_addr(cs);
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        uint32_t a[kMT][4];
        uint32_t b[kNT][2];
#pragma unroll
        for (int i = 0; i < kMT; ++i) {
          const int r = warp_m * kWM + i * 16 + (lane & 15);
          ldmatrix_x4(a[i], xs_a + r * kPitchBytes + (kk + (lane >> 4) * 8) * 2);
        }
#pragma unroll
        for (int jp = 0; jp < kNT / 2; ++jp) {
          const int r = warp_n * kWN + jp * 16 + (lane & 7) + ((lane >> 4) << 3);
          uint32_t q[4];
          ldmatrix_x4(q, cs_a + r * kPitchBytes + (kk + ((lane >> 3) & 1) * 8) * 2);
          b[2 * jp][0] = q[0];
          b[2 * jp][1] = q[1];
          b[2 * jp + 1][0] = q[2];
          b[2 * jp + 1][1] = q[3];
        }
#pragma unroll
        for (int i = 0; i < kMT; ++i)
#pragma unroll
          for (int j = 0; j < kNT; ++j) mma_16x8x16<KIND>(acc[i][j], a[i], b[j][0], b[j][1]);
      }
    } else {
      const float* xf = reinterpret_cast<const float*>(xs);
      const float* cf = reinterpret_cast<const float*>(cs);
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 8) {
        uint32_t a_big[kMT][4], b_big[kNT][2];
        uint32_t a_small[kMT][4], b_small[kNT][2];
#pragma unroll
        for (int i = 0; i < kMT; ++i) {
          const int r = warp_m * kWM + i * 16 + g;
          const float v[4] = {xf[r * kPitch + kk + t], xf[(r + 8) * kPitch + kk + t],
                              xf[r * kPitch + kk + t + 4], xf[(r + 8) * kPitch + kk + t + 4]};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            a_big[i][e] = to_tf32(v[e]);
            if constexpr (KIND == kTf32x3)
              a_small[i][e] = to_tf32(v[e] - __uint_as_float(a_big[i][e]));
          }
        }
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          const int r = warp_n * kWN + j * 8 + g;
          const float v[2] = {cf[r * kPitch + kk + t], cf[r * kPitch + kk + t + 4]};
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            b_big[j][e] = to_tf32(v[e]);
            if constexpr (KIND == kTf32x3)
              b_small[j][e] = to_tf32(v[e] - __uint_as_float(b_big[j][e]));
          }
        }
#pragma unroll
        for (int i = 0; i < kMT; ++i)
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
            if constexpr (KIND == kTf32x3) {
              mma_tf32(acc[i][j], a_small[i], b_big[j][0], b_big[j][1]);
              mma_tf32(acc[i][j], a_big[i], b_small[j][0], b_small[j][1]);
            }
            mma_tf32(acc[i][j], a_big[i], b_big[j][0], b_big[j][1]);
          }
      }
    }

    if (kc == kchunks - 1) {  // centroid tile done: fold its scores into the running best
      float bias[kNT][2];
      int col[kNT][2];
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int local = nt * BN + warp_n * kWN + j * 8 + t * 2 + e;
          col[j][e] = local;
          const bool valid = local < kcount;
          bias[j][e] = !valid ? kInf : (p.metric == 0 ? __ldg(p.c_sqnorm + c0 + local) : 0.0f);
        }
      const float alpha = p.metric == 0 ? 2.0f : 1.0f;
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int j = 0; j < kNT; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float s = fmaf(-alpha, acc[i][j][h * 2 + e], bias[j][e]);
              if (s < best_v[i * 2 + h]) {
                best_v[i * 2 + h] = s;
                best_i[i * 2 + h] = col[j][e];
              }
            }
    }
  }

  // ---- merge: the 4 lanes of a quad, then the warps along N, then write the row.
  cp_async_wait<0>();
  __syncthreads();  // all stages consumed: reuse shared memory
  float* red_v = reinterpret_cast<float*>(smem);
  int* red_i = reinterpret_cast<int*>(red_v + kWarpsN * kBM);
  float* xsq_s = reinterpret_cast<float*>(red_i + kWarpsN * kBM);

#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
#pragma unroll
    for (int m = 1; m <= 2; m <<= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best_v[s], m);
      const int oi = __shfl_xor_sync(0xffffffffu, best_i[s], m);
      merge_best(best_v[s], best_i[s], ov, oi);
    }
    if (t == 0) {
      const int r = warp_m * kWM + (s >> 1) * 16 + (s & 1) * 8 + g;
      red_v[warp_n * kBM + r] = best_v[s];
      red_i[warp_n * kBM + r] = best_i[s];
    }
  }
  xsq += __shfl_xor_sync(0xffffffffu, xsq, 1);
  if ((tid & 1) == 0) xsq_s[tid >> 1] = xsq;
  __syncthreads();

  if (tid < rows) {
    float v = red_v[tid];
    int idx = red_i[tid];
#pragma unroll
    for (int w = 1; w < kWarpsN; ++w) merge_best(v, idx, red_v[w * kBM + tid], red_i[w * kBM + tid]);
    const int64_t row = row0 + tid;
    const float sq = xsq_s[tid];
    p.labels[row] = c0 + idx;
    p.distances[row] = p.metric == 0 ? fmaxf(sq + v, 0.0f) : -v;
    if (p.x_sqnorm != nullptr) p.x_sqnorm[row] = sq;
  }
}

static_assert((2 * 4 + 1) * kBM * 4 <= smem_bytes(64), "merge buffers must fit the pipeline");

// ------------------------------------------------------------------------ host side
[[noreturn]] void cuda_fail(cudaError_t err, const std::string& what) {
  throw std::runtime_error("fastssl CUDA: " + what + ": " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ")");
}
#define FASTSSL_CUDA_OK(call, what)                 \
  do {                                              \
    const cudaError_t err_ = (call);                \
    if (err_ != cudaSuccess) cuda_fail(err_, what); \
  } while (0)

size_t elem_size(DType t) { return t == DType::F32 ? 4 : 2; }

void check_device_pointer(const void* ptr, int device, const std::string& name) {
  FASTSSL_CHECK(ptr != nullptr, name + " is a null pointer");
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw ArgumentError(name + " is not a CUDA pointer (" + cudaGetErrorString(err) + ")");
  }
  FASTSSL_CHECK(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged,
                name + " must be device memory (got a host or unregistered pointer)");
  FASTSSL_CHECK(attr.type == cudaMemoryTypeManaged || attr.device == device,
                name + " lives on device " + std::to_string(attr.device) +
                    " but the call runs on device " + std::to_string(device));
}

void check_aligned(const void* ptr, size_t align, const std::string& name) {
  FASTSSL_CHECK(reinterpret_cast<uintptr_t>(ptr) % align == 0,
                name + " must be " + std::to_string(align) + "-byte aligned");
}

// Validates everything that can be checked without reading device memory; selects the device.
void validate(const CudaAssignArgs& a) {
  FASTSSL_CHECK(a.dtype == DType::F32 || a.dtype == DType::F16 || a.dtype == DType::BF16,
                "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  FASTSSL_CHECK(a.metric == Metric::L2 || a.metric == Metric::IP, "metric must be 0 (l2) or 1 (ip)");
  const int prec = static_cast<int>(a.precision);
  FASTSSL_CHECK(prec >= 0 && prec <= 2, "precision must be 0 (default), 1 (tf32) or 2 (3xtf32)");
  FASTSSL_CHECK(a.n > 0, "x has n=" + std::to_string(a.n) + " rows; need n > 0");
  FASTSSL_CHECK(a.k > 0, "centroids have k=" + std::to_string(a.k) + " rows; need k > 0");
  FASTSSL_CHECK(a.d > 0 && a.d <= (1 << 30), "d=" + std::to_string(a.d) + " out of range");
  FASTSSL_CHECK(a.k < (int64_t(1) << 31) - 256, "k must be < 2^31");
  const int64_t elem = static_cast<int64_t>(elem_size(a.dtype));
  const int64_t align_elems = 16 / elem;
  FASTSSL_CHECK(a.ldx >= a.d && a.ldx % align_elems == 0,
                "x row stride " + std::to_string(a.ldx) + " must be >= d=" + std::to_string(a.d) +
                    " and a multiple of " + std::to_string(align_elems) + " elements (16 bytes)");
  FASTSSL_CHECK(a.ldc >= a.d && a.ldc % align_elems == 0,
                "centroid row stride " + std::to_string(a.ldc) + " must be >= d=" +
                    std::to_string(a.d) + " and a multiple of " + std::to_string(align_elems) +
                    " elements (16 bytes)");
  FASTSSL_CHECK(a.device >= 0, "device must be >= 0");
  FASTSSL_CHECK(a.x != nullptr && a.c != nullptr && a.labels != nullptr && a.distances != nullptr,
                "x, centroids, labels and distances must be non-null device pointers");
  FASTSSL_CHECK(a.metric != Metric::L2 || a.c_sqnorm != nullptr,
                "metric l2 needs c_sqnorm (k,) float32 on the device");

  (void)cudaGetLastError();  // drop a stale error left by someone else in this runtime
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    count = 0;
  }
  FASTSSL_CHECK(count > 0, "no CUDA device is visible to fastssl's CUDA engine");
  FASTSSL_CHECK(a.device < count, "device " + std::to_string(a.device) + " does not exist (" +
                                      std::to_string(count) + " visible)");
  FASTSSL_CUDA_OK(cudaSetDevice(a.device), "cudaSetDevice");
  int major = 0;
  FASTSSL_CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a.device),
                  "cudaDeviceGetAttribute");
  FASTSSL_CHECK(major >= 8, "the CUDA assignment engine needs compute capability 8.0 or newer "
                            "(cp.async, bf16 tensor cores); this device is sm_" +
                                std::to_string(major) + "x");

  check_device_pointer(a.x, a.device, "x");
  check_device_pointer(a.c, a.device, "centroids");
  check_device_pointer(a.labels, a.device, "labels");
  check_device_pointer(a.distances, a.device, "distances");
  check_aligned(a.x, 16, "x");
  check_aligned(a.c, 16, "centroids");
  check_aligned(a.labels, 8, "labels");
  check_aligned(a.distances, 4, "distances");
  if (a.metric == Metric::L2) {
    check_device_pointer(a.c_sqnorm, a.device, "c_sqnorm");
    check_aligned(a.c_sqnorm, 4, "c_sqnorm");
  }
  if (a.x_sqnorm != nullptr) {
    check_device_pointer(a.x_sqnorm, a.device, "x_sqnorm");
    check_aligned(a.x_sqnorm, 4, "x_sqnorm");
  }
}

int kind_of(const CudaAssignArgs& a) {
  switch (a.dtype) {
    case DType::BF16: return kBF16;
    case DType::F16: return kF16;
    default: return a.precision == CudaPrecision::Tf32 ? kTf32 : kTf32x3;
  }
}

template <int KIND, int BN>
void launch_one(const Params& p, int64_t blocks, cudaStream_t stream) {
  auto kernel = assign_kernel<KIND, BN>;
  const size_t smem = smem_bytes(BN);
  FASTSSL_CUDA_OK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem)),
                  "cudaFuncSetAttribute(max dynamic shared memory = " + std::to_string(smem) + ")");
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  FASTSSL_CUDA_OK(cudaGetLastError(), "launching assign_kernel");
}

template <int KIND>
void launch_kind(const Params& p, int64_t blocks, int64_t max_k, cudaStream_t stream) {
  if (max_k <= 64)
    launch_one<KIND, 64>(p, blocks, stream);
  else
    launch_one<KIND, 128>(p, blocks, stream);
}

void launch(const CudaAssignArgs& a, const int64_t* meta, int64_t groups, int64_t blocks,
            int64_t max_k) {
  FASTSSL_CHECK(blocks > 0 && blocks < (int64_t(1) << 31), "too many row tiles for one launch");
  const int64_t tiles_n = (max_k + 63) / 64;
  const int64_t chunks = (a.d + 31) / 32;
  FASTSSL_CHECK(tiles_n * chunks < (int64_t(1) << 30), "k * d too large for one launch");
  Params p{};
  p.x = a.x;
  p.c = a.c;
  p.ldx = a.ldx;
  p.ldc = a.ldc;
  p.n = a.n;
  p.k = a.k;
  p.d = static_cast<int>(a.d);
  p.metric = a.metric == Metric::L2 ? 0 : 1;
  p.c_sqnorm = a.c_sqnorm;
  p.labels = a.labels;
  p.distances = a.distances;
  p.x_sqnorm = a.x_sqnorm;
  p.meta = meta;
  p.groups = groups;
  auto stream = static_cast<cudaStream_t>(a.stream);
  switch (kind_of(a)) {
    case kBF16: launch_kind<kBF16>(p, blocks, max_k, stream); break;
    case kF16: launch_kind<kF16>(p, blocks, max_k, stream); break;
    case kTf32: launch_kind<kTf32>(p, blocks, max_k, stream); break;
    default: launch_kind<kTf32x3>(p, blocks, max_k, stream); break;
  }
}

}  // namespace

void assign_cuda(const CudaAssignArgs& args) {
  validate(args);
  launch(args, nullptr, 1, (args.n + kBM - 1) / kBM, args.k);
}

void assign_grouped_cuda(const CudaAssignArgs& args, const int64_t* x_offsets,
                         const int64_t* c_offsets, int64_t groups) {
  FASTSSL_CHECK(x_offsets != nullptr && c_offsets != nullptr, "offsets must not be null");
  FASTSSL_CHECK(groups >= 1, "need at least one group");
  FASTSSL_CHECK(x_offsets[0] == 0 && x_offsets[groups] == args.n,
                "x_offsets must start at 0 and end at n=" + std::to_string(args.n));
  FASTSSL_CHECK(c_offsets[0] == 0 && c_offsets[groups] == args.k,
                "c_offsets must start at 0 and end at k=" + std::to_string(args.k));
  std::vector<int64_t> meta(static_cast<size_t>(3 * (groups + 1)));
  int64_t* ts = meta.data() + 2 * (groups + 1);
  int64_t tiles = 0, max_k = 1;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t rows = x_offsets[g + 1] - x_offsets[g];
    const int64_t kc = c_offsets[g + 1] - c_offsets[g];
    FASTSSL_CHECK(rows >= 0 && kc >= 0,
                  "offsets must be non-decreasing (group " + std::to_string(g) + ")");
    FASTSSL_CHECK(rows == 0 || kc > 0,
                  "group " + std::to_string(g) + " has rows but no centroids");
    ts[g] = tiles;
    tiles += (rows + kBM - 1) / kBM;
    if (rows > 0) max_k = std::max(max_k, kc);
  }
  ts[groups] = tiles;
  std::copy(x_offsets, x_offsets + groups + 1, meta.begin());
  std::copy(c_offsets, c_offsets + groups + 1, meta.begin() + (groups + 1));
  validate(args);

  auto stream = static_cast<cudaStream_t>(args.stream);
  const size_t bytes = meta.size() * sizeof(int64_t);
  void* device_meta = nullptr;
  FASTSSL_CUDA_OK(cudaMallocAsync(&device_meta, bytes, stream), "cudaMallocAsync(group schedule)");
  // Pageable source: the call returns once `meta` is staged, so it may die afterwards.
  cudaError_t err = cudaMemcpyAsync(device_meta, meta.data(), bytes, cudaMemcpyHostToDevice, stream);
  if (err == cudaSuccess) {
    try {
      launch(args, static_cast<const int64_t*>(device_meta), groups, tiles, max_k);
    } catch (...) {
      (void)cudaFreeAsync(device_meta, stream);
      throw;
    }
  }
  const cudaError_t free_err = cudaFreeAsync(device_meta, stream);
  if (err != cudaSuccess) cuda_fail(err, "cudaMemcpyAsync(group schedule)");
  FASTSSL_CUDA_OK(free_err, "cudaFreeAsync(group schedule)");
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

std::string cuda_device_summary(int device) {
  cudaDeviceProp prop{};
  FASTSSL_CUDA_OK(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
         std::to_string(prop.minor) + ", " + std::to_string(prop.multiProcessorCount) + " SMs)";
}

}  // namespace fastssl
