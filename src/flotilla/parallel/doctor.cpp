#include "flotilla/parallel/doctor.hpp"

#include <fmt/format.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/comm/wire_bytes.hpp"
#include "flotilla/kernels/gemm.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::parallel {
namespace {

// 64-bit words through a multiply-xorshift mix: several GB/s, enough to fingerprint a
// model's weights before a run.
struct Digest {
  uint64_t h = 0x9e3779b97f4a7c15ULL;
  void add(const std::byte* p, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      mix(w);
    }
    uint64_t tail = 0;
    std::memcpy(&tail, p + i, n - i);
    mix(tail ^ (static_cast<uint64_t>(n) << 56));
  }
  void add(std::string_view s) { add(reinterpret_cast<const std::byte*>(s.data()), s.size()); }
  void mix(uint64_t w) {
    h ^= w + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 31;
  }
  std::string hex() const { return fmt::format("{:016x}", h); }
};

constexpr size_t kField = 96;  // bytes per string field in the all-gather
constexpr size_t kFields = 10;  // host, versions, binary, model, data, numbers, cpu, kernels, matmul, dtype

void put(std::array<char, kField * kFields>& rec, size_t field, std::string_view s) {
  std::memcpy(rec.data() + field * kField, s.data(), std::min(s.size(), kField - 1));
}
std::string get(const char* rec, size_t field) {
  const char* p = rec + field * kField;
  return std::string(p, strnlen(p, kField));
}

}  // namespace

std::string digest_path(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  if (!fs::exists(path)) throw InputError("doctor", path.string() + ": does not exist");
  std::vector<fs::path> files;
  if (fs::is_directory(path)) {
    for (const auto& e : fs::recursive_directory_iterator(path))
      if (e.is_regular_file()) files.push_back(e.path());
    std::sort(files.begin(), files.end());
  } else {
    files.push_back(path);
  }
  Digest d;
  for (const fs::path& f : files) {
    d.add(fs::relative(f, fs::is_directory(path) ? path : path.parent_path()).string());
    const MappedFile map(f);
    d.add(map.bytes().data(), map.size());
  }
  return d.hex();
}

std::string digest_running_binary() {
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return "unknown";
  const MappedFile map(exe);
  Digest d;
  d.add(map.bytes().data(), map.size());
  return d.hex();
}

DoctorReport run_doctor(comm::Communicator& comm, const std::filesystem::path& model,
                        const std::filesystem::path& data, uint64_t max_bytes, kernels::GemmInput dtype) {
  const int n = comm.size();
  std::array<char, kField * kFields> mine{};
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  put(mine, 0, host);
  put(mine, 1, fmt::format("flotilla 0.1.0, {} backend", comm.backend()));
  put(mine, 2, digest_running_binary());
  put(mine, 3, model.empty() ? "" : digest_path(model));
  put(mine, 4, data.empty() ? "" : digest_path(data));
  put(mine, 5, fmt::format("{} {}", sysconf(_SC_NPROCESSORS_ONLN), omp_get_max_threads()));
  put(mine, 6, kernels::cpu_features());
  put(mine, 7, kernels::kernel_isa());
  put(mine, 8, kernels::gemm_engine_info().isa);
  put(mine, 9, dtype == kernels::GemmInput::bf16 && kernels::gemm_bf16_supported() ? "bf16" : "float32");
  std::vector<char> all(mine.size() * static_cast<size_t>(n));
  comm.all_gather(std::span<const int8_t>(reinterpret_cast<const int8_t*>(mine.data()), mine.size()),
                  std::span<int8_t>(reinterpret_cast<int8_t*>(all.data()), all.size()),
                  comm::Options{.name = "doctor"});

  DoctorReport report;
  for (int r = 0; r < n; ++r) {
    const char* rec = all.data() + static_cast<size_t>(r) * mine.size();
    RankReport rr;
    rr.rank = r;
    rr.host = get(rec, 0);
    rr.versions = get(rec, 1);
    rr.binary = get(rec, 2);
    rr.model = get(rec, 3);
    rr.data = get(rec, 4);
    std::sscanf(get(rec, 5).c_str(), "%d %d", &rr.cores, &rr.threads);
    rr.cpu = get(rec, 6);
    rr.kernels = get(rec, 7);
    rr.matmul = get(rec, 8);
    rr.dtype = get(rec, 9);
    report.ranks.push_back(rr);
  }
  for (int r = 1; r < n; ++r) {
    const RankReport &a = report.ranks[0], &b = report.ranks[static_cast<size_t>(r)];
    if (a.binary != b.binary) report.mismatches.push_back(fmt::format("binary: rank {} differs from rank 0", r));
    if (a.model != b.model) report.mismatches.push_back(fmt::format("model: rank {} differs from rank 0", r));
    if (a.data != b.data) report.mismatches.push_back(fmt::format("data: rank {} differs from rank 0", r));
    if (a.kernels != b.kernels)
      report.warnings.push_back(fmt::format("kernels: rank {} runs the {} variant, rank 0 the {} variant", r,
                                            b.kernels, a.kernels));
    if (a.dtype != b.dtype)
      report.warnings.push_back(fmt::format("dtype: rank {} computes its matrix products in {}, rank 0 in {}: their "
                                            "gradients differ by more than rounding",
                                            r, b.dtype, a.dtype));
    if (a.matmul != b.matmul)
      report.warnings.push_back(fmt::format("matmul: rank {} runs oneDNN's {} kernels, rank 0 its {} kernels", r,
                                            b.matmul, a.matmul));
  }

  // All-reduce latency and bandwidth, 4 KiB .. max_bytes, best of a few repetitions.
  for (uint64_t bytes = 4096; bytes <= max_bytes; bytes *= 8) {
    std::vector<float> buf(bytes / sizeof(float), 1.0f);
    const int reps = bytes <= (1u << 20) ? 20 : 3;
    double best = 1e300;
    comm.barrier(comm::Options{.name = "doctor"});
    for (int i = 0; i < reps; ++i) {
      Timer t;
      comm.all_reduce(buf, comm::ReduceOp::sum, comm::Options{.name = "doctor"});
      best = std::min(best, t.elapsed_s());
    }
    // Every rank reports the slowest rank's best time.
    std::array<double, 1> worst = {best};
    comm.all_reduce(worst, comm::ReduceOp::max, comm::Options{.name = "doctor"});
    const double bus = static_cast<double>(bytes) * comm::all_reduce_wire_fraction(n) / worst[0] * 8e-9;
    report.all_reduce.push_back({bytes, worst[0] * 1e6, bus});
  }
  return report;
}

namespace {
const char* dim_name(MeshDim d) { return d == MeshDim::dp ? "dp" : d == MeshDim::pp ? "pp" : "tp"; }
}  // namespace

std::vector<std::string> mesh_placement_warnings(const MeshShape& shape, const std::vector<std::string>& hosts) {
  std::vector<std::string> warnings;
  if (shape.tp <= 1) return warnings;
  for (int r = 0; r < shape.size(); r += shape.tp) {  // each tp group once: its first rank
    const std::vector<int> group = mesh_group_ranks(shape, r, MeshDim::tp);
    std::vector<std::string> on;
    for (int g : group)
      if (std::find(on.begin(), on.end(), hosts.at(static_cast<size_t>(g))) == on.end())
        on.push_back(hosts.at(static_cast<size_t>(g)));
    if (on.size() < 2) continue;
    std::string ranks, names;
    for (int g : group) ranks += fmt::format("{}{}", ranks.empty() ? "" : ",", g);
    for (const std::string& h : on) names += fmt::format("{}{}", names.empty() ? "" : ", ", h);
    warnings.push_back(fmt::format("tp: the tensor-parallel group of ranks {} spans hosts {}: it exchanges "
                                   "activations in every block; keep it on one host (tp ranks are adjacent: give "
                                   "each host a multiple of {} slots)",
                                   ranks, names, shape.tp));
  }
  return warnings;
}

MeshReport run_mesh_doctor(Mesh& mesh, const std::vector<std::string>& hosts, uint64_t bytes) {
  MeshReport report;
  report.shape = mesh.shape();
  for (int r = 0; r < report.shape.size(); ++r) report.coords.push_back(mesh_coords(report.shape, r));
  report.warnings = mesh_placement_warnings(report.shape, hosts);
  std::vector<float> buf(std::max<uint64_t>(bytes / sizeof(float), 1), 1.0f);
  for (const MeshDim d : {MeshDim::tp, MeshDim::pp, MeshDim::dp}) {
    const int n = report.shape.extent(d);
    if (n <= 1) continue;
    comm::Communicator& group = mesh.group(d);
    double best = 1e300;
    mesh.world().barrier(comm::Options{.name = "doctor mesh"});
    for (int i = 0; i < 3; ++i) {
      Timer t;
      group.all_reduce(buf, comm::ReduceOp::sum, comm::Options{.name = "doctor mesh"});
      best = std::min(best, t.elapsed_s());
    }
    std::array<double, 1> worst = {best};
    mesh.world().all_reduce(worst, comm::ReduceOp::max, comm::Options{.name = "doctor mesh"});
    const uint64_t sent = buf.size() * sizeof(float);
    report.timings.push_back({d, dim_name(d), n, sent, worst[0] * 1e6,
                              static_cast<double>(sent) * comm::all_reduce_wire_fraction(n) / worst[0] * 8e-9});
  }
  return report;
}

}  // namespace flotilla::parallel
