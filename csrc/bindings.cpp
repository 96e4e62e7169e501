// pybind11 module fastssl._C: a thin, defensive layer over the native engines.
// Python (fastssl/kmeans.py) validates and dispatches; this layer re-checks every shape
// and stride it is handed, so that no call, however malformed, can crash the process.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <utility>
#include <string>

#include "kmeans/assign.h"

namespace py = pybind11;
using fastssl::DType;
using fastssl::MatrixView;
using fastssl::Metric;

#ifdef FASTSSL_WITH_CUDA
void register_cuda_bindings(py::module_& m);  // csrc/bindings_cuda.cpp
#endif

namespace {

// A 2-D host array whose rows are contiguous (row stride arbitrary).
MatrixView host_matrix(const py::array& a, bool is_bf16, const char* name) {
  FASTSSL_CHECK(a.ndim() == 2, std::string(name) + " must be 2-D, got " +
                                   std::to_string(a.ndim()) + "-D");
  const auto kind = a.dtype().kind();
  const auto size = a.dtype().itemsize();
  DType dtype;
  if (is_bf16) {
    FASTSSL_CHECK(size == 2 && (kind == 'u' || kind == 'i' || kind == 'V'),
                  std::string(name) + ": bfloat16 data must be passed as 2-byte words");
    dtype = DType::BF16;
  } else if (kind == 'f' && size == 4) {
    dtype = DType::F32;
  } else if (kind == 'f' && size == 2) {
    dtype = DType::F16;
  } else {
    throw fastssl::ArgumentError(std::string(name) + ": unsupported dtype " +
                                 std::string(py::str(a.dtype())) +
                                 " (expected float32, float16 or bfloat16)");
  }
  const int64_t rows = a.shape(0), cols = a.shape(1);
  FASTSSL_CHECK(rows > 0 && cols > 0, std::string(name) + " is empty: shape (" +
                                          std::to_string(rows) + ", " +
                                          std::to_string(cols) + ")");
  FASTSSL_CHECK(a.strides(1) == static_cast<py::ssize_t>(size),
                std::string(name) + ": rows must be contiguous (stride(1) == itemsize)");
  FASTSSL_CHECK(a.strides(0) >= cols * static_cast<int64_t>(size) &&
                    a.strides(0) % static_cast<int64_t>(size) == 0,
                std::string(name) + ": row stride must be a multiple of the itemsize, >= a row");
  return MatrixView{a.data(), dtype, rows, cols, a.strides(0) / static_cast<int64_t>(size)};
}

template <typename T>
T* output_vector(py::array& a, int64_t n, const char* name) {
  FASTSSL_CHECK(a.ndim() == 1 && a.shape(0) == n,
                std::string(name) + " must have shape (" + std::to_string(n) + ",)");
  FASTSSL_CHECK(py::isinstance<py::array_t<T>>(a) && a.strides(0) == sizeof(T),
                std::string(name) + " has the wrong dtype or is not contiguous");
  FASTSSL_CHECK(a.writeable(), std::string(name) + " is read-only");
  return static_cast<T*>(a.mutable_data());
}

std::vector<int64_t> offsets_vector(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& a) {
  return std::vector<int64_t>(a.data(), a.data() + a.size());
}

fastssl::AssignOutput outputs(py::array& labels, py::array& dist,
                              std::optional<py::array>& x_sqnorm, int64_t n) {
  fastssl::AssignOutput out{output_vector<int64_t>(labels, n, "labels"),
                            output_vector<float>(dist, n, "distances"), nullptr};
  if (x_sqnorm) out.x_sqnorm = output_vector<float>(*x_sqnorm, n, "x_sqnorm");
  return out;
}

// x and the centroids as matrix views with a common d, and a valid metric code.
std::pair<MatrixView, MatrixView> host_pair(const py::array& x, bool x_bf16, const py::array& c,
                                            bool c_bf16, int metric) {
  const MatrixView xv = host_matrix(x, x_bf16, "x");
  const MatrixView cv = host_matrix(c, c_bf16, "centroids");
  FASTSSL_CHECK(xv.cols == cv.cols, "x has d=" + std::to_string(xv.cols) +
                                        " but centroids have d=" + std::to_string(cv.cols));
  FASTSSL_CHECK(metric == 0 || metric == 1, "metric must be 0 (l2) or 1 (ip)");
  return {xv, cv};
}

void assign_cpu_py(const py::array& x, bool x_bf16, const py::array& c, bool c_bf16,
                   int metric, py::array labels, py::array dist,
                   std::optional<py::array> x_sqnorm, int num_threads) {
  const auto [xv, cv] = host_pair(x, x_bf16, c, c_bf16, metric);
  auto out = outputs(labels, dist, x_sqnorm, xv.rows);
  py::gil_scoped_release release;
  fastssl::assign_cpu(xv, cv, static_cast<Metric>(metric), out, num_threads);
}

void assign_grouped_cpu_py(const py::array& x, bool x_bf16,
                           const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& x_offsets,
                           const py::array& c, bool c_bf16,
                           const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& c_offsets,
                           int metric, py::array labels, py::array dist,
                           std::optional<py::array> x_sqnorm, int num_threads) {
  const auto [xv, cv] = host_pair(x, x_bf16, c, c_bf16, metric);
  FASTSSL_CHECK(x_offsets.ndim() == 1 && c_offsets.ndim() == 1 &&
                    x_offsets.size() == c_offsets.size() && x_offsets.size() >= 2,
                "x_offsets and c_offsets must be 1-D of the same length G+1 >= 2");
  const auto xo = offsets_vector(x_offsets);
  const auto co = offsets_vector(c_offsets);
  const int64_t groups = static_cast<int64_t>(xo.size()) - 1;
  FASTSSL_CHECK(xo.front() == 0 && xo.back() == xv.rows,
                "x_offsets must start at 0 and end at n=" + std::to_string(xv.rows));
  FASTSSL_CHECK(co.front() == 0 && co.back() == cv.rows,
                "c_offsets must start at 0 and end at k=" + std::to_string(cv.rows));
  for (int64_t g = 0; g < groups; ++g) {
    FASTSSL_CHECK(xo[g] <= xo[g + 1] && co[g] <= co[g + 1],
                  "offsets must be non-decreasing (group " + std::to_string(g) + ")");
    FASTSSL_CHECK(xo[g] == xo[g + 1] || co[g] < co[g + 1],
                  "group " + std::to_string(g) + " has rows but no centroids");
  }
  auto out = outputs(labels, dist, x_sqnorm, xv.rows);
  py::gil_scoped_release release;
  fastssl::assign_grouped_cpu(xv, xo.data(), cv, co.data(), groups, static_cast<Metric>(metric),
                              out, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastssl native engine: fused distance + argmin k-means assignment (CPU, CUDA)";
  py::register_exception<fastssl::ArgumentError>(m, "ArgumentError", PyExc_ValueError);

  m.def("assign_cpu", &assign_cpu_py, py::arg("x"), py::arg("x_bf16"), py::arg("centroids"),
        py::arg("c_bf16"), py::arg("metric"), py::arg("labels"), py::arg("distances"),
        py::arg("x_sqnorm") = py::none(), py::arg("num_threads") = 0,
        "Assign rows of x (n, d) to centroids (k, d); writes labels (n,) int64 and "
        "distances (n,) float32 in place. metric: 0 = squared L2, 1 = inner product.");
  m.def("assign_grouped_cpu", &assign_grouped_cpu_py, py::arg("x"), py::arg("x_bf16"),
        py::arg("x_offsets"), py::arg("centroids"), py::arg("c_bf16"), py::arg("c_offsets"),
        py::arg("metric"), py::arg("labels"), py::arg("distances"),
        py::arg("x_sqnorm") = py::none(), py::arg("num_threads") = 0,
        "CSR-grouped assignment: rows of group g only see centroids of group g.");
  m.def("cpu_isa", &fastssl::cpu_isa, "The CPU micro-kernel chosen on this machine.");
#ifdef FASTSSL_WITH_CUDA
  m.def("has_cuda", [] { return true; });
  register_cuda_bindings(m);
#else
  m.def("has_cuda", [] { return false; });
#endif
  m.def("build_info", [] {
    py::dict info;
    info["compiler"] = FASTSSL_CXX_COMPILER;
    info["cpu_isa"] = fastssl::cpu_isa();
#ifdef FASTSSL_WITH_CUDA
    info["cuda_archs"] = FASTSSL_CUDA_ARCHS;
#else
    info["cuda_archs"] = "";
#endif
    return info;
  });
}
