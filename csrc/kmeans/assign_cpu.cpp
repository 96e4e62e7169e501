// Run-time choice of the CPU engine: the widest instruction set this CPU supports.
// FASTSSL_CPU_ISA=generic|avx2|avx512|avx512_bf16|amx caps it (for tests and benchmarks).
#include <cstdlib>
#include <cstring>
#include <string>

#include "kmeans/assign.h"

namespace fastssl {

#define FASTSSL_DECLARE_ENGINE(ns)                                                        \
  namespace cpu::ns {                                                                     \
  void assign_entry(const MatrixView&, const MatrixView&, Metric, AssignOutput, int);      \
  void assign_grouped_entry(const MatrixView&, const int64_t*, const MatrixView&,          \
                            const int64_t*, int64_t, Metric, AssignOutput, int);           \
  }

FASTSSL_DECLARE_ENGINE(generic)
#ifdef FASTSSL_HAVE_X86
FASTSSL_DECLARE_ENGINE(avx2)
FASTSSL_DECLARE_ENGINE(avx512)
FASTSSL_DECLARE_ENGINE(avx512_bf16)
#endif
#ifdef FASTSSL_HAVE_AMX
FASTSSL_DECLARE_ENGINE(amx)
namespace cpu::amx {
bool available();
}
#endif

namespace {

// The tile unit multiplies bf16 values. It computes exactly what the other engines do
// only when nothing it rounds to bf16 is finer than bf16: bf16 rows (the other engines
// round the centroids to bf16 for those too), or float16 rows (split exactly into two
// bf16 halves) against centroids given as bf16 (fastssl.kmeans precision="bf16").
// float16 rows against float32 centroids (precision="data", the default) and float32
// rows keep float32 arithmetic on AVX-512, so a job gives the same result with or
// without AMX.
#ifdef FASTSSL_HAVE_AMX
bool amx_is_exact(const MatrixView& x, const MatrixView& c) {
  return x.dtype == DType::BF16 || (x.dtype == DType::F16 && c.dtype == DType::BF16);
}
#endif

enum class Isa { Generic = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, Amx = 4 };

Isa detect() {
  Isa best = Isa::Generic;
#ifdef FASTSSL_HAVE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
  if (best == Isa::Avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    best = Isa::Avx512;
  if (best == Isa::Avx512 && __builtin_cpu_supports("avx512bf16")) best = Isa::Avx512Bf16;
#ifdef FASTSSL_HAVE_AMX
  if (best == Isa::Avx512Bf16 && cpu::amx::available()) best = Isa::Amx;
#endif
#endif
  if (const char* cap = std::getenv("FASTSSL_CPU_ISA")) {
    Isa asked = best;
    if (!std::strcmp(cap, "generic")) asked = Isa::Generic;
    else if (!std::strcmp(cap, "avx2")) asked = Isa::Avx2;
    else if (!std::strcmp(cap, "avx512")) asked = Isa::Avx512;
    else if (!std::strcmp(cap, "avx512_bf16")) asked = Isa::Avx512Bf16;
    else if (!std::strcmp(cap, "amx")) asked = Isa::Amx;
    if (static_cast<int>(asked) < static_cast<int>(best)) best = asked;
  }
  return best;
}

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

}  // namespace

const char* cpu_isa() {
  switch (isa()) {
    case Isa::Generic: return "generic";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Bf16: return "avx512_bf16";
    case Isa::Amx: return "amx";
  }
  return "generic";
}

void assign_cpu(const MatrixView& x, const MatrixView& c, Metric metric, AssignOutput out,
                int num_threads) {
  switch (isa()) {
#ifdef FASTSSL_HAVE_X86
#ifdef FASTSSL_HAVE_AMX
    case Isa::Amx:
      if (amx_is_exact(x, c)) return cpu::amx::assign_entry(x, c, metric, out, num_threads);
      return cpu::avx512_bf16::assign_entry(x, c, metric, out, num_threads);
#endif
    case Isa::Avx512Bf16: return cpu::avx512_bf16::assign_entry(x, c, metric, out, num_threads);
    case Isa::Avx512: return cpu::avx512::assign_entry(x, c, metric, out, num_threads);
    case Isa::Avx2: return cpu::avx2::assign_entry(x, c, metric, out, num_threads);
#endif
    default: return cpu::generic::assign_entry(x, c, metric, out, num_threads);
  }
}

void assign_grouped_cpu(const MatrixView& x, const int64_t* x_offsets, const MatrixView& c,
                        const int64_t* c_offsets, int64_t groups, Metric metric,
                        AssignOutput out, int num_threads) {
  switch (isa()) {
#ifdef FASTSSL_HAVE_X86
#ifdef FASTSSL_HAVE_AMX
    case Isa::Amx:
      if (amx_is_exact(x, c))
        return cpu::amx::assign_grouped_entry(x, x_offsets, c, c_offsets, groups, metric, out,
                                              num_threads);
      return cpu::avx512_bf16::assign_grouped_entry(x, x_offsets, c, c_offsets, groups, metric,
                                                    out, num_threads);
#endif
    case Isa::Avx512Bf16:
      return cpu::avx512_bf16::assign_grouped_entry(x, x_offsets, c, c_offsets, groups, metric,
                                                    out, num_threads);
    case Isa::Avx512:
      return cpu::avx512::assign_grouped_entry(x, x_offsets, c, c_offsets, groups, metric, out,
                                               num_threads);
    case Isa::Avx2:
      return cpu::avx2::assign_grouped_entry(x, x_offsets, c, c_offsets, groups, metric, out,
                                             num_threads);
#endif
    default:
      return cpu::generic::assign_grouped_entry(x, x_offsets, c, c_offsets, groups, metric,
                                                out, num_threads);
  }
}

}  // namespace fastssl
