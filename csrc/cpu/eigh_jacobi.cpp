// CPU symmetric eigensolver: cyclic-by-rows threshold Jacobi (float64), threads over matrices.
//
// Algorithm (Golub & Van Loan 8.5; Rutishauser's rotation formulas):
//   B <- J^T B J for every off-diagonal pair (p, q) in row-cyclic order, where J is the
//   plane rotation that zeroes b_pq; the same rotations are accumulated into the rows of
//   Vt (Vt <- J^T Vt), so Vt^T keeps the eigenvectors as columns. A warm start only changes
//   the input: the caller passes B = Q0^T A Q0 and Vt = Q0^T; when Q0 is the eigenbasis of a
//   nearby matrix B is almost diagonal and few rotations exceed the threshold.
//
// Rotation threshold tau = max(tol * ||B||_F / n, 4 eps ||B||_F): entries at or below tau
// are left alone, so on exit off(B)_F <= n * tau. The floor keeps rounding noise from
// re-triggering rotations forever (float64 Jacobi cannot do better than O(eps ||B||) per entry).
// ||B||_F is invariant under the rotations, so it is computed once.
//
// Memory: B is full (both triangles) row-major; a rotation updates rows p, q contiguously
// (vectorised) and mirrors them into columns p, q. Cost per applied rotation ~ 18 n flops,
// per full sweep ~ 9 n^3: Jacobi wins for small matrices and for warm starts where most
// rotations are skipped; LAPACK's tridiagonal methods win for large cold problems.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>
#include <numeric>
#include <sstream>
#include <thread>

#include "kfac_fast/common.h"

namespace kfac_fast {
namespace cpu {

namespace {

struct MatrixError {
  int64_t index = -1;
  std::string what;
};

// Rotate rows x, y of length n: x <- c x - s y, y <- s x + c y.
inline void rotate_rows(double* __restrict__ x, double* __restrict__ y, int64_t n, double c, double s) {
  for (int64_t k = 0; k < n; ++k) {
    const double a = x[k], b = y[k];
    x[k] = c * a - s * b;
    y[k] = s * a + c * b;
  }
}

// Diagonalise one matrix; returns sweeps that applied rotations. Throws std::runtime_error
// (message without the index; the caller adds it).
int64_t jacobi_one(double* B, double* Vt, int64_t n, double tol, int64_t max_sweeps) {
  if (n <= 1) {
    if (n == 1 && !std::isfinite(B[0])) throw std::runtime_error("contains NaN or inf");
    return 0;
  }
  double fro2 = 0.0;
  bool finite = true;
  for (int64_t i = 0; i < n * n; ++i) {
    const double v = B[i];
    finite = finite && std::isfinite(v);
    fro2 += v * v;
  }
  if (!finite) throw std::runtime_error("contains NaN or inf (after projection onto warm_start, if given)");
  if (!std::isfinite(fro2)) throw std::runtime_error("Frobenius norm overflows float64; rescale the matrix");
  for (int64_t i = 0; i < n * n; ++i) {
    if (!std::isfinite(Vt[i])) throw std::runtime_error("warm_start eigenvectors contain NaN or inf");
  }
  const double fro = std::sqrt(fro2);
  const double eps = std::numeric_limits<double>::epsilon();
  const double tau = std::max(tol * fro / double(n), 4.0 * eps * fro);

  int64_t sweeps = 0;
  for (;;) {
    int64_t rotations = 0;
    for (int64_t p = 0; p < n - 1; ++p) {
      double* bp = B + p * n;
      for (int64_t q = p + 1; q < n; ++q) {
        const double apq = bp[q];
        if (!(std::fabs(apq) > tau)) continue;
        if (sweeps >= max_sweeps) {
          // One more rotation was needed after the last allowed sweep: not converged.
          double off2 = 0.0;
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < n; ++j)
              if (i != j) off2 += B[i * n + j] * B[i * n + j];
          std::ostringstream msg;
          msg << "Jacobi did not converge in max_sweeps=" << max_sweeps << " sweeps (off-diagonal norm "
              << std::sqrt(off2) / fro << " relative to ||A||_F, tol " << tol << "); raise max_sweeps or tol";
          throw std::runtime_error(msg.str());
        }
        double* bq = B + q * n;
        const double app = bp[p], aqq = bq[q];
        const double theta = (aqq - app) / (2.0 * apq);
        double t;
        if (std::fabs(theta) > 1e150) {
          t = 0.5 / theta;
        } else {
          t = 1.0 / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
          if (theta < 0) t = -t;
        }
        const double c = 1.0 / std::sqrt(t * t + 1.0);
        const double s = t * c;
        rotate_rows(bp, bq, n, c, s);
        bp[p] = app - t * apq;
        bq[q] = aqq + t * apq;
        bp[q] = 0.0;
        bq[p] = 0.0;
        for (int64_t k = 0; k < n; ++k) {
          B[k * n + p] = bp[k];
          B[k * n + q] = bq[k];
        }
        rotate_rows(Vt + p * n, Vt + q * n, n, c, s);
        ++rotations;
      }
    }
    if (rotations == 0) break;
    ++sweeps;
  }
  return sweeps;
}

}  // namespace

std::vector<int64_t> eigh_jacobi(const std::vector<std::uintptr_t>& B, const std::vector<std::uintptr_t>& Vt,
                                 const std::vector<int64_t>& n, double tol, int64_t max_sweeps, int64_t num_threads) {
  const int64_t count = static_cast<int64_t>(n.size());
  if (static_cast<int64_t>(B.size()) != count || static_cast<int64_t>(Vt.size()) != count)
    throw Error("eigh_jacobi: B, Vt and n must have the same length");
  if (!(tol >= 0.0) || !std::isfinite(tol)) throw Error("eigh_jacobi: tol must be a finite number >= 0");
  if (max_sweeps < 0) throw Error("eigh_jacobi: max_sweeps must be >= 0");
  for (int64_t i = 0; i < count; ++i) {
    if (n[i] < 0) throw Error("eigh_jacobi: matrix " + std::to_string(i) + " has negative size");
    if (n[i] > 0 && (B[i] == 0 || Vt[i] == 0)) throw Error("eigh_jacobi: null pointer for matrix " + std::to_string(i));
  }
  std::vector<int64_t> sweeps(count, 0);
  // Largest first so that the big matrices do not end up last on one thread.
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return n[a] > n[b]; });

  std::atomic<int64_t> next{0};
  std::mutex err_mu;
  MatrixError first_err;
  auto work = [&]() {
    for (;;) {
      const int64_t k = next.fetch_add(1);
      if (k >= count) return;
      const int64_t i = order[k];
      try {
        sweeps[i] = jacobi_one(reinterpret_cast<double*>(B[i]), reinterpret_cast<double*>(Vt[i]), n[i], tol,
                               max_sweeps);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (first_err.index < 0 || i < first_err.index) {
          first_err.index = i;
          first_err.what = e.what();
        }
      }
    }
  };
  int64_t threads = num_threads > 0 ? num_threads : static_cast<int64_t>(std::thread::hardware_concurrency());
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, count));
  if (threads == 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (int64_t t = 0; t < threads - 1; ++t) pool.emplace_back(work);
    work();
    for (auto& th : pool) th.join();
  }
  if (first_err.index >= 0) {
    throw Error("eigh: matrix " + std::to_string(first_err.index) + " (size " + std::to_string(n[first_err.index]) +
                "): " + first_err.what);
  }
  return sweeps;
}

}  // namespace cpu

#ifndef KFAC_FAST_WITH_CUDA
namespace cuda {
std::vector<int64_t> eigh_jacobi(const std::vector<std::uintptr_t>&, const std::vector<std::uintptr_t>&,
                                 const std::vector<int64_t>&, double, int64_t, std::intptr_t) {
  throw Error("this build of kfac_fast._C has no CUDA code (built with KFAC_FAST_CUDA=OFF or without nvcc); "
              "rebuild with nvcc on PATH to run the native eigensolver on CUDA tensors");
}
}  // namespace cuda
#endif

}  // namespace kfac_fast
