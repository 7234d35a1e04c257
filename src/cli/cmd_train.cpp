// flotilla train: pretrain, fully fine-tune or LoRA-fine-tune; alone, or as one rank of a
// data-parallel job under mpirun / srun.
#include <fmt/format.h>

#include <fstream>
#include <iterator>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/world.hpp"
#include "flotilla/parallel/data_parallel.hpp"
#include "flotilla/parallel/expert_parallel.hpp"
#include "flotilla/parallel/mesh.hpp"
#include "flotilla/parallel/tensor_parallel.hpp"

#include "cli/commands.hpp"
#include "cli/progress.hpp"
#include "cli/yaml_config.hpp"
#include "flotilla/train/job.hpp"

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <optional>

namespace flotilla::cli {

namespace {

// This process's command line as typed (from /proc), arguments with spaces quoted; "" where
// /proc is not there.
std::string command_line() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::string out, arg;
  for (char c : raw) {
    if (c != '\0') {
      arg += c;
      continue;
    }
    if (!out.empty()) out += ' ';
    out += arg.find_first_of(" \t'\"") == std::string::npos && !arg.empty() ? arg : "'" + arg + "'";
    arg.clear();
  }
  return out;
}

// FLOTILLA_TEST_SLOW_RANK's factor for `rank`: "RANK:FACTOR[,RANK:FACTOR...]", 1 for a
// rank not named. A test hook for --balance (docs/fault-tolerance.md).
double slow_factor_for_rank(std::string_view spec, int rank) {
  double factor = 1.0;
  while (!spec.empty()) {
    const size_t comma = spec.find(',');
    const std::string_view item = spec.substr(0, comma);
    spec = comma == std::string_view::npos ? std::string_view() : spec.substr(comma + 1);
    const size_t colon = item.find(':');
    char* end = nullptr;
    const std::string rank_text(item.substr(0, colon)), factor_text(colon == std::string_view::npos ? "" : item.substr(colon + 1));
    const long r = std::strtol(rank_text.c_str(), &end, 10);
    const bool rank_ok = !rank_text.empty() && *end == '\0';
    const double f = std::strtod(factor_text.c_str(), &end);
    if (!rank_ok || factor_text.empty() || *end != '\0')
      throw InputError("train", fmt::format("FLOTILLA_TEST_SLOW_RANK: '{}' is not RANK:FACTOR (e.g. 1:3.0)", item));
    if (r == rank) factor = f;
  }
  return factor;
}

}  // namespace

void add_train_command(CLI::App& app) {
  struct Options {
    train::TrainJob job;
    std::string model, config, data, out;
    int64_t log_every = 10;
    bool force = false;
    std::string resume;
    bool print_config = false;
    bool strict = false;
    std::string fine_tune_type = "full", lora_targets = "q,v", resume_adapter;
    std::string compression = "none";
    std::string compression_dtype = "f32";
    double timeout_s = 300.0;
    std::string allreduce = "auto";
    std::string parallel;
    std::string pp_schedule = "1f1b", pp_layers;
    std::string on_nonfinite = "stop";
    std::string dtype = "float32";
    bool balance = false;
    int64_t balance_every = 20;
    float lora_scale = 0.0f;
  };
  auto opt = std::make_shared<Options>();
  train::TrainConfig& t = opt->job.train;
  CLI::App* cmd = app.add_subcommand(
      "train", "Train or fine-tune a model (alone, or one rank of a data-parallel job under mpirun/srun)");
  auto* model = cmd->add_option("--model", opt->model, "Start from this HF model directory")->check(CLI::ExistingDirectory);
  auto* preset = cmd->add_option("--preset", opt->job.preset, "Start from a random model: tiny, 15M, 110M");
  auto* config = cmd->add_option("--config", opt->config, "Start from a random model of this config.json")->check(CLI::ExistingFile);
  model->excludes(preset, config);
  preset->excludes(config);
  cmd->add_option("--data", opt->data,
                  "A dataset folder from `flotilla data prepare`, an mlx_lm data folder (train.jsonl [valid.jsonl test.jsonl], "
                  "prepared for this run with the model's tokenizer and chat template, examples cut at --seq-len), "
                  "or raw text: .txt (paragraphs) or .jsonl ({\"text\": ...})")
      ->required()->check(CLI::ExistingPath);
  cmd->add_flag("--mask-prompt", opt->job.mask_prompt,
                "mlx_lm data folder: loss only on completions and assistant turns (as data prepare --mask-prompt)")
      ->default_str("false");
  cmd->add_flag("--test", opt->job.test, "After training, report the loss and perplexity on the data's test split")
      ->default_str("false");
  cmd->add_option("--test-batches", opt->job.test_batches, "Batches of the test split for --test (0 or -1: all)")
      ->capture_default_str();
  cmd->add_flag("--grad-checkpoint", opt->job.grad_checkpoint,
                "Keep only each block's input and recompute its activations in backward: less memory, one more "
                "forward of each block per step")
      ->default_str("false");
  cmd->add_option("--expert-capacity", opt->job.expert_capacity,
                  "Mixture of experts: each expert takes at most ceil(F x seq-len x top-k / experts) of a sequence's "
                  "tokens in training, the rest dropped (0: dropless)")
      ->capture_default_str();
  add_dtype_option(cmd, opt->dtype);
  cmd->add_flag("--pack,!--no-pack", opt->job.pack, "Prepared data: pack several examples per row (default) or pad one per row")
      ->default_str("true");
  cmd->add_option("--out,--adapter-path", opt->out, "Output directory for the trained model or adapters, and metrics")->required();
  add_strict_flag(cmd, opt->strict);
  cmd->add_flag("--force", opt->force, "Write into a non-empty output directory, replace an existing --trace file")
      ->default_str("false");
  cmd->add_option("--steps,--iters", t.steps, "Optimizer steps")->capture_default_str();
  cmd->add_option("--batch-size", t.batch_size, "Sequences per micro-batch")->capture_default_str();
  CLI::Option* seq_len =
      cmd->add_option("--seq-len,--max-seq-length", t.seq_len,
                      "Tokens per row; default: a prepared dataset's --max-seq-len (else its longest example, up "
                      "to 2048), raw text 128")
          ->capture_default_str();
  cmd->add_option("--grad-accum,--grad-accumulation-steps", t.grad_accum, "Micro-batches per optimizer step")->capture_default_str();
  cmd->add_option("--lr,--learning-rate", t.lr, "Peak learning rate")->capture_default_str();
  cmd->add_option("--min-lr", t.min_lr, "Learning rate of the last step, where the cosine decay ends")->capture_default_str();
  cmd->add_option("--warmup", t.warmup_steps, "Linear warm-up steps")->capture_default_str();
  cmd->add_option("--weight-decay", t.adamw.weight_decay, "AdamW decoupled weight decay (not on norms, biases)")
      ->capture_default_str();
  cmd->add_option("--beta1", t.adamw.beta1, "AdamW decay rate of the gradient's running mean")->capture_default_str();
  cmd->add_option("--beta2", t.adamw.beta2, "AdamW decay rate of the squared gradient's running mean")
      ->capture_default_str();
  cmd->add_option("--grad-clip", t.grad_clip, "Max global gradient norm (0: off)")->capture_default_str();
  cmd->add_option("--eval-every,--steps-per-eval", t.eval_every, "Steps between validation passes (0: at the end)")->capture_default_str();
  cmd->add_option("--eval-batches,--val-batches", t.eval_batches,
                  "Batches per validation pass, at most one pass over the validation data (0 or -1: one whole pass)")
      ->capture_default_str();
  cmd->add_option("--on-nonfinite", opt->on_nonfinite,
                  "A step whose loss or gradient norm is NaN or infinite: stop (the run ends with exit 1, writes no "
                  "model and keeps its checkpoints) or skip (the step's update is dropped and the run goes on)")
      ->check(CLI::IsMember({"stop", "skip"}))
      ->capture_default_str();
  cmd->add_option("--valid-fraction", opt->job.valid_fraction, "Share of the data held out for validation")
      ->capture_default_str();
  cmd->add_option("--seed", opt->job.seed, "Seed for initialisation and batch order")->capture_default_str();
  cmd->add_option("--log-every,--steps-per-report", opt->log_every, "Steps between progress lines")->capture_default_str();
  cmd->add_option("--save-every", opt->job.save_every,
                  "Steps between checkpoints in OUT/checkpoints, also written after the last step (0: none)")
      ->capture_default_str();
  cmd->add_option("--keep-checkpoints", opt->job.keep_checkpoints, "Newest checkpoints kept (0: all)")
      ->capture_default_str();
  cmd->add_option("--checkpoint-dir", opt->job.checkpoint_dir,
                  "Where checkpoints go (default OUT/checkpoints); {host} is replaced by each host's name "
                  "(FLOTILLA_HOST, else the host name): a folder per host on machines without a shared filesystem");
  CLI::Option* replicas = cmd->add_option(
      "--checkpoint-replicas", opt->job.checkpoint_replicas,
      "With a checkpoint folder per host: each rank's files are also kept on this many other hosts, so a lost host "
      "loses nothing (default: 1 with several hosts, 0 on one)");
  CLI::Option* resume =
      cmd->add_option("--resume", opt->resume,
                      "Continue from the latest good checkpoint of --out, or of DIR (a run folder or one "
                      "checkpoint folder); the model flags must describe the same model")
          ->expected(0, 1)
          ->type_name("[DIR]");
  cmd->add_option("--fine-tune-type", opt->fine_tune_type, "full: every parameter; lora: adapters over a frozen base")
      ->check(CLI::IsMember({"full", "lora"}))
      ->capture_default_str();
  cmd->add_option("--lora-rank", opt->job.lora.rank, "LoRA rank r")->capture_default_str();
  auto* alpha = cmd->add_option("--lora-alpha", opt->job.lora.alpha, "LoRA alpha (scale = alpha / r)")->capture_default_str();
  cmd->add_option("--lora-scale", opt->lora_scale,
                  "mlx_lm's LoRA scale, the factor on B A x: sets alpha = scale * r (lora_parameters.scale in a config file)")
      ->excludes(alpha);
  cmd->add_option("--lora-dropout", opt->job.lora.dropout, "Dropout on the adapters' input")->capture_default_str();
  cmd->add_option("--lora-targets", opt->lora_targets, "Adapted layers: any of q,k,v,o,gate,up,down (Mixtral's experts: w1,w2,w3)")
      ->capture_default_str();
  cmd->add_option("--num-layers", opt->job.lora.num_layers, "Adapt the last N layers (-1: all)")->capture_default_str();
  cmd->add_option("--resume-adapter-file", opt->resume_adapter,
                  "Start LoRA from these adapters: a PEFT or mlx_lm adapter folder, a checkpoint folder, or the "
                  "weights file in one; LoRA flags given must match the adapter's")
      ->check(CLI::ExistingPath);
  cmd->add_option("--compression", opt->compression,
                  "Data parallel: gradients sent as float32 (none), fp16, bf16, topk or powersgd; lossy ones keep "
                  "what they do not send for the next step (error feedback)")
      ->check(CLI::IsMember({"none", "fp16", "bf16", "topk", "powersgd"}))
      ->capture_default_str();
  cmd->add_option("--topk-density", opt->job.compression.topk_density,
                  "--compression topk: fraction of gradient elements sent each step (2 ranks: 4x fewer bytes "
                  "than float32 at 0.125, at 0.43 with --compression-dtype bf16, at 0.8 with int8)")
      ->capture_default_str();
  cmd->add_option("--powersgd-rank", opt->job.compression.powersgd_rank,
                  "--compression powersgd: rank r of each matrix's factors")
      ->capture_default_str();
  cmd->add_option("--compression-dtype", opt->compression_dtype,
                  "--compression topk|powersgd: the type values and factors travel in; bf16 or fp16 halve "
                  "PowerSGD's bytes and shrink top-k's entries from 8 bytes to 4 (a 16-bit offset and a half), or "
                  "fewer as a bitmap above density ~1/16; int8 (a float scale per 64 values) nearly quarters "
                  "PowerSGD's bytes and sends top-k's values in a byte; error feedback keeps the rounding")
      ->check(CLI::IsMember({"f32", "bf16", "fp16", "int8"}))
      ->capture_default_str();
  cmd->add_option("--sync-every", t.local_sgd.sync_every,
                  "Data parallel: local SGD — each rank steps on its own gradients and the ranks average their "
                  "weights every N steps (0: average gradients every step)")
      ->capture_default_str();
  cmd->add_option("--outer-lr", t.local_sgd.outer_lr,
                  "Local SGD: outer learning rate on the averaged weight change (1 with momentum 0: plain averaging; "
                  "DiLoCo: 0.7)")
      ->capture_default_str();
  cmd->add_option("--outer-momentum", t.local_sgd.outer_momentum,
                  "Local SGD: Nesterov momentum of the outer step (DiLoCo: 0.9)")
      ->capture_default_str();
  cmd->add_option("--zero", t.zero_stage,
                  "Data parallel: ZeRO sharding — 1: each rank keeps AdamW's moments for its 1/N of the weights "
                  "only; 2: its 1/N of the gradients too, between steps; 3: its 1/N of the weights too, each decoder "
                  "block gathered just before forward and backward use it (docs/sharding.md). The same result as 0, "
                  "with less memory per rank")
      ->capture_default_str();
  cmd->add_flag("--deterministic", t.deterministic,
                "Data parallel: byte-identical models for any number of ranks, any --batch-size x --grad-accum "
                "split of the same global batch and any thread count — rows run in groups of "
                "--deterministic-group and their gradients are summed in fixed-point integers "
                "(docs/fault-tolerance.md); not with --zero 3, --sync-every, --compression or pp > 1")
      ->default_str("false");
  cmd->add_option("--deterministic-group", t.deterministic_group,
                  "--deterministic: rows that run forward and backward as one batch, their gradient summed in "
                  "float32 in a fixed order and folded into the integers once. The model's bytes depend on it "
                  "(keep it to keep them); it must divide --batch-size. Larger is faster (4 or more: within "
                  "10% of the default mode's speed, docs/fault-tolerance.md); 1: rows one at a time")
      ->capture_default_str();
  cmd->add_flag("--balance", opt->balance,
                "Data parallel: each rank's share of the global batch follows its measured speed (rows per "
                "second of forward and backward), so a slow or busy machine does not hold the others up; the "
                "gradient is still the global batch's, and with --deterministic the same bytes "
                "(docs/fault-tolerance.md); not with pp > 1, mixture-of-experts models or --sync-every")
      ->default_str("false");
  cmd->add_option("--balance-every", opt->balance_every,
                  "--balance: steps between two measurements and new cuts of the global batch")
      ->capture_default_str();
  cmd->add_option("--bucket-mb", t.bucket_mb,
                  "Data parallel: fusion bucket size in MiB; buckets are all-reduced on a communication thread "
                  "while backward runs (0: one all-reduce after backward)")
      ->capture_default_str();
  cmd->add_option("--trace", opt->job.trace_path,
                  "Write a Chrome trace of every step's compute and communication (open in Perfetto); ranks "
                  "other than 0 write FILE.rankN.json beside it");
  cmd->add_option("--compression-warmup", opt->job.compression.warmup_steps,
                  "Optimizer steps with dense gradients before compression starts (float32, or in "
                  "--compression-dtype when it is bf16, fp16 or int8)")
      ->capture_default_str();
  cmd->add_option("--timeout", opt->timeout_s,
                  "Data parallel: seconds any collective may wait for the other ranks before the job fails; also bounds MPI "
                  "start-up (read from the command line then, not from a -c file)")
      ->capture_default_str();
  cmd->add_option("--parallel", opt->parallel,
                  "The device mesh dp=D,pp=P,tp=T,ep=E (product = number of processes; a key left out is 1; default: "
                  "dp = every process). Data, pipeline and expert parallelism are built (ep: each rank holds E/ep of "
                  "a mixture-of-experts model's experts; not with pp); tp splits every block's attention heads and MLP "
                  "columns (not with pp or ep) (docs/parallelism.md)");
  cmd->add_flag("--sequence-parallel", opt->job.sequence_parallel,
               "Tensor parallel (tp > 1): also shard the residual stream, the norms and the residual adds along "
               "the tokens (Megatron's sequence parallelism): activations per rank shrink, the bytes stay those "
               "of tp's all-reduces (an all-gather and a reduce-scatter each) plus one all-gather per norm in "
               "backward");
  cmd->add_option("--micro-batches", opt->job.pipeline.micro_batches,
                  "Pipeline (pp > 1): each --batch-size batch is cut into M micro-batches that flow through the "
                  "stages; the stages idle (P-1)/(M+P-1) of a step, so take M several times P. M must divide "
                  "--batch-size")
      ->capture_default_str();
  cmd->add_option("--pp-schedule", opt->pp_schedule,
                  "Pipeline (pp > 1): 1f1b (one forward one backward: at most P micro-batches' activations per "
                  "stage) or gpipe (all forwards, then all backwards: M micro-batches' activations); the same "
                  "bubble and the same result")
      ->check(CLI::IsMember({"gpipe", "1f1b"}))
      ->capture_default_str();
  cmd->add_option("--pp-layers", opt->pp_layers,
                  "Pipeline (pp > 1): layers per stage from the first, e.g. 3,3,2 (they add up to the model's "
                  "layers); default: balanced by compute, the last stage also running the head");
  cmd->add_option("--allreduce", opt->allreduce,
                  "The gradient all-reduce (data parallel) and tensor parallel's collectives: auto (by size and hosts), ring, hd "
                  "(halving-doubling), hier (hierarchical), mpi (the MPI library's)")
      ->check(CLI::IsMember({"auto", "ring", "hd", "hier", "mpi"}))
      ->capture_default_str();
  cmd->add_flag("--print-config", opt->print_config, "Print the resolved flags as YAML (a -c file) and exit")
      ->configurable(false);
  // Declared last so that its callback, which fills the options above from the file, runs
  // after CLI11 has stored the command line and before it checks required options.
  cmd->add_option_function<std::string>(
         "-c,--config-file", [cmd](const std::string& file) { apply_yaml_config(*cmd, file); },
         "YAML file of flags: keys are flag names with '_' for '-' (batch_size: 8, lr: 1e-3, pack: false); "
         "flags on the command line win")
      ->configurable(false);
  cmd->callback([opt, cmd, resume, seq_len, replicas] {
    if (replicas->count() > 0 && opt->job.checkpoint_replicas < 0)
      throw InputError("train", fmt::format("--checkpoint-replicas must be 0 or more, not {}",
                                                      opt->job.checkpoint_replicas));
    if (opt->print_config) {
      fmt::print("{}", options_as_yaml(*cmd));
      return;
    }
    train::TrainJob& job = opt->job;
    if (!(std::isfinite(opt->timeout_s) && opt->timeout_s > 0.0 && opt->timeout_s <= 1e9))
      throw InputError("train", fmt::format("--timeout must be a number of seconds in (0, 1e9], not {}", opt->timeout_s));
    job.train.on_nonfinite = opt->on_nonfinite == "skip" ? train::NonFinitePolicy::skip : train::NonFinitePolicy::stop;
    job.dtype = model::parse_matmul_dtype(opt->dtype).value_or(kernels::GemmInput::f32);
    // Ctrl-C / SIGTERM: finish the step, checkpoint, exit 128 + signal (a second one: at once).
    job.stop_on_signal = true;
    job.seq_len_from_data = seq_len->count() == 0;  // given on the command line or in a -c file
    job.fine_tune = opt->fine_tune_type == "lora" ? train::FineTuneType::lora : train::FineTuneType::full;
    job.lora.targets = model::LoraConfig::parse_targets(opt->lora_targets);
    job.resume_adapter = opt->resume_adapter;
    if (cmd->count("--lora-scale") > 0) job.lora.alpha = opt->lora_scale * static_cast<float>(job.lora.rank);
    job.lora_given = {.rank = cmd->count("--lora-rank") > 0,
                      .alpha = cmd->count("--lora-alpha") > 0 || cmd->count("--lora-scale") > 0,
                      .targets = cmd->count("--lora-targets") > 0, .num_layers = cmd->count("--num-layers") > 0};
    job.force = opt->force;
    job.non_finite = non_finite_policy(opt->strict);
    job.compression.kind = comm::parse_compression(opt->compression);
    job.compression.dtype = comm::parse_wire_dtype(opt->compression_dtype);
    job.compression.seed = job.seed;
    // Test mode of --zero 3 (parallel/zero3.hpp): released weights read NaN.
    if (const char* poison = std::getenv("FLOTILLA_ZERO_POISON")) job.train.zero_poison = std::string_view(poison) == "1";
    if (opt->balance_every < 1)
      throw InputError("train", fmt::format("--balance-every must be 1 or more steps, not {}", opt->balance_every));
    job.train.balance_every = opt->balance ? opt->balance_every : 0;
    // Under mpirun / srun this process is one rank of a data-parallel job.
    comm::Settings settings;
    settings.timeout = std::chrono::milliseconds(static_cast<int64_t>(opt->timeout_s * 1000.0));
    const std::unique_ptr<comm::Communicator> world = comm::make_world(settings);
    // Test hook for --balance: FLOTILLA_TEST_SLOW_RANK=rank:factor makes that rank's forward
    // and backward `factor` times as slow (TrainConfig::test_slow_factor).
    if (const char* slow = std::getenv("FLOTILLA_TEST_SLOW_RANK"); slow && *slow)
      job.train.test_slow_factor = slow_factor_for_rank(slow, world->rank());
    // The mesh's dp group carries the gradients: the whole world while pp = tp = 1.
    const parallel::MeshShape shape =
        opt->parallel.empty() ? parallel::MeshShape{world->size(), 1, 1} : parallel::parse_mesh_shape(opt->parallel);
    if (opt->job.sequence_parallel && shape.tp == 1)
      throw InputError("train", "--sequence-parallel applies to tensor parallelism: give --parallel tp=T with T > 1");
    if (shape.pp == 1 && (opt->job.pipeline.micro_batches != 1 || !opt->pp_layers.empty()))
      throw InputError("train", fmt::format("{} applies to pipeline parallelism: give --parallel pp=P with P > 1",
                                            opt->pp_layers.empty() ? "--micro-batches" : "--pp-layers"));
    job.pipeline.schedule = parallel::parse_pipeline_schedule(opt->pp_schedule);
    if (!opt->pp_layers.empty()) job.pipeline.stage_layers = parallel::parse_pp_layers(opt->pp_layers);
    if (shape.ep > 1 && opt->job.train.local_sgd.sync_every > 0)
      throw InputError("train", fmt::format("--parallel {}: local SGD (--sync-every) with expert parallelism is not "
                                            "built: each rank's experts would drift between meetings",
                                            opt->parallel));
    parallel::Mesh mesh(*world, shape);
    std::optional<parallel::DataParallel> dp;
    // Gradients are averaged over the data group (dp x ep; a stage's with pp): the ep ranks
    // are data replicas of all but the experts, and an expert's gradient is zero on the
    // ranks that do not run it, so the sum is the one of the ranks that do.
    if (shape.dp * shape.ep > 1) {
      dp.emplace(mesh.data_group(), comm::parse_algorithm(opt->allreduce));
      job.dp = &*dp;
    }
    // The experts' exchange (ep > 1), and for any mixture the sum of its load-balancing
    // statistics over the data group (with pp, the last stage's forward sums them).
    std::optional<parallel::ExpertParallel> experts;
    if (world->size() > 1) {
      experts.emplace(mesh.ep_group(), mesh.data_group(), &mesh.dp_group());
      job.experts = &*experts;
    }
    if (shape.pp > 1) {
      job.pp = &mesh.pp_group();
      job.world = world.get();
    }
    std::optional<parallel::TensorParallel> tensor_parallel;
    if (shape.tp > 1) {
      tensor_parallel.emplace(mesh.tp_group(), comm::parse_algorithm(opt->allreduce));
      job.tp = &*tensor_parallel;
      job.world = world.get();
    }
    const bool root = world->rank() == 0;
    job.model_dir = opt->model;
    job.flotilla_version = kFlotillaVersion;
    job.command_line = command_line();
    job.config_json = opt->config;
    job.data = opt->data;
    job.out_dir = opt->out;
    // `--resume` alone (or `resume: true` in a config file) continues the run in --out.
    if (resume->count() > 0 && opt->resume != "false")
      job.resume_from = opt->resume.empty() || opt->resume == "true" ? opt->out : opt->resume;
    // A resumed run writes into its own, non-empty folder. Rank 0 owns the folder; the job
    // creates it once the model, adapters and data have loaded, so a run that fails on its
    // inputs leaves nothing behind.
    // Every output is checked before the first step: a run never trains for hours and then
    // finds it cannot write, or that it would write over what it reads.
    const std::initializer_list<CommandInput> inputs = {{"--model", opt->model},
                                                        {"--data", opt->data},
                                                        {"--config", opt->config},
                                                        {"--resume-adapter-file", opt->resume_adapter}};
    if (root) {
      check_output_not_input("--out", opt->out, inputs);
      check_output_dir(opt->out, opt->force || !job.resume_from.empty());
    }
    if (!job.trace_path.empty()) {
      check_output_not_input("--trace", job.trace_path, inputs);
      check_output_file("--trace", train::trace_path_of_rank(job.trace_path, world->rank()), opt->force);
    }
    if (world->size() > 1) world->barrier(comm::Options{.name = "output folder"});
    ProgressPrinter progress(opt->log_every);
    if (root && job.train.warmup_steps >= job.train.steps)
      fmt::print("note: the run ({} steps) is no longer than its warm-up ({} steps): the learning rate never "
                 "reaches --lr {:g} and never decays to --min-lr\n",
                 job.train.steps, job.train.warmup_steps, job.train.lr);
    train::TrainCallbacks cb;
    cb.on_info = [](const std::string& s) { fmt::print("{}\n", s); };
    cb.on_step = [&](const train::StepMetrics& m) { progress.step(m); };
    cb.on_eval = [&](const train::EvalMetrics& e) { progress.eval(e); };
    const train::TrainSummary s = train::run_train_job(job, cb);
    if (!root) return;
    progress.finish();
    fmt::print("done: {} steps in {:.1f}s, loss {:.4f} -> {:.4f}", s.steps, s.elapsed_s, s.first_loss, s.final_loss);
    if (s.final_valid_loss >= 0) fmt::print(", validation {:.4f}", s.final_valid_loss);
    if (dp) fmt::print(", gradients sent {:.2f} MiB/step (rank 0)", s.gradient_bytes_per_step / (1 << 20));
    fmt::print(", peak memory {:.0f} MiB{}; {} written to {}\n", static_cast<double>(s.peak_rss_bytes) / (1 << 20),
               dp ? " (rank 0)" : "", job.fine_tune == train::FineTuneType::lora ? "adapters" : "model", opt->out);
  });
}

}  // namespace flotilla::cli
