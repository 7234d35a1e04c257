#include "flotilla/train/host_checkpoints.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <map>
#include <memory>
#include <set>
#include <utility>

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "flotilla/base/crc32c.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"

namespace flotilla::train {
namespace fs = std::filesystem;
namespace {

constexpr std::string_view kHostCheckpointsComponent = "train/host_checkpoints";
// Point-to-point messages of a transfer: a header, the files' bytes in segments of at
// most kSegmentBytes, and a trailer; one tag, since the two ends of a transfer post their
// sends and receives in the same order.
constexpr int kTransferTag = 7301;
constexpr size_t kSegmentBytes = size_t{8} << 20;

std::vector<std::string> gather(parallel::DataParallel* dp, const std::string& text, std::string_view what) {
  return dp ? dp->all_gather_text(text, what) : std::vector<std::string>{text};
}

std::string first_marked_failure(const std::vector<std::string>& outcomes) {
  for (size_t r = 0; r < outcomes.size(); ++r)
    if (outcomes[r].starts_with("!")) return fmt::format("rank {}: {}", r, outcomes[r].substr(1));
  return {};
}

nlohmann::json entries_json(const std::vector<io::FileEntry>& entries) {
  nlohmann::json out = nlohmann::json::array();
  for (const io::FileEntry& e : entries) out.push_back({e.name, e.bytes, e.crc32c});
  return out;
}

std::vector<io::FileEntry> entries_from(const nlohmann::json& list) {
  std::vector<io::FileEntry> out;
  for (const nlohmann::json& e : list) out.push_back({e[0].get<std::string>(), e[1].get<uint64_t>(), e[2].get<uint32_t>()});
  return out;
}

// ---- A transfer: one rank's files, sent to one rank, which writes them into its folder --

void send_text(comm::Communicator& comm, const std::string& text, int dest) {
  const std::array<int64_t, 1> size = {static_cast<int64_t>(text.size())};
  comm.send(size, dest, kTransferTag, {.name = "checkpoint transfer (size)"});
  std::vector<uint8_t> bytes(text.begin(), text.end());
  bytes.push_back(0);  // never a message of nothing
  comm.send(bytes, dest, kTransferTag, {.name = "checkpoint transfer (header)"});
}

std::string recv_text(comm::Communicator& comm, int source) {
  std::array<int64_t, 1> size = {0};
  comm.recv(size, source, kTransferTag, {.name = "checkpoint transfer (size)"});
  std::vector<uint8_t> bytes(static_cast<size_t>(size[0]) + 1);
  comm.recv(bytes, source, kTransferTag, {.name = "checkpoint transfer (header)"});
  return std::string(bytes.begin(), bytes.end() - 1);
}

// Sends the files `names` of `dir` to `dest`: header {"files": [[name, bytes]]} (or
// {"error": why}: nothing follows), each file's bytes in segments, and a trailer, "" or
// why a file could not be read whole (its missing bytes then went as zeros).
void send_files(comm::Communicator& comm, int dest, const fs::path& dir, const std::vector<std::string>& names,
                const std::string& error) {
  nlohmann::json header;
  std::vector<uint64_t> sizes;
  std::string problem = error;
  if (problem.empty()) {
    try {
      for (const std::string& name : names) sizes.push_back(fs::file_size(dir / name));
    } catch (const std::exception& e) {
      problem = e.what();
    }
  }
  if (!problem.empty()) {
    send_text(comm, nlohmann::json{{"error", problem}}.dump(), dest);
    return;
  }
  header["files"] = nlohmann::json::array();
  for (size_t i = 0; i < names.size(); ++i) header["files"].push_back({names[i], sizes[i]});
  send_text(comm, header.dump(), dest);
  std::vector<uint8_t> segment;
  std::string trailer;
  for (size_t i = 0; i < names.size(); ++i) {
    const int fd = ::open((dir / names[i]).c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0 && trailer.empty()) trailer = fmt::format("{}: cannot open it to send", names[i]);
    for (uint64_t at = 0; at < sizes[i]; at += segment.size()) {
      segment.assign(static_cast<size_t>(std::min<uint64_t>(kSegmentBytes, sizes[i] - at)), 0);
      size_t got = 0;
      while (fd >= 0 && got < segment.size()) {
        const ssize_t n = ::pread(fd, segment.data() + got, segment.size() - got, static_cast<off_t>(at + got));
        if (n <= 0) break;
        got += static_cast<size_t>(n);
      }
      if (got < segment.size() && trailer.empty()) trailer = fmt::format("{}: could not be read whole to send", names[i]);
      comm.send(segment, dest, kTransferTag, {.name = "checkpoint transfer (segment)"});
    }
    if (fd >= 0) ::close(fd);
  }
  send_text(comm, trailer, dest);
}

// Receives what send_files sends and writes each file into `dir` (atomically, fsynced);
// returns their entries read back from disk. Every message is received whatever fails
// here (so the sender never waits); `error` gets the first fault.
std::vector<io::FileEntry> recv_files(comm::Communicator& comm, int source, const fs::path& dir, std::string& error) {
  const auto fail = [&](const std::string& why) {
    if (error.empty()) error = why;
  };
  const nlohmann::json header = nlohmann::json::parse(recv_text(comm, source));
  if (header.contains("error")) {
    fail(fmt::format("rank {} could not send its files: {}", source, header["error"].get<std::string>()));
    return {};
  }
  std::vector<io::FileEntry> entries;
  std::vector<uint8_t> segment;
  for (const nlohmann::json& f : header["files"]) {
    const std::string name = f[0].get<std::string>();
    const uint64_t bytes = f[1].get<uint64_t>();
    std::unique_ptr<AtomicFileWriter> out;
    try {
      if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..")
        throw Error(kHostCheckpointsComponent, fmt::format("rank {} sent a bad file name '{}'", source, name));
      out = std::make_unique<AtomicFileWriter>(dir / name);
    } catch (const std::exception& e) {
      fail(e.what());
    }
    for (uint64_t at = 0; at < bytes; at += segment.size()) {
      segment.resize(static_cast<size_t>(std::min<uint64_t>(kSegmentBytes, bytes - at)));
      comm.recv(segment, source, kTransferTag, {.name = "checkpoint transfer (segment)"});
      try {
        if (out) out->write(std::as_bytes(std::span<const uint8_t>(segment)));
      } catch (const std::exception& e) {
        fail(fmt::format("{}: {}", (dir / name).string(), e.what()));
        out.reset();
      }
    }
    try {
      if (out) {
        out->commit();
        const FileChecksum sum = crc32c_file(dir / name);
        entries.push_back({name, sum.bytes, sum.crc32c});
      }
    } catch (const std::exception& e) {
      fail(fmt::format("{}: {}", (dir / name).string(), e.what()));
    }
  }
  const std::string trailer = recv_text(comm, source);
  if (!trailer.empty()) fail(fmt::format("rank {}: {}", source, trailer));
  return entries;
}

// One transfer of a plan: `source` sends `names` to `dest`.
struct Transfer {
  int source = 0;
  int dest = 0;
  std::vector<std::string> names;
};

// Runs the plan, which every rank holds alike, in its order: each transfer involves two
// ranks only, and both take their transfers in the same global order, so the earliest
// one not done always has both ends at it (no cycle of waits). Returns what this rank
// received into `dir`.
std::vector<io::FileEntry> run_transfers(comm::Communicator& comm, const std::vector<Transfer>& plan, int rank,
                                         const fs::path& dir, const std::string& send_error, std::string& error) {
  std::vector<io::FileEntry> received;
  for (const Transfer& t : plan) {
    if (t.source == rank) send_files(comm, t.dest, dir, t.names, send_error);
    if (t.dest == rank) {
      std::vector<io::FileEntry> got = recv_files(comm, t.source, dir, error);
      received.insert(received.end(), got.begin(), got.end());
    }
  }
  return received;
}

RunStopped save_stopped(int64_t step, int rank, const std::string& why) {
  return RunStopped(kHostCheckpointsComponent, fmt::format("checkpoint of step {} not written: {}", step, why), 1, rank != 0);
}

std::string joined(const std::vector<std::string>& items) {
  std::string out;
  for (const std::string& s : items) out += (out.empty() ? "" : ", ") + s;
  return out;
}

}  // namespace

std::string checkpoint_host_name() {
  if (const char* env = std::getenv("FLOTILLA_HOST"); env && *env) return env;
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "localhost";
  return name;
}

fs::path host_checkpoint_dir(const std::string& pattern, const std::string& host) {
  std::string out = pattern;
  for (size_t at = out.find("{host}"); at != std::string::npos; at = out.find("{host}", at + host.size()))
    out.replace(at, 6, host);
  return out;
}

std::vector<int> CheckpointHosts::replica_ranks(int r) const {
  const int h = host_of[static_cast<size_t>(r)];
  const std::vector<int>& own = ranks[static_cast<size_t>(h)];
  const auto pos = static_cast<size_t>(std::find(own.begin(), own.end(), r) - own.begin());
  std::vector<int> out;
  for (int k = 1; k <= replicas; ++k) {
    const std::vector<int>& on = ranks[static_cast<size_t>((h + k) % hosts())];
    out.push_back(on[pos % on.size()]);
  }
  return out;
}

CheckpointHosts find_checkpoint_hosts(const std::string& dir_pattern, int replicas, parallel::DataParallel* dp,
                                      const std::function<void(const std::string&)>& info) {
  CheckpointHosts hosts;
  hosts.rank = dp ? dp->rank() : 0;
  const bool root = hosts.rank == 0;
  const std::string name = checkpoint_host_name();
  for (const std::string& n : gather(dp, name, "checkpoint hosts")) {
    const auto it = std::find(hosts.names.begin(), hosts.names.end(), n);
    const auto h = static_cast<int>(it - hosts.names.begin());
    if (it == hosts.names.end()) {
      hosts.names.push_back(n);
      hosts.ranks.emplace_back();
    }
    hosts.ranks[static_cast<size_t>(h)].push_back(static_cast<int>(hosts.host_of.size()));
    hosts.host_of.push_back(h);
  }
  hosts.pattern = dir_pattern;
  hosts.dir = host_checkpoint_dir(dir_pattern, name);
  const bool named = dir_pattern.find("{host}") != std::string::npos;
  hosts.per_host = named;
  if (!named && hosts.hosts() > 1) {
    // Local disks under one path look alike from every host: rank 0 leaves a fresh file
    // in its folder, and the other hosts' leaders look for it in theirs.
    std::string probe;
    std::error_code ec;
    const bool existed = fs::exists(hosts.dir, ec);
    if (root) {
      try {
        fs::create_directories(hosts.dir);
        probe = fmt::format(".host-probe-{}-{}", ::getpid(),
                            std::chrono::steady_clock::now().time_since_epoch().count());
        write_file_atomic(hosts.dir / probe, name + "\n");
      } catch (const std::exception& e) {
        probe = std::string("!") + e.what();
      }
    }
    probe = dp->broadcast_text(probe, "checkpoint folder probe");
    if (probe.starts_with("!"))
      throw RunStopped(kHostCheckpointsComponent, fmt::format("{}: cannot write into the checkpoints folder: {}", hosts.dir.string(),
                                               probe.substr(1)),
                       1, !root);
    const std::string seen = hosts.is_leader() ? (fs::exists(hosts.dir / probe, ec) ? "1" : "0") : "";
    const std::vector<std::string> all_seen = dp->all_gather_text(seen, "checkpoint folder probe (seen)");
    if (root) {
      fs::remove(hosts.dir / probe, ec);
      if (!existed) fs::remove(hosts.dir, ec);  // made for the probe only: the first save makes it
    }
    std::vector<std::string> seeing, blind;
    for (int h = 1; h < hosts.hosts(); ++h)
      (all_seen[static_cast<size_t>(hosts.leader(h))] == "1" ? seeing : blind).push_back(hosts.names[static_cast<size_t>(h)]);
    if (!seeing.empty() && !blind.empty())
      throw RunStopped(kHostCheckpointsComponent,
                       fmt::format("{}: hosts {} share {}'s checkpoints folder and hosts {} do not; give every host "
                                   "its own with --checkpoint-dir 'DIR/{{host}}', or one folder every host shares",
                                   hosts.dir.string(), joined(seeing), hosts.names[0], joined(blind)),
                       2, !root);
    hosts.per_host = seeing.empty();
  }
  const int other_hosts = hosts.per_host ? hosts.hosts() - 1 : 0;
  hosts.replicas = replicas < 0 ? std::min(1, other_hosts) : std::min(replicas, other_hosts);
  if (root && info) {
    if (!hosts.per_host && hosts.hosts() > 1 && replicas > 0)
      info(fmt::format("checkpoints: {} is one folder all {} hosts share: --checkpoint-replicas {} has nothing to add",
                       hosts.dir.string(), hosts.hosts(), replicas));
    else if (hosts.per_host)
      info(fmt::format("checkpoints: a folder per host on {} host{} ({}), each rank's files also kept on {} other "
                       "host{}{}",
                       hosts.hosts(), hosts.hosts() == 1 ? "" : "s", joined(hosts.names), hosts.replicas,
                       hosts.replicas == 1 ? "" : "s",
                       replicas > other_hosts ? fmt::format(" (--checkpoint-replicas {}: only {} other host{})",
                                                            replicas, other_hosts, other_hosts == 1 ? "" : "s")
                                              : std::string()));
  }
  return hosts;
}

fs::path save_step_on_hosts(const CheckpointHosts& hosts, int64_t step, const io::StepFiles& files, size_t own_count,
                            const std::string& build_error, int keep, parallel::DataParallel& dp) {
  const int rank = hosts.rank;
  const bool leader = hosts.is_leader();

  // Each leader begins its host's folder; everyone learns every leader's (or why not).
  std::string begun;
  if (leader) {
    try {
      begun = io::begin_step_folder(hosts.dir, step).string();
    } catch (const std::exception& e) {
      begun = std::string("!") + e.what();
    }
  }
  const std::vector<std::string> all_begun = dp.all_gather_text(begun, "checkpoint folders");
  if (const std::string why = first_marked_failure(all_begun); !why.empty()) {
    if (leader && !begun.starts_with("!")) io::abandon_step_folder(begun);
    throw save_stopped(step, rank, why);
  }
  const fs::path tmp_dir = all_begun[static_cast<size_t>(hosts.leader(hosts.host()))];

  // Every rank writes its files into its host's folder.
  std::string error = build_error;
  std::vector<io::FileEntry> entries;
  if (error.empty()) {
    try {
      entries = io::write_step_files(tmp_dir, files);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }

  // Then the copies: each rank's own files to its replicas, rank 0's small files to every
  // other host's leader. Rounds by sender; a rank sends in its round, or receives.
  const std::vector<std::string> own(files.names.begin(), files.names.begin() + static_cast<std::ptrdiff_t>(own_count));
  const std::vector<std::string> root_files(files.names.begin() + static_cast<std::ptrdiff_t>(own_count),
                                            files.names.end());
  std::vector<Transfer> plan;
  for (int s = 0; s < static_cast<int>(hosts.host_of.size()); ++s) {
    std::map<int, Transfer> to;
    for (const int d : hosts.replica_ranks(s)) to[d] = Transfer{s, d, s == rank ? own : std::vector<std::string>{}};
    if (s == 0)
      for (int h = 1; h < hosts.hosts(); ++h) {
        Transfer& t = to.try_emplace(hosts.leader(h), Transfer{s, hosts.leader(h), {}}).first->second;
        if (rank == 0) t.names.insert(t.names.end(), root_files.begin(), root_files.end());
      }
    for (auto& [d, t] : to) plan.push_back(std::move(t));
  }
  std::string received_error;
  const std::vector<io::FileEntry> received =
      run_transfers(dp.communicator(), plan, rank, tmp_dir, error, received_error);
  if (error.empty()) error = received_error;
  entries.insert(entries.end(), received.begin(), received.end());

  // Every rank learns every rank's entries: its host's go into its leader's manifest, the
  // union is the checkpoint's set.
  const std::string mine = error.empty() ? entries_json(entries).dump() : "!" + error;
  const std::vector<std::string> all_written = dp.all_gather_text(mine, "checkpoint files");
  if (const std::string why = first_marked_failure(all_written); !why.empty()) {
    if (leader) io::abandon_step_folder(tmp_dir);
    throw save_stopped(step, rank, why);
  }
  std::map<std::string, io::FileEntry> set;
  std::vector<io::FileEntry> here;
  for (size_t r = 0; r < all_written.size(); ++r)
    for (const io::FileEntry& e : entries_from(nlohmann::json::parse(all_written[r]))) {
      set.emplace(e.name, e);
      if (hosts.host_of[r] == hosts.host()) here.push_back(e);
    }
  std::vector<io::FileEntry> set_entries;
  for (const auto& [n, e] : set) set_entries.push_back(e);

  std::string outcome;
  if (leader) {
    try {
      outcome = io::commit_step_folder(hosts.dir, tmp_dir, step, here, keep, set_entries).string();
    } catch (const std::exception& e) {
      outcome = std::string("!") + e.what();
    }
  }
  const std::vector<std::string> outcomes = dp.all_gather_text(outcome, "checkpoint outcome");
  if (const std::string why = first_marked_failure(outcomes); !why.empty()) throw save_stopped(step, rank, why);
  return outcomes[static_cast<size_t>(hosts.leader(hosts.host()))];
}

fs::path complete_on_hosts(const CheckpointHosts& hosts, parallel::DataParallel* dp,
                           const std::function<void(const std::string&)>& info) {
  const int rank = hosts.rank;
  const bool root = rank == 0, leader = hosts.is_leader();

  // Each leader: the steps its folder holds, and which of their files verify.
  std::string report;
  if (leader) {
    nlohmann::json steps = nlohmann::json::array();
    for (const io::HeldStep& s : io::list_held_steps(hosts.dir))
      steps.push_back({{"step", s.step}, {"set", entries_json(s.checkpoint_files)}, {"held", s.held}});
    report = steps.dump();
  }
  const std::vector<std::string> reports = gather(dp, report, "checkpoint steps held");
  // host -> step -> (set, held)
  std::vector<std::map<int64_t, std::pair<std::vector<io::FileEntry>, std::set<std::string>>>> held(
      static_cast<size_t>(hosts.hosts()));
  std::set<int64_t, std::greater<>> steps;
  for (int h = 0; h < hosts.hosts(); ++h)
    for (const nlohmann::json& s : nlohmann::json::parse(reports[static_cast<size_t>(hosts.leader(h))])) {
      const int64_t step = s["step"].get<int64_t>();
      held[static_cast<size_t>(h)][step] = {entries_from(s["set"]), s["held"].get<std::set<std::string>>()};
      steps.insert(step);
    }
  const auto same_entry = [](const io::FileEntry& a, const io::FileEntry& b) {
    return a.name == b.name && a.bytes == b.bytes && a.crc32c == b.crc32c;
  };
  const auto same_set = [&](const std::vector<io::FileEntry>& a, const std::vector<io::FileEntry>& b) {
    return std::equal(a.begin(), a.end(), b.begin(), b.end(), same_entry);
  };

  // The newest step whose set the hosts hold together. A host's folder of that step from
  // another history (another set) does not count.
  int64_t chosen = -1;
  std::vector<io::FileEntry> set;
  std::map<std::string, std::vector<int>> holders;  // file -> hosts holding it verified
  std::string lost;
  for (const int64_t step : steps) {
    set.clear();
    holders.clear();
    for (int h = 0; h < hosts.hosts() && set.empty(); ++h)
      if (const auto it = held[static_cast<size_t>(h)].find(step); it != held[static_cast<size_t>(h)].end())
        set = it->second.first;
    for (int h = 0; h < hosts.hosts(); ++h) {
      const auto it = held[static_cast<size_t>(h)].find(step);
      if (it == held[static_cast<size_t>(h)].end() || !same_set(it->second.first, set)) continue;
      for (const std::string& name : it->second.second) holders[name].push_back(h);
    }
    std::vector<std::string> missing;
    for (const io::FileEntry& e : set)
      if (!holders.count(e.name)) missing.push_back(e.name);
    if (missing.empty()) {
      chosen = step;
      break;
    }
    if (lost.empty()) lost = fmt::format("step {} lacks {}", step, joined(missing));
  }
  if (chosen < 0) {
    const std::string where = fmt::format("{} on host{} {}", hosts.pattern, hosts.hosts() == 1 ? "" : "s",
                                          joined(hosts.names));
    throw RunStopped(kHostCheckpointsComponent,
                     steps.empty()
                         ? fmt::format("{}: no checkpoints to resume from", where)
                         : fmt::format("{}: no checkpoint is complete on these hosts: {}, which no host that answers "
                                       "holds (a lost host's files survive only as replicas on other hosts: "
                                       "--checkpoint-replicas 1 or more)",
                                       where, lost),
                     1, !root);
  }

  // Each file a host lacks comes from the first host that holds it, leader to leader.
  const std::string step_name = io::checkpoint_dir_name(chosen);
  std::map<std::pair<int, int>, Transfer> by_pair;
  std::vector<bool> has_folder(static_cast<size_t>(hosts.hosts()), false);
  for (int h = 0; h < hosts.hosts(); ++h) {
    const auto it = held[static_cast<size_t>(h)].find(chosen);
    const bool same = it != held[static_cast<size_t>(h)].end() && same_set(it->second.first, set);
    has_folder[static_cast<size_t>(h)] = same;
    for (const io::FileEntry& e : set) {
      if (same && it->second.second.count(e.name)) continue;
      const int from = holders[e.name].front();
      Transfer& t = by_pair[{hosts.leader(from), hosts.leader(h)}];
      t.source = hosts.leader(from);
      t.dest = hosts.leader(h);
      t.names.push_back(e.name);
    }
  }
  std::vector<Transfer> plan;
  for (auto& [pair, t] : by_pair) plan.push_back(std::move(t));

  std::string outcome;
  if (leader && !plan.empty()) {
    const bool mine_has = has_folder[static_cast<size_t>(hosts.host())];
    const bool receives = std::any_of(plan.begin(), plan.end(), [&](const Transfer& t) { return t.dest == rank; });
    fs::path into = hosts.dir / step_name;
    std::string error;
    try {
      if (receives && !mine_has) into = io::begin_step_folder(hosts.dir, chosen);
    } catch (const std::exception& e) {
      error = e.what();
    }
    // A sender sends from its host's complete folder of the step.
    std::vector<io::FileEntry> got;
    if (receives && error.empty()) {
      got = run_transfers(dp->communicator(), plan, rank, into, "", error);
    } else {
      std::string ignored;
      got = run_transfers(dp->communicator(), plan, rank, hosts.dir / step_name, error, ignored);
    }
    try {
      for (const io::FileEntry& e : got) {
        const auto it = std::find_if(set.begin(), set.end(), [&](const io::FileEntry& s) { return s.name == e.name; });
        if (error.empty() && (it == set.end() || !same_entry(*it, e)))
          error = fmt::format("{}: received {} bytes with CRC-32C {}, the checkpoint's has {} bytes, {}",
                              (into / e.name).string(), e.bytes, crc32c_hex(e.crc32c),
                              it == set.end() ? 0 : it->bytes, it == set.end() ? "none" : crc32c_hex(it->crc32c));
      }
      if (error.empty() && receives) {
        if (mine_has)
          io::add_to_step_folder(into, got);
        else
          io::commit_step_folder(hosts.dir, into, chosen, got, 0, set);
      }
    } catch (const std::exception& e) {
      error = e.what();
    }
    if (!error.empty()) {
      if (receives && !mine_has) io::abandon_step_folder(into);
      outcome = "!" + error;
    } else if (receives) {
      uint64_t bytes = 0;
      for (const io::FileEntry& e : got) bytes += e.bytes;
      outcome = fmt::format("{} file{} ({} bytes)", got.size(), got.size() == 1 ? "" : "s", bytes);
    }
  }
  const std::vector<std::string> outcomes = gather(dp, outcome, "checkpoint completed");
  if (const std::string why = first_marked_failure(outcomes); !why.empty())
    throw RunStopped(kHostCheckpointsComponent, fmt::format("resuming from {}: could not complete it on every host: {}", step_name, why),
                     1, !root);
  if (root && info)
    for (int h = 0; h < hosts.hosts(); ++h)
      if (const std::string& got = outcomes[static_cast<size_t>(hosts.leader(h))]; !got.empty())
        info(fmt::format("resume: {} on host {} completed with {} from the other hosts", step_name,
                         hosts.names[static_cast<size_t>(h)], got));
  return hosts.dir / step_name;
}

}  // namespace flotilla::train
