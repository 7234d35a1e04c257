// Probe (not built by CMake): CPU time of gemm_bf16 calls on tiny and attention-sized shapes,
// 2000 calls split over 2 OpenMP threads, best of 5; the 16x16x16 row is the per-call cost
// of the wrapper around oneDNN's primitive. Build against a build directory's library:
//   mpicxx -O2 -std=c++20 -fopenmp -Isrc bench/probes/gemm_call_overhead.cpp build/libflotilla.a \
//       -ldnnl -lfmt -lsentencepiece -lyaml-cpp -o /tmp/gemm_call_overhead
// (bench/RESULTS.md, "W3 bf16: per-call cost of the products, attention's rounding").
#include <omp.h>
#include <time.h>
#include <cstdio>
#include <vector>
#include <cstdint>
#include "flotilla/kernels/gemm.hpp"
#include "flotilla/kernels/kernels.hpp"
using namespace flotilla::kernels;
static double tcpu(){timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+1e-9*t.tv_nsec;}
int main(){
  omp_set_num_threads(2);
  std::vector<uint16_t> A(64*512,0x3f80),B(512*64,0x3f80); std::vector<float> C(64*512);
  // tiny: overhead
  for(int shape=0;shape<3;++shape){
    int64_t M=64,N= shape==0?16:512,K=shape==2?512:64;
    if(shape==0){M=16;K=16;}
    double best=1e9;
    for(int rep=0;rep<5;++rep){
      double t0=tcpu(); int calls=0;
      #pragma omp parallel
      {
        #pragma omp for schedule(dynamic,1)
        for(int i=0;i<2000;++i){
          if(shape<2) gemm_bf16(Transpose::no,Transpose::yes,M,N,K,0.125f,A.data(),K,B.data(),K,false,C.data()+0*omp_get_thread_num(),N);
          else gemm_bf16(Transpose::no,Transpose::no,M,64,K,1.0f,A.data(),K,B.data(),64,true,C.data(),64);
        }
      }
      double t=tcpu()-t0; if(t<best)best=t;
    }
    double flops = 2.0*M*(shape==2?64:N)*K*2000;
    printf("shape %d M=%ld N=%ld K=%ld: main-thread cpu %.3f ms per 2000 calls (half on each thread): %.2f us/call, %.1f GFLOP/s per thread\n",shape,(long)M,(long)N,(long)K,best*1e3,best*1e6/1000,flops/2/best/1e9);
  }
}
