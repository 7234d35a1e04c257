#include "flotilla/train/job.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/hash.hpp"
#include "flotilla/base/log.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/base/stop_signal.hpp"
#include "flotilla/comm/world.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/matmul_dtype.hpp"
#include "flotilla/model/model_writer.hpp"
#include "flotilla/model/vocab_check.hpp"
#include "flotilla/text/tokenizer.hpp"
#include "flotilla/train/job_checkpoints.hpp"
#include "flotilla/train/job_context.hpp"
#include "flotilla/train/job_data.hpp"
#include "flotilla/train/job_loop.hpp"
#include "flotilla/train/job_model.hpp"
#include "flotilla/train/job_record.hpp"
#include "flotilla/train/training_state.hpp"

namespace flotilla::train {
namespace {

// What neither pipeline nor tensor parallelism combines with yet, each refused in one line
// naming the flag: local SGD, compression and the deterministic mode.
template <class Refuse>
void refuse_what_model_parallelism_lacks(const TrainJob& job, Refuse&& refuse) {
  if (job.train.local_sgd.sync_every > 0) refuse("local SGD (--sync-every)");
  if (job.compression.kind != comm::Compression::none) refuse("--compression");
  if (job.train.deterministic) refuse("--deterministic");
}

// Pipeline parallelism's flags, and what it does not combine with yet.
void check_pipeline_flags(const TrainJob& job) {
  auto refuse = [](std::string_view what) {
    throw InputError("train", fmt::format("pipeline parallelism (pp > 1) does not work with {} yet", what));
  };
  // ZeRO-1 shards each stage's optimizer state over its dp group; stage 2 would save nothing
  // at the peak (a stage's gradient is whole until its last micro-batch's backward), stage 3
  // would hold or regather the whole stage every tick. By design, not "yet":
  // docs/parallelism.md.
  if (job.train.zero_stage >= 2)
    throw InputError("train", fmt::format("pipeline parallelism (pp > 1) does not work with --zero {} (use --zero 1): "
                                          "a stage's gradient is whole until its last micro-batch, so ZeRO-2/3 "
                                          "save nothing there (docs/parallelism.md)",
                                          job.train.zero_stage));
  refuse_what_model_parallelism_lacks(job, refuse);
  if (job.train.balance_every > 0) refuse("--balance (the stages pass fixed-size micro-batches along)");
  const int64_t M = job.pipeline.micro_batches;
  if (M < 1) throw InputError("train", fmt::format("--micro-batches must be 1 or more, not {}", M));
  if (job.train.batch_size % M != 0)
    throw InputError("train", fmt::format("--micro-batches {} does not divide --batch-size {}: each micro-batch must "
                                          "have the same number of rows",
                                          M, job.train.batch_size));
}

// Tensor parallelism's combinations not built yet, each refused in one line.
void check_tensor_parallel_flags(const TrainJob& job) {
  auto refuse = [](std::string_view what) {
    throw InputError("train", fmt::format("tensor parallelism (tp > 1) does not work with {} yet", what));
  };
  // ZeRO-1/2 shard each tp slice's optimizer state (and gradients) over its dp group,
  // ZeRO-3 its weights too (each group of the local arena gathered over the dp group);
  // with pp, ZeRO-1 shards each stage's tp slices' optimizer state over its dp group
  // (check_pipeline_flags refuses ZeRO-2/3 with pp).
  refuse_what_model_parallelism_lacks(job, refuse);
  // The tp ranks of a replica must run the same rows; each measures its own dp group.
  if (job.train.balance_every > 0) refuse("--balance");
  // LoRA (--resume-adapter-file too): each tp rank takes its slices of the whole adapters
  // (train/job_model.cpp's attach_lora).
}

// The flags that need no model or data, checked first: a mistake shows before anything loads.
void check_job_flags(const TrainJob& job) {
  if (job.out_dir.empty()) throw InputError("train", "no output directory (--out)");
  if (job.save_every < 0) throw InputError("train", "--save-every must be 0 (no checkpoints) or positive");
  if (job.keep_checkpoints < 0)
    throw InputError("train", fmt::format("--keep-checkpoints must be 0 (all) or positive, not {}", job.keep_checkpoints));
  validate_train_config(job.train);
  // Flags of data-parallel strategies are checked on one process too, where they are unused:
  // a mistake shows before the job reaches a cluster.
  if (job.train.local_sgd.sync_every < 0)
    throw InputError("train", fmt::format("--sync-every must be 0 or positive, not {}", job.train.local_sgd.sync_every));
  if (job.train.local_sgd.sync_every > 0) parallel::LocalSgd::validate(job.train.local_sgd);
  (void)comm::make_gradient_codec(job.compression, 0, {});
  parallel::validate_sync({.local_sgd = job.train.local_sgd,
                           .bucket_mb = job.train.bucket_mb,
                           .zero_stage = job.train.zero_stage,
                           .deterministic = job.train.deterministic},
                          job.compression.kind);
  if (job.train.zero_stage > 0 && job.compression.kind != comm::Compression::none && job.compression.warmup_steps > 0)
    throw InputError("train", "--compression-warmup applies to all-reduced gradients; with --zero the gradient is "
                              "reduce-scattered in halves from the first step");
  if (job.pp) check_pipeline_flags(job);
  if (job.tp) check_tensor_parallel_flags(job);
  if (const int64_t H = job.train.local_sgd.sync_every; H > 0) {
    // Between meetings every rank holds other weights: a checkpoint must fall on a meeting.
    if (job.save_every > 0 && job.save_every % H != 0)
      throw InputError("train", fmt::format("--save-every {} must be a multiple of --sync-every {}: checkpoints are "
                                            "taken where the ranks' weights meet", job.save_every, H));
    if (job.compression.kind != comm::Compression::none)
      throw InputError("train", "--compression applies to per-step gradients; local SGD (--sync-every) sends weights");
  }
}

// A digest that is the same on every machine and build (std::hash need not be).
std::string fnv1a_hex(std::string_view bytes) { return fmt::format("{:016x}", fnv1a64(bytes)); }

// The names and sizes of a model directory's weight files (*.safetensors and the shard
// index), sorted: what ranks that each read only their part of it compare.
std::string weight_files_fingerprint(const std::filesystem::path& dir) {
  std::vector<std::string> files;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (e.path().extension() != ".safetensors" && name != "model.safetensors.index.json") continue;
    std::error_code size_ec;
    const auto bytes = std::filesystem::file_size(e.path(), size_ec);
    files.push_back(fmt::format("{}:{}", name, size_ec ? -1 : static_cast<int64_t>(bytes)));
  }
  std::sort(files.begin(), files.end());
  return fnv1a_hex(fmt::format("{}", fmt::join(files, ";")));
}

// Every rank must train the same model on the same data, from rank 0's weights.
// A rank that built only its ZeRO-3 shard (`sharded_build`) holds no whole model to
// broadcast: every rank drew its part from the same seed instead, which they check.
void join_data_parallel(const TrainJob& job, model::Llama& model, const text::Tokenizer& tokenizer, int world,
                        bool sharded_build, const InfoSink& info) {
  job.dp->check_same("model configs", fnv1a_hex(model.config().to_json().dump()));
  job.dp->check_same("tokenizers", tokenizer.fingerprint());
  if (sharded_build) {
    if (!job.model_dir.empty()) {
      // Each rank read its own shard of the directory; nothing is broadcast, so every rank
      // must read the same files (as it reads the same data). Their layout is compared here;
      // their values cannot be without reading them whole.
      job.dp->check_same("model directories' weight files (names and sizes)", weight_files_fingerprint(job.model_dir));
    } else {
      job.dp->check_same("initial weights' seeds (--seed)", std::to_string(job.seed));
    }
    // LoRA over a sharded base: the adapters are whole on every rank, rank 0's.
    if (model.base_frozen()) job.dp->broadcast_parameters(model.trainable().params);
  } else if (model.holds_all() || model.base_frozen()) {
    job.dp->broadcast_parameters(model.trainable().params);
  } else if (!model.holds_all_experts()) {
    // An expert-parallel rank: the data group shares all but the experts, which only this
    // rank's dp replicas hold; each rank read or drew its own from the same files or seed.
    const std::span<float> params = model.trainable().params;
    for (const auto& [begin, end] : model.held_ranges(model::Llama::TensorGroup::non_experts))
      job.dp->broadcast_parameters(params.subspan(static_cast<size_t>(begin), static_cast<size_t>(end - begin)));
    if (job.model_dir.empty()) job.dp->check_same("initial weights' seeds (--seed)", std::to_string(job.seed));
  } else {
    // A pipeline stage: the dp group is the same stage in the other replicas; only what the
    // stage holds is sent (writing the rest would make it resident).
    const std::span<float> params = model.trainable().params;
    for (const auto& [begin, end] : model.held_ranges())
      job.dp->broadcast_parameters(params.subspan(static_cast<size_t>(begin), static_cast<size_t>(end - begin)));
  }
  job.dp->set_compression(job.compression, model.trainable().table);
  if (job.train.local_sgd.sync_every > 0)
    info(fmt::format("data parallel: {} ranks, local SGD: weights meet every {} steps (outer lr {}, momentum {})",
                     world, job.train.local_sgd.sync_every, job.train.local_sgd.outer_lr,
                     job.train.local_sgd.outer_momentum));
  else
    info(fmt::format("data parallel: {} ranks; global batch {} x {} rows; gradients as {}", world,
                     job.train.batch_size * world, job.train.grad_accum,
                     job.train.deterministic ? std::string_view("fixed-point int64 rows (--deterministic)")
                     : job.compression.kind == comm::Compression::none
                         ? std::string_view("float32")
                         : comm::compression_name(job.compression.kind)));
}

// ZeRO-3's final model: rank 0 writes it tensor by tensor, in layout order, while every
// rank gathers the groups in the same order (each rank holds one group of whole weights at
// a time beyond its shard); the other ranks only take part in the gathers.
void write_gathered_model(const JobRanks& ranks, model::Llama& model, parallel::GradientSync& sync,
                          const std::filesystem::path& dir) {
  if (ranks.root) {
    std::filesystem::create_directories(dir);
    model::ModelWriteOptions options;
    model::write_model(dir, model.config(), options, [&](const model::ParamInfo& info, std::span<float> out) {
      sync.gather_weights_through(info.offset);
      model.weight_f32(info, out);
    });
  }
  sync.end_weight_pass();
}

// The outputs, after the last step. The trace first, on every rank: it shows what happened,
// a divergence included. Then rank 0 writes the model (or adapters), what the run was for;
// metrics and report after it, each on its own: one that cannot be written is an Error
// raised once everything else is written, and never stands in the model's way.
void write_outputs(const TrainJob& job, const JobRanks& ranks, model::Llama& model,
                   const model::LoraAdapters* adapters, const text::Tokenizer& tokenizer, TraceRecorder* trace,
                   Trainer& trainer, const nlohmann::json& config, JobCheckpoints& checkpoints,
                   RunRecord& record, const InfoSink& info) {
  std::vector<std::string> unwritten;
  const auto auxiliary = [&](std::string_view what, const std::function<void()>& write) {
    try {
      write();
    } catch (const std::exception& e) {
      unwritten.push_back(fmt::format("{} ({})", what, e.what()));
    }
  };
  if (trace) {
    auxiliary("trace", [&] {
      trace->write(trace_path_of_rank(job.trace_path, ranks.rank), ranks.rank);
      info(fmt::format("trace: {} ({} events; open in https://ui.perfetto.dev or chrome://tracing)",
                       job.trace_path.string(), trace->size()));
    });
  }
  checkpoints.check_weights_finite(record.summary.steps, "the model is");
  // pp x tp: the stages first hand each tp rank's slices of their tensors to the others
  // (each rank then holds its tp rank's slice of every layer; LoRA's adapters were made
  // whole at the end of the run), and the first stage's tp group gathers them as tp alone.
  const bool stages_of_slices = job.tp && job.pp;
  if (stages_of_slices && !adapters) trainer.sync().complete_weights();
  const bool gathered = !job.tp && !adapters && trainer.sync().weights_sharded();
  if (gathered && !ranks.root) write_gathered_model(ranks, model, trainer.sync(), job.out_dir);
  // ZeRO-3 x tp: each group of the local slices is gathered over the dp group as the tp
  // gather reads it (one group at a time beyond the shard); the other replicas walk the
  // same groups in the same order for their dp groups' gathers.
  const bool zero3_slices = job.tp && !job.pp && !adapters && trainer.sync().weights_sharded();
  parallel::TensorParallel::BeforeRead gather_through;
  if (zero3_slices) gather_through = [&](int64_t offset) { trainer.sync().gather_weights_through(offset); };
  // Tensor parallel: world rank 0's tp group gathers the slices into one whole model.
  std::optional<model::Llama> whole;
  std::optional<model::LoraAdapters> whole_adapters;
  if (job.tp && (!job.dp || job.dp->rank() == 0) && (!job.pp || job.pp->rank() == 0)) {
    if (adapters)
      whole_adapters = job.tp->gather_full_adapters(*adapters, model.full_config());
    else
      whole = job.tp->gather_full_model(model, gather_through);
  } else if (zero3_slices) {
    for (const model::ParamInfo& info : model.layout().params()) trainer.sync().gather_weights_through(info.offset);
  }
  if (zero3_slices) trainer.sync().end_weight_pass();
  if (!ranks.root) {
    // A rank's trace is its only output: a failure is told, and never ends the job while
    // rank 0 writes the model.
    for (const std::string& u : unwritten) log::warn("rank {}: not written: {}", ranks.rank, u);
    return;
  }
  if (adapters) {
    (whole_adapters ? &*whole_adapters : adapters)->save_peft(job.out_dir, base_model_name(job));
  } else {
    if (gathered) write_gathered_model(ranks, model, trainer.sync(), job.out_dir);
    else if (whole) whole->save(job.out_dir);
    else model.save(job.out_dir);
    tokenizer.save(job.out_dir);
  }
  auxiliary("metrics", [&] { record.write_metrics(); });
  auxiliary("report", [&] { write_report(job, config, trainer, record, ranks.world); });
  if (!unwritten.empty()) {
    std::string list;
    for (const std::string& u : unwritten) list += (list.empty() ? "" : "; ") + u;
    throw Error("train", fmt::format("the {} was written to {}, but not: {}", adapters ? "adapters" : "model",
                                     job.out_dir.string(), list));
  }
}

// The layers of each stage: as --pp-layers gives them, or balanced by cost.
std::vector<parallel::StageRange> pipeline_stages(const TrainJob& job, const model::ModelConfig& cfg,
                                                  const InfoSink& info) {
  const int P = job.pp->size();
  const std::vector<parallel::StageRange> ranges =
      job.pipeline.stage_layers.empty() ? parallel::balance_stages(cfg, P, job.train.seq_len)
                                        : parallel::stages_from_counts(cfg, P, job.pipeline.stage_layers);
  std::string layers;
  for (const parallel::StageRange& r : ranges) layers += fmt::format("{}[{}, {})", layers.empty() ? "" : " ", r.begin, r.end);
  const int64_t M = job.pipeline.micro_batches * job.train.grad_accum;
  info(fmt::format("pipeline: {} stages, layers {}; {} micro-batches of {} rows a step, schedule {}; bubble "
                   "(P-1)/(M+P-1) = {:.0f}% at equal stage costs",
                   P, layers, M, job.train.batch_size / job.pipeline.micro_batches,
                   parallel::pipeline_schedule_name(job.pipeline.schedule),
                   100.0 * (P - 1) / static_cast<double>(M + P - 1)));
  return ranges;
}

}  // namespace

nlohmann::json train_job_config_json(const TrainJob& job) {
  return {{"model", job.model_dir.string()},
          {"preset", job.preset},
          {"config", job.config_json.string()},
          {"data", job.data.string()},
          {"pack", job.pack},
          {"valid_fraction", job.valid_fraction},
          {"seed", job.seed},
          {"train", train_config_json(job.train)},
          {"save_every", job.save_every},
          {"keep_checkpoints", job.keep_checkpoints},
          {"compression", comm::compression_name(job.compression.kind)},
          {"zero_stage", job.train.zero_stage},
          {"local_sgd",
           {{"sync_every", job.train.local_sgd.sync_every},
            {"outer_lr", job.train.local_sgd.outer_lr},
            {"outer_momentum", job.train.local_sgd.outer_momentum}}}};
}

TrainSummary run_train_job(const TrainJob& job_given, const TrainCallbacks& callbacks) {
  TrainJob job = job_given;  // train.seq_len may come from the data
  // Rank 0 alone reports; the other ranks compute the same steps silently.
  const JobRanks ranks = job_ranks(job);
  const TrainCallbacks cb = ranks.root ? callbacks : TrainCallbacks{};
  const InfoSink info = [&](const std::string& s) {
    if (cb.on_info) cb.on_info(s);
  };
  check_job_flags(job);

  // The model, the data it reads, and what it trains.
  const std::unique_ptr<text::Tokenizer> tokenizer = make_tokenizer(job);
  // A pipeline locates the data before the weights: the data may set the sequence length,
  // which the stages are balanced by, and a stage reads only its own layers' weights.
  // Otherwise the weights come first, as their faults are reported first.
  const model::ModelConfig model_config = job_model_config(job, *tokenizer);
  std::optional<DataFolder> pipeline_data;
  std::optional<parallel::PipelineStage> pipeline;
  if (job.pp) {
    pipeline_data.emplace(locate_data(job, model_config, *tokenizer, info));
    pipeline.emplace(*job.pp, pipeline_stages(job, model_config, info), job.pipeline);
    // Each stage builds its own layers (the same draws or files as one process): every
    // stage must be building the same model.
    parallel::DataParallel(*job.pp).check_same("model configs", fnv1a_hex(model_config.to_json().dump()));
  }
  // Under --zero 3 each rank builds (draws or reads) only its shard of the model (build_ranges).
  const std::vector<model::ElementRange> shard = build_ranges(job, *tokenizer);
  model::Llama model = make_model(
      job, *tokenizer,
      held_part(job, model_config,
                pipeline ? std::optional<model::Llama::LayerRange>(pipeline->range()) : std::nullopt),
      shard);
  // (A tp rank's model holds a slice of the vocabulary: the data and tokenizer meet the whole.)
  const model::ModelConfig& whole_config = job.tp ? model_config : model.config();
  const DataFolder data_folder =
      pipeline_data ? std::move(*pipeline_data) : locate_data(job, whole_config, *tokenizer, info);
  model::check_tokenizer_fits(*tokenizer, whole_config, job.model_dir);
  const std::unique_ptr<model::LoraAdapters> adapters = attach_lora(job, model, whole_config, info);
  if (job.tp) {
    model.set_tensor_parallel(job.tp, model_config);
    model.set_sequence_parallel(job.sequence_parallel);
    if (job.sequence_parallel)
      info(fmt::format("sequence parallel: the residual stream and the norms on 1/{} of each micro-batch's token rows",
                       job.tp->tp_size()));
    info(fmt::format("tensor parallel: tp={}, this rank holds {} of {} query heads, {} of {} key-value heads and {} "
                     "of {} MLP columns per layer, {} of {} vocabulary rows: {:.2f}M of {:.2f}M parameters",
                     job.tp->tp_size(), model.config().n_heads, model_config.n_heads, model.config().n_kv_heads,
                     model_config.n_kv_heads, model.config().ffn_dim, model_config.ffn_dim,
                     model.config().vocab_size, model_config.vocab_size,
                     static_cast<double>(model.config().num_params()) / 1e6,
                     static_cast<double>(model_config.num_params()) / 1e6));
  }
  if (job.experts && (model.config().is_moe() || job.experts->ep_size() > 1)) {
    model.set_expert_exchange(job.experts);
    if (job.experts->ep_size() > 1) {
      const auto [first, end] = model.local_experts();
      info(fmt::format("expert parallel: ep={}, this rank runs experts [{}, {}) of {} per layer{}",
                       job.experts->ep_size(), first, end, model.config().moe.num_experts,
                       !model.holds_all_experts() ? ""
                       : job.tp ? " and holds every expert's tensor-parallel slice (tp x ep)"
                       : job.pp ? " and holds all of them (pp x ep)"
                                : " and holds all of them (--zero and --compression exchange the whole "
                                  "model over the data group)"));
    }
  }
  if (job.dp) join_data_parallel(job, model, *tokenizer, ranks.data_world, !shard.empty(), info);
  // LoRA: every stage starts from the first stage's adapters (each holds all of them and
  // trains its own layers'; they are small). The pp group: under tensor parallelism each
  // tp rank holds its own slices of them, which only the same tp rank of the other stages
  // shares (the dp replicas already hold their first replica's).
  if (job.pp && model.base_frozen())
    job.pp->broadcast(comm::MutView(model.trainable().params), 0, {.name = "initial adapters"});
  // (The shard is the base's; LoRA's adapters are whole. The base's floats were checked as read.)
  if (job.resume_from.empty())
    check_trainable_finite(job, model, model.base_frozen() ? std::span<const model::ElementRange>() : shard);  // checkpoints never hold non-finite weights
  plan_activations(job, model, info);
  TrainData data = open_train_data(job, data_folder, *tokenizer, model, pipeline ? &*pipeline : nullptr, ranks, info);

  // The trainer, where it starts from, and where its checkpoints go.
  if (ranks.root) std::filesystem::create_directories(job.out_dir);
  RunRecord record;
  record.metrics_path = job.out_dir / "metrics.jsonl";
  std::unique_ptr<TraceRecorder> trace;
  if (!job.trace_path.empty()) trace = std::make_unique<TraceRecorder>();
  Trainer trainer(model, job.train, job.dp, trace.get(), pipeline ? &*pipeline : nullptr, job.experts);
  const nlohmann::json config = train_job_config_json(job);
  JobCheckpoints checkpoints(job, ranks, trainer, *data.train, adapters.get(), config, record, info);
  if (!job.resume_from.empty()) checkpoints.resume();
  checkpoints.claim_folder();

  // Alive to the end of the job: a second signal while the checkpoint or the model is being
  // written quits at once with its notice, as during a step. Under mpirun a stop signal
  // from the launcher itself (its abort on Ctrl-C) means it reads our output no more:
  // base/stop_signal.hpp.
  std::optional<StopSignals> stop_signals;
  if (job.stop_on_signal)
    stop_signals.emplace(comm::launched_under_mpi() ? ParentOutput::stops_reading_on_signal
                                                    : ParentOutput::keeps_reading);
  run_training_loop(job, ranks, trainer, data, checkpoints, record, cb, info);
  record.summary.steps = trainer.steps_done();
  if (job.tp) job.tp->set_counting(false);  // the counts are the training steps' (report.json)
  if (job.tp && record.summary.steps > 0)
    info(fmt::format("tensor parallel: {} activation all-reduces, {:.1f} MiB a step reduced, {:.1f} MiB sent "
                     "(rank 0)",
                     job.tp->all_reduces(),
                     static_cast<double>(job.tp->bytes_reduced()) / static_cast<double>(record.summary.steps) /
                         (1 << 20),
                     static_cast<double>(job.tp->bytes_sent()) / static_cast<double>(record.summary.steps) /
                         (1 << 20)));
  if (data.test) {
    const EvalMetrics e = data.test();
    record.summary.test_loss = e.loss;
    record.summary.test_tokens = e.tokens;
    info(fmt::format("test: loss {:.4f}, perplexity {:.3f} ({} target tokens)", e.loss, std::exp(e.loss), e.tokens));
  }
  // Replicated tensors are updated alike on every tp rank: a difference is a bug. Under
  // ZeRO-3 x tp (the base's too under LoRA) each rank holds its dp shard of its slices:
  // the groups holding them are gathered one at a time as they are read.
  if (job.tp) {
    const bool zero3 = job.train.zero_stage == 3 && !job.pp;
    parallel::TensorParallel::BeforeRead gather_through;
    if (zero3) gather_through = [&](int64_t offset) { trainer.sync().gather_weights_through(offset); };
    job.tp->check_replicated_same(model, gather_through);
    if (zero3) trainer.sync().end_weight_pass();
  }
  record.summary.peak_rss_bytes = peak_rss_bytes();
  record.summary.dtype = std::string(model::matmul_dtype_name(model.matmul_input()));
  write_outputs(job, ranks, model, adapters.get(), *tokenizer, trace.get(), trainer, config, checkpoints, record, info);
  return record.summary;
}

std::filesystem::path trace_path_of_rank(const std::filesystem::path& trace, int rank) {
  if (rank == 0) return trace;
  std::filesystem::path path = trace;
  path.replace_filename(fmt::format("{}.rank{}{}", trace.stem().string(), rank, trace.extension().string()));
  return path;
}

}  // namespace flotilla::train
