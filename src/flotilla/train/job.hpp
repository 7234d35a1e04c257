// A training job end to end: model (from a directory, a preset or a config.json), data
// (a text or JSONL file, split into train and validation), the loop, and the outputs
// (model directory with tokenizer, metrics.jsonl). The CLI fills a TrainJob from flags.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "flotilla/kernels/gemm.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/parallel/data_parallel.hpp"
#include "flotilla/parallel/expert_parallel.hpp"
#include "flotilla/parallel/pipeline.hpp"
#include "flotilla/parallel/tensor_parallel.hpp"
#include "flotilla/train/trainer.hpp"

namespace flotilla::train {

enum class FineTuneType { full, lora };

struct TrainJob {
  std::filesystem::path model_dir;  // start from these weights, or:
  io::NonFinitePolicy non_finite = io::NonFinitePolicy::warn;  // their NaN or Inf: warn or refuse
  std::string preset;               // a preset's random init, or:
  std::filesystem::path config_json;  // a config.json's random init
  // A prepared dataset folder, an mlx_lm data folder (train.jsonl [valid.jsonl test.jsonl],
  // prepared for this run with the model's tokenizer and chat template, truncated at
  // train.seq_len), or a .txt / .jsonl file.
  std::filesystem::path data;
  bool mask_prompt = false;         // mlx_lm data folder: loss on completions / assistant turns
  bool grad_checkpoint = false;     // recompute each block's activations in backward (Llama)
  double expert_capacity = 0.0;     // a mixture of experts' capacity factor in training (0: dropless)
  // Matrix products: float32, or bf16 inputs with float32 accumulation (model/matmul_dtype.hpp:
  // float32 where the CPU has no bf16). Master weights and AdamW state stay float32.
  kernels::GemmInput dtype = kernels::GemmInput::f32;
  // After training, the loss on the data's test split (test_batches batches; <= 0: all).
  bool test = false;
  int64_t test_batches = 0;
  bool pack = true;                 // prepared data: pack examples into rows (else pad)
  std::filesystem::path out_dir;    // written at the end (model + tokenizer + metrics)
  double valid_fraction = 0.05;     // raw text only: the share held out for validation
  uint64_t seed = 0;                // init, batch order
  TrainConfig train;
  // With a prepared dataset, rows are as long as it asks (data::prepared_seq_len: its
  // max_seq_len) in place of train.seq_len. The CLI sets it when --seq-len is not given.
  bool seq_len_from_data = false;
  // Checkpoints (train/checkpoint.hpp) in out_dir/checkpoints: every save_every steps and
  // after the last step; 0: none. The keep_checkpoints newest are kept (0: all).
  int64_t save_every = 0;
  int keep_checkpoints = 3;
  // Where checkpoints go (empty: out_dir/checkpoints). "{host}" in it is replaced by each
  // host's name (FLOTILLA_HOST, else gethostname): a folder per host on machines that
  // share no filesystem (train/host_checkpoints.hpp), as is one path that every host
  // sees as its own local folder. checkpoint_replicas: hosts that also keep each rank's
  // files (-1: 1 with several host folders, else 0).
  std::string checkpoint_dir;
  int checkpoint_replicas = -1;
  // While training, the first SIGINT or SIGTERM (base/stop_signal.hpp) ends the run after
  // the current step, on every rank alike, with a checkpoint in out_dir/checkpoints (also
  // when save_every is 0) and a RunStopped exit of 128 + the signal. Off: signals keep
  // their default effect (the CLI turns it on).
  bool stop_on_signal = false;
  // Resume from a checkpoint: a run's output folder, its checkpoints folder or one step
  // folder; empty: start afresh. The model is built as for a fresh run, then the
  // checkpoint's tensors, optimizer, step, schedule position and data order replace its own.
  std::filesystem::path resume_from;
  // Full training of every parameter, or LoRA adapters over a frozen base. A LoRA run
  // writes the adapters (PEFT layout) into out_dir instead of a whole model.
  FineTuneType fine_tune = FineTuneType::full;
  // For the run report, so that a reader can rerun it: the command as typed and the version.
  std::string command_line;
  std::string flotilla_version;
  model::LoraConfig lora;
  // Start LoRA from these adapters: a PEFT or mlx_lm folder, or the weights file in one.
  // The LoRA settings the user gave (lora_given) must match the adapter's; the others are
  // taken from it.
  std::filesystem::path resume_adapter;
  struct LoraGiven {
    bool rank = false, alpha = false, targets = false, num_layers = false;
  } lora_given;
  // --force: a fresh run into a folder with an earlier run's checkpoints removes them
  // (without it, the run refuses).
  bool force = false;
  // Data parallel over these ranks (null: one process). Rank 0 alone reports and writes.
  // Under a pipeline: the ranks of this rank's stage in the other replicas.
  parallel::DataParallel* dp = nullptr;
  // Pipeline parallel (parallel/pipeline.hpp): the mesh's pp group (its size > 1), whose
  // rank is this rank's stage, and every rank of the job; null: no pipeline. The stages'
  // layers are balanced by cost unless pipeline.stage_layers gives them. A checkpoint is
  // the whole model's, each stage of the first replica writing its own tensors.
  comm::Communicator* pp = nullptr;
  comm::Communicator* world = nullptr;
  // Expert parallelism and the load-balancing loss over the ranks (parallel/
  // expert_parallel.hpp; null: one process or a pipeline): attached to a mixture-of-experts
  // model (Llama::set_expert_exchange); with ep > 1 each rank runs its block of the
  // experts, and `dp` is then the data group (dp x ep) that averages the gradients.
  parallel::ExpertParallel* experts = nullptr;
  parallel::PipelineConfig pipeline;
  // Tensor parallel (parallel/tensor_parallel.hpp): the mesh's tp group (its size > 1),
  // whose ranks hold slices of every block's linear layers; `world` is then every rank of
  // the job, and `dp` the data group (the same tp slice in the other replicas). Null: none.
  // Checkpoints are the whole model's, each rank of the first replica writing its slices;
  // the model written at the end is gathered whole.
  parallel::TensorParallel* tp = nullptr;
  // Sequence parallelism on the tp group (--sequence-parallel; model::Llama::
  // set_sequence_parallel): the residual stream and the norms on 1/tp of the token rows.
  bool sequence_parallel = false;
  // How gradients travel between ranks (data parallel only): exact float32, or compressed
  // with error feedback. A lossy codec's residuals are not checkpointed: a resumed run
  // starts them at zero, so it is not bit-for-bit the run that never stopped.
  comm::CompressionConfig compression;
  // A Chrome trace (Perfetto) of every step's compute and communication; each rank but 0
  // writes its own next to it (NAME.rank1.json, ...). Empty: none.
  std::filesystem::path trace_path;
};

struct TrainCallbacks {
  std::function<void(const std::string&)> on_info;   // one-off facts (sizes, memory)
  std::function<void(const StepMetrics&)> on_step;
  std::function<void(const EvalMetrics&)> on_eval;
};

struct TrainSummary {
  double first_loss = 0.0;
  double final_loss = 0.0;
  double final_valid_loss = -1.0;   // -1: no validation set
  double test_loss = -1.0;          // -1: no --test
  int64_t test_tokens = 0;
  int64_t steps = 0;
  int64_t skipped_batches = 0;      // global batches with no target token, not stepped on
  int64_t resumed_from_step = -1;   // -1: a fresh run
  double elapsed_s = 0.0;
  int64_t peak_rss_bytes = 0;
  // Data parallel: gradient bytes this rank sent per optimizer step (0 on one process).
  double gradient_bytes_per_step = 0.0;
  std::string dtype = "float32";    // the matrix products' number format as run ("float32", "bf16")
};

// Runs the job. The model (or adapters) is written first; metrics, report and trace after
// it, so that a failure to write one of those never costs the model: it is an Error
// raised once everything else is written, naming what is missing.
TrainSummary run_train_job(const TrainJob& job, const TrainCallbacks& callbacks);

// Where `rank` writes its trace: `trace` itself for rank 0, NAME.rankN.EXT beside it for
// the others.
std::filesystem::path trace_path_of_rank(const std::filesystem::path& trace, int rank);

// The job's configuration as JSON: what a checkpoint records in config.json and what a
// resumed run compares with its own.
nlohmann::json train_job_config_json(const TrainJob& job);

}  // namespace flotilla::train
