// CUDA k-means assignment engine: plain C++ launchers (no CUDA types in the signatures,
// so that bindings_cuda.cpp compiles with the host compiler alone).
//
// Every pointer in CudaAssignArgs is a device pointer on `device`; the work is queued on
// `stream` (a cudaStream_t passed as void*, nullptr = the legacy default stream) and the
// call returns without synchronising. Bad arguments throw fastssl::ArgumentError; CUDA
// failures throw std::runtime_error with the CUDA error string.
#pragma once

#include <cstdint>
#include <string>

#include "kmeans/assign.h"

namespace fastssl {

// How float32 inputs meet the tensor cores. 16-bit inputs always multiply in their own
// format (exact products) with float32 accumulation.
enum class CudaPrecision : int {
  Default = 0,   // = Tf32x3
  Tf32 = 1,      // one tf32 product: ~1e-3 relative error in x.c
  Tf32x3 = 2,    // split-tf32 (big*big + big*small + small*big): ~fp32 accuracy, 3x the MMAs
};

struct CudaAssignArgs {
  const void* x = nullptr;  // (n, d) rows ldx elements apart; 16-byte aligned, ldx*size % 16 == 0
  int64_t n = 0, d = 0, ldx = 0;
  const void* c = nullptr;  // (k, d) rows ldc elements apart; same dtype and alignment rules
  int64_t k = 0, ldc = 0;
  DType dtype = DType::F32;
  Metric metric = Metric::L2;
  const float* c_sqnorm = nullptr;  // (k,) ||c_j||^2 of the values used; required for L2
  int64_t* labels = nullptr;        // (n,) out
  float* distances = nullptr;       // (n,) out: L2 -> max(||x||^2 + ||c||^2 - 2 x.c, 0); IP -> x.c
  float* x_sqnorm = nullptr;        // (n,) out, optional: ||x_i||^2
  CudaPrecision precision = CudaPrecision::Default;
  int device = 0;
  void* stream = nullptr;
};

// Plain assignment: every row against all k centroids.
void assign_cuda(const CudaAssignArgs& args);

// Grouped (CSR) assignment: rows x[x_offsets[g]:x_offsets[g+1]] see only centroids
// c[c_offsets[g]:c_offsets[g+1]]; labels are global centroid indices. Offsets are HOST
// arrays of groups + 1 entries; they are validated here, turned into a small schedule
// (uploaded stream-ordered, freed stream-ordered) and all groups run in one launch.
void assign_grouped_cuda(const CudaAssignArgs& args, const int64_t* x_offsets,
                         const int64_t* c_offsets, int64_t groups);

// Number of visible devices (0 when there is no driver or no device; never throws).
int cuda_device_count();
// "name (sm_XY, N SMs)" for one device; throws std::runtime_error on failure.
std::string cuda_device_summary(int device);

}  // namespace fastssl
