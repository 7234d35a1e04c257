#include "cli/yaml_config.hpp"

#include <algorithm>
#include <cctype>
#include <map>
#include <set>

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include "cli/mlx_lm_config.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"

namespace flotilla::cli {
namespace {

constexpr std::string_view kYamlConfigComponent = "cli/config";

std::string to_dashes(std::string key) {
  std::replace(key.begin(), key.end(), '_', '-');
  return key;
}
std::string to_underscores(std::string key) {
  std::replace(key.begin(), key.end(), '-', '_');
  return key;
}

// The option `--key` of `cmd`, else of its parent (global flags such as --threads).
CLI::Option* find_option(CLI::App& cmd, const std::string& key) {
  const std::string name = "--" + to_dashes(key);
  if (CLI::Option* op = cmd.get_option_no_throw(name)) return op;
  if (CLI::App* parent = cmd.get_parent()) return parent->get_option_no_throw(name);
  return nullptr;
}

std::vector<std::string> configurable_keys(const CLI::App& cmd) {
  std::vector<std::string> keys;
  const auto add = [&](const CLI::App& app) {
    for (const CLI::Option* op : app.get_options())
      if (op->get_configurable())
        for (const std::string& name : op->get_lnames()) keys.push_back(to_underscores(name));
  };
  add(cmd);
  if (const CLI::App* parent = cmd.get_parent()) add(*parent);
  return keys;
}

// A flag takes no value (expected(0)); `--resume [DIR]` (expected(0, 1)) is not one.
bool is_flag(const CLI::Option& op) { return op.get_expected_max() == 0; }

// YAML 1.1's booleans (what `pack: yes` means to most YAML readers).
bool parse_bool(std::string s, bool& out) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  if (s == "true" || s == "yes" || s == "on" || s == "y") return out = true, true;
  if (s == "false" || s == "no" || s == "off" || s == "n") return out = false, true;
  return false;
}

std::string expected_type(const CLI::Option& op) {
  std::string type = op.get_type_name();
  if (const size_t colon = type.find(':'); colon != std::string::npos) type.resize(colon);  // "TEXT:FILE"
  if (type == "INT") return "an integer";
  if (type == "UINT") return "a non-negative integer";
  if (type == "FLOAT") return "a number";
  if (type == "BOOLEAN") return "true or false";
  if (type == "TEXT") return "text";
  return "a value of type " + type;
}

std::string quoted_values(const std::vector<std::string>& values) {
  std::string s;
  for (const std::string& v : values) s += (s.empty() ? "'" : ", '") + v + "'";
  return s;
}

std::string yaml_scalar(const std::string& value) {
  YAML::Emitter out;
  out << value;
  return out.c_str();
}

}  // namespace

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];  // row[i-1][j-1]
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::vector<ConfigEntry> read_yaml_config(const std::filesystem::path& file) {
  const std::string where = file.string();
  YAML::Node root;
  try {
    root = YAML::Load(read_text_file(file));
  } catch (const YAML::Exception& e) {
    throw InputError(kYamlConfigComponent, fmt::format("{}:{}:{}: {}", where, e.mark.line + 1, e.mark.column + 1, e.msg));
  }
  std::vector<ConfigEntry> entries;
  if (root.IsNull()) return entries;  // an empty file
  if (!root.IsMap())
    throw InputError(kYamlConfigComponent,
                     fmt::format("{}:{}: expected a mapping of flag names to values (batch_size: 8)", where,
                                 line_of(root)));
  std::map<std::string, int> seen;  // key -> line
  for (auto it = root.begin(); it != root.end(); ++it) {
    const YAML::Node key = it->first;  // by value: `it->` is a temporary proxy
    const YAML::Node value = it->second;
    if (!key.IsScalar())
      throw InputError(kYamlConfigComponent, fmt::format("{}:{}: keys must be flag names", where, line_of(key)));
    ConfigEntry e;
    e.key = key.Scalar();
    e.line = line_of(key);
    if (const auto [at, fresh] = seen.emplace(e.key, e.line); !fresh)
      throw InputError(kYamlConfigComponent,
                       fmt::format("{}:{}: '{}' repeats the key of line {}", where, e.line, e.key, at->second));
    if (value.IsNull()) {
      e.is_null = true;
    } else if (value.IsScalar()) {
      e.values.push_back(value.Scalar());
    } else if (value.IsSequence()) {
      e.is_list = true;
      for (const YAML::Node& item : value) {
        if (!item.IsScalar())
          throw InputError(kYamlConfigComponent, fmt::format("{}:{}: '{}': list items must be single values", where,
                                                   line_of(item), e.key));
        e.values.push_back(item.Scalar());
      }
    } else if (auto section = expand_mlx_lm_section(e.key, value, where)) {
      for (ConfigEntry& s : *section) s.section = e.key;
      entries.insert(entries.end(), section->begin(), section->end());
      continue;
    } else {
      e.is_map = true;
    }
    entries.push_back(std::move(e));
  }
  // mlx_lm ignores learning_rate when an lr_schedule gives the peak.
  if (std::any_of(entries.begin(), entries.end(), [](const ConfigEntry& e) { return e.section == "lr_schedule" && e.key == "lr"; }))
    std::erase_if(entries, [](const ConfigEntry& e) { return e.section.empty() && (e.key == "learning_rate" || e.key == "lr"); });
  translate_mlx_lm_keys(entries, where);
  for (const ConfigEntry& e : entries)
    if (e.is_map)
      throw InputError(kYamlConfigComponent, fmt::format("{}:{}: '{}' must be a single value, not a mapping", where, e.line, e.key));
  return entries;
}

void apply_yaml_config(CLI::App& cmd, const std::filesystem::path& file) {
  const std::vector<ConfigEntry> entries = read_yaml_config(file);
  const std::string where = file.string();
  // What the command line set, before the file adds anything.
  std::set<const CLI::Option*> from_command_line;
  const auto snapshot = [&](const CLI::App& app) {
    for (const CLI::Option* op : app.get_options())
      if (op->count() > 0) from_command_line.insert(op);
  };
  snapshot(cmd);
  if (const CLI::App* parent = cmd.get_parent()) snapshot(*parent);

  std::map<const CLI::Option*, const ConfigEntry*> from_file;
  for (const ConfigEntry& e : entries) {
    CLI::Option* op = find_option(cmd, e.key);
    if (op && !op->get_configurable())
      throw InputError(kYamlConfigComponent,
                       fmt::format("{}:{}: '{}' cannot be set in a config file", where, e.line, e.key));
    if (!op) {
      std::string best;
      size_t best_distance = std::string::npos;
      for (const std::string& k : configurable_keys(cmd)) {
        const size_t d = edit_distance(to_underscores(e.key), k);
        if (d < best_distance) best_distance = d, best = k;
      }
      const bool close = best_distance <= std::max<size_t>(2, e.key.size() / 3);
      throw InputError(kYamlConfigComponent, fmt::format("{}: unknown key '{}'{}", where, e.key,
                                               close ? fmt::format(" (did you mean '{}'?)", best) : ""));
    }
    if (const auto it = from_file.find(op); it != from_file.end())
      throw InputError(kYamlConfigComponent, fmt::format("{}:{}: '{}' sets the same flag as '{}' on line {}", where, e.line,
                                               e.key, it->second->key, it->second->line));
    from_file[op] = &e;
    if (from_command_line.contains(op)) continue;
    const std::set<CLI::Option*> excluded = op->get_excludes();
    if (std::any_of(excluded.begin(), excluded.end(), [&](CLI::Option* x) { return from_command_line.contains(x); }))
      continue;  // e.g. --model on the command line replaces `preset:` in the file
    for (CLI::Option* x : excluded)
      if (const auto it = from_file.find(x); it != from_file.end())
        throw InputError(kYamlConfigComponent, fmt::format("{}:{}: '{}' and '{}' (line {}) exclude each other", where, e.line,
                                                 e.key, it->second->key, it->second->line));
    if (e.is_null) continue;  // `resume_adapter_file: null`: the flag keeps its default

    if (is_flag(*op)) {
      bool on = false;
      if (e.is_list || !parse_bool(e.values[0], on))
        throw InputError(kYamlConfigComponent, fmt::format("{}:{}: '{}' expects true or false, got {}", where, e.line, e.key,
                                                 e.is_list ? "a list" : "'" + e.values[0] + "'"));
      op->add_result(op->get_flag_value(to_dashes(e.key), on ? "true" : "false"));
    } else {
      if (e.is_list && op->get_items_expected_max() <= 1)
        throw InputError(kYamlConfigComponent,
                         fmt::format("{}:{}: '{}' takes one value, not a list", where, e.line, e.key));
      op->add_result(e.values);
    }
    try {
      op->run_callback();
    } catch (const CLI::ConversionError&) {
      throw InputError(kYamlConfigComponent, fmt::format("{}:{}: '{}' expects {}, got {}", where, e.line, e.key,
                                               expected_type(*op), quoted_values(e.values)));
    } catch (const CLI::ParseError& x) {  // a validator: a missing file, a value out of range
      throw InputError(kYamlConfigComponent, fmt::format("{}:{}: '{}': {}", where, e.line, e.key, x.what()));
    }
  }
}

std::string options_as_yaml(const CLI::App& cmd) {
  std::string out = fmt::format("# flotilla {}: resolved flags (read back with -c)\n", cmd.get_name());
  for (const CLI::Option* op : cmd.get_options()) {
    if (!op->get_configurable() || op->get_lnames().empty()) continue;
    const std::string key = to_underscores(op->get_lnames().front());
    std::vector<std::string> values = op->results();
    // A default is not printed beside the option that replaces it (--lora-scale, --lora-alpha).
    const std::set<CLI::Option*> excluded = op->get_excludes();
    const bool replaced = std::any_of(excluded.begin(), excluded.end(), [](CLI::Option* x) { return x->count() > 0; });
    if (values.empty() && !op->get_default_str().empty() && !replaced) values = {op->get_default_str()};
    if (values.empty()) {
      out += fmt::format("# {}:\n", key);
    } else if (is_flag(*op)) {
      bool on = false;
      parse_bool(values.back(), on);
      out += fmt::format("{}: {}\n", key, on ? "true" : "false");
    } else if (values.size() == 1 || op->get_items_expected_max() <= 1) {
      out += fmt::format("{}: {}\n", key, yaml_scalar(values.back()));
    } else {
      out += key + ":\n";
      for (const std::string& v : values) out += "  - " + yaml_scalar(v) + "\n";
    }
  }
  return out;
}

}  // namespace flotilla::cli
