// Native k-means assignment: for every row x_i, the centroid that minimises the squared
// L2 distance (or maximises the inner product), without materialising the n x k matrix.
//
// Shared by the CPU engine (assign_cpu*.cpp) and the CUDA engine (assign_cuda.cu).
// Nothing here depends on Python or torch: the bindings pass raw pointers.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastssl {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };
enum class Metric : int { L2 = 0, IP = 1 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "unknown";
}

// A bad argument that reached the native layer. The bindings turn it into ValueError.
struct ArgumentError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

#define FASTSSL_CHECK(cond, msg)                                            \
  do {                                                                      \
    if (!(cond)) throw ::fastssl::ArgumentError(std::string(msg));          \
  } while (0)

// A dense row-major matrix view: rows of `cols` elements, `ld` elements apart.
struct MatrixView {
  const void* data;
  DType dtype;
  int64_t rows;
  int64_t cols;
  int64_t ld;
};

// Outputs, one entry per row of x.
//   labels:    best centroid index (global index into the centroid matrix)
//   distances: L2 -> max(||x||^2 - 2 x.c + ||c||^2, 0); IP -> x.c at the best centroid
//   x_sqnorm:  optional (nullptr to skip): ||x_i||^2 of the values actually used
struct AssignOutput {
  int64_t* labels;
  float* distances;
  float* x_sqnorm;
};

// ---------------------------------------------------------------- CPU engine
// Plain and grouped (CSR) assignment. Groups: rows x[x_offsets[g]:x_offsets[g+1]] are
// assigned among centroids c[c_offsets[g]:c_offsets[g+1]]. Offsets are validated by the
// caller (monotone, covering, every non-empty row group has centroids).
// Arithmetic: fp32 accumulation. bf16 x is multiplied in bf16 (centroids rounded to bf16,
// exact products, AVX512-BF16 when present); fp16 and fp32 x are multiplied in fp32.
// num_threads <= 0 uses OpenMP's default.
void assign_cpu(const MatrixView& x, const MatrixView& c, Metric metric, AssignOutput out,
                int num_threads);
void assign_grouped_cpu(const MatrixView& x, const int64_t* x_offsets, const MatrixView& c,
                        const int64_t* c_offsets, int64_t groups, Metric metric,
                        AssignOutput out, int num_threads);

// Which micro-kernel the CPU engine picked on this machine: "avx512_bf16", "avx512",
// "avx2" or "generic".
const char* cpu_isa();

}  // namespace fastssl
