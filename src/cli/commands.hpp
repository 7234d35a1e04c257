// flotilla's subcommands. Each add_*_command registers its flags on the app and a
// callback that calls the library; errors propagate as flotilla::Error to main().
#pragma once

#include <CLI/CLI.hpp>

#include "flotilla/io/non_finite.hpp"
#include "flotilla/model/matmul_dtype.hpp"

#include <filesystem>
#include <functional>
#include <initializer_list>
#include <string>
#include <string_view>

namespace flotilla::cli {

inline constexpr const char* kFlotillaVersion = "0.1.0";

void add_init_command(CLI::App& app);
void add_train_command(CLI::App& app);
void add_generate_command(CLI::App& app);
void add_chat_command(CLI::App& app);
void add_score_command(CLI::App& app);
void add_grads_command(CLI::App& app);
void add_fuse_command(CLI::App& app);
void add_eval_command(CLI::App& app);
void add_doctor_command(CLI::App& app);
void add_data_command(CLI::App& app);
void add_bench_command(CLI::App& app);
void add_plan_command(CLI::App& app);
void add_convert_command(CLI::App& app);
void add_launch_command(CLI::App& app);

// Refuses to write into a non-empty directory unless `force`: a user's earlier model or
// run is never overwritten by accident. ensure_output_dir then creates it; check_output_dir
// only checks, for a command that creates the folder itself once its inputs have loaded.
// Both also refuse a folder that cannot be written (tried with a probe file).
void ensure_output_dir(const std::string& dir, bool force);
void check_output_dir(const std::string& dir, bool force);

// An output file (grads --out, train --trace): refused when it is a directory or another
// non-file, when it exists and `force` is not given, or when its folder is missing or
// cannot be written. `flag` names it in the message.
void check_output_file(std::string_view flag, const std::filesystem::path& file, bool force);

// An input a command reads, named by its flag ("--data"), for check_output_not_input.
struct CommandInput {
  std::string_view flag;
  std::filesystem::path path;  // empty: not given, skipped
};
// Refuses an output path that is, contains or sits inside one of the command's own inputs:
// writing there (--force most of all) would replace or delete what the command reads.
// Symbolic links and ".." are resolved before comparing.
void check_output_not_input(std::string_view out_flag, const std::filesystem::path& out,
                            std::initializer_list<CommandInput> inputs);

// Same refusal, then `fill(stage)` writes the files into a staging directory that is moved
// into place only when fill returns: a failure leaves `dir` as it was (staged_output.cpp).
void write_output_dir(const std::string& dir, bool force, const std::function<void(const std::filesystem::path&)>& fill);

// --strict, on every command that loads a model: weights holding NaN or Inf are refused
// instead of reported with a warning.
inline void add_strict_flag(CLI::App* cmd, bool& strict) {
  cmd->add_flag("--strict", strict, "Refuse model weights that hold NaN or Inf (default: a warning naming the tensor)");
}
inline io::NonFinitePolicy non_finite_policy(bool strict) {
  return strict ? io::NonFinitePolicy::refuse : io::NonFinitePolicy::warn;
}

// --dtype, on every command that runs the model: the number format of its matrix products.
// Applied with model::resolve_matmul_dtype (float32, said once, where the CPU has no bf16).
inline void add_dtype_option(CLI::App* cmd, std::string& dtype) {
  cmd->add_option("--dtype", dtype,
                  "Matrix products in float32, or bf16 (bfloat16 inputs, float32 accumulation; weights, norms, "
                  "softmax and the loss stay float32); bf16 needs an AVX-512 CPU, elsewhere float32 is used")
      ->check(CLI::IsMember({"float32", "bf16"}))
      ->capture_default_str();
}
// The format --dtype asks for, as this machine runs it.
inline kernels::GemmInput matmul_dtype_of(const std::string& dtype) {
  return model::resolve_matmul_dtype(model::parse_matmul_dtype(dtype).value_or(kernels::GemmInput::f32));
}

// Copies the tokenizer files of a model directory (tokenizer.json, tokenizer.model,
// tokenizer_config.json, ...) that exist into `out` (cmd_convert.cpp).
void copy_tokenizer_files(const std::filesystem::path& model_dir, const std::filesystem::path& out);

}  // namespace flotilla::cli
