// kfac_fast native core: shared definitions.
//
// Nothing here includes torch headers. Tensors cross the boundary as raw data
// pointers plus sizes/strides, and CUDA work receives the caller's stream as an
// integer handle (torch.cuda.current_stream().cuda_stream).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace kfac_fast {

// Bumped whenever the binding signatures change; python/kfac_fast/_native.py
// compares it so a stale in-place build gives a clear message, not a crash.
constexpr int kAbiVersion = 2;

enum class DType : int { Float32 = 0, Float64 = 1 };

// Raised by native code; becomes a Python RuntimeError/ValueError with the message.
struct Error : std::runtime_error {
  explicit Error(const std::string& what) : std::runtime_error("kfac_fast native: " + what) {}
};

bool built_with_cuda();
std::string cuda_version();
std::string cuda_archs();

namespace cpu {
// out[i, j] = (in[i, j] + in[j, i]) / 2 for a batch of `batch` n x n matrices,
// contiguous row-major, elementwise-distinct buffers allowed to alias (in == out).
void symmetrize(const void* in, void* out, int64_t batch, int64_t n, DType dtype);
}  // namespace cpu

namespace cuda {
void symmetrize(const void* in, void* out, int64_t batch, int64_t n, DType dtype, std::intptr_t stream);
}  // namespace cuda

}  // namespace kfac_fast
