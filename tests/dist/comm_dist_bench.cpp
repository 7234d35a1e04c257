// What the mismatch check and deadline polling cost: microseconds per all_reduce of f32
// buffers, plain blocking MPI_Allreduce against flotilla's MPI backend with the check off
// (nonblocking + MPI_Test polling only), with the exchange check and with the hash check.
//   mpirun --allow-run-as-root --oversubscribe -np 4 build/tests/dist/comm_dist_bench
// Prints rank 0's mean over a loop of about 0.3 s; the ratio column is to plain MPI_Allreduce.
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

#include "flotilla/comm/mpi/mpi_runtime.hpp"
#include "flotilla/comm/world.hpp"

using namespace flotilla::comm;

namespace {

// Mean seconds per call of `op` over about 0.3 s of calls. Every rank must make the same
// number of calls, so rank 0 sizes the loop from a 10-call probe and broadcasts it.
double time_per_call(Communicator& world, const std::function<void()>& op) {
  for (int i = 0; i < 3; ++i) op();  // warm up: connections, buffers
  MPI_Barrier(MPI_COMM_WORLD);
  double start = MPI_Wtime();
  for (int i = 0; i < 10; ++i) op();
  const double probe = (MPI_Wtime() - start) / 10;
  std::vector<int32_t> calls = {static_cast<int32_t>(std::clamp(0.3 / probe, 10.0, 1e6))};
  world.broadcast(calls, 0);
  MPI_Barrier(MPI_COMM_WORLD);
  start = MPI_Wtime();
  for (int i = 0; i < calls[0]; ++i) op();
  const double seconds = (MPI_Wtime() - start) / calls[0];
  MPI_Barrier(MPI_COMM_WORLD);
  return seconds;
}

}  // namespace

int main(int argc, char** argv) {
  MpiRuntime runtime(&argc, &argv);
  auto world = make_world();
  auto group_with = [&](bool check, CheckProtocol protocol) {
    auto g = world->split(0, world->rank());
    Settings s = g->settings();
    s.check_mismatch = check;
    s.protocol = protocol;
    g->set_settings(s);
    return g;
  };
  auto off = group_with(false, CheckProtocol::automatic);
  auto exchange = group_with(true, CheckProtocol::exchange);
  auto hash = group_with(true, CheckProtocol::hash);

  if (world->rank() == 0)
    std::printf("ranks %d, %s\n%10s %12s %16s %16s %16s\n", world->size(),
                std::string(MpiRuntime::threading_name(runtime.threading())).c_str(), "floats",
                "MPI us", "check off us", "exchange us", "hash us");
  for (size_t n : {size_t{1}, size_t{1024}, size_t{262144}, size_t{4194304}}) {
    std::vector<float> data(n, 1.0f);
    const double raw = time_per_call(*world, [&] {
      MPI_Allreduce(MPI_IN_PLACE, data.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM,
                    MPI_COMM_WORLD);
    });
    const double t_off = time_per_call(*world, [&] { off->all_reduce(data, ReduceOp::sum); });
    const double t_exchange =
        time_per_call(*world, [&] { exchange->all_reduce(data, ReduceOp::sum); });
    const double t_hash = time_per_call(*world, [&] { hash->all_reduce(data, ReduceOp::sum); });
    if (world->rank() == 0)
      std::printf("%10zu %12.1f %9.1f (%4.2fx) %9.1f (%4.2fx) %9.1f (%4.2fx)\n", n, raw * 1e6,
                  t_off * 1e6, t_off / raw, t_exchange * 1e6, t_exchange / raw, t_hash * 1e6,
                  t_hash / raw);
  }
  off.reset();
  exchange.reset();
  hash.reset();
  world.reset();
  return 0;
}
