// Probe (not built by CMake): one W2 layer's attention in bf16 (B=4, T=512, 12 heads of 64),
// forward and backward, process CPU time and wall time per call, best of 6 rounds of 4, on
// 2 threads. Build against a build directory's library and run with OMP_WAIT_POLICY=passive
// so that waiting threads do not count as CPU:
//   mpicxx -O2 -std=c++20 -fopenmp -Isrc bench/probes/attention_bf16.cpp build/libflotilla.a \
//       -ldnnl -lfmt -lsentencepiece -lyaml-cpp -o /tmp/attention_bf16
//   OMP_WAIT_POLICY=passive /tmp/attention_bf16 label
// (bench/RESULTS.md, "W3 bf16: per-call cost of the products, attention's rounding").
#include <omp.h>
#include <sys/resource.h>
#include <time.h>
#include <cstdio>
#include <vector>
#include <random>
#include "flotilla/kernels/kernels.hpp"
using namespace flotilla::kernels;
static double pcpu(){rusage r;getrusage(RUSAGE_SELF,&r);return r.ru_utime.tv_sec+r.ru_stime.tv_sec+1e-6*(r.ru_utime.tv_usec+r.ru_stime.tv_usec);}
static double wall(){timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
int main(int argc,char**argv){
  omp_set_num_threads(2);
  const int64_t B=4,T=512,NH=12,hd=64; const int64_t nq=B*T*NH*hd;
  std::mt19937 g(1); std::normal_distribution<float> d(0,1);
  std::vector<float> q(nq),k(nq),v(nq),dout(nq),out(nq),probs(B*NH*T*T),scratch(B*NH*T*T),dq(nq),dk(nq),dv(nq);
  for(auto*x:{&q,&k,&v,&dout}) for(auto&e:*x) e=d(g);
  auto fwd=[&]{attention_forward(out.data(),probs.data(),q.data(),k.data(),v.data(),B,T,T,NH,NH,hd,nullptr,GemmInput::bf16);};
  auto bwd=[&]{attention_backward(dq.data(),dk.data(),dv.data(),scratch.data(),dout.data(),q.data(),k.data(),v.data(),probs.data(),B,T,T,NH,NH,hd,nullptr,GemmInput::bf16);};
  fwd(); bwd();
  double bf=1e9,bb=1e9,wf=1e9,wb=1e9;
  for(int r=0;r<6;++r){
    double c0=pcpu(),w0=wall(); for(int i=0;i<4;++i) fwd(); double c1=pcpu(),w1=wall(); for(int i=0;i<4;++i) bwd(); double c2=pcpu(),w2=wall();
    bf=std::min(bf,(c1-c0)/4); bb=std::min(bb,(c2-c1)/4); wf=std::min(wf,(w1-w0)/4); wb=std::min(wb,(w2-w1)/4);
  }
  printf("%s: per layer, best of 6x4: forward cpu %.1f ms wall %.1f ms; backward cpu %.1f ms wall %.1f ms\n",argv[1],bf*1e3,wf*1e3,bb*1e3,wb*1e3);
}
