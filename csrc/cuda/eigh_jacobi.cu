// CUDA symmetric eigensolver: parallel-order (round-robin) threshold Jacobi, float64,
// one thread block per matrix.
//
// Same contract as csrc/cpu/eigh_jacobi.cpp (B -> diag, Vt <- J^T Vt, in place; same
// threshold tau = max(tol ||B||_F / n, 4 eps ||B||_F); same sweep count and failure rule),
// but the n(n-1)/2 rotations of a sweep are grouped into m-1 rounds (m = n rounded up to
// even) of m/2 disjoint pairs (circle method), so a round is one parallel step:
//   1. each pair (p, q): rotation (c, s) from b_pp, b_qq, b_pq, or none if |b_pq| <= tau;
//   2. rows p, q of B and of Vt rotated (J^T B), all pairs and columns in parallel;
//   3. columns p, q of B rotated ((J^T B) J), all rows and pairs in parallel;
//   4. b_pq = b_qp = 0.
// Disjoint rotations commute, so a round is exactly one product of m/2 plane rotations.
// Matrices with n <= kSharedN keep B in shared memory; larger ones work in global memory
// (simple and correct, not fast: intended for the many small factors of convolutional
// layers; large factors are better served by cuSOLVER through backend="torch").
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <string>
#include <vector>

#include "kfac_fast/common.h"

namespace kfac_fast {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kSharedN = 64;

enum Status : int { kOk = 0, kNonFinite = 1, kNoConvergence = 2, kBadWarm = 3 };

__device__ __forceinline__ void round_pair(int r, int i, int m, int* p, int* q) {
  int a, b;
  if (i == 0) {
    a = m - 1;
    b = r;
  } else {
    a = (r + i) % (m - 1);
    b = (r - i + (m - 1)) % (m - 1);
  }
  *p = min(a, b);
  *q = max(a, b);
}

__device__ double block_sum(double v, double* red) {
  const int tid = threadIdx.x;
  red[tid] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  const double out = red[0];
  __syncthreads();
  return out;
}

__global__ void __launch_bounds__(kThreads)
    jacobi_kernel(const int64_t* __restrict__ meta, int count, double tol, int64_t max_sweeps,
                  int64_t* __restrict__ sweeps_out, int64_t* __restrict__ status_out) {
  const int mat = blockIdx.x;
  const int tid = threadIdx.x;
  double* Bg = reinterpret_cast<double*>(meta[mat]);
  double* Vt = reinterpret_cast<double*>(meta[count + mat]);
  const int n = static_cast<int>(meta[2 * count + mat]);
  const int m = n + (n & 1);
  const int half = m / 2;

  extern __shared__ double smem[];
  double* cs_c = smem;         // [half]
  double* cs_s = smem + half;  // [half]; s == 0 marks "no rotation"
  double* Bs = smem + 2 * half;
  __shared__ double red[kThreads];
  __shared__ int s_rot;

  const bool shared_b = n <= kSharedN;
  double* B = shared_b ? Bs : Bg;
  const int64_t nn = static_cast<int64_t>(n) * n;

  // Load (shared variant), Frobenius norm, finiteness of B and Vt.
  double acc = 0.0;
  int bad_b = 0, bad_v = 0;
  for (int64_t k = tid; k < nn; k += blockDim.x) {
    const double v = Bg[k];
    if (shared_b) Bs[k] = v;
    if (!isfinite(v)) bad_b = 1;
    acc += v * v;
    if (!isfinite(Vt[k])) bad_v = 1;
  }
  const double fro2 = block_sum(acc, red);
  const double nb = block_sum(static_cast<double>(bad_b), red);
  const double nv = block_sum(static_cast<double>(bad_v), red);
  if (nb > 0 || !isfinite(fro2)) {
    if (tid == 0) { status_out[mat] = kNonFinite; sweeps_out[mat] = 0; }
    return;
  }
  if (nv > 0) {
    if (tid == 0) { status_out[mat] = kBadWarm; sweeps_out[mat] = 0; }
    return;
  }
  if (n <= 1) {
    if (tid == 0) { status_out[mat] = kOk; sweeps_out[mat] = 0; }
    return;
  }
  const double fro = sqrt(fro2);
  const double tau = fmax(tol * fro / n, 4.0 * DBL_EPSILON * fro);

  int64_t sweeps = 0;
  int status = kOk;
  for (;;) {
    if (tid == 0) s_rot = 0;
    __syncthreads();
    for (int r = 0; r < m - 1; ++r) {
      // 1. rotations of this round
      for (int i = tid; i < half; i += blockDim.x) {
        int p, q;
        round_pair(r, i, m, &p, &q);
        double c = 1.0, s = 0.0;
        if (q < n) {
          const double apq = B[static_cast<int64_t>(p) * n + q];
          if (fabs(apq) > tau) {
            const double app = B[static_cast<int64_t>(p) * n + p];
            const double aqq = B[static_cast<int64_t>(q) * n + q];
            const double theta = (aqq - app) / (2.0 * apq);
            double t;
            if (fabs(theta) > 1e150) {
              t = 0.5 / theta;
            } else {
              t = 1.0 / (fabs(theta) + sqrt(theta * theta + 1.0));
              if (theta < 0) t = -t;
            }
            c = 1.0 / sqrt(t * t + 1.0);
            s = t * c;
            if (s == 0.0) s = DBL_MIN;  // keep the "rotated" mark; c == 1 to working precision
            atomicAdd(&s_rot, 1);
          }
        }
        cs_c[i] = c;
        cs_s[i] = s;
      }
      __syncthreads();
      // 2. rows p, q of B and Vt
      for (int64_t idx = tid; idx < static_cast<int64_t>(half) * n; idx += blockDim.x) {
        const int i = static_cast<int>(idx / n);
        const int k = static_cast<int>(idx - static_cast<int64_t>(i) * n);
        const double s = cs_s[i];
        if (s == 0.0) continue;
        const double c = cs_c[i];
        int p, q;
        round_pair(r, i, m, &p, &q);
        const int64_t ip = static_cast<int64_t>(p) * n + k, iq = static_cast<int64_t>(q) * n + k;
        const double x = B[ip], y = B[iq];
        B[ip] = c * x - s * y;
        B[iq] = s * x + c * y;
        const double u = Vt[ip], v = Vt[iq];
        Vt[ip] = c * u - s * v;
        Vt[iq] = s * u + c * v;
      }
      __syncthreads();
      // 3. columns p, q of B
      for (int64_t idx = tid; idx < static_cast<int64_t>(half) * n; idx += blockDim.x) {
        const int k = static_cast<int>(idx / half);
        const int i = static_cast<int>(idx - static_cast<int64_t>(k) * half);
        const double s = cs_s[i];
        if (s == 0.0) continue;
        const double c = cs_c[i];
        int p, q;
        round_pair(r, i, m, &p, &q);
        const int64_t kp = static_cast<int64_t>(k) * n + p, kq = static_cast<int64_t>(k) * n + q;
        const double x = B[kp], y = B[kq];
        B[kp] = c * x - s * y;
        B[kq] = s * x + c * y;
      }
      __syncthreads();
      // 4. annihilated entries are exactly zero
      for (int i = tid; i < half; i += blockDim.x) {
        if (cs_s[i] == 0.0) continue;
        int p, q;
        round_pair(r, i, m, &p, &q);
        B[static_cast<int64_t>(p) * n + q] = 0.0;
        B[static_cast<int64_t>(q) * n + p] = 0.0;
      }
      __syncthreads();
    }
    const int rotations = s_rot;
    __syncthreads();
    if (rotations == 0) break;
    ++sweeps;
    if (sweeps > max_sweeps) {
      status = kNoConvergence;
      sweeps = max_sweeps;
      break;
    }
  }
  if (shared_b) {
    for (int64_t k = tid; k < nn; k += blockDim.x) Bg[k] = Bs[k];
  }
  if (tid == 0) {
    status_out[mat] = status;
    sweeps_out[mat] = sweeps;
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Error(std::string("eigh (cuda): ") + what + ": " + cudaGetErrorString(err));
}

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
    const int64_t need = m + (n[i] <= kSharedN ? n[i] * n[i] : 0);
    max_smem_doubles = std::max(max_smem_doubles, need);
  }
  const size_t smem = static_cast<size_t>(max_smem_doubles) * sizeof(double);
  auto s = reinterpret_cast<cudaStream_t>(stream);

  // meta = [B ptrs | Vt ptrs | sizes | sweeps out | status out]
  std::vector<int64_t> host(5 * static_cast<size_t>(count), 0);
  for (int i = 0; i < count; ++i) {
    host[i] = static_cast<int64_t>(B[i]);
    host[count + i] = static_cast<int64_t>(Vt[i]);
    host[2 * count + i] = n[i];
  }
  int64_t* dev = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&dev), host.size() * sizeof(int64_t), s), "cudaMallocAsync");
  struct Free {
    int64_t* p;
    cudaStream_t s;
    ~Free() { cudaFreeAsync(p, s); }
  } guard{dev, s};
  check(cudaMemcpyAsync(dev, host.data(), 3 * count * sizeof(int64_t), cudaMemcpyHostToDevice, s), "upload");
  if (smem > 48 * 1024) {
    check(cudaFuncSetAttribute(jacobi_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
          "shared memory attribute");
  }
  jacobi_kernel<<<count, kThreads, smem, s>>>(dev, count, tol, max_sweeps, dev + 3 * count, dev + 4 * count);
  check(cudaGetLastError(), "kernel launch");
  check(cudaMemcpyAsync(host.data() + 3 * count, dev + 3 * count, 2 * count * sizeof(int64_t), cudaMemcpyDeviceToHost,
                        s),
        "download");
  check(cudaStreamSynchronize(s), "kernel execution");
  for (int i = 0; i < count; ++i) {
    const int64_t st = host[4 * count + i];
    if (st == kOk) continue;
    std::string head = "eigh: matrix " + std::to_string(i) + " (size " + std::to_string(n[i]) + "): ";
    if (st == kNonFinite) throw Error(head + "contains NaN or inf (after projection onto warm_start, if given)");
    if (st == kBadWarm) throw Error(head + "warm_start eigenvectors contain NaN or inf");
    throw Error(head + "Jacobi did not converge in max_sweeps=" + std::to_string(max_sweeps) +
                " sweeps; raise max_sweeps or tol");
  }
  return std::vector<int64_t>(host.begin() + 3 * count, host.begin() + 4 * count);
}

}  // namespace cuda
}  // namespace kfac_fast
