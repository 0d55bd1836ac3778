// What the host launch code (csrc/cuda/*_host.cpp, plain C++) and the device code
// (csrc/cuda/*.cu, compiled by nvcc into embedded fatbins) share: module and kernel names,
// launch constants, status codes. Kernels are extern "C" so they are found by name.
#pragma once

namespace kfac_fast {
namespace cuda {

// csrc/cuda/eigh_jacobi.cu
constexpr const char* kEighModule = "eigh_jacobi";
constexpr const char* kJacobiKernel = "kfac_fast_jacobi_kernel";
constexpr int kJacobiThreads = 256;  // threads per block (one block per matrix)
constexpr int kJacobiSharedN = 64;   // matrices with n <= this keep B in shared memory
enum JacobiStatus : int { kJacobiOk = 0, kJacobiNonFinite = 1, kJacobiNoConvergence = 2, kJacobiBadWarm = 3 };

// csrc/cuda/symmetrize.cu
constexpr const char* kSymmetrizeModule = "symmetrize";
constexpr const char* kSymmetrizeF32Kernel = "kfac_fast_symmetrize_f32";
constexpr const char* kSymmetrizeF64Kernel = "kfac_fast_symmetrize_f64";

}  // namespace cuda
}  // namespace kfac_fast
