// kfac_fast native core: shared definitions.
//
// Nothing here includes torch headers. Tensors cross the boundary as raw data
// pointers plus sizes/strides, and CUDA work receives the caller's stream as an
// integer handle (torch.cuda.current_stream().cuda_stream).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace kfac_fast {

// Bumped whenever the binding signatures change; python/kfac_fast/_native.py
// compares it so a stale in-place build gives a clear message, not a crash.
constexpr int kAbiVersion = 3;

enum class DType : int { Float32 = 0, Float64 = 1 };

// Raised by native code; becomes a Python RuntimeError/ValueError with the message.
struct Error : std::runtime_error {
  explicit Error(const std::string& what) : std::runtime_error("kfac_fast native: " + what) {}
};

bool built_with_cuda();
std::string cuda_version();
std::string cuda_archs();
// One line on the CUDA driver as _C sees it (loads libcuda.so.1 and runs cuInit on first use);
// in a build without CUDA, says so. Never throws.
std::string cuda_driver_status();

namespace cpu {
// out[i, j] = (in[i, j] + in[j, i]) / 2 for a batch of `batch` n x n matrices,
// contiguous row-major, elementwise-distinct buffers allowed to alias (in == out).
void symmetrize(const void* in, void* out, int64_t batch, int64_t n, DType dtype);
}  // namespace cpu

namespace cpu {
// Symmetric eigensolver (cyclic threshold Jacobi, csrc/cpu/eigh_jacobi.cpp).
// For each matrix i: B[i] (n_i x n_i, row-major float64, symmetric) is diagonalised in
// place by rotations B <- J^T B J; the same rotations are applied to the rows of Vt[i]
// (n_i x n_i row-major float64, caller-initialised: identity for a cold start, Q0^T for a
// warm start), so on return B = diag(eigenvalues) (unsorted) and row j of Vt is the
// eigenvector of B[j, j]. A rotation is skipped when |b_pq| <= tol * ||B||_F / n; the
// result satisfies off(B)_F <= tol * ||B||_F. Returns sweeps used per matrix (sweeps that
// applied at least one rotation). Throws Error naming the matrix index on NaN/inf input or
// when max_sweeps is exhausted. Threads (num_threads <= 0: hardware_concurrency) work on
// different matrices, largest first.
std::vector<int64_t> eigh_jacobi(const std::vector<std::uintptr_t>& B, const std::vector<std::uintptr_t>& Vt,
                                 const std::vector<int64_t>& n, double tol, int64_t max_sweeps, int64_t num_threads);
}  // namespace cpu

namespace cuda {
// Same contract on device pointers (float64), one thread block per matrix, on `stream`.
// Synchronises the stream to read back sweep counts and per-matrix status.
std::vector<int64_t> eigh_jacobi(const std::vector<std::uintptr_t>& B, const std::vector<std::uintptr_t>& Vt,
                                 const std::vector<int64_t>& n, double tol, int64_t max_sweeps, std::intptr_t stream);
void symmetrize(const void* in, void* out, int64_t batch, int64_t n, DType dtype, std::intptr_t stream);
}  // namespace cuda

}  // namespace kfac_fast
