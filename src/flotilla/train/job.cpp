#include "flotilla/train/job.hpp"

#include <algorithm>
#include <cmath>
#include <ctime>
#include <optional>

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/hash.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/log.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/base/stop_signal.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/comm/world.hpp"
#include "flotilla/data/batch_sampler.hpp"
#include "flotilla/data/chat_template.hpp"
#include "flotilla/data/prepare.hpp"
#include "flotilla/data/rank_slice.hpp"
#include "flotilla/data/text_dataset.hpp"
#include "flotilla/data/token_dataset.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/vocab_check.hpp"
#include "flotilla/text/byte_tokenizer.hpp"
#include "flotilla/text/tokenizer.hpp"
#include "flotilla/train/training_state.hpp"
#include "flotilla/train/report.hpp"

namespace flotilla::train {
namespace {

model::Llama make_model(const TrainJob& job, const text::Tokenizer& tokenizer) {
  const int sources = !job.model_dir.empty() + !job.preset.empty() + !job.config_json.empty();
  if (sources != 1) throw InputError("train", "give exactly one of --model, --preset or --config");
  if (!job.model_dir.empty()) return model::Llama::load(job.model_dir, job.non_finite);
  model::ModelConfig cfg =
      job.preset.empty() ? model::ModelConfig::load(job.config_json) : model::preset_config(job.preset);
  // A new model speaks its tokenizer's special ids; config.json records them for HF.
  if (cfg.bos_token_id < 0) cfg.bos_token_id = tokenizer.bos_id();
  if (cfg.eos_token_id < 0) cfg.eos_token_id = tokenizer.eos_id();
  model::Llama model(cfg);
  model.init_random(job.seed);
  return model;
}

std::unique_ptr<text::Tokenizer> make_tokenizer(const TrainJob& job) {
  if (!job.model_dir.empty()) return text::Tokenizer::load_for_model(job.model_dir);
  return std::make_unique<text::ByteTokenizer>();
}

// JSON has no NaN or Inf: a non-finite value is written as null (and read as "no value").
nlohmann::json finite_or_null(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

nlohmann::json step_json(const StepMetrics& m) {
  nlohmann::json j = {{"step", m.step},     {"loss", finite_or_null(m.loss)},         {"lr", m.lr},
          {"grad_norm", finite_or_null(m.grad_norm)}, {"tokens", m.tokens}, {"tokens_per_s", m.tokens_per_s},
          {"elapsed_s", m.elapsed_s}, {"step_s", m.step_s}, {"data_s", m.data_s},
          {"compute_s", m.compute_s}, {"sync_s", m.sync_s}, {"update_s", m.update_s}};
  if (m.skipped) j["skipped"] = true;
  return j;
}

bool all_finite(std::span<const float> values) {
  for (const float v : values)
    if (!std::isfinite(v)) return false;
  return true;
}

// The lines of an earlier metrics.jsonl up to and including `step`: a resumed run keeps
// the history of the steps it does not repeat. Lines it cannot read are dropped.
std::string metrics_up_to(const std::filesystem::path& path, int64_t step) {
  if (!std::filesystem::is_regular_file(path)) return {};
  const std::string text = read_text_file(path);
  std::string kept;
  size_t begin = 0;
  while (begin < text.size()) {
    size_t end = text.find('\n', begin);
    if (end == std::string::npos) end = text.size();
    const std::string_view line(text.data() + begin, end - begin);
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() <= step)
      kept.append(line).push_back('\n');
    begin = end + 1;
  }
  return kept;
}

// The training loss of the first step line of metrics.jsonl text.
std::optional<double> first_loss_of(const std::string& metrics) {
  size_t begin = 0;
  while (begin < metrics.size()) {
    size_t end = metrics.find('\n', begin);
    if (end == std::string::npos) end = metrics.size();
    const nlohmann::json j = nlohmann::json::parse(metrics.substr(begin, end - begin), nullptr, false);
    if (j.is_object() && j.contains("loss") && j["loss"].is_number()) return j["loss"].get<double>();
    begin = end + 1;
  }
  return std::nullopt;
}

std::string targets_list(const std::vector<model::LoraTarget>& targets) {
  std::string s;
  for (model::LoraTarget t : targets) s += (s.empty() ? "" : ",") + std::string(model::lora_target_module(t));
  return s;
}

// The LoRA flags a user gave with --resume-adapter-file must describe the adapter it
// holds: a different rank or target set cannot continue it, and a silent choice of one
// side would train something other than what either says.
void check_resumed_adapter(const TrainJob& job, const model::LoraConfig& adapter, int64_t n_layers) {
  const model::LoraConfig& flags = job.lora;
  const auto mismatch = [&](std::string_view flag, const std::string& given, const std::string& held) {
    throw InputError("train", fmt::format("{} {} differs from the resumed adapter's {} ({}): drop the flag or give "
                                          "the adapter's value",
                                          flag, given, held, job.resume_adapter.string()));
  };
  if (job.lora_given.rank && flags.rank != adapter.rank)
    mismatch("--lora-rank", std::to_string(flags.rank), fmt::format("rank {}", adapter.rank));
  if (job.lora_given.targets && flags.targets != adapter.targets)
    mismatch("--lora-targets", targets_list(flags.targets), "targets " + targets_list(adapter.targets));
  if (job.lora_given.alpha && flags.alpha != adapter.alpha)
    mismatch("--lora-alpha", fmt::format("{}", flags.alpha), fmt::format("alpha {}", adapter.alpha));
  const auto layers = [&](int64_t n) { return n < 0 || n > n_layers ? n_layers : n; };
  if (job.lora_given.num_layers && layers(flags.num_layers) != layers(adapter.num_layers))
    mismatch("--num-layers", std::to_string(flags.num_layers), fmt::format("{} layers", layers(adapter.num_layers)));
}

// Says what rows of T positions cut from a split's examples: how many examples, how many
// target tokens. For training, InputError when no example keeps a target (nothing to
// learn), and a warning when some keep none (batches of only those are skipped).
void check_truncation(const data::TruncationStats& s, std::string_view split, int64_t T, bool training,
                      const std::filesystem::path& data, const std::function<void(const std::string&)>& info) {
  if (training && s.without_targets == s.examples)
    throw InputError("train", fmt::format("{}: no training example has a target token within rows of --seq-len {}: "
                                          "nothing to learn; raise --seq-len (the longest example has {} tokens)",
                                          data.string(), T, s.longest));
  if (s.truncated == 0) return;
  info(fmt::format("warning: {} of {} {} examples do not fit in rows of --seq-len {}: {} of {} target tokens ({:.1f}%) "
                   "past the row are {}; --seq-len {} keeps them all",
                   s.truncated, s.examples, split, T, s.targets_lost, s.targets,
                   s.targets > 0 ? 100.0 * static_cast<double>(s.targets_lost) / static_cast<double>(s.targets) : 0.0,
                   training ? "never trained on" : "not evaluated", s.longest));
  if (training && s.without_targets > 0)
    info(fmt::format("warning: {} training examples keep no target token in a row of {}: a batch of only such "
                     "examples is skipped, not stepped on",
                     s.without_targets, T));
}

// adapter_config.json's base_model_name_or_path: the base as the user named it, made
// absolute (a relative path would name another folder from wherever the adapter is used).
std::string base_model_name(const TrainJob& job) {
  if (job.model_dir.empty()) return job.preset.empty() ? "flotilla" : "flotilla preset " + job.preset;
  return std::filesystem::absolute(job.model_dir).lexically_normal().string();
}

// A digest that is the same on every machine and build (std::hash need not be).
std::string fnv1a_hex(std::string_view bytes) { return fmt::format("{:016x}", fnv1a64(bytes)); }

void write_report(const TrainJob& job, const nlohmann::json& config, const std::string& metrics,
                  const Trainer& trainer, TrainSummary& summary, int world);

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
  const bool root = !job.dp || job.dp->is_root();
  const int rank = job.dp ? job.dp->rank() : 0, world = job.dp ? job.dp->world() : 1;
  const TrainCallbacks cb = root ? callbacks : TrainCallbacks{};
  auto info = [&](const std::string& s) {
    if (cb.on_info) cb.on_info(s);
  };
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
  parallel::validate_sync({.local_sgd = job.train.local_sgd, .bucket_mb = job.train.bucket_mb, .zero_stage = job.train.zero_stage},
                          job.compression.kind);
  if (const int64_t H = job.train.local_sgd.sync_every; H > 0) {
    // Between meetings every rank holds other weights: a checkpoint must fall on a meeting.
    if (job.save_every > 0 && job.save_every % H != 0)
      throw InputError("train", fmt::format("--save-every {} must be a multiple of --sync-every {}: checkpoints are "
                                            "taken where the ranks' weights meet", job.save_every, H));
    if (job.compression.kind != comm::Compression::none)
      throw InputError("train", "--compression applies to per-step gradients; local SGD (--sync-every) sends weights");
  }
  const std::unique_ptr<text::Tokenizer> tokenizer = make_tokenizer(job);
  model::Llama model = make_model(job, *tokenizer);
  const model::ModelConfig& cfg = model.config();
  // A prepared dataset says how long its examples are: unless --seq-len was given, rows are
  // that long (at most the model's positions), so that training does not cut what data
  // prepare kept. (A JSONL folder prepared for this run is cut at --seq-len, below.)
  if (job.seq_len_from_data && std::filesystem::is_directory(job.data) && !data::is_unprepared_data_folder(job.data)) {
    const data::DatasetIndex index = data::TokenDataset::open(job.data).index();
    job.train.seq_len = std::min(data::prepared_seq_len(index), cfg.max_position);
    info(index.max_seq_len > 0
             ? fmt::format("data: rows of {} tokens: {} was prepared with --max-seq-len {} (--seq-len sets another)",
                           job.train.seq_len, job.data.string(), index.max_seq_len)
             : fmt::format("data: rows of {} tokens: the longest training example of {}, up to {} (--seq-len sets "
                           "another)",
                           job.train.seq_len, job.data.string(), data::kLongestDefaultSeqLen));
  }
  // mlx_lm's habit: a folder of JSONL examples given straight to training. It is prepared
  // as `flotilla data prepare` would, into a temporary folder this run removes, before the
  // row length is fixed: without --seq-len, rows follow what the preparation kept.
  std::optional<data::TemporaryPreparedData> on_the_fly;
  std::filesystem::path data_dir = job.data;
  if (data::is_unprepared_data_folder(job.data)) {
    data::PrepareOptions po;
    po.data = job.data;
    po.mask_prompt = job.mask_prompt;
    // As mlx_lm: examples are cut at its --max-seq-length (2048, at most the model's
    // positions) unless --seq-len says otherwise, and rows are as long as the longest kept.
    const int64_t limit = job.seq_len_from_data ? std::min(data::kLongestDefaultSeqLen, cfg.max_position)
                                                : job.train.seq_len;
    po.max_seq_len = static_cast<size_t>(limit);
    po.seed = job.seed;
    on_the_fly.emplace(po, *tokenizer,
                       job.model_dir.empty() ? std::nullopt : data::resolve_chat_template(job.model_dir, ""));
    data_dir = on_the_fly->dir();
    const data::DatasetIndex& index = on_the_fly->index();
    uint64_t truncated = 0;
    for (const auto& [split, s] : index.splits) truncated += s.stats.truncated;
    info(fmt::format("data: prepared {} for this run (tokenizer {}, chat template {}{}){}", job.data.string(),
                     index.tokenizer_name, index.chat_template.value_or("none"),
                     job.mask_prompt ? ", loss on completions only" : "",
                     truncated > 0 ? fmt::format("; {} examples cut at {} tokens", truncated, limit) : ""));
    if (job.seq_len_from_data) {
      const auto train_split = index.splits.find(data::Split::train);
      const uint64_t longest = train_split == index.splits.end() ? 0 : train_split->second.stats.longest;
      job.train.seq_len = std::clamp<int64_t>(static_cast<int64_t>(longest), 1, limit);
      info(fmt::format("data: rows of {} tokens, the longest training example (--seq-len sets another)",
                       job.train.seq_len));
    }
  }
  if (job.train.seq_len > cfg.max_position)
    throw InputError("train", fmt::format("--seq-len {} exceeds the model's {} positions (max_position_embeddings)",
                                          job.train.seq_len, cfg.max_position));
  model::check_tokenizer_fits(*tokenizer, cfg, job.model_dir);

  // LoRA: adapters over the frozen base; the optimizer and checkpoints see only them.
  std::optional<model::LoraAdapters> adapters;
  if (job.fine_tune == FineTuneType::lora) {
    if (!job.resume_adapter.empty()) {
      adapters.emplace(model::LoraAdapters::load(job.resume_adapter, cfg, job.non_finite));
      check_resumed_adapter(job, adapters->config(), cfg.n_layers);
      info(fmt::format("LoRA: continuing from {}", job.resume_adapter.string()));
    } else {
      adapters.emplace(cfg, job.lora);
      adapters->init_random(job.seed);
    }
    model.attach_lora(&*adapters);
    const model::LoraConfig& lc = adapters->config();
    std::string targets;
    for (model::LoraTarget t : lc.targets) {
      if (!targets.empty()) targets += ',';
      targets += model::lora_target_module(t);
    }
    info(fmt::format("LoRA: rank {}, alpha {}, dropout {}, on {} of layers {}..{}: {:.3f}M trainable parameters "
                     "({:.2f}% of the model)",
                     lc.rank, lc.alpha, lc.dropout, targets, adapters->first_layer(), cfg.n_layers - 1,
                     static_cast<double>(adapters->table().total_numel()) / 1e6,
                     100.0 * static_cast<double>(adapters->table().total_numel()) / static_cast<double>(cfg.num_params())));
  } else if (!job.resume_adapter.empty()) {
    throw InputError("train", "--resume-adapter-file needs --fine-tune-type lora");
  } else if (model.quantized()) {
    throw InputError("train", fmt::format("{}: a quantized model cannot be fully fine-tuned: de-quantize first (flotilla "
                                          "fuse --de-quantize, or flotilla convert without --quantize), or pass "
                                          "--fine-tune-type lora",
                                          job.model_dir.string()));
  }
  if (job.dp) {
    // Every rank must train the same model on the same data, from rank 0's weights.
    job.dp->check_same("model configs", fnv1a_hex(cfg.to_json().dump()));
    job.dp->check_same("tokenizers", tokenizer->fingerprint());
    job.dp->broadcast_parameters(model.trainable().params);
    job.dp->set_compression(job.compression, model.trainable().table);
    if (job.train.local_sgd.sync_every > 0)
      info(fmt::format("data parallel: {} ranks, local SGD: weights meet every {} steps (outer lr {}, momentum {})",
                       world, job.train.local_sgd.sync_every, job.train.local_sgd.outer_lr,
                       job.train.local_sgd.outer_momentum));
    else
      info(fmt::format("data parallel: {} ranks; global batch {} x {} rows; gradients as {}", world,
                       job.train.batch_size * world, job.train.grad_accum,
                       job.compression.kind == comm::Compression::none ? std::string_view("float32")
                                                                       : comm::compression_name(job.compression.kind)));
  }

  // Weights to train that hold a NaN or an Inf can only give a non-finite model, which is
  // never written: say so now, not after the whole run (a fresh run; checkpoints never hold
  // them).
  if (job.resume_from.empty()) {
    const model::Llama::Trainable trainable = model.trainable();
    for (const model::ParamInfo& p : trainable.table.params()) {
      const auto values = trainable.params.subspan(static_cast<size_t>(p.offset), static_cast<size_t>(p.numel));
      const auto bad = std::find_if(values.begin(), values.end(), [](float v) { return !std::isfinite(v); });
      if (bad != values.end())
        throw InputError("train", fmt::format("{}: tensor {} holds {} at element {}: training from non-finite weights "
                                              "can only diverge",
                                              job.model_dir.empty() ? std::string("the initial weights")
                                                                    : job.model_dir.string(),
                                              p.name, *bad, bad - values.begin()));
    }
  }
  const int64_t T = job.train.seq_len;
  model.set_grad_checkpoint(job.grad_checkpoint);
  model.check_activation_memory(job.train.batch_size, T);  // before the data loads, not at the first step
  info(fmt::format("model: {} with {:.2f}M parameters; activations for B={} T={}: {:.1f} MiB{}",
                   model::architecture_name(cfg.arch), static_cast<double>(cfg.num_params()) / 1e6,
                   job.train.batch_size, T,
                   static_cast<double>(model.activation_bytes(job.train.batch_size, T)) / (1 << 20),
                   job.grad_checkpoint ? " (gradient checkpointing)" : ""));
  // The data: a prepared token dataset (flotilla data prepare), or a raw text/JSONL file
  // read as one token stream.
  std::unique_ptr<data::BatchSource> train_source;
  std::function<EvalMetrics()> evaluate;
  std::unique_ptr<data::TokenDataset> prepared;
  std::unique_ptr<data::ExampleSource> train_examples, valid_examples;
  std::unique_ptr<data::SequentialWindowSource> valid_stream;
  std::unique_ptr<data::BatchSource> raw_train;  // the windows a RankSlicedSource slices
  std::unique_ptr<data::TokenDataset::SplitExamples> test_examples;
  if (!on_the_fly && job.mask_prompt && !std::filesystem::is_directory(job.data)) {
    throw InputError("train", job.data.string() + ": --mask-prompt needs a data folder of prompt/completion or chat "
                                                  "examples (train.jsonl, ...)");
  }
  if (std::filesystem::is_directory(data_dir)) {
    prepared = std::make_unique<data::TokenDataset>(data::TokenDataset::open(data_dir, *tokenizer));
    if (job.mask_prompt && !prepared->index().mask_prompt)
      throw InputError("train", job.data.string() + ": prepared without --mask-prompt; prepare it again with "
                                                    "`flotilla data prepare --mask-prompt`");
    if (job.test && !prepared->has_split(data::Split::test))
      throw InputError("train", job.data.string() + ": --test needs a test split (test.jsonl), and there is none");
    if (!prepared->has_split(data::Split::train))
      throw InputError("train", job.data.string() + ": the prepared dataset has no training examples");
    data::SamplerConfig sc;
    sc.seq_len = T;
    sc.micro_batch = job.train.batch_size;
    sc.grad_accum = job.train.grad_accum;
    sc.pack = job.pack;
    sc.seed = job.seed;
    sc.rank = rank;
    sc.world = world;
    sc.pad_id = std::max(0, tokenizer->pad_id());
    train_examples = std::make_unique<data::TokenDataset::SplitExamples>(prepared->examples(data::Split::train));
    check_truncation(data::truncation_at(*train_examples, T), "training", T, true, job.data, info);
    train_source = std::make_unique<data::BatchSampler>(*train_examples, sc);
    info(fmt::format("data: {} prepared: {} train / {} valid examples ({} / {} tokens), {}", job.data.string(),
                     prepared->num_examples(data::Split::train), prepared->num_examples(data::Split::valid),
                     prepared->num_tokens(data::Split::train), prepared->num_tokens(data::Split::valid),
                     job.pack ? "packed" : "padded"));
    if (job.test) {
      test_examples = std::make_unique<data::TokenDataset::SplitExamples>(prepared->examples(data::Split::test));
    }
    if (prepared->has_split(data::Split::valid)) {
      valid_examples = std::make_unique<data::TokenDataset::SplitExamples>(prepared->examples(data::Split::valid));
      check_truncation(data::truncation_at(*valid_examples, T), "validation", T, false, job.data, info);
      data::SamplerConfig vc = sc;
      vc.grad_accum = 1;
      vc.shuffle = false;
      vc.repeat = false;
      evaluate = [&model, &examples = *valid_examples, vc, max_batches = job.train.eval_batches, dp = job.dp] {
        data::BatchSampler sampler(examples, vc);
        EvalMetrics e = evaluate_loss(model, [&](data::Batch& b) { return sampler.next(b); }, max_batches);
        if (dp) {
          const model::LossSum total = dp->all_reduce_loss({e.loss * static_cast<double>(e.tokens), e.tokens});
          e = EvalMetrics{e.step, total.mean(), total.num_tokens};
        }
        return e;
      };
    }
  } else {
    if (job.test)
      throw InputError("train", job.data.string() + ": --test needs a data folder with test.jsonl");
    const data::TextDataset dataset = data::load_text_dataset(job.data, *tokenizer);
    data::StreamSplit split = data::split_train_valid(dataset.tokens, job.valid_fraction);
    if (static_cast<int64_t>(split.train.size()) <= T)
      throw InputError("train", fmt::format("{}: {} training tokens, fewer than one sequence of {} + 1",
                                            job.data.string(), split.train.size(), T));
    const bool have_valid = static_cast<int64_t>(split.valid.size()) > T;
    info(fmt::format("data: {}: {} documents, {} train / {} valid tokens", job.data.string(), dataset.num_documents,
                     split.train.size(), have_valid ? split.valid.size() : 0));
    raw_train = std::make_unique<data::RandomWindowSource>(std::move(split.train), job.seed);
    // Ranks draw the same rows and keep their slice: the union is one process's batch.
    if (job.dp)
      train_source = std::make_unique<data::RankSlicedSource>(*raw_train, rank, world);
    else
      train_source = std::move(raw_train);
    if (have_valid) valid_stream = std::make_unique<data::SequentialWindowSource>(std::move(split.valid));
  }

  if (root) std::filesystem::create_directories(job.out_dir);
  const std::filesystem::path metrics_path = job.out_dir / "metrics.jsonl";
  std::string metrics;  // JSON lines, written with each checkpoint and with the model at the end
  TrainSummary summary;
  bool have_first_loss = false;
  std::unique_ptr<TraceRecorder> trace;
  if (!job.trace_path.empty()) trace = std::make_unique<TraceRecorder>();
  Trainer trainer(model, job.train, job.dp, trace.get());
  const nlohmann::json config = train_job_config_json(job);
  if (!job.resume_from.empty()) {
    const io::ResumePoint point = find_resume_point(job.resume_from);
    for (const std::string& why : point.skipped) info("checkpoint: skipping " + why);
    const nlohmann::json saved_config = restore_training_state(point.dir, trainer, *train_source);
    info(fmt::format("resumed from {} at step {}", point.dir.string(), point.step));
    std::string diffs;
    for (const std::string& d : config_differences(saved_config, config)) diffs += (diffs.empty() ? "" : ", ") + d;
    if (!diffs.empty()) info("resume: this run's configuration differs from the checkpoint's: " + diffs);
    metrics = metrics_up_to(metrics_path, point.step);
    if (const std::optional<double> first = first_loss_of(metrics)) {
      summary.first_loss = *first;
      have_first_loss = true;
    }
    summary.resumed_from_step = point.step;
  }
  const std::filesystem::path checkpoints_dir = job.out_dir / "checkpoints";
  // A fresh run never mixes its checkpoints with an earlier run's (whose higher steps
  // would outrank and outlive its own), nor deletes them.
  // --force says the folder's old contents may go: its checkpoints are another run's.
  if (root && job.resume_from.empty() && job.force && std::filesystem::exists(checkpoints_dir)) {
    std::filesystem::remove_all(checkpoints_dir);
    info("checkpoints: removed the earlier run's " + checkpoints_dir.string() + " (--force)");
  }
  if (job.resume_from.empty() && job.save_every > 0 && std::filesystem::exists(checkpoints_dir / "latest"))
    throw InputError("train", checkpoints_dir.string() +
                                  ": holds an earlier run's checkpoints; pass --resume to continue it, or remove them");
  // An earlier run's checkpoints (a fresh run with --save-every 0): a checkpoint taken on a
  // stop signal must not join them. With --force rank 0 has removed them (the other ranks
  // may still see them on a shared folder, so they decide by the flag).
  const bool foreign_checkpoints =
      job.resume_from.empty() && !job.force && std::filesystem::exists(checkpoints_dir / "latest");
  int64_t last_saved_step = -1;
  std::filesystem::path last_saved_dir;
  // Weights that are not finite are never saved over good ones. The loss and gradient
  // checks keep non-finite values out of an update; this catches a finite update that
  // overflowed (a huge --lr). Every rank holds the same weights here and stops alike.
  const auto check_weights_finite = [&](int64_t step, std::string_view what) {
    if (all_finite(model.trainable().params)) return;
    if (root) write_file_atomic(metrics_path, metrics);  // the history up to here, for the record
    std::string kept = last_saved_dir.empty() ? std::string("no checkpoint was written")
                                              : "the last good checkpoint is " + last_saved_dir.string();
    throw RunStopped("train",
                     fmt::format("after step {} the weights hold values that are not finite (inf or nan): training "
                                 "diverged; {} not written, {}; lower --lr",
                                 step, what, kept),
                     1, !root);
  };
  const auto save_checkpoint = [&](int64_t step) {
    check_weights_finite(step, "the checkpoint is");
    // Every rank holds the same weights, optimizer and data position: rank 0 writes. Under
    // ZeRO each rank holds its shard of the optimizer's moments: gathered first, so the
    // checkpoint has the unsharded layout and resumes on any number of ranks and any stage.
    trainer.gather_moments();
    if (root) {
      Timer timer;
      // metrics.jsonl first: after a kill, it reaches at least as far as `latest`.
      write_file_atomic(metrics_path, metrics);
      CheckpointContents contents = capture_training_state(trainer, *train_source, config);
      if (adapters) {
        // The step folder is also an adapter folder: generate --adapter, fuse and
        // --resume-adapter-file take it as it is.
        contents.extra_files = {"adapter_model.safetensors", "adapter_config.json"};
        contents.write_extra = [&](const std::filesystem::path& dir) { adapters->save_peft(dir, base_model_name(job)); };
      }
      last_saved_dir = write_checkpoint(checkpoints_dir, contents, job.keep_checkpoints);
      info(fmt::format("checkpoint: {} ({:.2f} s)", last_saved_dir.string(), timer.elapsed_s()));
    }
    trainer.drop_whole_moments();
    last_saved_step = step;
  };
  const auto checkpoint = [&](int64_t step) {
    if (job.save_every <= 0 || (step % job.save_every != 0 && step != job.train.steps)) return;
    save_checkpoint(step);
  };
  if (valid_stream) {
    evaluate = [&, &valid = *valid_stream] {
      // The same consecutive windows as one process reads, each rank its slice of them.
      valid.reset();
      data::RankSlicedSource slice(valid, rank, world);
      EvalMetrics e = evaluate_loss(
          model,
          [&](data::Batch& b) {
            b.B = job.train.batch_size;
            b.T = T;
            slice.next_batch(b);
            return true;
          },
          bounded_eval_batches(valid, job.train.batch_size * world, T, job.train.eval_batches));
      if (job.dp) {
        const model::LossSum total = job.dp->all_reduce_loss({e.loss * static_cast<double>(e.tokens), e.tokens});
        e = EvalMetrics{e.step, total.mean(), total.num_tokens};
      }
      return e;
    };
  }
  // A stop signal on any rank stops every rank after the same step.
  int stop_signal = 0;
  const auto stop_after = [&](int64_t step) {
    const int local = stop_signal_received();
    stop_signal = job.dp ? static_cast<int>(job.dp->max_over_ranks(local, "stop signal")) : local;
    // Local SGD: the ranks' weights meet every H steps only, and a checkpoint must fall on
    // a meeting: run on to the next one (the request stays set on the rank that got it).
    const int64_t H = job.train.local_sgd.sync_every;
    return stop_signal != 0 && (!job.dp || H <= 0 || step % H == 0);
  };
  // Alive to the end of the job: a second signal while the checkpoint or the model is being
  // written quits at once with its notice, as during a step.
  std::optional<StopSignals> stop_signals;
  // Under mpirun a stop signal from the launcher itself (its abort on Ctrl-C) means it reads
  // our output no more: base/stop_signal.hpp.
  if (job.stop_on_signal)
    stop_signals.emplace(comm::launched_under_mpi() ? ParentOutput::stops_reading_on_signal
                                                    : ParentOutput::keeps_reading);
  try {
    trainer.run(
        *train_source, evaluate,
        [&](const StepMetrics& m) {
          if (!have_first_loss && !m.skipped) {
            summary.first_loss = m.loss;
            have_first_loss = true;
          }
          if (!m.skipped) summary.final_loss = m.loss;
          summary.skipped_batches += m.skipped_batches;
          if (m.skipped_batches > 0)
            info(fmt::format("step {}: skipped {} batch{} with no target token (their examples' targets lie past "
                             "--seq-len {}): no optimizer step on {}",
                             m.step, m.skipped_batches, m.skipped_batches == 1 ? "" : "es", T,
                             m.skipped_batches == 1 ? "it" : "them"));
          summary.elapsed_s = m.elapsed_s;
          metrics += step_json(m).dump() + "\n";
          if (cb.on_step) cb.on_step(m);
        },
        [&](const EvalMetrics& e) {
          summary.final_valid_loss = e.loss;
          metrics += nlohmann::json{{"step", e.step}, {"valid_loss", finite_or_null(e.loss)}, {"valid_tokens", e.tokens}}
                         .dump() +
                     "\n";
          if (cb.on_eval) cb.on_eval(e);
        },
        checkpoint, job.stop_on_signal ? std::function<bool(int64_t)>(stop_after) : nullptr);
  } catch (const NonFiniteStep& e) {
    // Nothing of the step was applied; the checkpoints on disk are all from finite steps.
    metrics += step_json(e.metrics()).dump() + "\n";
    if (root) write_file_atomic(metrics_path, metrics);
    const std::string kept = !last_saved_dir.empty() ? "the last good checkpoint is " + last_saved_dir.string()
                             : job.resume_from.empty() ? std::string("no checkpoint was written")
                                                       : "the checkpoint it resumed from is kept";
    throw RunStopped("train",
                     fmt::format("{}; stopped without writing the model ({}); lower --lr, or pass --on-nonfinite skip "
                                 "to skip such steps",
                                 std::string_view(e.what()).substr(std::string_view("[train] ").size()), kept),
                     1, !root);
  }
  if (trainer.steps_done() < job.train.steps) {
    // Stopped by a signal: a checkpoint to resume from, then a non-zero exit.
    const int64_t step = trainer.steps_done();
    std::string where;
    if (last_saved_step == step) {
      where = "checkpoint " + last_saved_dir.string();
    } else if (foreign_checkpoints) {
      if (root) write_file_atomic(metrics_path, metrics);
      where = "no checkpoint written: " + checkpoints_dir.string() + " holds an earlier run's checkpoints";
    } else {
      save_checkpoint(step);
      where = "checkpoint " + last_saved_dir.string();
    }
    throw RunStopped("train",
                     fmt::format("stopped by {} after step {} of {}; {}; continue with the same command and --resume",
                                 stop_signal_name(stop_signal), step, job.train.steps, where),
                     128 + stop_signal, !root);
  }
  summary.steps = trainer.steps_done();
  if (test_examples) {
    // mlx_lm's --test: the test split once, in order, after the last step.
    data::SamplerConfig tc;
    tc.seq_len = T;
    tc.micro_batch = job.train.batch_size;
    tc.pack = job.pack;
    tc.shuffle = false;
    tc.repeat = false;
    tc.rank = rank;
    tc.world = world;
    tc.pad_id = std::max(0, tokenizer->pad_id());
    data::BatchSampler sampler(*test_examples, tc);
    EvalMetrics e = evaluate_loss(model, [&](data::Batch& b) { return sampler.next(b); }, job.test_batches);
    if (job.dp) {
      const model::LossSum total = job.dp->all_reduce_loss({e.loss * static_cast<double>(e.tokens), e.tokens});
      e = EvalMetrics{e.step, total.mean(), total.num_tokens};
    }
    summary.test_loss = e.loss;
    summary.test_tokens = e.tokens;
    info(fmt::format("test: loss {:.4f}, perplexity {:.3f} ({} target tokens)", e.loss, std::exp(e.loss), e.tokens));
  }
  summary.peak_rss_bytes = peak_rss_bytes();
  const auto write_trace = [&] {
    trace->write(trace_path_of_rank(job.trace_path, rank), rank);
    info(fmt::format("trace: {} ({} events; open in https://ui.perfetto.dev or chrome://tracing)",
                     job.trace_path.string(), trace->size()));
  };
  // Auxiliary outputs (trace, metrics, report) are written each on its own: one that cannot
  // be written is reported once everything else is, and never stands in the model's way.
  std::vector<std::string> unwritten;
  const auto auxiliary = [&](std::string_view what, const std::function<void()>& write) {
    try {
      write();
    } catch (const std::exception& e) {
      unwritten.push_back(fmt::format("{} ({})", what, e.what()));
    }
  };
  // The trace first, on every rank: it shows what happened, a divergence included.
  if (trace) auxiliary("trace", write_trace);
  check_weights_finite(summary.steps, "the model is");
  if (!root) {
    // A rank's trace is its only output: a failure is told, and never ends the job while
    // rank 0 writes the model.
    for (const std::string& u : unwritten) log::warn("rank {}: not written: {}", rank, u);
    return summary;
  }
  // The model next: what the run was for.
  if (adapters) {
    adapters->save_peft(job.out_dir, base_model_name(job));
  } else {
    model.save(job.out_dir);
    tokenizer->save(job.out_dir);
  }
  auxiliary("metrics", [&] { write_file_atomic(metrics_path, metrics); });
  auxiliary("report", [&] { write_report(job, config, metrics, trainer, summary, world); });
  if (!unwritten.empty()) {
    std::string list;
    for (const std::string& u : unwritten) list += (list.empty() ? "" : "; ") + u;
    throw Error("train", fmt::format("the {} was written to {}, but not: {}", adapters ? "adapters" : "model",
                                     job.out_dir.string(), list));
  }
  return summary;
}

std::filesystem::path trace_path_of_rank(const std::filesystem::path& trace, int rank) {
  if (rank == 0) return trace;
  std::filesystem::path path = trace;
  path.replace_filename(fmt::format("{}.rank{}{}", trace.stem().string(), rank, trace.extension().string()));
  return path;
}

namespace {
// report.json and loss.svg: the numbers and the loss curves of the whole run (resumed
// history included). Fills summary.gradient_bytes_per_step for the caller.
void write_report(const TrainJob& job, const nlohmann::json& config, const std::string& metrics,
                  const Trainer& trainer, TrainSummary& summary, int world) {
  LossCurves curves;
  size_t begin = 0;
  while (begin < metrics.size()) {
    size_t end = metrics.find('\n', begin);
    if (end == std::string::npos) end = metrics.size();
    const nlohmann::json j = nlohmann::json::parse(metrics.substr(begin, end - begin), nullptr, false);
    // null (a non-finite value, a skipped step) is no point on the curve.
    if (j.is_object() && j.contains("step") && j["step"].is_number()) {
      const auto step = j["step"].get<double>();
      if (j.contains("loss") && j["loss"].is_number()) curves.train.emplace_back(step, j["loss"].get<double>());
      if (j.contains("valid_loss") && j["valid_loss"].is_number())
        curves.valid.emplace_back(step, j["valid_loss"].get<double>());
    }
    begin = end + 1;
  }
  nlohmann::json report = {{"steps", summary.steps},
                           {"first_loss", summary.first_loss},
                           {"final_loss", summary.final_loss},
                           {"elapsed_s", summary.elapsed_s},
                           {"peak_rss_bytes", summary.peak_rss_bytes},
                           {"skipped_batches_without_targets", summary.skipped_batches},
                           {"ranks", world},
                           {"config", config}};
  report["fine_tune_type"] = job.fine_tune == FineTuneType::lora ? "lora" : "full";
  if (job.fine_tune == FineTuneType::lora) {
    std::vector<std::string> targets;
    for (const model::LoraTarget t : job.lora.targets) targets.emplace_back(model::lora_target_module(t));
    report["lora"] = {{"rank", job.lora.rank},       {"alpha", job.lora.alpha},
                      {"dropout", job.lora.dropout}, {"targets", targets},
                      {"num_layers", job.lora.num_layers < 0 ? nlohmann::json("all") : nlohmann::json(job.lora.num_layers)}};
  }
  if (!job.flotilla_version.empty()) report["flotilla_version"] = job.flotilla_version;
  if (!job.command_line.empty()) report["command_line"] = job.command_line;
  {
    const std::time_t now = std::time(nullptr);
    std::tm utc{};
    gmtime_r(&now, &utc);
    char date[32];
    std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", &utc);
    report["date"] = date;
  }
  if (job.dp) {
    // What this rank sent per optimizer step of this run: gradients (and ZeRO's weight
    // shards), or local SGD's weights.
    const comm::GradientCodec& codec = job.dp->codec();
    const parallel::GradientSync& sync = trainer.sync();
    const int64_t run_steps = summary.steps - std::max<int64_t>(0, summary.resumed_from_step);
    summary.gradient_bytes_per_step =
        run_steps > 0 ? static_cast<double>(sync.bytes_sent()) / static_cast<double>(run_steps) : 0.0;
    report["gradient_bytes_per_step"] = summary.gradient_bytes_per_step;
    report["gradient_sync"] = sync.name();
    if (job.train.zero_stage > 0) report["zero_stage"] = job.train.zero_stage;
    if (job.train.local_sgd.sync_every > 0) {
      report["local_sgd"] = {{"sync_every", job.train.local_sgd.sync_every},
                             {"outer_lr", job.train.local_sgd.outer_lr},
                             {"outer_momentum", job.train.local_sgd.outer_momentum},
                             {"meetings", sync.exchanges()}};
    } else {
      report["gradient_compression"] = comm::compression_name(codec.kind());
      if (const comm::OverlappedAllReduce* overlap = job.dp->overlap()) {
        report["fusion_buckets"] = overlap->buckets().size();
        report["exposed_gradient_wait_s"] = overlap->exposed_s();
      }
    }
  }
  if (summary.test_loss >= 0) {
    report["test_loss"] = summary.test_loss;
    report["test_perplexity"] = std::exp(summary.test_loss);
    report["test_tokens"] = summary.test_tokens;
  }
  if (summary.final_valid_loss >= 0) {
    report["final_valid_loss"] = summary.final_valid_loss;
    report["final_valid_perplexity"] = std::exp(summary.final_valid_loss);
  }
  write_run_report(job.out_dir, report, curves);
}
}  // namespace

}  // namespace flotilla::train
