/* A stand-in libcuda.so.1 for tests/test_native_cuda_driver.py: the driver API entry points that
 * kfac_fast._C binds, working on host memory. "Device" pointers are host pointers, allocations are
 * malloc, copies are memcpy, and launches of the three kernels of _C run host versions that check
 * the launch shape and read the arguments as the kernels declare them:
 *   kfac_fast_symmetrize_f32/_f64(const T* in, T* out, int64_t n), grid (ceil(n/16), ceil(n/16),
 *     batch), block (16, 16, 1): out = (in + in^T) / 2, as the kernel;
 *   kfac_fast_jacobi_kernel(const int64_t* meta, int count, double tol, int64_t max_sweeps,
 *     int64_t* sweeps_out, int64_t* status_out), grid (count), block (256): sweeps_out[i] = n_i,
 *     status_out[i] = 2 (no convergence) for n_i == 13, else 0 (the matrices are left as they are).
 * Module images must start with the fatbin magic 0xBA55ED50. mock_stats() reports the calls. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
enum { OK = 0, ERR_INVALID_VALUE = 1, ERR_INVALID_IMAGE = 200, ERR_NOT_FOUND = 500, ERR_LAUNCH = 719 };

static long long g_push, g_pop, g_loads, g_launches, g_allocs, g_frees, g_bad_launch, g_last_stream;
static double g_last_tol;
static long long g_last_max_sweeps;
static int g_ctx_token, g_mod_token;

void mock_stats(long long* out) {
  out[0] = g_push; out[1] = g_pop; out[2] = g_loads; out[3] = g_launches; out[4] = g_allocs;
  out[5] = g_frees; out[6] = g_bad_launch; out[7] = g_last_stream; out[8] = g_last_max_sweeps;
  memcpy(&out[9], &g_last_tol, sizeof(double));
}

CUresult cuGetErrorName(CUresult r, const char** s) {
  *s = r == ERR_INVALID_IMAGE ? "CUDA_ERROR_INVALID_IMAGE" : r == ERR_NOT_FOUND ? "CUDA_ERROR_NOT_FOUND"
       : r == ERR_LAUNCH ? "CUDA_ERROR_LAUNCH_FAILED" : "CUDA_ERROR_INVALID_VALUE";
  return OK;
}
CUresult cuGetErrorString(CUresult r, const char** s) { *s = "mock driver error"; return OK; }
CUresult cuInit(unsigned flags) { return OK; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return OK; }
CUresult cuDeviceGet(int* dev, int ordinal) { *dev = ordinal; return ordinal == 0 ? OK : ERR_INVALID_VALUE; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }
CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) { *ctx = &g_ctx_token; return OK; }
CUresult cuCtxPushCurrent_v2(void* ctx) { ++g_push; return ctx == &g_ctx_token ? OK : ERR_INVALID_VALUE; }
CUresult cuCtxPopCurrent_v2(void** ctx) { ++g_pop; if (ctx) *ctx = &g_ctx_token; return OK; }
CUresult cuPointerGetAttribute(void* data, int attribute, unsigned long long ptr) {
  if (attribute != 9 /* CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL */ || ptr == 0) return ERR_INVALID_VALUE;
  *(int*)data = 0;
  return OK;
}
CUresult cuModuleLoadData(void** mod, const void* image) {
  uint32_t magic;
  memcpy(&magic, image, 4);
  if (magic != 0xBA55ED50u) return ERR_INVALID_IMAGE;
  ++g_loads;
  *mod = &g_mod_token;
  return OK;
}
CUresult cuModuleGetFunction(void** f, void* mod, const char* name) {
  static const char* known[] = {"kfac_fast_symmetrize_f32", "kfac_fast_symmetrize_f64", "kfac_fast_jacobi_kernel"};
  for (int i = 0; i < 3; ++i)
    if (strcmp(name, known[i]) == 0) { *f = (void*)known[i]; return OK; }
  return ERR_NOT_FOUND;
}
CUresult cuFuncSetAttribute(void* f, int attr, int value) { return OK; }

#define SYMMETRIZE(T)                                                             \
  {                                                                               \
    const T* in = *(const T**)params[0];                                          \
    T* out = *(T**)params[1];                                                     \
    const int64_t n = *(const int64_t*)params[2];                                 \
    const unsigned b = (unsigned)((n + 15) / 16);                                 \
    if (gx != b || gy != b || bx != 16 || by != 16 || bz != 1 || smem != 0) { ++g_bad_launch; return ERR_LAUNCH; } \
    for (int64_t k = 0; k < (int64_t)gz; ++k)                                     \
      for (int64_t i = 0; i < n; ++i)                                             \
        for (int64_t j = i; j < n; ++j) {                                         \
          const T v = (in[k * n * n + i * n + j] + in[k * n * n + j * n + i]) / (T)2; \
          out[k * n * n + i * n + j] = v;                                         \
          out[k * n * n + j * n + i] = v;                                         \
        }                                                                         \
  }

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, void* stream, void** params, void** extra) {
  const char* name = (const char*)f;
  ++g_launches;
  g_last_stream = (long long)(intptr_t)stream;
  if (extra != NULL) { ++g_bad_launch; return ERR_LAUNCH; }
  if (strcmp(name, "kfac_fast_symmetrize_f32") == 0) SYMMETRIZE(float)
  else if (strcmp(name, "kfac_fast_symmetrize_f64") == 0) SYMMETRIZE(double)
  else if (strcmp(name, "kfac_fast_jacobi_kernel") == 0) {
    const int64_t* meta = *(const int64_t**)params[0];
    const int count = *(const int*)params[1];
    g_last_tol = *(const double*)params[2];
    g_last_max_sweeps = *(const int64_t*)params[3];
    int64_t* sweeps_out = *(int64_t**)params[4];
    int64_t* status_out = *(int64_t**)params[5];
    if ((int)gx != count || gy != 1 || gz != 1 || bx != 256 || by != 1 || bz != 1) { ++g_bad_launch; return ERR_LAUNCH; }
    for (int i = 0; i < count; ++i) {
      const int64_t n = meta[2 * count + i];
      if (n > 0 && (meta[i] == 0 || meta[count + i] == 0)) { ++g_bad_launch; return ERR_LAUNCH; }
      const int64_t m = n + (n & 1);
      if (smem < (unsigned)(8 * (m + (n <= 64 ? n * n : 0)))) { ++g_bad_launch; return ERR_LAUNCH; }
      sweeps_out[i] = n;
      status_out[i] = n == 13 ? 2 : 0;
    }
  } else {
    ++g_bad_launch;
    return ERR_LAUNCH;
  }
  return OK;
}

CUresult cuMemAllocAsync(unsigned long long* p, size_t size, void* stream) {
  ++g_allocs;
  *p = (unsigned long long)(uintptr_t)malloc(size);
  return OK;
}
CUresult cuMemFreeAsync(unsigned long long p, void* stream) { ++g_frees; free((void*)(uintptr_t)p); return OK; }
CUresult cuMemcpyHtoDAsync_v2(unsigned long long dst, const void* src, size_t n, void* stream) {
  memcpy((void*)(uintptr_t)dst, src, n);
  return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, unsigned long long src, size_t n, void* stream) {
  memcpy(dst, (const void*)(uintptr_t)src, n);
  return OK;
}
CUresult cuStreamSynchronize(void* stream) { return OK; }
