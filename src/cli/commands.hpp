// flotilla's subcommands. Each add_*_command registers its flags on the app and a
// callback that calls the library; errors propagate as flotilla::Error to main().
#pragma once

#include <CLI/CLI.hpp>

#include <filesystem>
#include <functional>
#include <string>

namespace flotilla::cli {

void add_init_command(CLI::App& app);
void add_train_command(CLI::App& app);
void add_generate_command(CLI::App& app);
void add_score_command(CLI::App& app);
void add_grads_command(CLI::App& app);
void add_fuse_command(CLI::App& app);
void add_eval_command(CLI::App& app);
void add_doctor_command(CLI::App& app);
void add_data_command(CLI::App& app);
void add_bench_command(CLI::App& app);
void add_plan_command(CLI::App& app);
void add_convert_command(CLI::App& app);

// Refuses to write into a non-empty directory unless `force`: a user's earlier model or
// run is never overwritten by accident. ensure_output_dir then creates it; check_output_dir
// only checks, for a command that creates the folder itself once its inputs have loaded.
void ensure_output_dir(const std::string& dir, bool force);
void check_output_dir(const std::string& dir, bool force);

// Same refusal, then `fill(stage)` writes the files into a staging directory that is moved
// into place only when fill returns: a failure leaves `dir` as it was (staged_output.cpp).
void write_output_dir(const std::string& dir, bool force, const std::function<void(const std::filesystem::path&)>& fill);

// Copies the tokenizer files of a model directory (tokenizer.json, tokenizer.model,
// tokenizer_config.json, ...) that exist into `out` (cmd_convert.cpp).
void copy_tokenizer_files(const std::filesystem::path& model_dir, const std::filesystem::path& out);

}  // namespace flotilla::cli
