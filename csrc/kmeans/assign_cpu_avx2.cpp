// The AVX2 + FMA CPU engine.
#include <omp.h>

#include <algorithm>

#include "kmeans/cpu_common.h"
#include "kmeans/micro_avx2.h"

namespace fastssl::cpu::avx2 {
using Micro = Avx2Micro;
#include "kmeans/cpu_engine.inl"
}  // namespace fastssl::cpu::avx2
