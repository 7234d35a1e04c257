// flotilla launch's supervisor: runs a training job under mpirun and keeps it going when a
// rank or a host is lost, in the manner of torchrun's elastic agent and horovodrun's host
// discovery.
//
// Each attempt: read the hosts (hostfile or discovery command), keep those that answer
// (a probe command; this machine always answers), choose the world and the cut of the
// global batch (train/elastic.hpp), run mpirun, and watch it. When a rank fails, flotilla's
// own fault detection ends its peers within train's --timeout; mpirun then gets `grace_s`
// after the first error line to exit before its process group is ended. Unless the job
// ended on an input error (exit 2), the next attempt resumes the newest complete checkpoint,
// resharded to the new world. While the job trains, the hosts are read again every
// `rescan_s`: when a larger world answers, the job is stopped at a step boundary (SIGTERM:
// it checkpoints) and relaunched on it. Events go to stderr as they happen, to
// OUT/metrics.jsonl (one line each, with an "event" key) and, at the end, as a timeline.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace flotilla::train {

struct LaunchConfig {
  std::string hostfile;            // one of hostfile and discover
  std::string discover;            // a shell command printing `host slots=N` lines
  std::string probe;               // shell command, {host} replaced; empty: every host answers
  std::string mpirun = "mpirun";
  std::vector<std::string> mpirun_args;
  int min_hosts = 1, max_hosts = 0, max_restarts = 3;
  // grace_s: after a rank's first error line, how long mpirun may take to end the job
  // before the launcher ends its process group.
  double grace_s = 10.0, probe_timeout_s = 15.0, rescan_s = 60.0;
  std::string self;                // the flotilla binary the ranks run
  std::vector<std::string> train_args;  // "train" and its flags, as the user gave them
  // The train flags as train resolved them (cli: `train ... --print-config`).
  std::string out;
  std::string checkpoint_dir;      // train's --checkpoint-dir (empty: OUT/checkpoints)
  int checkpoint_replicas = -1;    // train's --checkpoint-replicas (-1: its default)
  int64_t batch_size = 0, grad_accum = 0, save_every = 0;
  int64_t deterministic_group = 1;  // train's --deterministic-group with --deterministic, else 1
};

// Runs the job to its end: 0 when it completed, the job's status when it was stopped by a
// signal to the launcher (passed on to the job). InputError for a bad configuration (before
// anything runs); Error when too few hosts answer, --max-restarts is used up, or the job
// stopped on an input error.
int run_launch(const LaunchConfig& config);

}  // namespace flotilla::train
