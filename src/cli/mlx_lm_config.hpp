// mlx_lm's lora_config.yaml read by `flotilla train -c`, unchanged: most of its keys are
// flotilla's flags or their aliases (iters, learning_rate, adapter_path, max_seq_length, ...);
// this file handles the rest.
//
//   lora_parameters: {keys, rank, scale, dropout}  -> lora_targets, lora_rank, lora_scale
//                                                     (alpha = scale * rank), lora_dropout
//   lr_schedule: {name: cosine_decay, warmup, warmup_init, arguments: [peak, steps, end]}
//                                                  -> lr, warmup, min_lr
//   train: true, training_mode: normal, optimizer: adam|adamw
//                                                  -> what flotilla train does (adam: no
//                                                     weight decay)
//
// A value flotilla cannot honour (train: false, a DoRA or DPO run, another schedule) is an
// InputError naming the file, the line and the key, never a silent default.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "cli/yaml_config.hpp"

namespace flotilla::cli {

// The 1-based line of `node` in its YAML file, for error lines (both config readers).
inline int line_of(const YAML::Node& node) { return node.Mark().line + 1; }

// The flat entries of mlx_lm's nested section `key` (lora_parameters, lr_schedule), or
// nullopt when `key` is not one of them. Null values in the section are left out.
std::optional<std::vector<ConfigEntry>> expand_mlx_lm_section(const std::string& key, const YAML::Node& value,
                                                              const std::string& where);

// Removes or rewrites mlx_lm's top-level keys that are not flotilla flags (train,
// training_mode, optimizer, wandb, hf_dataset, optimizer_config).
void translate_mlx_lm_keys(std::vector<ConfigEntry>& entries, const std::string& where);

}  // namespace flotilla::cli
