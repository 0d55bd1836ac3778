// CPU symmetric eigensolver: parallel-order (round-robin) threshold Jacobi in float64.
//
// Algorithm (Golub & Van Loan 8.5 "parallel Jacobi"; Rutishauser's rotation formulas):
//   B <- J^T B J where each sweep visits every off-diagonal pair (p, q) once, grouped into
//   m - 1 rounds (m = n rounded up to even) of m/2 disjoint pairs by the circle method; J is
//   the product of the plane rotations that zero the b_pq of one round (disjoint rotations
//   commute). The same rotations are accumulated into the rows of Vt (Vt <- J^T Vt), so Vt^T
//   holds the eigenvectors as columns. A warm start only changes the input: the caller
//   passes B = Q0^T A Q0 and Vt = Q0^T; when Q0 is the eigenbasis of a nearby matrix B is
//   nearly diagonal, convergence (quadratic) takes few sweeps and small entries are skipped.
//
// Rotation threshold tau = max(tol * ||B||_F / n, 4 eps ||B||_F): entries at or below tau
// are left alone, so on exit off(B)_F <= n * tau. The floor keeps rounding noise from
// re-triggering rotations forever (float64 Jacobi cannot do better than O(eps ||B||) per
// entry). ||B||_F is invariant under the rotations, so it is computed once. Converged when a
// sweep applies no rotation; failing that after max_sweeps sweeps is an error.
//
// A round: (1) thread 0 picks the rotations (|b_pq| > tau); (2) rows p, q of B and Vt are
// rotated (contiguous, vectorised; split over pairs); (3) columns p, q of B are rotated row
// by row (each row stays in cache; split over rows); b_pq = b_qp = 0. No strided column
// mirror, and the same ordering as the CUDA kernel. Matrices with n >= kTeamMinN are
// processed one at a time by all threads (barrier per phase); smaller ones one per thread.
//
// Cost: ~9 n^3 flops of level-1 work per full sweep, about the cost of a whole LAPACK syevd,
// and a cold start needs ~8-12 sweeps, a warm start 3-8. So this engine wins for small
// matrices (no per-call overhead, threads over many matrices) and loses for large ones
// (n >~ 100) to MKL/OpenBLAS; see benchmarks/results/eigh_cpu.csv.
// KFAC_FAST_JACOBI_DEBUG=1 prints the rotations of every sweep to stderr.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
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

// Matrices at least this large are diagonalised by all threads together.
constexpr int64_t kTeamMinN = 192;

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

// Pair i of round r of the circle method on m (even) indices: every unordered pair once
// in m - 1 rounds, each index once per round.
inline void round_pair(int64_t r, int64_t i, int64_t m, int64_t* p, int64_t* q) {
  int64_t a, b;
  if (i == 0) {
    a = m - 1;
    b = r;
  } else {
    a = (r + i) % (m - 1);
    b = (r - i + (m - 1)) % (m - 1);
  }
  *p = std::min(a, b);
  *q = std::max(a, b);
}

// Spin-then-yield barrier for the threads of a team working on one matrix.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    if (n_ <= 1) return;
    const int64_t gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    int spins = 0;
    while (gen_.load(std::memory_order_acquire) == gen) {
      if (++spins > 256) std::this_thread::yield();
    }
  }

 private:
  int n_;
  std::atomic<int> count_{0};
  std::atomic<int64_t> gen_{0};
};

struct Rot {
  int64_t p, q;
  double c, s;
};

// Shared state of one matrix being diagonalised by a team of threads.
struct Job {
  double* B;
  double* Vt;
  int64_t n;
  double tau;
  int64_t max_sweeps;
  std::vector<Rot> rots;  // active rotations of the current round
  int64_t sweeps = 0;
  int64_t sweep_rotations = 0;
  bool done = false;
  bool failed = false;
};

// Parallel-order (round-robin) threshold Jacobi; thread `tid` of `nthreads`. A round applies
// m/2 disjoint rotations: rows p, q of B and Vt (contiguous, split over pairs), then columns
// p, q of B row by row (each row stays in cache; split over rows). No strided column mirror.
void jacobi_team(Job& job, int tid, int nthreads, Barrier& bar) {
  double* B = job.B;
  double* Vt = job.Vt;
  const int64_t n = job.n;
  const int64_t m = n + (n & 1);
  for (;;) {
    for (int64_t r = 0; r < m - 1; ++r) {
      if (tid == 0) {
        // previous round's annihilated entries become exact zeros; choose this round's rotations
        for (const Rot& rt : job.rots) B[rt.p * n + rt.q] = B[rt.q * n + rt.p] = 0.0;
        job.rots.clear();
        if (r == 0) {
          job.sweep_rotations = 0;
        }
        for (int64_t i = 0; i < m / 2; ++i) {
          int64_t p, q;
          round_pair(r, i, m, &p, &q);
          if (q >= n) continue;
          const double apq = B[p * n + q];
          if (!(std::fabs(apq) > job.tau)) continue;
          if (job.sweeps >= job.max_sweeps) {
            job.failed = true;
            break;
          }
          const double app = B[p * n + p], aqq = B[q * n + q];
          const double theta = (aqq - app) / (2.0 * apq);
          double t;
          if (std::fabs(theta) > 1e150) {
            t = 0.5 / theta;
          } else {
            t = 1.0 / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
            if (theta < 0) t = -t;
          }
          const double c = 1.0 / std::sqrt(t * t + 1.0);
          job.rots.push_back({p, q, c, t * c});
        }
        job.sweep_rotations += static_cast<int64_t>(job.rots.size());
      }
      bar.wait();
      if (job.failed) return;
      // Both barriers below are unconditional: thread 0 must not rewrite job.rots for the
      // next round before every thread has finished reading this round's.
      const int64_t nr = static_cast<int64_t>(job.rots.size());
      for (int64_t j = tid; j < nr; j += nthreads) {
        const Rot& rt = job.rots[j];
        rotate_rows(B + rt.p * n, B + rt.q * n, n, rt.c, rt.s);
        rotate_rows(Vt + rt.p * n, Vt + rt.q * n, n, rt.c, rt.s);
      }
      bar.wait();
      if (nr > 0) {
        const int64_t k0 = n * tid / nthreads, k1 = n * (tid + 1) / nthreads;
        const Rot* rots = job.rots.data();
        for (int64_t k = k0; k < k1; ++k) {
          double* row = B + k * n;
          for (int64_t j = 0; j < nr; ++j) {
            const double x = row[rots[j].p], y = row[rots[j].q];
            row[rots[j].p] = rots[j].c * x - rots[j].s * y;
            row[rots[j].q] = rots[j].s * x + rots[j].c * y;
          }
        }
      }
      bar.wait();
    }
    if (tid == 0) {
      for (const Rot& rt : job.rots) B[rt.p * n + rt.q] = B[rt.q * n + rt.p] = 0.0;
      job.rots.clear();
      if (std::getenv("KFAC_FAST_JACOBI_DEBUG"))
        std::fprintf(stderr, "n=%lld sweep %lld rotations %lld\n", (long long)n, (long long)job.sweeps,
                     (long long)job.sweep_rotations);
      if (job.sweep_rotations == 0) {
        job.done = true;
      } else {
        ++job.sweeps;
        // Re-symmetrise: row and column updates round differently.
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = i + 1; j < n; ++j) {
            const double v = 0.5 * (B[i * n + j] + B[j * n + i]);
            B[i * n + j] = B[j * n + i] = v;
          }
      }
    }
    bar.wait();
    if (job.done) return;
  }
}

// Diagonalise one matrix with `nthreads` threads; returns sweeps that applied rotations.
// Throws std::runtime_error (message without the index; the caller adds it).
int64_t jacobi_one(double* B, double* Vt, int64_t n, double tol, int64_t max_sweeps, int nthreads) {
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
  Job job;
  job.B = B;
  job.Vt = Vt;
  job.n = n;
  job.tau = std::max(tol * fro / double(n), 4.0 * eps * fro);
  job.max_sweeps = max_sweeps;
  job.rots.reserve(static_cast<size_t>(n / 2 + 1));
  nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 64)));
  Barrier bar(nthreads);
  if (nthreads == 1) {
    jacobi_team(job, 0, 1, bar);
  } else {
    std::vector<std::thread> team;
    for (int t = 1; t < nthreads; ++t) team.emplace_back([&, t]() { jacobi_team(job, t, nthreads, bar); });
    jacobi_team(job, 0, nthreads, bar);
    for (auto& th : team) th.join();
  }
  if (job.failed) {
    double off2 = 0.0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        if (i != j) off2 += B[i * n + j] * B[i * n + j];
    std::ostringstream msg;
    msg << "Jacobi did not converge in max_sweeps=" << max_sweeps << " sweeps (off-diagonal norm "
        << std::sqrt(off2) / fro << " relative to ||A||_F, tol " << tol << "); raise max_sweeps or tol";
    throw std::runtime_error(msg.str());
  }
  return job.sweeps;
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

  int64_t threads = num_threads > 0 ? num_threads : static_cast<int64_t>(std::thread::hardware_concurrency());
  threads = std::max<int64_t>(1, threads);
  std::mutex err_mu;
  MatrixError first_err;
  auto run_one = [&](int64_t i, int team) {
    try {
      sweeps[i] = jacobi_one(reinterpret_cast<double*>(B[i]), reinterpret_cast<double*>(Vt[i]), n[i], tol, max_sweeps,
                             team);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(err_mu);
      if (first_err.index < 0 || i < first_err.index) {
        first_err.index = i;
        first_err.what = e.what();
      }
    }
  };
  // Large matrices one after another, each by the whole team of threads; the rest spread
  // over the threads, one matrix per thread at a time.
  int64_t k_small = 0;
  while (threads > 1 && k_small < count && n[order[k_small]] >= kTeamMinN) run_one(order[k_small++], int(threads));
  std::atomic<int64_t> next{k_small};
  auto work = [&]() {
    for (;;) {
      const int64_t k = next.fetch_add(1);
      if (k >= count) return;
      run_one(order[k], 1);
    }
  };
  const int64_t pool_threads = std::max<int64_t>(1, std::min<int64_t>(threads, count - k_small));
  if (pool_threads == 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    pool.reserve(pool_threads - 1);
    for (int64_t t = 0; t < pool_threads - 1; ++t) pool.emplace_back(work);
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
