// What `flotilla launch` decides between attempts of a job, apart from running processes:
// which hosts to use and how the global batch is cut over the ranks they give.
//
// A restart on fewer (or more) ranks resumes the run's newest checkpoint, resharded
// (docs/sharded-checkpoints.md). The batch sampler resumes only the same global batch of
// G = batch_size x world x grad_accum rows, so the launcher keeps G: the world is the
// largest rank count the answering hosts offer that divides G, and each rank's G / world
// rows are cut into micro-batches no larger than the first attempt's (per-rank memory
// never grows; accumulation makes up for fewer ranks).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace flotilla::train {

// One line of an Open MPI hostfile: `host slots=N` (N >= 1), or `host` alone for one slot.
struct HostSlots {
  std::string host;
  int slots = 1;
  bool operator==(const HostSlots&) const = default;
};

// Hostfile text (also a discovery script's output): one host per line, blank lines and
// `#` comments ignored. InputError "<source>:<line>: ..." for a malformed line, a slot
// count that is not a positive integer, another key than slots, or a host named twice.
std::vector<HostSlots> parse_hostfile(std::string_view text, std::string_view source);

// Whether `host` is this machine by name (localhost, 127.x.x.x, ::1, or its hostname):
// no probe needed to know it answers.
bool is_local_host(std::string_view host);

// A network partition never leaves two sides training: after a failure the launcher goes on
// only when the hosts answering now include a strict majority of the last world's members
// (the hosts that answered when the last attempt started, used or not). A side that cannot
// see more than half of them stops; in a 2|2 split both sides do. Hosts, not slots, are
// counted: a partition cuts machines apart.
struct HostQuorum {
  std::vector<std::string> answering;  // the last world's members that answer now
  std::vector<std::string> lost;       // those that do not
  bool majority() const { return 2 * answering.size() > answering.size() + lost.size(); }
  // "2 of the last world's 4 hosts answer (h0, h1; not h2, h3)"
  std::string describe() const;
};
HostQuorum last_world_quorum(const std::vector<HostSlots>& last_members, const std::vector<HostSlots>& alive);

// With a checkpoint folder per host (train/host_checkpoints.hpp), where a world on `hosts`
// (ranks placed slot by slot in their order) keeps each rank's files: on its own host and
// on the `replicas` hosts after it (-1: 1 when there are several hosts; at most the other
// hosts). Per rank, the names of the hosts that hold its files.
std::vector<std::vector<std::string>> checkpoint_holders(const std::vector<HostSlots>& hosts, int replicas);

// `alive` reordered so that a world too small to take every answering host still takes
// hosts that hold, between them, every rank's files of the checkpoint it resumes (a host
// outside the world cannot hand its files over): first the fewest hosts that do (of sets
// of that size, the first in `alive`'s order), then the others in order. `alive` as it is
// when the answering hosts do not hold every rank's files (or there are over 20).
std::vector<HostSlots> holders_first(const std::vector<HostSlots>& alive,
                                     const std::vector<std::vector<std::string>>& holders);

struct ElasticShape {
  std::vector<HostSlots> hosts;  // the slots used, in hostfile order (a host may give fewer)
  int world = 0;
  int64_t batch_size = 0;        // rows per micro-batch on each rank
  int64_t grad_accum = 0;        // micro-batches per step on each rank
  int64_t global_rows() const { return batch_size * world * grad_accum; }
  // "4 ranks on 2 hosts (a:2, b:2), 2 rows x 1 micro-batch each = 8 rows per step"
  std::string describe() const;
};

// The shape for `global_rows` G on `hosts` (at most `max_hosts` of them, 0: all, taken in
// order): the largest world <= their slots that divides G; per rank R = G / world rows in
// micro-batches of the largest divisor of R not above `max_batch_size`. With `group` > 1
// (--deterministic-group: every micro-batch a whole number of groups) G counts in groups:
// the world divides G / group and the micro-batch is a multiple of `group` (at least one
// group, even past max_batch_size). nullopt when no host is given. InputError for G,
// max_batch_size or group below 1, or G not a multiple of group.
std::optional<ElasticShape> plan_elastic_shape(const std::vector<HostSlots>& hosts, int max_hosts, int64_t global_rows,
                                               int64_t max_batch_size, int64_t group = 1);

}  // namespace flotilla::train
