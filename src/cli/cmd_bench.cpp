// flotilla bench comm: under mpirun, all-reduce time and bus bandwidth for a range of
// sizes, flotilla's algorithms and the MPI library's own MPI_Allreduce side by side, and
// the ratio of flotilla's best to MPI_Allreduce. Rank 0 prints.
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <limits>

#include "cli/commands.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/comm/algorithms/all_reduce.hpp"
#include "flotilla/comm/algorithms/all_reduce_bench.hpp"
#include "flotilla/comm/mpi/mpi_communicator.hpp"
#include "flotilla/comm/world.hpp"

namespace flotilla::cli {
namespace {

constexpr std::string_view kReference = "MPI_Allreduce";

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t comma = std::min(s.find(',', start), s.size());
    if (comma > start) out.push_back(s.substr(start, comma - start));
    start = comma + 1;
  }
  return out;
}

std::string human_bytes(size_t bytes) {
  if (bytes >= (size_t{1} << 20) && bytes % (size_t{1} << 20) == 0)
    return fmt::format("{}M", bytes >> 20);
  if (bytes >= 1024 && bytes % 1024 == 0) return fmt::format("{}K", bytes >> 10);
  return fmt::format("{}", bytes);
}

}  // namespace

void add_bench_command(CLI::App& app) {
  struct Options {
    std::string sizes = "4K..256M";
    int iters = 0;
    std::string algorithms = "ring,hd,hier,mpi,MPI_Allreduce";
    int ranks_per_host = 0;
    size_t segment_bytes = comm::AlgorithmOptions{}.segment_bytes;
    int window = comm::AlgorithmOptions{}.window;
    double timeout_s = 300.0;
    bool no_check = false;
    bool no_shm = false;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks (run under mpirun)");
  bench->require_subcommand(1);
  CLI::App* cmd = bench->add_subcommand(
      "comm", "All-reduce time and bus bandwidth: flotilla's algorithms and MPI_Allreduce side by side");
  cmd->add_option("--sizes", opt->sizes, "Buffer sizes: 4K..256M (powers of two) or a list 1M,3M")
      ->capture_default_str();
  cmd->add_option("--iters", opt->iters, "Timed calls per size and algorithm (0: about 128 MiB moved, 3..200)")
      ->capture_default_str();
  cmd->add_option("--algorithms,--allreduce", opt->algorithms,
                  "Comma list of auto, ring, hd, hier, mpi (flotilla's MPI backend: MPI_Iallreduce, "
                  "checked, polled) and MPI_Allreduce (the library's own, blocking)")
      ->capture_default_str();
  cmd->add_option("--ranks-per-host", opt->ranks_per_host,
                  "Group consecutive ranks K at a time into emulated hosts for hier and auto "
                  "(0: by host name)")
      ->capture_default_str();
  cmd->add_option("--segment-bytes", opt->segment_bytes, "Bytes per transfer in ring and hier (0: 256 KiB on one host, 60 KiB across hosts)")
      ->capture_default_str();
  cmd->add_option("--window", opt->window, "Segments received ahead in ring and hier (0: 8 on one host, 16 across)")->capture_default_str();
  cmd->add_option("--timeout", opt->timeout_s, "Seconds any collective may wait")->capture_default_str();
  cmd->add_flag("--no-check", opt->no_check, "Skip the per-call mismatch check of flotilla's algorithms");
  cmd->add_flag("--no-shm", opt->no_shm,
                "hier: move data inside a host over point-to-point, not a shared-memory arena");
  cmd->callback([opt] {
    comm::Settings settings;
    settings.timeout = std::chrono::milliseconds(static_cast<int64_t>(opt->timeout_s * 1000.0));
    const std::unique_ptr<comm::Communicator> world = comm::make_world(settings);
    // The algorithms run on a group of their own, so that --no-check leaves the bench's
    // own barriers and timing reductions checked.
    std::unique_ptr<comm::Communicator> group = world->split(0, world->rank(), {.name = "bench"});
    comm::Settings group_settings = settings;
    group_settings.check_mismatch = !opt->no_check;
    group->set_settings(group_settings);
    comm::AllReducer::Config config;
    config.tuning.segment_bytes = opt->segment_bytes;
    config.tuning.window = opt->window;
    config.fake_ranks_per_host = opt->ranks_per_host;
    config.use_shm = !opt->no_shm;
    comm::AllReducer reducer(*group, config);
    const std::vector<size_t> sizes = comm::parse_sizes(opt->sizes);

    std::vector<comm::BenchContender> contenders;
    for (const std::string& name : split_list(opt->algorithms)) {
      if (name == kReference) {
        if (!comm::is_mpi(*group)) {
          if (world->rank() == 0)
            fmt::print("(MPI_Allreduce left out: not running under mpirun)\n");
          continue;
        }
        comm::Communicator* g = group.get();
        contenders.push_back({std::string(kReference),
                              [g](comm::MutView d) {
                                comm::mpi_reference_all_reduce(*g, d, comm::ReduceOp::sum);
                              },
                              false});
        continue;
      }
      const comm::AllReduceAlgorithm a = comm::parse_algorithm(name);
      auto pinned = std::make_shared<comm::AllReducer>(
          *group, comm::AllReducer::Config{a, config.tuning, config.fake_ranks_per_host,
                                           config.use_shm});
      contenders.push_back({std::string(comm::algorithm_flag(a)),
                            [pinned](comm::MutView d) { pinned->run(d, comm::ReduceOp::sum); },
                            a != comm::AllReduceAlgorithm::backend});
    }
    if (contenders.empty()) throw InputError("bench", "--algorithms names nothing to run");

    const bool root = world->rank() == 0;
    const int n = world->size();
    if (root) {
      const comm::Topology& t = reducer.topology();
      fmt::print("flotilla bench comm: in-place f32 sum all-reduce on {} ranks, {} host{}{}; "
                 "mismatch check {}; segment {} bytes, window {}\n",
                 n, t.hosts, t.hosts == 1 ? "" : "s",
                 opt->ranks_per_host > 0 ? fmt::format(" (emulated, {} ranks each)", opt->ranks_per_host) : "",
                 opt->no_check ? "off" : "on", config.tuning.resolve(*group).segment_bytes,
                 config.tuning.resolve(*group).window);
      fmt::print("hier inside a host: {}\n",
                 opt->no_shm ? "point-to-point chains (--no-shm)" : "shared-memory arena");
      fmt::print("time: slowest rank's mean per call; busbw = bytes x 2(n-1)/n / time, Gbit/s "
                 "(nccl-tests); auto = the chooser's pick\n");
      std::string head = fmt::format("{:>6} {:>5} {:>5} |", "size", "iters", "auto");
      for (const auto& c : contenders) head += fmt::format("  {:>16}", c.name + " us");
      head += " |";
      for (const auto& c : contenders) head += fmt::format("  {:>16}", c.name + " bw");
      head += " | best/MPI";
      fmt::print("{}\n", head);
      std::fflush(stdout);
    }
    int reference = -1;
    for (size_t i = 0; i < contenders.size(); ++i)
      if (contenders[i].name == kReference) reference = static_cast<int>(i);
    if (reference < 0)
      for (size_t i = 0; i < contenders.size(); ++i)
        if (contenders[i].name == "mpi") reference = static_cast<int>(i);

    comm::bench_all_reduce(*group, contenders, sizes, opt->iters, [&](const comm::BenchRow& row) {
      if (!root) return;
      std::string line = fmt::format("{:>6} {:>5} {:>5} |", human_bytes(row.bytes), row.iters,
                                     comm::algorithm_flag(reducer.algorithm_for(row.bytes)));
      double best = std::numeric_limits<double>::infinity();
      for (size_t i = 0; i < contenders.size(); ++i) {
        line += fmt::format("  {:>16.1f}", row.seconds[i] * 1e6);
        if (contenders[i].is_flotilla) best = std::min(best, row.seconds[i]);
      }
      line += " |";
      for (size_t i = 0; i < contenders.size(); ++i)
        line += fmt::format("  {:>16.3f}", comm::bus_gbit_s(row.bytes, n, row.seconds[i]));
      line += " |";
      if (reference >= 0 && best < std::numeric_limits<double>::infinity() && n > 1)
        line += fmt::format(" {:>7.2f}x", row.seconds[reference] / best);
      fmt::print("{}\n", line);
      std::fflush(stdout);
    });
  });
}

}  // namespace flotilla::cli
