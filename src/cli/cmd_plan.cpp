// flotilla plan: should this training go distributed, and how? Measures a short run of
// the user's own training here, models every strategy's exchange, step time and memory on
// 1..N machines, walks the flowchart and prints a recommendation with its command.
// Under mpirun it also measures the all-reduce between the ranks it was given.
#include <fmt/format.h>

#include "cli/commands.hpp"
#include "flotilla/comm/world.hpp"
#include "flotilla/data/token_dataset.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/plan/job.hpp"

namespace flotilla::cli {

void add_plan_command(CLI::App& app) {
  struct Options {
    plan::PlanJob job;
    std::string fine_tune_type = "full", lora_targets = "q,v", compression_dtype = "f32", dtype = "float32", out;
    bool force = false;
  };
  auto opt = std::make_shared<Options>();
  plan::PlanJob& j = opt->job;
  plan::PlanSource& s = j.source;
  CLI::App* cmd = app.add_subcommand(
      "plan", "Should you go distributed, and how: step time, bytes, speed-up and memory on 1..N machines");
  cmd->add_option("--model", s.model, "A HF model directory, or a config.json (random weights)")->required();
  cmd->add_option("--data", s.data, "Training data as for `flotilla train --data`")->required();
  cmd->add_option("--fine-tune-type", opt->fine_tune_type, "full or lora")
      ->check(CLI::IsMember({"full", "lora"}))
      ->capture_default_str();
  cmd->add_option("--lora-rank", s.lora_config.rank, "LoRA rank r")->capture_default_str();
  cmd->add_option("--lora-targets", opt->lora_targets, "Adapted layers: any of q,k,v,o,gate,up,down (Mixtral's experts: w1,w2,w3)")
      ->capture_default_str();
  cmd->add_option("--num-layers", s.lora_config.num_layers, "LoRA: adapt the last N layers (-1: all)")
      ->capture_default_str();
  cmd->add_option("--batch-size", s.batch_size, "Sequences per micro-batch per rank")->capture_default_str();
  CLI::Option* seq_len =
      cmd->add_option("--seq-len", s.seq_len, "Tokens per sequence; default as train: a prepared dataset's "
                                               "--max-seq-len, raw text 128")
          ->capture_default_str();
  cmd->add_option("--grad-accum", s.grad_accum, "Micro-batches per optimizer step")->capture_default_str();
  cmd->add_option("--micro-batches", j.micro_batches,
                  "Pipeline rows (--parallel pp=P): micro-batches per --batch-size batch, which it must divide (0: "
                  "the most up to 4 per stage)")
      ->capture_default_str();
  cmd->add_flag("--pack,!--no-pack", s.pack, "Prepared data: pack examples into rows (default)")->default_str("true");
  cmd->add_flag("--grad-checkpoint", s.grad_checkpoint,
                "Plan for train --grad-checkpoint: blocks recomputed in backward (less memory, more compute)")
      ->default_str("false");
  cmd->add_option("--seed", s.seed, "Seed of the measured run")->capture_default_str();
  cmd->add_option("--bucket-mb", s.bucket_mb,
                  "As train --bucket-mb: the units ZeRO reduce-scatters while backward runs; MPI's reduce-scatter "
                  "holds copies of one (0: of the whole gradient)")
      ->capture_default_str();
  auto* hosts = cmd->add_option("--hosts", j.hosts, "Machines to plan for (alike)")->capture_default_str();
  auto* hostfile = cmd->add_option("--hostfile", j.hostfile, "OpenMPI hostfile: one machine per line, slots=K ranks");
  hosts->excludes(hostfile);
  cmd->add_option("--slots", j.slots, "Ranks per machine")->capture_default_str();
  cmd->add_option("--cores", j.cores, "Cores per machine (default: this machine's)");
  cmd->add_option("--memory-per-host", j.memory_per_host,
                  "Memory of each machine: 24GiB, 16GB, 512MiB or bytes (default: this machine's MemTotal); a "
                  "replica that does not fit gets ZeRO sharding advice");
  auto* bw = cmd->add_option("--bandwidth", j.bandwidth, "Network between machines: 1gbit, 10gbit, 100mbit, 1.25GB/s")
                 ->capture_default_str();
  auto* lat = cmd->add_option("--latency", j.latency, "Per-message latency between machines: 50us, 0.2ms")
                  ->capture_default_str();
  cmd->add_option("--local-bandwidth", j.local_bandwidth,
                  "Between ranks of one machine (default: measured under mpirun, else --bandwidth)");
  cmd->add_option("--local-latency", j.local_latency, "Between ranks of one machine");
  cmd->add_option("--runs", j.runs, "How many times you will train this (sweeps, reruns)")->capture_default_str();
  cmd->add_option("--epochs", j.epochs, "Epochs in one run")->capture_default_str();
  cmd->add_flag("--no-run", j.no_run, "Estimate compute from FLOPs and a GEMM timing instead of training here");
  cmd->add_option("--measure-steps", j.measure.steps, "Timed training steps of the measured run")->capture_default_str();
  cmd->add_option("--warmup-steps", j.measure.warmup_steps, "Untimed steps before them")->capture_default_str();
  cmd->add_option("--accumulate", j.knobs.accumulate, "K of the accumulation strategy (0: pick)")->capture_default_str();
  cmd->add_option("--topk-density", j.knobs.topk_density, "Share of gradient entries top-k sends")->capture_default_str();
  cmd->add_option("--powersgd-rank", j.knobs.powersgd_rank, "PowerSGD rank")->capture_default_str();
  cmd->add_option("--compression-dtype", opt->compression_dtype,
                  "What top-k's values and PowerSGD's factors travel as: f32, bf16, fp16, int8 (as train)")
      ->check(CLI::IsMember({"f32", "bf16", "fp16", "int8"}))
      ->capture_default_str();
  cmd->add_option("--sync-every", j.knobs.local_sgd_every, "Local SGD: steps between parameter averages")
      ->capture_default_str();
  add_dtype_option(cmd, opt->dtype);
  cmd->add_option("--out", opt->out, "Write plan.json, plan.txt and speedup.svg here");
  cmd->add_flag("--force", opt->force, "Write into a non-empty --out directory");
  cmd->callback([opt, bw, lat, seq_len] {
    plan::PlanJob& job = opt->job;
    // The rows train would use on this data (train's default), so that the plan is its run.
    if (seq_len->count() == 0 && std::filesystem::is_directory(job.source.data))
      job.source.seq_len = data::prepared_seq_len(data::TokenDataset::open(job.source.data).index());
    job.source.lora = opt->fine_tune_type == "lora";
    job.knobs.compression_dtype = comm::parse_wire_dtype(opt->compression_dtype);
    job.source.dtype = matmul_dtype_of(opt->dtype);
    job.source.lora_config.targets = model::LoraConfig::parse_targets(opt->lora_targets);
    job.bandwidth_given = bw->count() > 0;
    job.latency_given = lat->count() > 0;
    comm::Settings settings;
    settings.timeout = std::chrono::hours(6);  // rank 0 trains for a while before the others hear from it
    const std::unique_ptr<comm::Communicator> world = comm::make_world(settings);
    if (world->rank() == 0 && !opt->out.empty()) {
      check_output_not_input("--out", opt->out,
                             {{"--model", job.source.model}, {"--data", job.source.data}, {"--hostfile", job.hostfile}});
      ensure_output_dir(opt->out, opt->force);
    }
    const plan::PlanResult result = plan::run_plan_job(job, *world);
    if (world->rank() != 0) return;
    fmt::print("{}", plan::render_text(result));
    if (!opt->out.empty()) {
      plan::write_plan(opt->out, result);
      fmt::print("\nwritten: {}/plan.json, plan.txt, speedup.svg\n", opt->out);
    }
  });
}

}  // namespace flotilla::cli
