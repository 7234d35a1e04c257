// flotilla eval: test loss and perplexity.
#include <fmt/format.h>

#include <array>
#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "flotilla/train/eval_job.hpp"

namespace flotilla::cli {

void add_eval_command(CLI::App& app) {
  auto job = std::make_shared<train::EvalJob>();
  auto paths = std::make_shared<std::array<std::string, 3>>();  // model, adapter, data
  CLI::App* cmd = app.add_subcommand("eval", "Mean token loss and perplexity on a dataset split (JSON)");
  cmd->add_option("--model", (*paths)[0], "Model directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--adapter,--adapter-path", (*paths)[1], "LoRA adapters to apply (a PEFT or mlx_lm folder)")->check(CLI::ExistingDirectory);
  cmd->add_option("--data", (*paths)[2], "A prepared dataset folder, or a .txt / .jsonl file")
      ->required()->check(CLI::ExistingPath);
  cmd->add_option("--split", job->split, "Prepared data: train, valid or test")->capture_default_str();
  cmd->add_option("--batch-size", job->batch_size, "Rows per batch")->capture_default_str();
  cmd->add_option("--seq-len", job->seq_len, "Tokens per row")->capture_default_str();
  cmd->add_option("--max-batches", job->max_batches, "At most this many batches (0: one whole pass)")
      ->capture_default_str();
  cmd->add_flag("--pack,!--no-pack", job->pack, "Prepared data: pack examples into rows (default) or pad");
  auto strict = std::make_shared<bool>(false);
  add_strict_flag(cmd, *strict);
  auto dtype = std::make_shared<std::string>("float32");
  add_dtype_option(cmd, *dtype);
  cmd->callback([job, paths, strict, dtype] {
    job->non_finite = non_finite_policy(*strict);
    job->dtype = matmul_dtype_of(*dtype);
    job->model_dir = (*paths)[0];
    job->adapter_dir = (*paths)[1];
    job->data = (*paths)[2];
    const train::EvalResult r = train::run_eval_job(*job);
    fmt::print("{}\n", nlohmann::json{{"split", r.split},
                                      {"loss", r.loss},
                                      {"perplexity", r.perplexity},
                                      {"tokens", r.tokens},
                                      {"batches", r.batches}}
                           .dump(2));
  });
}

}  // namespace flotilla::cli
