// The measurements behind a plan: a short training run of the user's own model on the
// user's own data on this machine (or, with --no-run, FLOPs over a measured GEMM rate),
// and — when `flotilla plan` runs under mpirun — the all-reduce latency and bandwidth
// between the ranks it was given.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include "flotilla/comm/communicator.hpp"
#include "flotilla/model/config.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/plan/link.hpp"
#include "flotilla/plan/workload.hpp"

namespace flotilla::plan {

struct PlanSource {
  std::filesystem::path model;  // a HF model directory, or a config.json (random weights)
  std::filesystem::path data;   // as `flotilla train --data`: a prepared folder, .txt or .jsonl
  bool pack = true;
  double valid_fraction = 0.05;
  uint64_t seed = 0;
  int64_t batch_size = 4, seq_len = 128, grad_accum = 1;
  bool grad_checkpoint = false;  // as train --grad-checkpoint
  double bucket_mb = 25.0;       // as train --bucket-mb: the units ZeRO reduce-scatters
  bool lora = false;
  model::LoraConfig lora_config;
  // train --dtype, as this machine runs it (model::resolve_matmul_dtype): the measured run
  // trains in it, the --no-run estimate times its products in it.
  kernels::GemmInput dtype = kernels::GemmInput::f32;
};

// The model's config: dir/config.json for a directory, else the file itself.
model::ModelConfig load_plan_model_config(const std::filesystem::path& model);

struct DataSize {
  bool prepared = false;
  uint64_t train_tokens = 0;
  uint64_t train_examples = 0;  // prepared data only
  double rows_per_epoch = 0;    // sequences of seq_len one pass over the training data needs
  std::string description;
};
// Reads the data as `flotilla train` would (tokenizing raw text) and counts one epoch.
DataSize measure_data(const PlanSource& src);

struct MeasureOptions {
  int warmup_steps = 2;
  int steps = 8;
};
// Runs warmup + steps optimizer steps of the real trainer (train::Trainer, alone) on the
// user's model and data; the median of each phase over the timed steps. Also counts the
// data's epoch into `data` when given (the data is read once).
StepCost measure_step(const PlanSource& src, const MeasureOptions& opt, DataSize* data = nullptr);

// --no-run: forward + backward from FLOPs per token over the rate of this machine's
// products at the workload's shapes in the workload's dtype (SGEMM, or bf16) (an optimistic bound: attention, norms and the
// loss run below the GEMM rate); the update from timing AdamW on a buffer of 2^20 floats,
// scaled to the trainable size; data time 0.
StepCost estimate_step(const Workload& w);

// Every rank calls this: the median time of all-reduces of 16 bytes and of
// payload_bytes, by the algorithm training chooses (comm::AllReducer, automatic), fitted
// to the ring model of link.hpp (slowest rank's numbers).
Link measure_link(comm::Communicator& comm, double payload_bytes);

}  // namespace flotilla::plan
