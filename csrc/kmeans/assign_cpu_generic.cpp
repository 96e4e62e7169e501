// The portable CPU engine (any architecture).
#include <omp.h>

#include <algorithm>

#include "kmeans/cpu_common.h"
#include "kmeans/micro_generic.h"

namespace fastssl::cpu::generic {
using Micro = GenericMicro;
#include "kmeans/cpu_engine.inl"
}  // namespace fastssl::cpu::generic
