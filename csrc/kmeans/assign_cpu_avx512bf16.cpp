// The AVX-512 engine with AVX512-BF16 dot products (Cooper Lake, Sapphire Rapids, Zen 4+).
#define FASTSSL_DPBF16 1
#include "assign_cpu_avx512.cpp"
