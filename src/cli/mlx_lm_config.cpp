#include "cli/mlx_lm_config.hpp"

#include <algorithm>
#include <array>
#include <cstdio>
#include <string_view>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"

namespace flotilla::cli {
namespace {

constexpr std::string_view kMlxLmConfigComponent = "cli/config";

[[noreturn]] void fail(const std::string& where, int line, const std::string& what) {
  throw InputError(kMlxLmConfigComponent, fmt::format("{}:{}: {}", where, line, what));
}

ConfigEntry scalar_entry(const std::string& key, const std::string& value, int line) {
  ConfigEntry e;
  e.key = key;
  e.values = {value};
  e.line = line;
  return e;
}

std::string scalar(const YAML::Node& node, const std::string& name, const std::string& where) {
  if (!node.IsScalar()) fail(where, line_of(node), fmt::format("'{}' must be a single value", name));
  return node.Scalar();
}

// mlx_lm's layer keys for a Llama-family model and flotilla's target names.
constexpr std::array<std::pair<std::string_view, std::string_view>, 7> kLayerKeys = {{{"self_attn.q_proj", "q"},
                                                                                      {"self_attn.k_proj", "k"},
                                                                                      {"self_attn.v_proj", "v"},
                                                                                      {"self_attn.o_proj", "o"},
                                                                                      {"mlp.gate_proj", "gate"},
                                                                                      {"mlp.up_proj", "up"},
                                                                                      {"mlp.down_proj", "down"}}};

std::vector<ConfigEntry> lora_parameters(const YAML::Node& section, const std::string& where) {
  std::vector<ConfigEntry> out;
  const ConfigEntry* scale = nullptr;
  std::optional<ConfigEntry> alpha;
  for (auto it = section.begin(); it != section.end(); ++it) {
    const std::string key = it->first.as<std::string>();
    const YAML::Node value = it->second;
    const int line = line_of(it->first);
    const std::string name = "lora_parameters." + key;
    if (value.IsNull()) continue;  // null: flotilla's default
    if (key == "keys") {
      if (!value.IsSequence()) fail(where, line, name + " must be a list of layer keys (self_attn.q_proj, ...)");
      std::string targets;
      for (const YAML::Node& item : value) {
        const std::string k = scalar(item, name, where);
        const auto found = std::find_if(kLayerKeys.begin(), kLayerKeys.end(), [&](const auto& p) { return p.first == k; });
        if (found == kLayerKeys.end())
          fail(where, line_of(item),
               fmt::format("{}: '{}' is not a layer flotilla adapts (self_attn.q_proj, self_attn.k_proj, "
                           "self_attn.v_proj, self_attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)",
                           name, k));
        targets += (targets.empty() ? "" : ",") + std::string(found->second);
      }
      if (targets.empty()) fail(where, line, name + " is empty: no layer to adapt");
      out.push_back(scalar_entry("lora_targets", targets, line));
    } else if (key == "rank") {
      out.push_back(scalar_entry("lora_rank", scalar(value, name, where), line));
    } else if (key == "scale") {
      // mlx_lm adds scale * (x A) B; flotilla's --lora-scale sets alpha = scale * rank.
      out.push_back(scalar_entry("lora_scale", scalar(value, name, where), line));
      scale = &out.back();
    } else if (key == "alpha") {
      // mlx_lm's LoRA layers use `scale` and ignore `alpha` (DoRA's too); taken only alone.
      alpha = scalar_entry("lora_alpha", scalar(value, name, where), line);
    } else if (key == "dropout") {
      out.push_back(scalar_entry("lora_dropout", scalar(value, name, where), line));
    } else {
      fail(where, line, fmt::format("unknown key '{}' (lora_parameters takes keys, rank, scale, dropout)", name));
    }
  }
  if (alpha && !scale) out.push_back(*alpha);
  return out;
}

std::vector<ConfigEntry> lr_schedule(const YAML::Node& section, int section_line, const std::string& where) {
  std::vector<ConfigEntry> out;
  bool have_name = false, have_warmup = false;
  for (auto it = section.begin(); it != section.end(); ++it) {
    const std::string key = it->first.as<std::string>();
    const YAML::Node value = it->second;
    const int line = line_of(it->first);
    const std::string name = "lr_schedule." + key;
    if (value.IsNull()) continue;
    if (key == "name") {
      const std::string schedule = scalar(value, name, where);
      if (schedule != "cosine_decay")
        fail(where, line, fmt::format("{} '{}': flotilla's schedule is cosine_decay (after a linear warm-up)", name,
                                      schedule));
      have_name = true;
    } else if (key == "warmup") {
      out.push_back(scalar_entry("warmup", scalar(value, name, where), line));
      have_warmup = true;
    } else if (key == "warmup_init") {
      // flotilla's warm-up rises from 0 (its first step takes lr / warmup); mlx_lm's from
      // warmup_init. Only that start point differs, so it is said rather than refused.
      const std::string init = scalar(value, name, where);
      if (std::strtod(init.c_str(), nullptr) != 0.0)
        std::fprintf(stderr, "flotilla: note: %s:%d: %s %s: flotilla's warm-up starts from 0\n", where.c_str(), line,
                     name.c_str(), init.c_str());
    } else if (key == "arguments") {
      // cosine_decay(init, decay_steps, end): the peak, the decay's length, the floor.
      if (!value.IsSequence() || value.size() < 1 || value.size() > 3)
        fail(where, line, name + " must be [peak_lr, decay_steps, end_lr] (cosine_decay's arguments)");
      out.push_back(scalar_entry("lr", scalar(value[0], name, where), line_of(value[0])));
      if (value.size() == 3) out.push_back(scalar_entry("min_lr", scalar(value[2], name, where), line_of(value[2])));
      else out.push_back(scalar_entry("min_lr", "0", line));  // cosine_decay's end defaults to 0
      // decay_steps: flotilla's cosine ends at the run's last step (--steps / iters).
    } else {
      fail(where, line, fmt::format("unknown key '{}' (lr_schedule takes name, warmup, warmup_init, arguments)", name));
    }
  }
  if (!have_name) fail(where, section_line, "lr_schedule has no name (cosine_decay)");
  if (!have_warmup) out.push_back(scalar_entry("warmup", "0", section_line));  // mlx_lm: no warm-up unless asked
  return out;
}

}  // namespace

std::optional<std::vector<ConfigEntry>> expand_mlx_lm_section(const std::string& key, const YAML::Node& value,
                                                              const std::string& where) {
  if (key != "lora_parameters" && key != "lr_schedule") return std::nullopt;
  for (auto it = value.begin(); it != value.end(); ++it)
    if (!it->first.IsScalar()) fail(where, line_of(it->first), fmt::format("{}: keys must be names", key));
  return key == "lora_parameters" ? lora_parameters(value, where) : lr_schedule(value, line_of(value), where);
}

void translate_mlx_lm_keys(std::vector<ConfigEntry>& entries, const std::string& where) {
  const auto has = [&](std::string_view key) {
    return std::any_of(entries.begin(), entries.end(), [&](const ConfigEntry& e) { return e.key == key; });
  };
  std::vector<ConfigEntry> out;
  for (ConfigEntry& e : entries) {
    const std::string value = e.values.empty() || e.is_list ? "" : e.values[0];
    if (e.key == "train") {
      // mlx_lm's switch between training and testing; flotilla train always trains.
      if (!e.is_null && value != "true" && value != "yes" && value != "on")
        fail(where, e.line, "train: false: `flotilla train` trains; evaluate alone with `flotilla eval`");
    } else if (e.key == "training_mode") {
      if (!e.is_null && value != "normal")
        fail(where, e.line, fmt::format("training_mode '{}': flotilla trains on next-token loss (normal) only", value));
    } else if (e.key == "optimizer") {
      if (e.is_null || value == "adamw") continue;
      if (value != "adam") fail(where, e.line, fmt::format("optimizer '{}': flotilla's optimizer is adamw (or adam)", value));
      // Adam is AdamW without weight decay.
      if (!has("weight_decay")) out.push_back(scalar_entry("weight_decay", "0", e.line));
    } else if (e.key == "optimizer_config") {
      if (!e.is_null)
        fail(where, e.line, "optimizer_config: give weight_decay, beta1 and beta2 as keys of their own");
    } else if (e.key == "wandb" || e.key == "report_to" || e.key == "project_name") {
      if (!e.is_null && !value.empty())
        fail(where, e.line, fmt::format("{}: flotilla does not report to Weights & Biases (metrics.jsonl and "
                                        "report.json hold the run's metrics)", e.key));
    } else if (e.key == "hf_dataset") {
      fail(where, e.line, "hf_dataset: flotilla does not download datasets; give a data folder (data: DIR)");
    } else {
      out.push_back(std::move(e));
    }
  }
  entries = std::move(out);
}

}  // namespace flotilla::cli
