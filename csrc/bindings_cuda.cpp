// pybind11 bindings of the CUDA engine (compiled only when CMake found a CUDA compiler).
// Device buffers arrive as integer addresses (torch's data_ptr(), cupy's .data.ptr) and
// the stream as an integer cudaStream_t; assign_cuda.cu re-validates every pointer
// (device memory on the right device, alignment) so that a bad call raises ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "kmeans/assign.h"
#include "kmeans/assign_cuda.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(uint64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

fastssl::CudaAssignArgs make_args(uint64_t x_ptr, int64_t n, int64_t d, int64_t ldx,
                                  uint64_t c_ptr, int64_t k, int64_t ldc, int dtype,
                                  int metric, uint64_t c_sqnorm_ptr, uint64_t labels_ptr,
                                  uint64_t dist_ptr, uint64_t x_sqnorm_ptr, int precision,
                                  uint64_t stream_ptr, int device) {
  FASTSSL_CHECK(dtype >= 0 && dtype <= 2,
                "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  FASTSSL_CHECK(metric == 0 || metric == 1, "metric must be 0 (l2) or 1 (ip), got " + std::to_string(metric));
  FASTSSL_CHECK(precision >= 0 && precision <= 2,
                "precision must be 0 (default), 1 (tf32) or 2 (3xtf32), got " + std::to_string(precision));
  fastssl::CudaAssignArgs a;
  a.x = as_ptr<const void>(x_ptr);
  a.n = n;
  a.d = d;
  a.ldx = ldx;
  a.c = as_ptr<const void>(c_ptr);
  a.k = k;
  a.ldc = ldc;
  a.dtype = static_cast<fastssl::DType>(dtype);
  a.metric = static_cast<fastssl::Metric>(metric);
  a.c_sqnorm = as_ptr<const float>(c_sqnorm_ptr);
  a.labels = as_ptr<int64_t>(labels_ptr);
  a.distances = as_ptr<float>(dist_ptr);
  a.x_sqnorm = as_ptr<float>(x_sqnorm_ptr);
  a.precision = static_cast<fastssl::CudaPrecision>(precision);
  a.stream = as_ptr<void>(stream_ptr);
  a.device = device;
  return a;
}

using Offsets = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

}  // namespace

void register_cuda_bindings(py::module_& m) {
  m.def(
      "assign_cuda",
      [](uint64_t x_ptr, int64_t n, int64_t d, int64_t ldx, uint64_t c_ptr, int64_t k,
         int64_t ldc, int dtype, int metric, uint64_t c_sqnorm_ptr, uint64_t labels_ptr,
         uint64_t dist_ptr, uint64_t x_sqnorm_ptr, int precision, uint64_t stream_ptr,
         int device) {
        const auto a = make_args(x_ptr, n, d, ldx, c_ptr, k, ldc, dtype, metric, c_sqnorm_ptr,
                                 labels_ptr, dist_ptr, x_sqnorm_ptr, precision, stream_ptr, device);
        py::gil_scoped_release release;
        fastssl::assign_cuda(a);
      },
      py::arg("x_ptr"), py::arg("n"), py::arg("d"), py::arg("ldx"), py::arg("c_ptr"),
      py::arg("k"), py::arg("ldc"), py::arg("dtype"), py::arg("metric"),
      py::arg("c_sqnorm_ptr"), py::arg("labels_ptr"), py::arg("dist_ptr"),
      py::arg("x_sqnorm_ptr") = 0, py::arg("precision") = 0, py::arg("stream_ptr") = 0,
      py::arg("device") = 0,
      "Queue the assignment of x (n, d) to centroids (k, d) on a CUDA stream (device "
      "pointers as integers). dtype: 0 float32, 1 float16, 2 bfloat16 (x and centroids "
      "alike); metric: 0 l2, 1 ip; precision (float32 only): 0 default = 3xtf32, 1 tf32, "
      "2 3xtf32. Row strides in elements, multiples of 16 bytes. c_sqnorm (k,) float32 is "
      "required for l2. Writes labels (n,) int64, distances (n,) float32 and optionally "
      "x_sqnorm (n,) float32. Returns without synchronising.");
  m.def(
      "assign_grouped_cuda",
      [](uint64_t x_ptr, int64_t n, int64_t d, int64_t ldx, const Offsets& x_offsets,
         uint64_t c_ptr, int64_t k, int64_t ldc, const Offsets& c_offsets, int dtype,
         int metric, uint64_t c_sqnorm_ptr, uint64_t labels_ptr, uint64_t dist_ptr,
         uint64_t x_sqnorm_ptr, int precision, uint64_t stream_ptr, int device) {
        FASTSSL_CHECK(x_offsets.ndim() == 1 && c_offsets.ndim() == 1 &&
                          x_offsets.size() == c_offsets.size() && x_offsets.size() >= 2,
                      "x_offsets and c_offsets must be 1-D host arrays of the same length "
                      "G+1 >= 2");
        const auto a = make_args(x_ptr, n, d, ldx, c_ptr, k, ldc, dtype, metric, c_sqnorm_ptr,
                                 labels_ptr, dist_ptr, x_sqnorm_ptr, precision, stream_ptr, device);
        const int64_t groups = static_cast<int64_t>(x_offsets.size()) - 1;
        const int64_t* xo = x_offsets.data();
        const int64_t* co = c_offsets.data();
        py::gil_scoped_release release;
        fastssl::assign_grouped_cuda(a, xo, co, groups);
      },
      py::arg("x_ptr"), py::arg("n"), py::arg("d"), py::arg("ldx"), py::arg("x_offsets"),
      py::arg("c_ptr"), py::arg("k"), py::arg("ldc"), py::arg("c_offsets"), py::arg("dtype"),
      py::arg("metric"), py::arg("c_sqnorm_ptr"), py::arg("labels_ptr"), py::arg("dist_ptr"),
      py::arg("x_sqnorm_ptr") = 0, py::arg("precision") = 0, py::arg("stream_ptr") = 0,
      py::arg("device") = 0,
      "Grouped (CSR) assignment in one launch: rows x[x_offsets[g]:x_offsets[g+1]] see only "
      "centroids [c_offsets[g]:c_offsets[g+1]]; offsets are host int64 arrays; labels are "
      "global centroid indices. Other arguments as assign_cuda.");
  m.def("cuda_device_count", &fastssl::cuda_device_count,
        "Devices visible to the extension's CUDA runtime (0 without a driver or device).");
  m.def("cuda_device_summary", &fastssl::cuda_device_summary, py::arg("device") = 0,
        "'name (sm_XY, N SMs)' of a device.");
}
