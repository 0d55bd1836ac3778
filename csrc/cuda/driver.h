// The CUDA driver API, loaded on first use: _C links no CUDA library. libcuda.so.1 (installed by
// every NVIDIA driver) is opened with dlopen when a CUDA op first runs, so importing _C, and all
// CPU work, never needs it. The kernels (csrc/cuda/*.cu) are embedded as fatbins (SASS for each
// KFAC_FAST_CUDA_ARCHS entry + PTX) and loaded per device with cuModuleLoadData.
#pragma once
#include <cuda.h>

#include <cstdint>
#include <string>

namespace kfac_fast {
namespace cuda {
namespace driver {

// Entry points, bound by their ABI names (the _v2 ones where cuda.h renames).
struct Api {
  decltype(&::cuGetErrorName) GetErrorName;
  decltype(&::cuGetErrorString) GetErrorString;
  decltype(&::cuInit) Init;
  decltype(&::cuDriverGetVersion) DriverGetVersion;
  decltype(&::cuDeviceGet) DeviceGet;
  decltype(&::cuDeviceGetCount) DeviceGetCount;
  decltype(&::cuDevicePrimaryCtxRetain) DevicePrimaryCtxRetain;
  decltype(&::cuCtxPushCurrent) CtxPushCurrent;
  decltype(&::cuCtxPopCurrent) CtxPopCurrent;
  decltype(&::cuPointerGetAttribute) PointerGetAttribute;
  decltype(&::cuModuleLoadData) ModuleLoadData;
  decltype(&::cuModuleGetFunction) ModuleGetFunction;
  decltype(&::cuFuncSetAttribute) FuncSetAttribute;
  decltype(&::cuLaunchKernel) LaunchKernel;
  decltype(&::cuMemAllocAsync) MemAllocAsync;
  decltype(&::cuMemFreeAsync) MemFreeAsync;
  decltype(&::cuMemcpyHtoDAsync) MemcpyHtoDAsync;
  decltype(&::cuMemcpyDtoHAsync) MemcpyDtoHAsync;
  decltype(&::cuStreamSynchronize) StreamSynchronize;
};

// The loaded driver (cuInit done); throws Error saying why when there is none.
const Api& api();

// "CUDA_ERROR_...: description".
std::string error_text(CUresult r);

// Throws Error("<where>: <what>: <error_text>") unless r == CUDA_SUCCESS.
void check(CUresult r, const char* where, const char* what);

// One line on the driver, for reports; never throws. Loads the driver and runs cuInit.
std::string status();

// Makes the primary context of the device that holds `device_ptr` current for the scope (torch
// allocates in primary contexts; its streams belong to them), as the runtime API would.
class DeviceScope {
 public:
  DeviceScope(const void* device_ptr, const char* where);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  int device() const { return device_; }

 private:
  const Api* api_ = nullptr;
  int device_ = -1;
};

// Kernel `name` of the embedded fatbin `module` on the current scope's device (loaded once per
// device, then cached).
CUfunction kernel(const DeviceScope& scope, const char* module, const char* name, const char* where);

}  // namespace driver
}  // namespace cuda
}  // namespace kfac_fast
