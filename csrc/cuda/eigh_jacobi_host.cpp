// Host side of the CUDA Jacobi eigensolver (kernel: eigh_jacobi.cu): argument checks, the
// per-matrix metadata upload, the launch on the caller's stream through the driver API
// (driver.h), and the sweep counts and status read back after synchronising that stream.
#include <algorithm>
#include <string>
#include <vector>

#include "driver.h"
#include "kfac_fast/common.h"
#include "kfac_fast/cuda_kernels.h"

namespace kfac_fast {
namespace cuda {

namespace {
constexpr const char* kWhere = "eigh (cuda)";
}  // namespace

std::vector<int64_t> eigh_jacobi(const std::vector<std::uintptr_t>& B, const std::vector<std::uintptr_t>& Vt,
                                 const std::vector<int64_t>& n, double tol, int64_t max_sweeps, std::intptr_t stream) {
  const int count = static_cast<int>(n.size());
  if (B.size() != n.size() || Vt.size() != n.size()) throw Error("eigh_jacobi: B, Vt and n must have the same length");
  if (!(tol >= 0.0) || !(tol < 1e300)) throw Error("eigh_jacobi: tol must be a finite number >= 0");
  if (max_sweeps < 0) throw Error("eigh_jacobi: max_sweeps must be >= 0");
  if (count == 0) return {};
  int64_t max_smem_doubles = 0;
  for (int i = 0; i < count; ++i) {
    if (n[i] < 0) throw Error("eigh_jacobi: matrix " + std::to_string(i) + " has negative size");
    if (n[i] > 65536) throw Error("eigh_jacobi (cuda): matrix " + std::to_string(i) + " is larger than 65536");
    const int64_t m = n[i] + (n[i] & 1);
    const int64_t need = m + (n[i] <= kJacobiSharedN ? n[i] * n[i] : 0);
    max_smem_doubles = std::max(max_smem_doubles, need);
  }
  const size_t smem = static_cast<size_t>(max_smem_doubles) * sizeof(double);

  // The device: that of the first matrix with memory (all empty: nothing to diagonalise).
  const void* any_ptr = nullptr;
  for (int i = 0; i < count && !any_ptr; ++i) any_ptr = reinterpret_cast<const void*>(B[i]);
  if (!any_ptr) return std::vector<int64_t>(count, 0);
  const driver::Api& cu = driver::api();
  driver::DeviceScope scope(any_ptr, kWhere);
  CUfunction fn = driver::kernel(scope, kEighModule, kJacobiKernel, kWhere);
  auto s = reinterpret_cast<CUstream>(stream);

  // meta = [B ptrs | Vt ptrs | sizes | sweeps out | status out]
  std::vector<int64_t> host(5 * static_cast<size_t>(count), 0);
  for (int i = 0; i < count; ++i) {
    host[i] = static_cast<int64_t>(B[i]);
    host[count + i] = static_cast<int64_t>(Vt[i]);
    host[2 * count + i] = n[i];
  }
  CUdeviceptr dev = 0;
  driver::check(cu.MemAllocAsync(&dev, host.size() * sizeof(int64_t), s), kWhere, "cuMemAllocAsync");
  struct Free {
    const driver::Api& cu;
    CUdeviceptr p;
    CUstream s;
    ~Free() { cu.MemFreeAsync(p, s); }
  } guard{cu, dev, s};
  driver::check(cu.MemcpyHtoDAsync(dev, host.data(), 3 * count * sizeof(int64_t), s), kWhere, "upload");
  if (smem > 48 * 1024) {
    driver::check(cu.FuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, static_cast<int>(smem)),
                  kWhere, "shared memory attribute");
  }
  // Kernel arguments, in the order and types of kfac_fast_jacobi_kernel's parameters.
  const int64_t* meta = reinterpret_cast<const int64_t*>(dev);
  int count_arg = count;
  double tol_arg = tol;
  int64_t sweeps_arg = max_sweeps;
  int64_t* sweeps_out = reinterpret_cast<int64_t*>(dev) + 3 * count;
  int64_t* status_out = reinterpret_cast<int64_t*>(dev) + 4 * count;
  void* args[] = {&meta, &count_arg, &tol_arg, &sweeps_arg, &sweeps_out, &status_out};
  driver::check(cu.LaunchKernel(fn, static_cast<unsigned>(count), 1, 1, kJacobiThreads, 1, 1,
                                static_cast<unsigned>(smem), s, args, nullptr),
                kWhere, "kernel launch");
  driver::check(cu.MemcpyDtoHAsync(host.data() + 3 * count, dev + 3 * count * sizeof(int64_t),
                                   2 * count * sizeof(int64_t), s),
                kWhere, "download");
  driver::check(cu.StreamSynchronize(s), kWhere, "kernel execution");
  for (int i = 0; i < count; ++i) {
    const int64_t st = host[4 * count + i];
    if (st == kJacobiOk) continue;
    std::string head = "eigh: matrix " + std::to_string(i) + " (size " + std::to_string(n[i]) + "): ";
    if (st == kJacobiNonFinite) throw Error(head + "contains NaN or inf (after projection onto warm_start, if given)");
    if (st == kJacobiBadWarm) throw Error(head + "warm_start eigenvectors contain NaN or inf");
    throw Error(head + "Jacobi did not converge in max_sweeps=" + std::to_string(max_sweeps) +
                " sweeps; raise max_sweeps or tol");
  }
  return std::vector<int64_t>(host.begin() + 3 * count, host.begin() + 4 * count);
}

}  // namespace cuda
}  // namespace kfac_fast
