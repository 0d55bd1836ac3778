// pybind11 bindings: the only place Python meets the native core.
// Integers in (pointers, sizes, dtype codes, stream handles), GIL released
// around the work, C++ exceptions become Python exceptions with their message.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <thread>

#include "kfac_fast/common.h"

namespace py = pybind11;
using namespace kfac_fast;

namespace kfac_fast {
bool built_with_cuda() {
#ifdef KFAC_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}
std::string cuda_version() {
#ifdef KFAC_FAST_WITH_CUDA
  return KFAC_FAST_CUDA_VERSION;
#else
  return "";
#endif
}
std::string cuda_archs() {
#ifdef KFAC_FAST_WITH_CUDA
  return KFAC_FAST_CUDA_ARCHS;
#else
  return "";
#endif
}
#ifndef KFAC_FAST_WITH_CUDA
std::string cuda_driver_status() { return "built without CUDA"; }
#endif
}  // namespace kfac_fast

static DType to_dtype(int code) {
  if (code == 0) return DType::Float32;
  if (code == 1) return DType::Float64;
  throw Error("unknown dtype code " + std::to_string(code) + " (0 = float32, 1 = float64)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "kfac_fast native core (no libtorch: raw pointers, sizes, CUDA stream handles)";
  m.attr("ABI_VERSION") = kAbiVersion;
  m.def("built_with_cuda", &built_with_cuda);
  m.def("cuda_version", &cuda_version);
  m.def("cuda_archs", &cuda_archs);
  m.def(
      "cuda_driver_status",
      []() {
        py::gil_scoped_release nogil;
        return cuda_driver_status();
      },
      "The CUDA driver as the CUDA kernels would use it: 'driver X.Y, N device(s)', or why there is "
      "none (no libcuda.so.1, cuInit error). Loads the driver on first call; never raises.");

  m.def(
      "symmetrize_cpu",
      [](std::uintptr_t in, std::uintptr_t out, int64_t batch, int64_t n, int dtype) {
        DType dt = to_dtype(dtype);
        py::gil_scoped_release nogil;
        cpu::symmetrize(reinterpret_cast<const void*>(in), reinterpret_cast<void*>(out), batch, n, dt);
      },
      py::arg("in_ptr"), py::arg("out_ptr"), py::arg("batch"), py::arg("n"), py::arg("dtype"));
  m.def(
      "symmetrize_cuda",
      [](std::uintptr_t in, std::uintptr_t out, int64_t batch, int64_t n, int dtype, std::intptr_t stream) {
        DType dt = to_dtype(dtype);
        py::gil_scoped_release nogil;
        cuda::symmetrize(reinterpret_cast<const void*>(in), reinterpret_cast<void*>(out), batch, n, dt, stream);
      },
      py::arg("in_ptr"), py::arg("out_ptr"), py::arg("batch"), py::arg("n"), py::arg("dtype"), py::arg("stream"));

  m.def(
      "eigh_jacobi_cpu",
      [](const std::vector<std::uintptr_t>& B, const std::vector<std::uintptr_t>& Vt, const std::vector<int64_t>& n,
         double tol, int64_t max_sweeps, int64_t num_threads) {
        py::gil_scoped_release nogil;
        return cpu::eigh_jacobi(B, Vt, n, tol, max_sweeps, num_threads);
      },
      py::arg("B_ptrs"), py::arg("Vt_ptrs"), py::arg("sizes"), py::arg("tol"), py::arg("max_sweeps"),
      py::arg("num_threads") = 0,
      "Jacobi eigensolver on float64 row-major buffers, in place: B -> diag(eigenvalues), Vt <- J^T Vt. "
      "Returns sweeps per matrix; raises NativeError naming the matrix index.");
  m.def(
      "eigh_jacobi_cuda",
      [](const std::vector<std::uintptr_t>& B, const std::vector<std::uintptr_t>& Vt, const std::vector<int64_t>& n,
         double tol, int64_t max_sweeps, std::intptr_t stream) {
        py::gil_scoped_release nogil;
        return cuda::eigh_jacobi(B, Vt, n, tol, max_sweeps, stream);
      },
      py::arg("B_ptrs"), py::arg("Vt_ptrs"), py::arg("sizes"), py::arg("tol"), py::arg("max_sweeps"),
      py::arg("stream"));
  m.def("hardware_threads", []() { return static_cast<int64_t>(std::thread::hardware_concurrency()); });

  // Feature modules add their bindings here (one register_* per file).
  py::register_exception<Error>(m, "NativeError", PyExc_RuntimeError);
}
