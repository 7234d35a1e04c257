// flotilla doctor: run under mpirun before a long job; prints each rank's host, cores,
// threads, versions and the digests of the binary, model and data it sees (a mismatch is
// an error), and all-reduce latency and bandwidth across the world.
#include <fmt/format.h>

#include "cli/commands.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/log.hpp"
#include "flotilla/comm/world.hpp"
#include "flotilla/parallel/doctor.hpp"
#include "flotilla/parallel/mesh.hpp"

#include <optional>
#include <string>
#include <vector>

namespace flotilla::cli {

void add_doctor_command(CLI::App& app) {
  struct Options {
    std::string model, data;
    uint64_t max_bytes = 64ull << 20;
    std::string dtype = "float32";
    std::string parallel;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("doctor", "Check ranks see the same binary, model and data; measure all-reduce");
  cmd->add_option("--model", opt->model, "Model directory every rank should hold identically");
  cmd->add_option("--data", opt->data, "Data file or folder every rank should hold identically");
  cmd->add_option("--max-bytes", opt->max_bytes, "Largest all-reduce measured")->capture_default_str();
  cmd->add_option("--dtype", opt->dtype,
                  "The --dtype a job will use: each rank says the format it computes matrix products in (bf16 "
                  "needs AVX-512; ranks that differ are a warning)")
      ->check(CLI::IsMember({"float32", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--parallel", opt->parallel,
                  "The device mesh a job will use (dp=D,pp=P,tp=T): each rank's place in it, an all-reduce "
                  "measured in every group of each dimension at once, and a warning where a tensor-parallel group "
                  "spans hosts");
  cmd->callback([opt] {
    const std::unique_ptr<comm::Communicator> world = comm::make_world();
    const parallel::DoctorReport r = parallel::run_doctor(*world, opt->model, opt->data, opt->max_bytes,
                                                           model::parse_matmul_dtype(opt->dtype).value_or(kernels::GemmInput::f32));
    std::optional<parallel::MeshReport> mesh_report;
    if (!opt->parallel.empty()) {
      parallel::Mesh mesh(*world, parallel::parse_mesh_shape(opt->parallel));
      std::vector<std::string> hosts;
      for (const auto& rr : r.ranks) hosts.push_back(rr.host);
      mesh_report = parallel::run_mesh_doctor(mesh, hosts, opt->max_bytes);
    }
    if (world->rank() != 0) {
      if (!r.mismatches.empty()) throw InputError("doctor", r.mismatches.front());
      return;
    }
    fmt::print("{:>4}  {:<16} {:>5} {:>7}  {:<16} {:<16} {:<16}  {}\n", "rank", "host", "cores", "threads", "binary",
               "model", "data", "versions");
    for (const auto& rr : r.ranks)
      fmt::print("{:>4}  {:<16} {:>5} {:>7}  {:<16} {:<16} {:<16}  {}\n", rr.rank, rr.host, rr.cores, rr.threads,
                 rr.binary, rr.model.empty() ? "-" : rr.model, rr.data.empty() ? "-" : rr.data, rr.versions);
    fmt::print("\n{:>4}  {:<8} {:<18} {:<8} {}\n", "rank", "kernels", "matmul", "dtype", "cpu features");
    for (const auto& rr : r.ranks)
      fmt::print("{:>4}  {:<8} {:<18} {:<8} {}\n", rr.rank, rr.kernels, rr.matmul.empty() ? "-" : rr.matmul,
                 rr.dtype.empty() ? "-" : rr.dtype, rr.cpu.empty() ? "-" : rr.cpu);
    fmt::print("\nall_reduce (f32 sum) over {} ranks: best time, bus bandwidth = bytes x 2(n-1)/n / time\n",
               r.ranks.size());
    for (const auto& t : r.all_reduce)
      fmt::print("  {:>10} bytes  {:>10.1f} us  {:>8.3f} Gbit/s\n", t.bytes, t.time_us, t.bus_gbit_s);
    if (mesh_report) {
      fmt::print("\nmesh {}\n{:>4}  {:<16} {:>3} {:>3} {:>3}\n", mesh_report->shape.to_string(), "rank", "host", "dp",
                 "pp", "tp");
      for (size_t i = 0; i < mesh_report->coords.size(); ++i) {
        const parallel::MeshCoords& c = mesh_report->coords[i];
        fmt::print("{:>4}  {:<16} {:>3} {:>3} {:>3}\n", i, r.ranks[i].host, c.dp, c.pp, c.tp);
      }
      for (const parallel::MeshGroupTiming& t : mesh_report->timings)
        fmt::print("  all_reduce in every {} group ({} ranks each) at once, {} bytes: {:.1f} us, {:.3f} Gbit/s\n",
                   t.name, t.group_size, t.bytes, t.time_us, t.bus_gbit_s);
      for (const std::string& w : mesh_report->warnings) log::warn("doctor: {}", w);
    }
    for (const auto& w : r.warnings) log::warn("doctor: {}", w);
    if (!r.mismatches.empty()) {
      std::string all;
      for (const auto& m : r.mismatches) all += (all.empty() ? "" : "; ") + m;
      throw InputError("doctor", all);
    }
    fmt::print("\nall {} ranks see the same binary, model and data\n", r.ranks.size());
  });
}

}  // namespace flotilla::cli
