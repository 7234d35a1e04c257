// Flags from a YAML file: `flotilla train -c run.yaml`. Each top-level key is a flag of the
// subcommand (or a global one such as threads) written with '_' for '-', as mlx_lm's
// configs are: `batch_size: 8` is `--batch-size 8`, `pack: false` is `--no-pack`.
// Flags given on the command line win over the file.
//
// CLI11 2.1 reads TOML/INI config files only for the main app, so this is not a
// CLI::Config formatter: the -c option's callback applies the file to the subcommand's
// options before CLI11 checks required and mutually exclusive options. Errors are
// InputErrors naming the file, the line and the key.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <CLI/CLI.hpp>

namespace flotilla::cli {

// One `key: value` of a config file.
struct ConfigEntry {
  std::string key;                  // as written, e.g. "batch_size"
  std::vector<std::string> values;  // a scalar gives one; a list one per item
  bool is_list = false;
  bool is_null = false;             // `key:` or `key: null`: the flag's default
  bool is_map = false;              // a nested mapping that is not one of mlx_lm's sections
  std::string section;              // mlx_lm's section it came from ("lr_schedule"), else empty
  int line = 0;                     // 1-based
};

// Reads a YAML mapping of keys to scalars or lists of scalars (an empty file is an empty
// mapping), with mlx_lm's lora_config.yaml keys translated (cli/mlx_lm_config.hpp).
// InputError "<file>:<line>: ..." for YAML syntax errors, a top level that is not a
// mapping, other nested mappings and repeated keys.
std::vector<ConfigEntry> read_yaml_config(const std::filesystem::path& file);

// Sets `cmd`'s options (and its parent's) from `file`, except options given on the command
// line, keys whose value is null (the flag keeps its default) and options that exclude one given there (`--model` on the command line overrides
// `preset:` in the file). Options that are not configurable (help, the config option
// itself) cannot be set. InputError naming the file for an unknown key (with the nearest
// known one), and "<file>:<line>" for a value of the wrong type or that fails the option's
// check.
void apply_yaml_config(CLI::App& cmd, const std::filesystem::path& file);

// The resolved options of `cmd` as a YAML file that apply_yaml_config reads back: every
// configurable option with a long name, in the order of `--help`; options without a value
// are commented out.
std::string options_as_yaml(const CLI::App& cmd);

// Levenshtein distance (insertions, deletions, substitutions), for "did you mean".
size_t edit_distance(std::string_view a, std::string_view b);

}  // namespace flotilla::cli
