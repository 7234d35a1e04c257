#include "flotilla/plan/job.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <fstream>
#include <sstream>
#include <span>
#include <string>

#include "flotilla/base/error.hpp"
#include "flotilla/base/hash.hpp"

namespace flotilla::plan {
namespace {

std::string train_args(const PlanJob& job) {
  const PlanSource& s = job.source;
  std::string out = std::filesystem::is_directory(s.model) ? "--model " + s.model.string() : "--config " + s.model.string();
  out += fmt::format(" --data {} --batch-size {} --seq-len {}", s.data.string(), s.batch_size, s.seq_len);
  if (s.grad_accum != 1) out += fmt::format(" --grad-accum {}", s.grad_accum);
  if (!s.pack) out += " --no-pack";
  if (s.grad_checkpoint) out += " --grad-checkpoint";
  if (s.dtype == kernels::GemmInput::bf16) out += " --dtype bf16";
  if (s.bucket_mb != PlanSource{}.bucket_mb) out += fmt::format(" --bucket-mb {:g}", s.bucket_mb);
  if (s.lora) {
    std::string targets;
    for (const model::LoraTarget t : s.lora_config.targets) {
      std::string_view name = model::lora_target_module(t);  // "q_proj": the flag takes "q"
      if (name.ends_with("_proj")) name.remove_suffix(5);
      if (!targets.empty()) targets += ",";
      targets += name;
    }
    out += fmt::format(" --fine-tune-type lora --lora-rank {} --lora-targets {}", s.lora_config.rank, targets);
    if (s.lora_config.num_layers >= 0) out += fmt::format(" --num-layers {}", s.lora_config.num_layers);
  }
  return out;
}

}  // namespace

Hostfile read_hostfile(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw InputError("plan", path.string() + ": cannot read the hostfile (--hostfile)");
  Hostfile h;
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    line = line.substr(0, line.find('#'));
    std::istringstream words(line);
    std::string host, word;
    if (!(words >> host)) continue;
    int slots = 1;
    while (words >> word) {
      const size_t eq = word.find('=');
      const std::string key = word.substr(0, eq);
      if (eq == std::string::npos || (key != "slots" && key != "max_slots" && key != "max-slots"))
        throw InputError("plan", fmt::format("{}:{}: '{}' is not slots=K", path.string(), number, word));
      int value = 0;
      const std::string v = word.substr(eq + 1);
      const auto [ptr, ec] = std::from_chars(v.data(), v.data() + v.size(), value);
      if (ec != std::errc() || ptr != v.data() + v.size() || value < 1)
        throw InputError("plan", fmt::format("{}:{}: '{}' needs a positive whole number", path.string(), number, word));
      if (key == "slots") slots = value;
    }
    ++h.hosts;
    h.slots = std::max(h.slots, slots);
  }
  if (h.hosts == 0) throw InputError("plan", path.string() + ": the hostfile names no host");
  return h;
}

namespace {

// Whether every rank runs under the same booted kernel (/proc/sys/kernel/random/boot_id,
// the same in every namespace of one machine, different on any other): hosts that are
// network namespaces of this machine, as ../shared/netcluster makes them.
bool same_kernel_everywhere(comm::Communicator& world) {
  std::string boot_id;
  std::ifstream("/proc/sys/kernel/random/boot_id") >> boot_id;
  if (boot_id.empty()) boot_id = "unknown";  // then no rank can tell; hosts count as machines
  const uint64_t h = fnv1a64(boot_id);
  // Two 32-bit halves, exact in doubles; equal everywhere iff max(x) == -max(-x).
  std::array<double, 4> v = {static_cast<double>(h >> 32), static_cast<double>(h & 0xffffffffu),
                             -static_cast<double>(h >> 32), -static_cast<double>(h & 0xffffffffu)};
  world.all_reduce(std::span<double>(v), comm::ReduceOp::max, comm::Options{.name = "plan boot id"});
  return boot_id != "unknown" && v[0] == -v[2] && v[1] == -v[3];
}

}  // namespace

PlanResult run_plan_job(const PlanJob& job, comm::Communicator& world) {
  const PlanSource& src = job.source;
  if (src.batch_size <= 0 || src.seq_len <= 0 || src.grad_accum <= 0)
    throw InputError("plan", "--batch-size, --seq-len and --grad-accum must be positive");
  if (job.hosts < 1) throw InputError("plan", fmt::format("--hosts {}: there must be at least one machine", job.hosts));
  if (job.slots < 1) throw InputError("plan", fmt::format("--slots {}: a machine runs at least one rank", job.slots));
  if (!(src.bucket_mb >= 0)) throw InputError("plan", fmt::format("--bucket-mb {}: 0 or more MiB", src.bucket_mb));
  if (job.runs < 1) throw InputError("plan", fmt::format("--runs {}: at least one run", job.runs));
  if (!(job.epochs > 0)) throw InputError("plan", "--epochs must be positive");
  if (job.measure.steps < 1 || job.measure.warmup_steps < 0)
    throw InputError("plan", "--measure-steps must be at least 1 and --warmup-steps at least 0");
  if (!(job.knobs.topk_density > 0 && job.knobs.topk_density <= 1))
    throw InputError("plan", "--topk-density must be in (0, 1]");
  if (job.knobs.powersgd_rank < 1 || job.knobs.local_sgd_every < 1 || job.knobs.accumulate < 0)
    throw InputError("plan", "--powersgd-rank and --sync-every must be at least 1, --accumulate at least 0");

  PlanRequest req;
  Cluster& c = req.cluster;
  c.network.bandwidth_bytes_per_s = parse_bandwidth(job.bandwidth, "--bandwidth");
  c.network.latency_s = parse_latency(job.latency, "--latency");
  c.network.source = job.bandwidth_given || job.latency_given ? "given" : "assumed: 1 Gbit/s ethernet";
  c.local = c.network;
  c.local.source = "assumed: the network's (run plan under mpirun -np 2 to measure this host's)";
  if (!job.local_bandwidth.empty() || !job.local_latency.empty()) {
    if (!job.local_bandwidth.empty()) c.local.bandwidth_bytes_per_s = parse_bandwidth(job.local_bandwidth, "--local-bandwidth");
    if (!job.local_latency.empty()) c.local.latency_s = parse_latency(job.local_latency, "--local-latency");
    c.local.source = "given";
  }
  c.hosts = job.hosts;
  c.slots = job.slots;
  if (!job.hostfile.empty()) {
    const Hostfile h = read_hostfile(job.hostfile);
    c.hosts = h.hosts;
    c.slots = h.slots;
    req.hostfile = job.hostfile.string();
  }
  c.cores = job.cores > 0 ? job.cores : static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  if (!job.memory_per_host.empty()) {
    c.memory_bytes = parse_memory_bytes(job.memory_per_host, "--memory-per-host");
    c.memory_source = "--memory-per-host";
  } else {
    c.memory_bytes = machine_memory_bytes();
    c.memory_source = c.memory_bytes > 0 ? "MemTotal of this machine" : "unknown: /proc/meminfo unreadable, not checked";
  }

  const model::ModelConfig cfg = load_plan_model_config(src.model);
  req.workload = describe_workload(cfg, src.lora, src.lora_config, src.batch_size, src.seq_len, src.grad_accum,
                                    src.grad_checkpoint);
  req.workload.bucket_mb = src.bucket_mb;
  req.workload.dtype = src.dtype;
  req.knobs = job.knobs;
  req.micro_batches = job.micro_batches;
  req.runs = job.runs;
  req.epochs = job.epochs;
  req.train_args = train_args(job);

  // Ranks on several hosts that all run under one kernel are an emulated cluster.
  c.one_machine = world.size() > 1 && world.local_size() < world.size() && same_kernel_everywhere(world);
  // Under mpirun: the link between the ranks we were given, measured at the gradient's size.
  if (world.size() > 1) {
    Link measured = measure_link(world, 4.0 * static_cast<double>(req.workload.trainable_floats));
    if (world.local_size() == world.size()) {
      if (job.local_bandwidth.empty() && job.local_latency.empty()) c.local = measured;
    } else if (!job.bandwidth_given && !job.latency_given) {
      c.network = measured;
    }
  }
  // One rank measures the step alone; the others wait (their polling takes a core each:
  // with ranks x threads <= cores it does not slow the measured rank).
  const comm::Options wait{.name = "plan measured", .timeout = std::chrono::hours(6)};
  if (world.rank() == 0) {
    DataSize data;
    if (job.no_run) {
      data = measure_data(src);
      req.cost = estimate_step(req.workload);
    } else {
      req.cost = measure_step(src, job.measure, &data);
    }
    req.rows_per_epoch = data.rows_per_epoch;
    req.data_description = data.description;
  }
  if (world.size() > 1) world.barrier(wait);
  // Several ranks on this one host: all of them train at once, as a job here would, and
  // the slowest one's median against rank 0's alone is the contention for sharing a host
  // (less the time slicing the model already charges when ranks x threads > cores).
  if (world.size() > 1 && (world.local_size() == world.size() || c.one_machine) && !job.no_run) {
    const StepCost together = measure_step(src, job.measure);
    std::array<double, 1> worst = {together.data_s + together.compute_s};
    world.all_reduce(worst, comm::ReduceOp::max, wait);
    if (world.rank() == 0) {
      const double alone = req.cost.data_s + req.cost.compute_s;
      const double sliced = std::max(1.0, static_cast<double>(world.size()) * together.threads / c.cores);
      req.cost.contention = alone > 0 ? std::max(1.0, worst[0] / alone / sliced) : 1.0;
      req.cost.contention_ranks = world.size();
    }
  }
  PlanResult result;
  if (world.rank() == 0) result = make_plan(req);
  return result;
}

}  // namespace flotilla::plan
