// `flotilla plan` end to end: read the flags' values, measure what can be measured here
// (a short run of the user's training; under mpirun, the all-reduce between the ranks),
// and make the plan. The CLI fills a PlanJob from flags.
#pragma once

#include <filesystem>
#include <string>

#include "flotilla/comm/communicator.hpp"
#include "flotilla/plan/measure.hpp"
#include "flotilla/plan/plan.hpp"

namespace flotilla::plan {

struct PlanJob {
  PlanSource source;
  bool no_run = false;         // estimate compute from FLOPs instead of training here
  int64_t micro_batches = 0;   // the pipeline rows' --micro-batches (0: picked)
  MeasureOptions measure;
  int hosts = 1;               // machines, alike
  std::filesystem::path hostfile;  // instead of hosts: OpenMPI's "name slots=K" lines
  int slots = 1;               // ranks per machine (a hostfile's slots override it)
  int cores = 0;               // per machine; 0: this machine's
  std::string memory_per_host;  // "24GiB", bytes (parse_memory_bytes); empty: this machine's MemTotal
  std::string bandwidth = "1gbit", latency = "50us";  // between machines
  // Between ranks of one machine; empty: measured when run under mpirun on one host,
  // else the network's values.
  std::string local_bandwidth, local_latency;
  bool bandwidth_given = false, latency_given = false;  // flags given explicitly
  int runs = 1;
  double epochs = 1.0;
  StrategyKnobs knobs;
};

struct Hostfile {
  int hosts = 0;
  int slots = 1;  // the largest slots= of any line (1 where a line gives none)
};
// OpenMPI's hostfile: one host per line, "name [slots=K] [max_slots=M]", '#' comments.
// InputError naming the file and line for anything else.
Hostfile read_hostfile(const std::filesystem::path& path);

// Every rank of `world` calls this; the result is complete on rank 0 (other ranks get
// an empty plan). Alone, `world` is the size-1 group.
PlanResult run_plan_job(const PlanJob& job, comm::Communicator& world);

}  // namespace flotilla::plan
