// A training job's checkpoints in OUT/checkpoints (train/training_state.hpp): resuming from
// one, keeping a fresh run's apart from an earlier run's, saving every save_every steps and
// after the last step, and on a stop signal; never saving weights that are not finite.
// Every rank calls every method alike (the ranks hold the same weights); rank 0 writes.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "flotilla/data/text_dataset.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/train/job.hpp"
#include "flotilla/train/job_context.hpp"
#include "flotilla/train/host_checkpoints.hpp"
#include "flotilla/train/job_record.hpp"
#include "flotilla/train/trainer.hpp"

namespace flotilla::train {

class JobCheckpoints {
 public:
  // `adapters`: a LoRA run's (each step folder is then also a PEFT adapter folder), or
  // null. `config` is what config.json records and a resumed run compares with.
  JobCheckpoints(const TrainJob& job, const JobRanks& ranks, Trainer& trainer, data::BatchSource& source,
                 const model::LoraAdapters* adapters, nlohmann::json config, RunRecord& record, InfoSink info);

  // --resume: the trainer and the source continue from the newest usable checkpoint under
  // job.resume_from (unusable ones and configuration differences told), and the record
  // from the earlier metrics.jsonl up to its step.
  void resume();
  // A fresh run never mixes its checkpoints with an earlier run's (whose higher steps
  // would outrank and outlive its own), nor deletes them unless --force says so.
  void claim_folder();
  // After `step`: a checkpoint every save_every steps and after the last step.
  void after_step(int64_t step);
  // A run stopped by a signal after `step`: a checkpoint to resume from, unless one was
  // just taken or the folder holds an earlier run's. Says where it is, for the stop line.
  std::string save_on_stop(int64_t step);
  // RunStopped (exit 1, after writing metrics.jsonl) when the trainable weights are not
  // all finite: `what` ("the model is") is then not written.
  void check_weights_finite(int64_t step, std::string_view what);
  // What a run stopped by a non-finite step keeps, for its stop line.
  std::string kept_after_failed_step() const;

 private:
  void save(int64_t step);

  const TrainJob& job_;
  JobRanks ranks_;
  Trainer& trainer_;
  data::BatchSource& source_;
  const model::LoraAdapters* adapters_;
  nlohmann::json config_;
  RunRecord& record_;
  InfoSink info_;
  // Tensor and pipeline parallelism: every rank of the world writes its slices or its
  // stage's tensors (of the first replica), so a checkpoint is a collective over the world,
  // not the data group; so are the per-host folders' protocols.
  std::unique_ptr<parallel::DataParallel> model_parallel_world_;
  CheckpointHosts hosts_;      // who keeps which folder
  std::filesystem::path dir_;  // this rank's checkpoints folder: OUT/checkpoints, or its host's
  // An earlier run's checkpoints, kept (a fresh run with --save-every 0, no --force).
  bool foreign_ = false;
  int64_t last_saved_step_ = -1;
  std::filesystem::path last_saved_dir_;

  // The group a checkpoint is a collective over: the world under tp or pp, else the data
  // group (null: one process).
  parallel::DataParallel* checkpoint_group() const {
    return model_parallel_world_ ? model_parallel_world_.get() : job_.dp;
  }
};

}  // namespace flotilla::train
