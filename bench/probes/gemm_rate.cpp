// Probe (not built by CMake): one thread's matrix-product rate on this host, the figure
// every W2/W3 ratio in bench/RESULTS.md moves with (the hosts this project runs on give
// AVX-512 full or half throughput under the same CPU flags). M x N x K = 2048 x 2048 x 768
// and 512 x 8000 x 768 (an lm_head-like shape), best of 5 by thread CPU time, for
// kernels::gemm (oneDNN float32), kernels::gemm_bf16 and, built with -DWITH_OPENBLAS and
// -lopenblas, OpenBLAS's cblas_sgemm. Build against a build directory's library:
//   mpicxx -O2 -std=c++20 -fopenmp -Isrc bench/probes/gemm_rate.cpp build/libflotilla.a \
//       -ldnnl -lfmt -lsentencepiece -lyaml-cpp -o /tmp/gemm_rate        [-DWITH_OPENBLAS -lopenblas]
//   OMP_NUM_THREADS=1 /tmp/gemm_rate
#include <omp.h>
#include <time.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "flotilla/kernels/gemm.hpp"
#ifdef WITH_OPENBLAS
#include <cblas.h>
#endif

using namespace flotilla::kernels;

namespace {
double thread_cpu() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

void report(const char* what, int64_t M, int64_t N, int64_t K, const std::function<void()>& product) {
  product();  // primitive creation and first touch
  double best = 1e9;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = thread_cpu();
    product();
    best = std::min(best, thread_cpu() - t0);
  }
  std::printf("%-22s %5ld x %5ld x %4ld: %7.1f GFLOP/s\n", what, static_cast<long>(M), static_cast<long>(N),
              static_cast<long>(K), 2.0 * static_cast<double>(M * N * K) / best / 1e9);
}
}  // namespace

int main() {
  const char* env = std::getenv("OMP_NUM_THREADS");
  omp_set_num_threads(env ? std::atoi(env) : 1);
  for (const auto [M, N, K] : {std::array<int64_t, 3>{2048, 2048, 768}, std::array<int64_t, 3>{512, 8000, 768}}) {
    std::vector<float> A(static_cast<size_t>(M * K), 0.5f), B(static_cast<size_t>(K * N), 0.25f),
        C(static_cast<size_t>(M * N));
    std::vector<uint16_t> Ab(A.size(), 0x3f00), Bb(B.size(), 0x3e80);
    report("oneDNN float32", M, N, K, [&] {
      gemm(Transpose::no, Transpose::no, M, N, K, 1.0f, A.data(), K, B.data(), N, false, C.data(), N);
    });
    if (gemm_bf16_supported())
      report("oneDNN bf16", M, N, K, [&] {
        gemm_bf16(Transpose::no, Transpose::no, M, N, K, 1.0f, Ab.data(), K, Bb.data(), N, false, C.data(), N);
      });
#ifdef WITH_OPENBLAS
    report("OpenBLAS sgemm", M, N, K, [&] {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(M), static_cast<int>(N),
                  static_cast<int>(K), 1.0f, A.data(), static_cast<int>(K), B.data(), static_cast<int>(N), 0.0f,
                  C.data(), static_cast<int>(N));
    });
#endif
  }
}
