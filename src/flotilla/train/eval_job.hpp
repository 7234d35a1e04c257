// flotilla eval: the mean token loss and perplexity of a model (and adapters) on one split
// of a prepared dataset, or on a raw text file.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include "flotilla/io/non_finite.hpp"
#include "flotilla/kernels/gemm.hpp"

namespace flotilla::train {

struct EvalJob {
  std::filesystem::path model_dir;
  std::filesystem::path adapter_dir;  // optional PEFT adapters
  std::filesystem::path data;         // a prepared dataset folder, or a .txt / .jsonl file
  std::string split = "test";         // prepared data: train, valid or test
  int64_t batch_size = 4;
  int64_t seq_len = 512;
  int64_t max_batches = 0;            // 0: the whole split (one pass)
  bool pack = true;
  io::NonFinitePolicy non_finite = io::NonFinitePolicy::warn;  // weights holding NaN or Inf
  kernels::GemmInput dtype = kernels::GemmInput::f32;  // matrix products (as this machine runs them)
};

struct EvalResult {
  std::string split;
  double loss = 0.0;        // mean over target tokens
  double perplexity = 0.0;  // exp(loss)
  int64_t tokens = 0;       // target tokens scored
  int64_t batches = 0;
};

EvalResult run_eval_job(const EvalJob& job);

}  // namespace flotilla::train
