// A training job's loop: Trainer::run with the job's callbacks (each step and validation
// recorded and handed on, a checkpoint after the steps that take one, a stop signal
// honoured on every rank after the same step), and the two ways it ends early, each a
// RunStopped with one line: a non-finite step (exit 1) and a stop signal (exit 128 + the
// signal, with a checkpoint to resume from).
#pragma once

#include "flotilla/train/job.hpp"
#include "flotilla/train/job_checkpoints.hpp"
#include "flotilla/train/job_context.hpp"
#include "flotilla/train/job_data.hpp"
#include "flotilla/train/job_record.hpp"
#include "flotilla/train/trainer.hpp"

namespace flotilla::train {

// Trains from trainer.steps_done() to job.train.steps. `callbacks` are rank 0's (empty on
// the other ranks). Stop signals are watched (job.stop_on_signal) by the caller's
// StopSignals, which outlives the loop so that a second signal while the model is written
// still quits at once.
void run_training_loop(const TrainJob& job, const JobRanks& ranks, Trainer& trainer, TrainData& data,
                       JobCheckpoints& checkpoints, RunRecord& record, const TrainCallbacks& callbacks,
                       const InfoSink& info);

}  // namespace flotilla::train
