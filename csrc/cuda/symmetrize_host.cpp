// Host side of the CUDA symmetrization (kernels: symmetrize.cu): launched on the caller's
// stream through the driver API (driver.h), asynchronously.
#include <string>

#include "driver.h"
#include "kfac_fast/common.h"
#include "kfac_fast/cuda_kernels.h"

namespace kfac_fast {
namespace cuda {

void symmetrize(const void* in, void* out, int64_t batch, int64_t n, DType dtype, std::intptr_t stream) {
  if (batch == 0 || n == 0) return;
  constexpr const char* kWhere = "symmetrize (cuda)";
  const driver::Api& cu = driver::api();
  driver::DeviceScope scope(in, kWhere);
  const bool f32 = dtype == DType::Float32;
  CUfunction fn = driver::kernel(scope, kSymmetrizeModule, f32 ? kSymmetrizeF32Kernel : kSymmetrizeF64Kernel, kWhere);
  const auto blocks = static_cast<unsigned>((n + 15) / 16);
  const void* in_arg = in;
  void* out_arg = out;
  int64_t n_arg = n;
  void* args[] = {&in_arg, &out_arg, &n_arg};
  const CUresult r = cu.LaunchKernel(fn, blocks, blocks, static_cast<unsigned>(batch), 16, 16, 1, 0,
                                     reinterpret_cast<CUstream>(stream), args, nullptr);
  if (r != CUDA_SUCCESS) throw Error(std::string("symmetrize launch failed: ") + driver::error_text(r));
}

}  // namespace cuda
}  // namespace kfac_fast
