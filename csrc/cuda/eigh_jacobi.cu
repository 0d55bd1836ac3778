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
//
// Device code only: nvcc compiles this file into a fatbin embedded in _C; the host side
// (argument checks, launch through the driver API, status read-back) is eigh_jacobi_host.cpp.
#include <cfloat>
#include <cstdint>

#include "kfac_fast/cuda_kernels.h"

namespace kfac_fast {
namespace cuda {

namespace {

constexpr int kThreads = kJacobiThreads;
constexpr int kSharedN = kJacobiSharedN;

enum Status : int { kOk = kJacobiOk, kNonFinite = kJacobiNonFinite, kNoConvergence = kJacobiNoConvergence,
                    kBadWarm = kJacobiBadWarm };

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

}  // namespace

}  // namespace cuda
}  // namespace kfac_fast

using namespace kfac_fast::cuda;

// meta = [B ptrs | Vt ptrs | sizes] (count entries each); one block of kJacobiThreads per matrix.
extern "C" __global__ void __launch_bounds__(kThreads)
    kfac_fast_jacobi_kernel(const int64_t* __restrict__ meta, int count, double tol, int64_t max_sweeps,
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
