// The flowchart's answers on clear-cut cases, and the hostfile reader.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/local/local_communicator.hpp"
#include "flotilla/plan/job.hpp"
#include "flotilla/plan/plan.hpp"

namespace flotilla::plan {
namespace {

// A 110M-parameter-class model (llama2.c's shape) so that its gradients weigh something
// on the network, with a step time and data size set by each test.
PlanRequest request(double step_s, double run_s, int hosts, const std::string& bandwidth) {
  model::ModelConfig cfg = model::preset_config("110M");
  PlanRequest r;
  r.workload = describe_workload(cfg, false, {}, 4, 256, 1);
  r.cost.compute_s = 0.95 * step_s;
  r.cost.update_s = 0.05 * step_s;
  r.cost.threads = 8;
  r.cluster.hosts = hosts;
  r.cluster.cores = 8;
  r.cluster.memory_bytes = int64_t{64} << 30;
  r.cluster.network = {parse_bandwidth(bandwidth), 50e-6, "given"};
  r.cluster.local = r.cluster.network;
  r.rows_per_epoch = run_s / step_s * 4;  // steps x batch
  r.train_args = "--model m --data d --batch-size 4 --seq-len 256";
  return r;
}

TEST(Recommend, OneSecondRunStaysOnOneMachineHoweverManyMachines) {
  const PlanResult p = make_plan(request(0.1, 1.0, 1000, "100gbit"));
  EXPECT_EQ(p.recommendation.advice, Advice::one_machine) << p.recommendation.reason;
  EXPECT_EQ(p.recommendation.command.rfind("flotilla train", 0), 0u) << p.recommendation.command;
  EXPECT_NEAR(p.run_s_one, 1.0, 1e-9);
}

TEST(Recommend, TenHourRunOnAFastNetworkIsBasicDataParallel) {
  const PlanResult p = make_plan(request(10.0, 10 * 3600.0, 4, "10gbit"));
  const Recommendation& r = p.recommendation;
  EXPECT_EQ(r.advice, Advice::data_parallel) << r.reason;
  EXPECT_EQ(r.ranks, 4);
  EXPECT_FALSE(r.planned);
  EXPECT_NE(r.command.find("mpirun -np 4"), std::string::npos) << r.command;
  EXPECT_NE(r.command.find("flotilla train --model m"), std::string::npos) << r.command;
}

TEST(Recommend, ShortRunsManyTimesGoDistributed) {
  // 30 minutes a run is under the hour, but 10 of them are not.
  EXPECT_EQ(make_plan(request(10.0, 1800.0, 4, "10gbit")).recommendation.advice, Advice::one_machine);
  PlanRequest r = request(10.0, 1800.0, 4, "10gbit");
  r.runs = 10;
  EXPECT_EQ(make_plan(r).recommendation.advice, Advice::data_parallel);
}

TEST(Recommend, SlowNetworkCallsForAccumulationOrCompression) {
  // 110M parameters = 440 MB of gradients over 100 Mbit/s: ~60 s per all-reduce on 4 ranks
  // against a 1 s step. Plain all-reduce is a slow-down; accumulation or compression hides it.
  const PlanResult p = make_plan(request(1.0, 10 * 3600.0, 4, "100mbit"));
  const Recommendation& r = p.recommendation;
  EXPECT_LT(p.row(StrategyKind::all_reduce).weak.back().speedup, 1.0);
  EXPECT_EQ(r.advice, Advice::accumulate_or_compress) << r.reason;
  EXPECT_TRUE(r.command.find("--grad-accum") != std::string::npos || r.command.find("--compression") != std::string::npos)
      << r.command;
}

TEST(Recommend, WhatDoesNotFitOneMachineIsSharded) {
  PlanRequest r = request(10.0, 10 * 3600.0, 8, "10gbit");
  // A replica needs 16 bytes per parameter (~2 GiB here) and the activations; give each
  // machine 1.5 GiB.
  r.cluster.memory_bytes = int64_t{3} << 29;
  const PlanResult p = make_plan(r);
  EXPECT_EQ(p.recommendation.advice, Advice::sharding) << p.recommendation.reason;
  EXPECT_FALSE(p.recommendation.planned);
  EXPECT_EQ(p.recommendation.strategy, "ZeRO-3");
  EXPECT_GT(p.recommendation.ranks, 1);
}

// A budget per machine between what `kind` needs per rank at the peak on `fits` ranks and
// on `fits - 1` ranks, with the planner's 90% headroom.
int64_t memory_between(const PlanRequest& r, StrategyKind kind, int fits) {
  for (const Strategy& s : all_strategies(r.knobs, r.workload, 2)) {
    if (s.kind != kind) continue;
    const double need = memory_cost(s, r.workload, fits).peak();
    const double more = memory_cost(s, r.workload, fits - 1).peak();
    return static_cast<int64_t>((need + more) / 2 / r.memory_headroom);
  }
  throw std::runtime_error("missing strategy");
}

TEST(Recommend, ReplicaTooBigForAMachineIsShardedOnTheFewestRanks) {
  // Between what ZeRO-2 needs on 4 and on 3 ranks: ZeRO-3, which shards the weights too,
  // fits on 3, the fewest ranks on which any stage fits.
  PlanRequest r = request(10.0, 10 * 3600.0, 4, "10gbit");
  r.cluster.memory_bytes = memory_between(r, StrategyKind::zero2, 4);
  const PlanResult p = make_plan(r);
  const Recommendation& rec = p.recommendation;
  EXPECT_FALSE(p.row(StrategyKind::all_reduce).fits_at(0, r));
  EXPECT_FALSE(p.row(StrategyKind::zero2).fits_at(2, r));  // 3 ranks
  EXPECT_TRUE(p.row(StrategyKind::zero2).fits_at(3, r));   // 4 ranks
  EXPECT_FALSE(p.row(StrategyKind::zero1).fits_at(3, r));  // ZeRO-1 keeps the whole gradient
  ASSERT_TRUE(p.row(StrategyKind::zero3).fits_at(2, r));   // 3 ranks
  EXPECT_EQ(rec.advice, Advice::sharding) << rec.reason;
  EXPECT_EQ(rec.strategy, "ZeRO-3");
  EXPECT_EQ(rec.ranks, p.row(StrategyKind::zero3).fits_at(1, r) ? 2 : 3);
  EXPECT_FALSE(rec.planned);
  EXPECT_NE(rec.command.find("--zero 3"), std::string::npos) << rec.command;
  EXPECT_NE(rec.reason.find("ZeRO-3 shards the weights"), std::string::npos) << rec.reason;
  EXPECT_EQ(rec.reason.find('\n'), std::string::npos) << rec.reason;
}

TEST(Recommend, LoraWhoseBaseDoesNotFitNeedsZeroThree) {
  // LoRA keeps the whole frozen base on every rank under ZeRO-1/2; only ZeRO-3 with LoRA
  // shards it.
  PlanRequest r = request(10.0, 10 * 3600.0, 4, "10gbit");
  r.workload = describe_workload(model::preset_config("110M"), true, {}, 4, 256, 1);
  r.cluster.memory_bytes = memory_between(r, StrategyKind::zero3, 4);
  const PlanResult p = make_plan(r);
  EXPECT_FALSE(p.row(StrategyKind::zero2).fits_at(3, r));
  EXPECT_EQ(p.recommendation.advice, Advice::sharding) << p.recommendation.reason;
  EXPECT_EQ(p.recommendation.strategy, "ZeRO-3");
  EXPECT_FALSE(p.recommendation.planned);
  EXPECT_NE(p.recommendation.command.find("--zero 3"), std::string::npos) << p.recommendation.command;
}

TEST(Recommend, RanksOfOneMachineShareItsMemory) {
  // Four ranks on one machine each hold a ZeRO-1 replica's weights and gradients: together
  // more than one unsharded rank. Sharding over hosts helps; over one host's slots it does not.
  PlanRequest r = request(10.0, 10 * 3600.0, 4, "10gbit");
  r.cluster.memory_bytes = memory_between(r, StrategyKind::zero1, 4);
  EXPECT_EQ(make_plan(r).recommendation.advice, Advice::sharding);
  r.cluster.hosts = 1;
  r.cluster.slots = 4;
  const PlanResult p = make_plan(r);
  EXPECT_EQ(p.recommendation.advice, Advice::does_not_fit) << p.recommendation.reason;
  EXPECT_DOUBLE_EQ(p.row(StrategyKind::zero1).host_peak_bytes(3, r), 4 * p.row(StrategyKind::zero1).memory[3].peak());
}

TEST(Report, PrintsZeroTwosPeakBesideItsSteadyState) {
  const PlanResult p = make_plan(request(1.0, 10 * 3600.0, 4, "1gbit"));
  const MemoryCost& z2 = p.row(StrategyKind::zero2).memory.back();
  ASSERT_GT(z2.peak(), z2.steady());
  const std::string text = render_text(p);
  EXPECT_NE(text.find(format_bytes(z2.peak())), std::string::npos) << text;
  EXPECT_NE(text.find(format_bytes(z2.steady())), std::string::npos) << text;
  const nlohmann::json j = plan_json(p);
  for (const nlohmann::json& row : j["strategies"]) {
    if (row["kind"] != "zero2") continue;
    EXPECT_EQ(row["available"], true);
    EXPECT_EQ(row["train_flags"], "--zero 2");
    EXPECT_DOUBLE_EQ(row["predictions"][3]["memory"]["peak"].get<double>(), z2.peak());
    EXPECT_DOUBLE_EQ(row["predictions"][3]["memory"]["steady"].get<double>(), z2.steady());
  }
}

TEST(MemoryPerHost, ReadsBinaryAndDecimalUnits) {
  EXPECT_EQ(parse_memory_bytes("24GiB"), int64_t{24} << 30);
  EXPECT_EQ(parse_memory_bytes("24g"), int64_t{24} << 30);
  EXPECT_EQ(parse_memory_bytes("16GB"), int64_t{16'000'000'000});
  EXPECT_EQ(parse_memory_bytes("512 MiB"), int64_t{512} << 20);
  EXPECT_EQ(parse_memory_bytes("1.5TiB"), int64_t{3} << 39);
  EXPECT_EQ(parse_memory_bytes("34359738368"), int64_t{32} << 30);
  for (const char* bad : {"", "lots", "0", "-4GiB", "24 GiBs", "nanGB", "1e30"}) {
    try {
      parse_memory_bytes(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("--memory-per-host"), std::string::npos) << e.what();
    }
  }
}

// `flotilla plan --memory-per-host`: the machines' memory comes from the flag, else from
// this machine's MemTotal; nonsense is an InputError naming the flag.
TEST(MemoryPerHost, PlanJobTakesTheFlagOrThisMachinesMemory) {
  const auto dir = std::filesystem::temp_directory_path() / ("flotilla_plan_job_" + std::to_string(std::random_device{}()));
  std::filesystem::create_directories(dir);
  const auto config = dir / "config.json";
  std::ofstream(config) << R"({"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64})";
  PlanJob job;
  job.source.model = config;
  job.source.data = std::filesystem::path(FLOTILLA_SOURCE_DIR) / "data" / "sample" / "corpus.txt";
  job.source.batch_size = 2;
  job.source.seq_len = 32;
  job.no_run = true;
  job.hosts = 4;
  job.memory_per_host = "1GiB";
  const std::unique_ptr<comm::Communicator> alone = comm::make_local();
  const PlanResult given = run_plan_job(job, *alone);
  EXPECT_EQ(given.request.cluster.memory_bytes, int64_t{1} << 30);
  EXPECT_EQ(given.request.cluster.memory_source, "--memory-per-host");
  EXPECT_NE(render_text(given).find("1.0 GiB memory each [--memory-per-host]"), std::string::npos) << render_text(given);
  job.memory_per_host.clear();
  EXPECT_EQ(run_plan_job(job, *alone).request.cluster.memory_bytes, machine_memory_bytes());
  job.memory_per_host = "lots";
  EXPECT_THROW(run_plan_job(job, *alone), InputError);
  std::filesystem::remove_all(dir);
}

TEST(Recommend, NothingFitsSaysSo) {
  PlanRequest r = request(10.0, 10 * 3600.0, 2, "10gbit");
  r.cluster.memory_bytes = int64_t{64} << 20;
  EXPECT_EQ(make_plan(r).recommendation.advice, Advice::does_not_fit);
}

TEST(Recommend, OneMachineOnlyStays) {
  EXPECT_EQ(make_plan(request(10.0, 10 * 3600.0, 1, "10gbit")).recommendation.advice, Advice::one_machine);
}

// The plan charges the host arena per rank where ranks share a host: on one machine of 4
// slots, ZeRO-3's rows carry 2 MiB a rank of the host more than without sharing (the
// cluster of one-rank hosts), and a machine's peak is its ranks' sum.
TEST(Memory, PlanChargesTheHostArenaWhereRanksShareAHost) {
  PlanRequest shared = request(1.0, 3600.0, 1, "10gbit");
  shared.cluster.slots = 4;
  PlanRequest alone = request(1.0, 3600.0, 4, "10gbit");
  alone.cluster.slots = 1;
  const PlanResult a = make_plan(shared), b = make_plan(alone);
  ASSERT_EQ(a.ranks, b.ranks);
  for (size_t i = 0; i < a.ranks.size(); ++i) {
    const int n = a.ranks[i];
    const double arena = n > 1 ? 2.0 * n * (1 << 20) : 0.0;
    EXPECT_DOUBLE_EQ(a.row(StrategyKind::zero3).memory[i].buffers - b.row(StrategyKind::zero3).memory[i].buffers,
                     arena) << n << " ranks";
    EXPECT_DOUBLE_EQ(a.row(StrategyKind::zero3).host_peak_bytes(i, shared),
                     n * a.row(StrategyKind::zero3).memory[i].peak()) << n << " ranks";
  }
}

TEST(Report, JsonAndChartCarryEveryStrategy) {
  const PlanResult p = make_plan(request(1.0, 10 * 3600.0, 4, "1gbit"));
  const nlohmann::json j = plan_json(p);
  EXPECT_EQ(j["strategies"].size(), p.rows.size());
  EXPECT_EQ(j["ranks"].size(), 4u);
  EXPECT_EQ(j["strategies"][0]["predictions"].size(), 4u);
  const std::string svg = speedup_chart_svg(p);
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("all-reduce"), std::string::npos);
  EXPECT_NE(render_text(p).find("recommendation:"), std::string::npos);
}

std::filesystem::path temp_file(const std::string& text) {
  std::random_device rd;
  const auto path = std::filesystem::temp_directory_path() / ("flotilla_hostfile_" + std::to_string(rd()));
  std::ofstream(path) << text;
  return path;
}

TEST(Hostfile, CountsHostsAndSlots) {
  const auto path = temp_file("# the lab\nnode1 slots=2\nnode2 slots=4 max_slots=4\n\nnode3\n");
  const Hostfile h = read_hostfile(path);
  EXPECT_EQ(h.hosts, 3);
  EXPECT_EQ(h.slots, 4);
  std::filesystem::remove(path);
}

TEST(Hostfile, RejectsGarbageNamingTheLine) {
  const auto path = temp_file("node1 slots=two\n");
  try {
    read_hostfile(path);
    ADD_FAILURE() << "accepted slots=two";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(":1:"), std::string::npos) << e.what();
  }
  std::filesystem::remove(path);
  const auto empty = temp_file("# nobody\n");
  EXPECT_THROW(read_hostfile(empty), InputError);
  std::filesystem::remove(empty);
}

}  // namespace
}  // namespace flotilla::plan
