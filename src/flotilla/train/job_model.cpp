#include "flotilla/train/job_model.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"
#include "flotilla/model/matmul_dtype.hpp"
#include "flotilla/model/tensor_parallel.hpp"
#include "flotilla/model/tensor_parallel_io.hpp"
#include "flotilla/parallel/tensor_parallel.hpp"
#include "flotilla/parallel/zero3.hpp"
#include "flotilla/text/byte_tokenizer.hpp"

namespace flotilla::train {
namespace {

std::string targets_list(const std::vector<model::LoraTarget>& targets) {
  std::string s;
  for (model::LoraTarget t : targets) {
    if (!s.empty()) s += ',';
    s += model::lora_target_module(t);
  }
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

// The config of a new model (--preset or --config), speaking its tokenizer's special ids.
}  // namespace

std::unique_ptr<text::Tokenizer> make_tokenizer(const TrainJob& job) {
  if (!job.model_dir.empty()) return text::Tokenizer::load_for_model(job.model_dir);
  return std::make_unique<text::ByteTokenizer>();
}

model::ModelConfig job_model_config(const TrainJob& job, const text::Tokenizer& tokenizer) {
  const int sources = !job.model_dir.empty() + !job.preset.empty() + !job.config_json.empty();
  if (sources != 1) throw InputError("train", "give exactly one of --model, --preset or --config");
  if (!job.model_dir.empty()) {
    if (!std::filesystem::is_directory(job.model_dir))
      throw InputError("model", job.model_dir.string() + ": not a model directory");
    return model::ModelConfig::load(job.model_dir / "config.json");
  }
  model::ModelConfig cfg =
      job.preset.empty() ? model::ModelConfig::load(job.config_json) : model::preset_config(job.preset);
  // A new model speaks its tokenizer's special ids; config.json records them for HF.
  if (cfg.bos_token_id < 0) cfg.bos_token_id = tokenizer.bos_id();
  if (cfg.eos_token_id < 0) cfg.eos_token_id = tokenizer.eos_id();
  return cfg;
}

std::vector<model::ElementRange> build_ranges(const TrainJob& job, const text::Tokenizer& tokenizer) {
  // Stage 3's refusals (pipelines, bf16) come before any model is built (check_job_flags).
  // A new model draws only these ranges, a model directory reads only them (Llama::load);
  // with LoRA they are the frozen base's shard (the adapters are made whole after).
  if (job.train.zero_stage != 3 || !job.dp || job.dp->world() < 2 || job.pp) return {};
  model::ModelConfig cfg = job_model_config(job, tokenizer);
  // A 4-bit base: its float tensors (norms, biases) are few and loaded whole; its packed
  // matrices stay unread in the mapped files until the sync copies out this rank's chunks
  // of them (Llama::own_quantized, parallel/zero3.cpp).
  if (cfg.quantization) return {};
  // ZeRO-3 x tp: the shard of this tp rank's local model, cut over its dp group.
  if (job.tp) cfg = model::tensor_parallel_config(cfg, {job.tp->tp_rank(), job.tp->tp_size()});
  return parallel::zero3_owned_ranges(cfg, model::ParamLayout(cfg), job.dp->world(), job.dp->rank());
}

model::Llama::HeldPart held_part(const TrainJob& job, const model::ModelConfig& cfg,
                                 std::optional<model::Llama::LayerRange> stage) {
  model::Llama::HeldPart held{.layers = stage, .experts = std::nullopt};
  if (!job.experts || job.experts->ep_size() < 2 || !cfg.is_moe()) return held;
  const int ep = job.experts->ep_size();
  const int64_t E = cfg.moe.num_experts;
  if (E % ep != 0) return held;  // refused by Llama::set_expert_exchange, naming both
  // ZeRO and compression reduce (and ZeRO gathers) the whole arena over the data group.
  const bool whole_arena = job.fine_tune == FineTuneType::full &&
                           (job.train.zero_stage > 0 || job.compression.kind != comm::Compression::none);
  // tp x ep and pp x ep: each rank holds every expert (its tp slice) and runs its block's;
  // the tp and pipeline checkpoints, syncs and gathers know whole (stage) arenas only.
  if (whole_arena || job.tp || job.pp) return held;
  const int64_t El = E / ep;
  held.experts = model::Llama::ExpertRange{job.experts->ep_rank() * El, (job.experts->ep_rank() + 1) * El};
  return held;
}

model::Llama make_model(const TrainJob& job, const text::Tokenizer& tokenizer, const model::Llama::HeldPart& held,
                        std::span<const model::ElementRange> shard) {
  if (job.tp) {
    // A tp rank's local model: its slices of the full model's weights (model/tensor_parallel.hpp),
    // read one tensor at a time from a model directory or drawn from the one-rank stream.
    // pp x tp: only the stage's tensors are read or drawn; ZeRO-3 x tp: only the shard.
    const int tp = job.tp->tp_size(), rank = job.tp->tp_rank();
    if (!job.model_dir.empty())
      return model::load_tensor_parallel(job.model_dir, job.non_finite, tp, rank, held.layers, shard);
    const model::ModelConfig full = job_model_config(job, tokenizer);
    model::Llama local(model::tensor_parallel_config(full, {rank, tp}));
    if (held.layers) local.hold_only(*held.layers);
    model::init_random_slices(local, full, {rank, tp}, job.seed, shard);
    return local;
  }
  if (!job.model_dir.empty()) return model::Llama::load(job.model_dir, job.non_finite, held, shard);
  model::Llama model(job_model_config(job, tokenizer));
  if (held.layers || held.experts) model.hold_only(held);
  if (shard.empty())
    model.init_random(job.seed);
  else
    model.init_random(job.seed, shard);
  return model;
}

std::unique_ptr<model::LoraAdapters> attach_lora(const TrainJob& job, model::Llama& model, const model::ModelConfig& whole,
                                                 const InfoSink& info) {
  const model::ModelConfig& cfg = model.config();
  // LoRA: adapters over the frozen base; the optimizer and checkpoints see only them.
  if (job.fine_tune == FineTuneType::lora) {
    std::unique_ptr<model::LoraAdapters> adapters;
    // A tp rank's adapters are its slices of the whole ones (model/tensor_parallel.hpp): a
    // column-parallel layer's B by output rows, a row-parallel one's (o, down) A by input
    // columns (its bound and random stream, or its saved values, the whole A's).
    const auto take_tp_slices = [&](const model::LoraAdapters& full) {
      auto local = std::make_unique<model::LoraAdapters>(cfg, full.config());
      const model::TpRank at{job.tp->tp_rank(), job.tp->tp_size()};
      for (const model::ParamInfo& info : full.table().params())
        model::copy_slice_out(info, *local->table().find(info.name), at, full.params(), local->params());
      return local;
    };
    if (!job.resume_adapter.empty()) {
      // Read whole (a PEFT or mlx_lm file of the one-rank shapes), then sliced under tp.
      model::LoraAdapters loaded = model::LoraAdapters::load(job.resume_adapter, whole, job.non_finite);
      check_resumed_adapter(job, loaded.config(), cfg.n_layers);
      adapters = job.tp ? take_tp_slices(loaded) : std::make_unique<model::LoraAdapters>(std::move(loaded));
      info(fmt::format("LoRA: continuing from {}", job.resume_adapter.string()));
    } else if (job.tp) {
      model::LoraAdapters full(whole, job.lora);
      full.init_random(job.seed);
      adapters = take_tp_slices(full);
    } else {
      adapters = std::make_unique<model::LoraAdapters>(cfg, job.lora);
      adapters->init_random(job.seed);
    }
    model.attach_lora(adapters.get());
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
    return adapters;
  }
  if (!job.resume_adapter.empty()) throw InputError("train", "--resume-adapter-file needs --fine-tune-type lora");
  if (model.quantized()) {
    throw InputError("train", fmt::format("{}: a quantized model cannot be fully fine-tuned: de-quantize first (flotilla "
                                          "fuse --de-quantize, or flotilla convert without --quantize), or pass "
                                          "--fine-tune-type lora",
                                          job.model_dir.string()));
  }
  return nullptr;
}

void check_trainable_finite(const TrainJob& job, model::Llama& model, std::span<const model::ElementRange> shard) {
  const model::Llama::Trainable trainable = model.trainable();
  for (const model::ParamInfo& p : trainable.table.params()) {
    if (!model.base_frozen() && !model.holds(p)) continue;  // another pipeline stage's or expert rank's
    // The tensor's floats this rank holds: all, or those inside its shard.
    std::vector<model::ElementRange> parts;
    if (shard.empty()) parts.push_back({p.offset, p.offset + p.numel});
    for (const model::ElementRange& r : shard) {
      const int64_t b = std::max(r.begin, p.offset), e = std::min(r.end, p.offset + p.numel);
      if (b < e) parts.push_back({b, e});
    }
    for (const model::ElementRange& part : parts) {
      const auto values = trainable.params.subspan(static_cast<size_t>(part.begin), static_cast<size_t>(part.size()));
      const auto bad = std::find_if(values.begin(), values.end(), [](float v) { return !std::isfinite(v); });
      if (bad != values.end())
        throw InputError("train", fmt::format("{}: tensor {} holds {} at element {}: training from non-finite "
                                              "weights can only diverge",
                                              job.model_dir.empty() ? std::string("the initial weights")
                                                                    : job.model_dir.string(),
                                              p.name, *bad, part.begin - p.offset + (bad - values.begin())));
    }
  }
}

void plan_activations(const TrainJob& job, model::Llama& model, const InfoSink& info) {
  const model::ModelConfig& cfg = model.config();
  const int64_t B = job.train.batch_size, T = job.train.seq_len;
  model.set_grad_checkpoint(job.grad_checkpoint);
  model.set_expert_capacity(job.expert_capacity);
  model.set_matmul_input(model::resolve_matmul_dtype(job.dtype));
  model.check_activation_memory(B, T);  // before the data loads, not at the first step
  info(fmt::format("model: {} with {:.2f}M parameters; activations for B={} T={}: {:.1f} MiB{}; matrix products "
                   "in {}",
                   model::architecture_name(cfg.arch), static_cast<double>(cfg.num_params()) / 1e6, B, T,
                   static_cast<double>(model.activation_bytes(B, T)) / (1 << 20),
                   job.grad_checkpoint ? " (gradient checkpointing)" : "",
                   model.matmul_input() == kernels::GemmInput::bf16 ? "bf16 (float32 accumulation)" : "float32"));
}

std::string base_model_name(const TrainJob& job) {
  if (job.model_dir.empty()) return job.preset.empty() ? "flotilla" : "flotilla preset " + job.preset;
  return std::filesystem::absolute(job.model_dir).lexically_normal().string();
}

}  // namespace flotilla::train
