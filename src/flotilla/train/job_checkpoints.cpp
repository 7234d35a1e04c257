#include "flotilla/train/job_checkpoints.hpp"

#include <cmath>
#include <optional>
#include <span>
#include <utility>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/io/checkpoint_store.hpp"
#include "flotilla/train/job_model.hpp"
#include "flotilla/train/sharded_checkpoint.hpp"
#include "flotilla/train/training_state.hpp"

namespace flotilla::train {
namespace {

bool all_finite(std::span<const float> values) {
  for (const float v : values)
    if (!std::isfinite(v)) return false;
  return true;
}

}  // namespace

JobCheckpoints::JobCheckpoints(const TrainJob& job, const JobRanks& ranks, Trainer& trainer, data::BatchSource& source,
                               const model::LoraAdapters* adapters, nlohmann::json config, RunRecord& record,
                               InfoSink info)
    : job_(job),
      ranks_(ranks),
      trainer_(trainer),
      source_(source),
      adapters_(adapters),
      config_(std::move(config)),
      record_(record),
      info_(std::move(info)),
      model_parallel_world_(job.tp || job.pp ? std::make_unique<parallel::DataParallel>(*job.world) : nullptr),
      hosts_(find_checkpoint_hosts(
          job.checkpoint_dir.empty() ? (job.out_dir / io::kCheckpointsDirName).string() : job.checkpoint_dir,
          job.checkpoint_replicas, checkpoint_group(), info_)),
      dir_(hosts_.dir) {}

void JobCheckpoints::resume() {
  // `--resume` of this run's own folder with a folder per host: the newest step the hosts
  // hold together, first made complete on every host.
  const bool own_folder = job_.resume_from == job_.out_dir;
  // --checkpoint-dir: the run's own checkpoints live there, not in OUT/checkpoints.
  const std::filesystem::path from = own_folder && !job_.checkpoint_dir.empty() ? dir_ : job_.resume_from;
  const io::ResumePoint point = hosts_.per_host && own_folder
                                    ? find_resume_point(complete_on_hosts(hosts_, checkpoint_group(), info_))
                                    : find_resume_point(from);
  for (const std::string& why : point.skipped) info_("checkpoint: skipping " + why);
  const nlohmann::json saved_config = restore_training_state(point.dir, trainer_, source_, {}, info_);
  info_(fmt::format("resumed from {} at step {}", point.dir.string(), point.step));
  std::string diffs;
  for (const std::string& d : config_differences(saved_config, config_)) diffs += (diffs.empty() ? "" : ", ") + d;
  if (!diffs.empty()) info_("resume: this run's configuration differs from the checkpoint's: " + diffs);
  record_.continue_from(point.step);
  record_.summary.resumed_from_step = point.step;
}

void JobCheckpoints::claim_folder() {
  if (!job_.resume_from.empty()) return;
  // --force says the folder's old contents may go: its checkpoints are another run's. With
  // a folder per host, each host's leader clears its own.
  const bool clears = hosts_.per_host ? hosts_.is_leader() : ranks_.root;
  if (clears && job_.force && std::filesystem::exists(dir_)) {
    std::filesystem::remove_all(dir_);
    info_("checkpoints: removed the earlier run's " + dir_.string() + " (--force)");
  }
  bool earlier = !job_.force && std::filesystem::exists(dir_ / io::kCheckpointLatestFile);
  // Hosts see different folders: they decide together, so that all stop or none.
  if (hosts_.per_host && checkpoint_group())
    earlier = checkpoint_group()->max_over_ranks(earlier ? 1 : 0, "earlier checkpoints") != 0;
  if (job_.save_every > 0 && earlier && !hosts_.per_host)
    throw InputError("train", dir_.string() +
                                  ": holds an earlier run's checkpoints; pass --resume to continue it, or remove them");
  if (job_.save_every > 0 && earlier)
    throw RunStopped("train",
                     fmt::format("the checkpoint folders {} hold an earlier run's checkpoints; pass --resume to "
                                 "continue it, or remove them",
                                 job_.checkpoint_dir.empty() ? dir_.string() : job_.checkpoint_dir),
                     2, !ranks_.root);
  // An earlier run's checkpoints (a fresh run with --save-every 0): a checkpoint taken on a
  // stop signal must not join them. With --force rank 0 has removed them (the other ranks
  // may still see them on a shared folder, so they decide by the flag).
  foreign_ = earlier;
}

void JobCheckpoints::check_weights_finite(int64_t step, std::string_view what) {
  // Weights that are not finite are never saved over good ones. The loss and gradient
  // checks keep non-finite values out of an update; this catches a finite update that
  // overflowed (a huge --lr). Every rank holds the same weights here (or, under ZeRO-3,
  // asks the others) and stops alike.
  const std::span<const float> params = trainer_.model().trainable().params;
  bool finite = true;
  if (trainer_.sync().weights_sharded()) {
    // ZeRO-3 or a pipeline stage: each rank holds its own part only; the ranks agree.
    for (const parallel::ArenaRange& r : trainer_.sync().owned())
      finite = finite && all_finite(params.subspan(static_cast<size_t>(r.begin), static_cast<size_t>(r.size())));
    if (job_.dp) finite = job_.dp->max_over_ranks(finite ? 0 : 1, "finite weights") == 0;
    if (job_.pp) {
      // A pipeline stage: its own tensors only; the stages agree too.
      double bad = finite ? 0.0 : 1.0;
      job_.pp->all_reduce(comm::MutView(std::span<double>(&bad, 1)), comm::ReduceOp::max, {.name = "finite weights"});
      finite = bad == 0.0;
    }
    if (job_.tp) {
      // ZeRO-3 x tp or pp x tp: the other tp ranks checked their own slices; all agree.
      double bad = finite ? 0.0 : 1.0;
      job_.world->all_reduce(comm::MutView(std::span<double>(&bad, 1)), comm::ReduceOp::max, {.name = "finite weights"});
      finite = bad == 0.0;
    }
  } else {
    finite = all_finite(params);
    if (job_.tp) {
      // Tensor parallel: each rank holds its own slices; every rank of the job agrees.
      double bad = finite ? 0.0 : 1.0;
      job_.world->all_reduce(comm::MutView(std::span<double>(&bad, 1)), comm::ReduceOp::max, {.name = "finite weights"});
      finite = bad == 0.0;
    }
  }
  if (finite) return;
  if (ranks_.root) record_.write_metrics();  // the history up to here, for the record
  std::string kept = last_saved_dir_.empty() ? std::string("no checkpoint was written")
                                             : "the last good checkpoint is " + last_saved_dir_.string();
  throw RunStopped("train",
                   fmt::format("after step {} the weights hold values that are not finite (inf or nan): training "
                               "diverged; {} not written, {}; lower --lr",
                               step, what, kept),
                   1, !ranks_.root);
}

void JobCheckpoints::save(int64_t step) {
  check_weights_finite(step, "the checkpoint is");
  // Every rank writes its own part of the weights and moments (its ZeRO shard, or an
  // equal part of the arena) and rank 0 the folder's shared files: nothing is gathered,
  // and the checkpoint resumes on any number of ranks at any stage.
  Timer timer;
  // metrics.jsonl first: after a kill, it reaches at least as far as `latest`.
  if (ranks_.root) record_.write_metrics();
  io::StepFiles adapter_files;
  std::optional<model::LoraAdapters> whole_adapters;
  if (adapters_) {
    // The step folder is also an adapter folder: generate --adapter, fuse and
    // --resume-adapter-file take it as it is. Under tensor parallelism each tp group's
    // rank 0 gathers the whole adapters (world rank 0's are written); a pipeline's stages
    // exchange their layers' adapters, and expert-parallel ranks their experts', as at the
    // end of a run.
    trainer_.complete_model();
    if (job_.tp) whole_adapters = job_.tp->gather_full_adapters(*adapters_, trainer_.model().full_config());
    adapter_files.names = {"adapter_model.safetensors", "adapter_config.json"};
    adapter_files.write = [&](const std::filesystem::path& dir) {
      (whole_adapters ? &*whole_adapters : adapters_)->save_peft(dir, base_model_name(job_));
    };
  }
  last_saved_dir_ = save_sharded_checkpoint(dir_, trainer_, source_, config_, job_.keep_checkpoints, checkpoint_group(),
                                            adapter_files, {}, {}, &hosts_);
  info_(fmt::format("checkpoint: {} ({:.2f} s)", last_saved_dir_.string(), timer.elapsed_s()));
  last_saved_step_ = step;
}

void JobCheckpoints::after_step(int64_t step) {
  if (job_.save_every <= 0 || (step % job_.save_every != 0 && step != job_.train.steps)) return;
  save(step);
}

std::string JobCheckpoints::save_on_stop(int64_t step) {
  if (last_saved_step_ == step) return "checkpoint " + last_saved_dir_.string();
  if (foreign_) {
    if (ranks_.root) record_.write_metrics();
    return "no checkpoint written: " + dir_.string() + " holds an earlier run's checkpoints";
  }
  save(step);
  return "checkpoint " + last_saved_dir_.string();
}

std::string JobCheckpoints::kept_after_failed_step() const {
  return !last_saved_dir_.empty()     ? "the last good checkpoint is " + last_saved_dir_.string()
         : job_.resume_from.empty() ? std::string("no checkpoint was written")
                                    : "the checkpoint it resumed from is kept";
}

}  // namespace flotilla::train
