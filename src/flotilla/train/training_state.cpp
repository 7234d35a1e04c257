#include "flotilla/train/training_state.hpp"

#include <algorithm>
#include <string>
#include <utility>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/parallel/row_balance.hpp"
#include "flotilla/train/sharded_checkpoint.hpp"

namespace flotilla::train {
namespace fs = std::filesystem;
namespace {

constexpr std::string_view kTrainingStateComponent = "train/training_state";
constexpr std::string_view kStateFormat = "flotilla-checkpoint";
constexpr int kFormatVersion = 1;

// A float as the shortest decimal that reads back as the same float (0.9f is 0.9, not
// 0.8999999761581421), so that config.json and trainer_state.json read as they were set.
double json_float(float f) { return std::stod(fmt::format("{}", f)); }

}  // namespace

nlohmann::json train_config_json(const TrainConfig& cfg) {
  return {{"batch_size", cfg.batch_size},
          {"seq_len", cfg.seq_len},
          {"grad_accum", cfg.grad_accum},
          {"steps", cfg.steps},
          {"lr", json_float(cfg.lr)},
          {"min_lr", json_float(cfg.min_lr)},
          {"warmup_steps", cfg.warmup_steps},
          {"grad_clip", json_float(cfg.grad_clip)},
          {"adamw",
           {{"beta1", json_float(cfg.adamw.beta1)},
            {"beta2", json_float(cfg.adamw.beta2)},
            {"eps", json_float(cfg.adamw.eps)},
            {"weight_decay", json_float(cfg.adamw.weight_decay)}}},
          {"eval_every", cfg.eval_every},
          {"eval_batches", cfg.eval_batches}};
}

nlohmann::json training_state_json(Trainer& trainer, const data::BatchSource& source, const RngStreams& rngs) {
  const int64_t step = trainer.steps_done();
  const TrainConfig& cfg = trainer.config();
  const CosineSchedule& schedule = trainer.schedule();
  nlohmann::json streams = nlohmann::json::object();
  for (const auto& [name, stream] : rngs) {
    const Rng::State st = stream->state();
    streams[name] = {st.s[0], st.s[1], st.s[2], st.s[3]};
  }
  // LoRA dropout masks are a hash of (seed, forward count): the count is its whole state.
  const nlohmann::json rng = {{"dropout_step", trainer.model().dropout_step()}, {"streams", streams}};
  nlohmann::json state = {{"format", std::string(kStateFormat)},
          {"version", kFormatVersion},
          {"step", step},
          {"elapsed_s", trainer.elapsed_s()},
          {"optimizer",
           {{"kind", "adamw"},
            {"step", trainer.optimizer().steps_taken()},
            {"beta1", json_float(cfg.adamw.beta1)},
            {"beta2", json_float(cfg.adamw.beta2)},
            {"eps", json_float(cfg.adamw.eps)},
            {"weight_decay", json_float(cfg.adamw.weight_decay)}}},
          {"schedule",
           {{"kind", "warmup_cosine"},
            {"peak_lr", json_float(schedule.peak_lr)},
            {"min_lr", json_float(schedule.min_lr)},
            {"warmup_steps", schedule.warmup_steps},
            {"total_steps", schedule.total_steps},
            {"position", step},
            {"next_lr", json_float(schedule.lr_at(step))}}},
          {"data", source.state()},
          {"rng", rng}};
  // --balance: the agreed shares in force for the next step and the smoothed speeds they
  // were cut from, so that a resumed run goes on with them (restore_balance).
  if (const parallel::RowBalancer* b = trainer.balancer())
    state["balance"] = {{"rank_rows", b->shares()}, {"rank_rows_per_s", b->speeds()}};
  return state;
}

namespace {

// Views of the trainable tensors and the whole moments (Trainer::whole_moments: under
// ZeRO buffers the trainer holds until restore_progress) in the unsharded layout.
CheckpointContents unsharded_views(Trainer& trainer) {
  CheckpointContents c;
  c.step = trainer.steps_done();
  // What the optimizer updates: every parameter in full training, the adapters in a LoRA
  // run. The moments share the table's offsets.
  const auto [m, v] = trainer.whole_moments();
  const model::Llama::Trainable trainable = trainer.model().trainable();
  const auto view = [](std::span<float> buffer, const model::ParamInfo& info) {
    return buffer.subspan(static_cast<size_t>(info.offset), static_cast<size_t>(info.numel));
  };
  if (m.size() != trainable.params.size())
    throw Error(kTrainingStateComponent, "the optimizer's state does not match the trainable parameters");
  for (const model::ParamInfo& info : trainable.table.params())
    c.weights.push_back({info.name, info.shape, view(trainable.params, info)});
  for (const model::ParamInfo& info : trainable.table.params())
    c.optimizer.push_back({"m." + info.name, info.shape, view(m, info)});
  for (const model::ParamInfo& info : trainable.table.params())
    c.optimizer.push_back({"v." + info.name, info.shape, view(v, info)});
  return c;
}

}  // namespace

CheckpointContents capture_training_state(Trainer& trainer, const data::BatchSource& source,
                                          nlohmann::json config, const RngStreams& rngs) {
  if (trainer.sync().sharded())
    throw Error(kTrainingStateComponent, "an unsharded checkpoint holds the whole moments, which a ZeRO rank does not: "
                            "save_sharded_checkpoint writes its shard");
  CheckpointContents c = unsharded_views(trainer);
  c.state = training_state_json(trainer, source, rngs);
  c.config = std::move(config);
  return c;
}

fs::path save_training_checkpoint(const fs::path& checkpoints_dir, Trainer& trainer, const data::BatchSource& source,
                                  nlohmann::json config, int keep, const RngStreams& rngs) {
  return write_checkpoint(checkpoints_dir, capture_training_state(trainer, source, std::move(config), rngs), keep);
}

namespace {

// The shares a --balance run saved, when this run balances too. Shares saved for another
// world (an elastic restart on other hosts) say nothing of these ranks' speeds: this run
// then starts from equal shares, and says so.
void restore_balance(const nlohmann::json& state, Trainer& trainer, const std::function<void(const std::string&)>& warn) {
  parallel::RowBalancer* balancer = trainer.balancer();
  if (!balancer || !state.contains("balance")) return;
  try {
    const nlohmann::json& saved = state.at("balance");
    balancer->restore(saved.at("rank_rows").get<std::vector<int64_t>>(),
                      saved.at("rank_rows_per_s").get<std::vector<double>>());
  } catch (const nlohmann::json::exception& e) {
    if (warn) warn("--balance: the checkpoint's shares are malformed (" + json_error_text(e) + "): equal shares until the first re-cut");
  } catch (const InputError& e) {
    if (warn) warn(std::string("--balance: ") + e.what() + ": equal shares until the first re-cut");
  }
}

}  // namespace

nlohmann::json restore_training_state(const fs::path& step_dir, Trainer& trainer, data::BatchSource& source,
                                      const RngStreams& rngs, const std::function<void(const std::string&)>& warn) {
  const fs::path state_path = step_dir / kCheckpointStateFile;
  // Check trainer_state.json before read_checkpoint overwrites the model.
  const nlohmann::json state = read_checkpoint_state(step_dir);
  const auto bad = [&](const std::string& what) { return InputError(kTrainingStateComponent, state_path.string() + ": " + what); };
  int64_t step = 0, optimizer_step = 0;
  double elapsed_s = 0.0;
  try {
    if (state.at("format").get<std::string>() != kStateFormat || state.at("version") != kFormatVersion)
      throw bad("not a flotilla trainer state of version " + std::to_string(kFormatVersion));
    step = state.at("step").get<int64_t>();
    elapsed_s = state.at("elapsed_s").get<double>();
    const nlohmann::json& opt = state.at("optimizer");
    if (opt.at("kind") != "adamw") throw bad("optimizer is " + opt.at("kind").dump() + ", this trainer's is adamw");
    optimizer_step = opt.at("step").get<int64_t>();
    if (state.at("schedule").at("position").get<int64_t>() != step)
      throw bad("the schedule position differs from the step");
    if (!state.at("rng").at("dropout_step").is_number_unsigned())
      throw bad("rng.dropout_step must be a non-negative integer");
    const nlohmann::json& saved_rngs = state.at("rng").at("streams");
    for (const auto& [name, stream] : rngs)
      if (!saved_rngs.contains(name)) throw bad("has no state for the random stream '" + name + "'");
    for (const auto& [name, words] : saved_rngs.items()) {
      if (!rngs.contains(name)) throw bad("holds the random stream '" + name + "', which this run does not use");
      if (!words.is_array() || words.size() != 4) throw bad("random stream '" + name + "' must be 4 words");
    }
    if (!state.contains("data")) throw bad("has no data source state");
  } catch (const nlohmann::json::exception& e) {
    throw bad("malformed: " + json_error_text(e));
  }
  if (step < 0 || optimizer_step < 0) throw bad("negative step");

  nlohmann::json config;
  if (is_sharded_checkpoint(step_dir)) {
    config = read_checkpoint_config(step_dir);
    read_sharded_tensors(step_dir, trainer);
  } else {
    // Written before sharded checkpoints (or by save_training_checkpoint): the whole
    // moments, of which restore_progress keeps this rank's shard under ZeRO.
    CheckpointContents c = unsharded_views(trainer);
    read_checkpoint(step_dir, c);
    config = std::move(c.config);
  }
  try {
    source.set_state(state.at("data"));
  } catch (const InputError& e) {
    throw InputError(kTrainingStateComponent, state_path.string() + ": data source: " + e.what());
  }
  trainer.model().set_dropout_step(state["rng"]["dropout_step"].get<uint64_t>());
  for (const auto& [name, stream] : rngs) {
    const nlohmann::json& words = state["rng"]["streams"][name];
    stream->set_state(Rng::State{{words[0].get<uint64_t>(), words[1].get<uint64_t>(), words[2].get<uint64_t>(),
                                  words[3].get<uint64_t>()}});
  }
  trainer.optimizer().set_steps_taken(optimizer_step);
  trainer.restore_progress(step, elapsed_s);
  restore_balance(state, trainer, warn);
  read_rank_state(step_dir, trainer, warn);
  return config;
}

std::vector<std::string> config_differences(const nlohmann::json& saved, const nlohmann::json& current) {
  const nlohmann::json a = saved.flatten(), b = current.flatten();
  std::map<std::string, std::pair<std::string, std::string>> diffs;
  const auto key = [](const std::string& pointer) {
    std::string k = pointer.substr(1);
    std::replace(k.begin(), k.end(), '/', '.');
    return k;
  };
  for (const auto& [p, v] : a.items())
    if (!b.contains(p) || b[p] != v) diffs[key(p)] = {v.dump(), b.contains(p) ? b[p].dump() : "(none)"};
  for (const auto& [p, v] : b.items())
    if (!a.contains(p)) diffs[key(p)] = {"(none)", v.dump()};
  std::vector<std::string> lines;
  for (const auto& [k, d] : diffs) lines.push_back(fmt::format("{}: {} -> {}", k, d.first, d.second));
  return lines;
}

}  // namespace flotilla::train
