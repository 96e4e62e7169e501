// The AVX-512 CPU engine; built twice: here without, and in assign_cpu_avx512bf16.cpp
// with vdpbf16ps for bf16 inputs.
#include <omp.h>

#include <algorithm>

#include "kmeans/cpu_common.h"
#include "kmeans/micro_avx512.h"

#ifdef FASTSSL_DPBF16
namespace fastssl::cpu::avx512_bf16 {
#else
namespace fastssl::cpu::avx512 {
#endif
using Micro = Avx512Micro;
#include "kmeans/cpu_engine.inl"
}
