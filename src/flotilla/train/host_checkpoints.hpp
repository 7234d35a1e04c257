// Checkpoints on hosts that share no filesystem (docs/sharded-checkpoints.md, "Per-host
// folders"): each host keeps its own copy of the step folder, every rank's files are also
// sent to K other hosts, and a resume gathers the newest step the surviving hosts hold
// together.
//
// Vocabulary:
//   host         a machine, by its name: FLOTILLA_HOST when set (emulated hosts, tests),
//                else gethostname(). Hosts are numbered by their lowest rank.
//   leader       a host's lowest rank: it begins, commits and completes its host's folder
//   host folder  the checkpoints folder of one host: --checkpoint-dir with "{host}"
//                replaced by its name (default OUT/checkpoints)
//   replica      a copy of a rank's files in the host folder of another host: rank r's
//                go to the hosts after its own, (h + 1) ... (h + K) mod H
//   set          every file of one checkpoint, with its size and CRC-32C; each host
//                folder's manifest lists the files it holds and the set
//
// A folder torn by a kill is never used: each host's step folder is written to a tmp name
// and renamed by io/checkpoint_store.hpp, so a host holds a step whole or not at all.
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "flotilla/io/checkpoint_store.hpp"
#include "flotilla/parallel/data_parallel.hpp"

namespace flotilla::train {

// FLOTILLA_HOST when set and not empty, else gethostname().
std::string checkpoint_host_name();

// `pattern` with every "{host}" replaced by `host`.
std::filesystem::path host_checkpoint_dir(const std::string& pattern, const std::string& host);

// The ranks grouped by host, and whether each host has its own checkpoints folder.
struct CheckpointHosts {
  int rank = 0;
  std::vector<std::string> names;         // per host, numbered by lowest rank
  std::vector<std::vector<int>> ranks;    // per host, ascending
  std::vector<int> host_of;               // per rank
  bool per_host = false;                  // false: one folder every rank writes into
  int replicas = 0;                       // K (per-host folders only), at most hosts - 1
  std::string pattern;                    // --checkpoint-dir as given ("{host}" in it)
  std::filesystem::path dir;              // this rank's checkpoints folder

  int hosts() const { return static_cast<int>(names.size()); }
  int host() const { return host_of[static_cast<size_t>(rank)]; }
  int leader(int h) const { return ranks[static_cast<size_t>(h)].front(); }
  bool is_leader() const { return leader(host()) == rank; }
  // The ranks holding replicas of rank r's files: on each of the K hosts after r's, the
  // rank at r's position among its host's ranks (wrapped).
  std::vector<int> replica_ranks(int r) const;
};

// Every rank calls it alike (a collective over `dp`; null: one process). `dir_pattern` is
// --checkpoint-dir; `replicas` is --checkpoint-replicas (-1: 1 when there are several host
// folders, else 0). The folders are per host when the pattern names "{host}", or when a
// file rank 0 makes in its folder is not seen by the other hosts' leaders (local disks
// under one path); an InputError when some hosts see it and others do not. `info`: one
// line on rank 0 saying what was found.
CheckpointHosts find_checkpoint_hosts(const std::string& dir_pattern, int replicas, parallel::DataParallel* dp,
                                      const std::function<void(const std::string&)>& info);

// The per-host protocol of save_sharded_checkpoint (train/sharded_checkpoint.hpp), which
// has built this rank's files: files.names[0, own_count) are its own (sent to its
// replicas), the rest rank 0's small files (sent to every other host). `build_error`: why
// this rank could not build them (every rank still takes part, so nobody waits). Each
// leader begins its host folder, every rank writes into its host's, the replicas and rank
// 0's files are sent point to point in chunks and written, and each leader commits with
// the files its host holds and the set. A failure anywhere: every leader abandons its
// folder and every rank throws RunStopped naming the rank. Returns this host's step folder.
std::filesystem::path save_step_on_hosts(const CheckpointHosts& hosts, int64_t step, const io::StepFiles& files,
                                         size_t own_count, const std::string& build_error, int keep,
                                         parallel::DataParallel& dp);

// Resuming from per-host folders: the leaders report the steps they hold and which of
// their files verify; every rank picks the newest step whose set the hosts hold together;
// each file a host lacks is sent from a holder and written and checked there. Returns this
// host's step folder, now complete. RunStopped (exit 1) in one line naming the lost files
// when no step is complete on these hosts.
std::filesystem::path complete_on_hosts(const CheckpointHosts& hosts, parallel::DataParallel* dp,
                                        const std::function<void(const std::string&)>& info);

}  // namespace flotilla::train
