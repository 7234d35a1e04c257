#include "flotilla/train/launcher.hpp"

#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/stop_signal.hpp"
#include "flotilla/base/subprocess.hpp"
#include "flotilla/train/checkpoint.hpp"
#include "flotilla/train/elastic.hpp"

namespace flotilla::train {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
constexpr const char* kLauncherComponent = "launch";

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

// train's arguments split into those every attempt passes as they are and those the
// launcher sets per attempt: the batch cut (replaced), and --resume and --force (the first
// attempt passes the user's; later ones resume the run's own folder).
struct TrainArgs {
  std::vector<std::string> kept;
  std::vector<std::string> first_only;  // the user's --resume [DIR] and --force
};

TrainArgs split_train_args(const std::vector<std::string>& args) {
  static const std::set<std::string, std::less<>> batch = {"--batch-size", "--grad-accum",
                                                          "--grad-accumulation-steps"};
  TrainArgs out;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    const bool inline_value = a.find('=') != std::string::npos;
    const std::string name = a.substr(0, a.find('='));
    if (batch.contains(name)) {
      if (!inline_value) ++i;  // its value is the next word
    } else if (name == "--resume") {
      out.first_only.push_back(a);
      // `--resume DIR`: a value that is not the next flag.
      if (!inline_value && i + 1 < args.size() && !args[i + 1].starts_with("-")) out.first_only.push_back(args[++i]);
    } else if (a == "--force") {
      out.first_only.push_back(a);
    } else {
      out.kept.push_back(a);
    }
  }
  return out;
}

std::string replace_all(std::string s, std::string_view what, std::string_view with) {
  for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + with.size()))
    s.replace(at, what.size(), with);
  return s;
}


// One attempt's mpirun, watched: its output passes through; the first error line starts
// the grace period, after which the job's remains are ended.
struct AttemptEnd {
  int status = 0;
  int user_signal = 0;                  // the user's SIGINT or SIGTERM to the launcher, passed on
  bool stopped_to_grow = false;         // more slots answered: stopped at a step, to relaunch larger
  std::string first_error;              // the first error line any rank printed
  std::optional<double> fault_s;        // when it appeared (launcher clock)
  std::optional<double> first_step_s;   // when this attempt printed its first step line
  int64_t last_step = -1;               // the last step line's step
  int64_t last_checkpoint_step = -1;    // the last "checkpoint: .../step-N (" line's step
  std::vector<int64_t> checkpoint_steps;  // every such line's step
};

// `grow`, asked every `rescan_s` seconds once training runs: whether a larger world
// answers now; if so the job is stopped at a step boundary (flotilla finishes the step,
// checkpoints and exits) so that the next attempt takes the hosts in.
//
// A stop goes to mpirun as SIGUSR1 once the ranks train (their handlers are in place):
// mpirun passes it on to every rank at once. SIGINT or SIGTERM would make mpirun abort the
// job instead: SIGCONT, then SIGTERM to the ranks only after --mca odls_base_sigkill_timeout
// (set to --grace, so that a checkpoint has time), i.e. seconds of training more.
AttemptEnd supervise(const std::vector<std::string>& argv, double grace_s, double rescan_s,
                     const std::function<bool()>& grow, Clock::time_point t0) {
  Subprocess child(argv, /*capture_stdout=*/true, /*capture_stderr=*/true);
  AttemptEnd end;
  Clock::time_point last_scan = Clock::now();
  std::string line_out, line_err;
  std::optional<Clock::time_point> fault_at, term_sent;
  int forwarded_signal = 0;
  // See above: SIGUSR1 once the ranks train, SIGINT before.
  const auto stop_job = [&] { child.signal(end.first_step_s ? SIGUSR1 : SIGINT); };
  const auto scan = [&](std::string& pending, bool is_err) {
    size_t nl;
    while ((nl = pending.find('\n')) != std::string::npos) {
      const std::string line = pending.substr(0, nl);
      pending.erase(0, nl + 1);
      if (!is_err) {
        long long step = 0;
        if (std::sscanf(line.c_str(), "step %lld/", &step) == 1) {
          if (!end.first_step_s) end.first_step_s = seconds_since(t0);
          end.last_step = step;
        }
        if (const size_t at = line.rfind("/step-"); line.starts_with("checkpoint: ") && at != std::string::npos)
          if (std::sscanf(line.c_str() + at, "/step-%lld", &step) == 1) {
            end.last_checkpoint_step = step;
            end.checkpoint_steps.push_back(step);
          }
        continue;
      }
      const bool error = line.find("flotilla: error:") != std::string::npos ||
                         line.find("mpirun noticed that process") != std::string::npos ||
                         line.find("ORTE has lost communication") != std::string::npos ||
                         line.find("mpirun has exited due to process") != std::string::npos;
      if (error && !fault_at) {
        fault_at = Clock::now();
        end.fault_s = seconds_since(t0);
        end.first_error = line;
      }
    }
  };
  char buf[8192];
  while (true) {
    std::vector<pollfd> fds;
    if (child.out_fd() >= 0) fds.push_back({child.out_fd(), POLLIN, 0});
    if (child.err_fd() >= 0) fds.push_back({child.err_fd(), POLLIN, 0});
    if (!fds.empty() && ::poll(fds.data(), fds.size(), 200) > 0) {
      for (const pollfd& p : fds) {
        if (!(p.revents & (POLLIN | POLLHUP | POLLERR))) continue;
        const ssize_t n = ::read(p.fd, buf, sizeof buf);
        const bool is_err = p.fd == child.err_fd();
        if (n <= 0) {
          is_err ? child.close_err() : child.close_out();
          continue;
        }
        std::fwrite(buf, 1, static_cast<size_t>(n), is_err ? stderr : stdout);
        std::fflush(is_err ? stderr : stdout);
        std::string& pending = is_err ? line_err : line_out;
        pending.append(buf, static_cast<size_t>(n));
        scan(pending, is_err);
      }
    } else if (fds.empty()) {
      ::usleep(50000);
    }
    if (const std::optional<int> status = child.poll_exit(); status && fds.empty()) {
      end.status = *status;
      break;
    } else if (status && child.out_fd() < 0 && child.err_fd() < 0) {
      end.status = *status;
      break;
    }
    // The user's Ctrl-C or SIGTERM: passed on once (flotilla stops at a step boundary and
    // says so), then the job ends as it ends; no restart.
    if (const int sig = stop_signal_received(); sig != 0 && forwarded_signal == 0) {
      forwarded_signal = sig;
      end.user_signal = sig;
      stop_job();
    }
    if (rescan_s > 0 && end.first_step_s && !fault_at && forwarded_signal == 0 &&
        seconds_since(last_scan) > rescan_s) {
      last_scan = Clock::now();
      if (grow()) {
        forwarded_signal = SIGUSR1;
        end.stopped_to_grow = true;
        stop_job();
      }
    }
    // A rank failed: the others follow within flotilla's --timeout; mpirun gets the grace
    // period to end them and exit, then its remains are ended.
    if (fault_at && std::chrono::duration<double>(Clock::now() - *fault_at).count() > grace_s) {
      if (!term_sent) {
        std::fprintf(stderr, "launch: the job has not ended %.0f s after its first error: ending it\n", grace_s);
        child.signal_group(SIGTERM);
        term_sent = Clock::now();
      } else if (std::chrono::duration<double>(Clock::now() - *term_sent).count() > 5.0) {
        child.signal_group(SIGKILL);
      }
    }
  }
  if (!end.fault_s && end.status != 0) end.fault_s = seconds_since(t0);
  return end;
}

class Timeline {
 public:
  Timeline(fs::path metrics, Clock::time_point t0) : metrics_(std::move(metrics)), t0_(t0) {}

  void add(nlohmann::json event, const std::string& text) {
    const double t = seconds_since(t0_);
    event["seq"] = static_cast<int64_t>(events_.size());
    event["t_s"] = std::round(t * 1000.0) / 1000.0;
    event["time"] = utc_now();
    event["unix_s"] = std::round(unix_now() * 1000.0) / 1000.0;
    events_.push_back(event);
    lines_.push_back(fmt::format("{:>9.1f} s  {}", t, text));
    std::fprintf(stderr, "launch: %s\n", text.c_str());
    std::fflush(stderr);
  }

  // Appends to metrics.jsonl the events it does not hold yet (a fresh restart rewrites the
  // file; a resumed one keeps the event lines, train/job_record.cpp).
  void flush() const {
    if (!fs::is_directory(metrics_.parent_path())) fs::create_directories(metrics_.parent_path());
    std::set<int64_t> present;
    if (fs::is_regular_file(metrics_)) {
      const std::string text = read_text_file(metrics_);
      size_t begin = 0;
      while (begin < text.size()) {
        size_t end = text.find('\n', begin);
        if (end == std::string::npos) end = text.size();
        const nlohmann::json j = nlohmann::json::parse(text.substr(begin, end - begin), nullptr, false);
        if (j.is_object() && j.contains("event") && j.contains("seq") && j["seq"].is_number_integer())
          present.insert(j["seq"].get<int64_t>());
        begin = end + 1;
      }
    }
    std::string add;
    for (const nlohmann::json& e : events_)
      if (!present.contains(e["seq"].get<int64_t>())) add += e.dump() + "\n";
    if (add.empty()) return;
    std::FILE* f = std::fopen(metrics_.c_str(), "a");
    if (!f) throw Error(kLauncherComponent, fmt::format("{}: cannot append: {}", metrics_.string(), std::strerror(errno)));
    std::fwrite(add.data(), 1, add.size(), f);
    std::fclose(f);
  }

  void print() const {
    std::fprintf(stderr, "launch: timeline\n");
    for (const std::string& l : lines_) std::fprintf(stderr, "  %s\n", l.c_str());
  }

 private:
  fs::path metrics_;
  Clock::time_point t0_;
  std::vector<nlohmann::json> events_;
  std::vector<std::string> lines_;
};

// The hosts of this attempt that answer, and those that do not.
// `timeline` null: a rescan while the job runs, which records nothing.
std::vector<HostSlots> answering_hosts(const LaunchConfig& opt, Timeline* timeline, int attempt) {
  std::vector<HostSlots> listed;
  if (!opt.discover.empty()) {
    std::string out;
    const int status = run_capture({"/bin/sh", "-c", opt.discover}, opt.probe_timeout_s, &out, false);
    if (status != 0)
      throw InputError(kLauncherComponent, fmt::format("--discover: `{}` exited with status {}", opt.discover, status));
    listed = parse_hostfile(out, "--discover output");
  } else {
    listed = parse_hostfile(read_text_file(opt.hostfile), opt.hostfile);
  }
  std::vector<HostSlots> alive;
  for (const HostSlots& h : listed) {
    if (is_local_host(h.host) || opt.probe.empty()) {
      alive.push_back(h);
      continue;
    }
    std::string ignored;
    const std::string cmd = replace_all(opt.probe, "{host}", h.host);
    if (run_capture({"/bin/sh", "-c", cmd}, opt.probe_timeout_s, &ignored, /*silence_stderr=*/true) == 0) {
      alive.push_back(h);
    } else if (timeline) {
      timeline->add({{"event", "host_unreachable"}, {"attempt", attempt}, {"host", h.host}},
                   fmt::format("host {} does not answer (`{}`): left out", h.host, cmd));
    }
  }
  return alive;
}

}  // namespace

int run_launch(const LaunchConfig& opt) {
  if (opt.train_args.empty() || opt.train_args.front() != "train")
    throw InputError(kLauncherComponent, "give the job after `--`: flotilla launch [options] -- train --out DIR ...");
  if (opt.hostfile.empty() == opt.discover.empty())
    throw InputError(kLauncherComponent, "give the hosts with --hostfile FILE or --discover COMMAND (one of them)");
  if (opt.min_hosts < 1 || opt.max_hosts < 0 || opt.max_restarts < 0 || !(opt.grace_s >= 0) || !(opt.rescan_s >= 0))
    throw InputError(kLauncherComponent, "--min-hosts must be at least 1; --max-hosts, --max-restarts, --grace and --rescan "
                                 "at least 0");
  if (opt.max_hosts > 0 && opt.max_hosts < opt.min_hosts)
    throw InputError(kLauncherComponent, fmt::format("--max-hosts {} is below --min-hosts {}", opt.max_hosts, opt.min_hosts));
  if (opt.save_every <= 0)
    throw InputError(kLauncherComponent, "the job needs --save-every N: a restart resumes from the newest checkpoint, and "
                                 "without checkpoints it would start over");
  const LaunchConfig& train = opt;
  const TrainArgs args = split_train_args(opt.train_args);

  // Ctrl-C or SIGTERM to the launcher: passed on to the job, which stops at a step
  // boundary with a checkpoint; a second one ends the launcher at once.
  const StopSignals stop_signals;
  const Clock::time_point t0 = Clock::now();
  Timeline timeline(fs::path(train.out) / "metrics.jsonl", t0);
  int64_t global_rows = 0;
  // The last failure's time and step, until the next attempt trains (fault_s < 0: none).
  double fault_s = -1.0;
  int64_t fault_step = -1;
  int failures = 0;
  // The step of the last checkpoint any attempt wrote (-1: none), and whether the first
  // attempt resumed (its folders hold checkpoints).
  int64_t checkpointed_step = -1;
  bool resumed_as_asked = false;
  // The hosts that answered when the last attempt started: the majority a relaunch needs.
  std::vector<HostSlots> members;
  // With a folder per host: for each checkpoint step an attempt wrote, the hosts holding
  // each rank's files (checkpoint_holders of that attempt's hosts).
  const bool per_host = train.checkpoint_dir.find("{host}") != std::string::npos;
  std::map<int64_t, std::vector<std::vector<std::string>>> holders_of_step;
  for (int attempt = 1;; ++attempt) {
    const std::vector<HostSlots> alive = answering_hosts(opt, &timeline, attempt);
    if (attempt > 1) {
      // Checked before --min-hosts: in a partition the launcher is on one side, the other
      // side's ranks end on their own (their collectives time out, their daemons lose
      // mpirun), and only a side with more than half of the last world may go on.
      const HostQuorum quorum = last_world_quorum(members, alive);
      if (!quorum.majority()) {
        timeline.add({{"event", "no_majority"},
                      {"attempt", attempt},
                      {"answering", quorum.answering},
                      {"lost", quorum.lost}},
                     fmt::format("{}: not a strict majority, stopping", quorum.describe()));
        timeline.flush();
        timeline.print();
        throw Error(kLauncherComponent,
                    fmt::format("{}: the side of a partition without a strict majority of the last world stops (the "
                                "other side may be training); the newest checkpoint in {} resumes with flotilla launch "
                                "... -- train ... once more than half of them answer",
                                quorum.describe(), train.out));
      }
    }
    members = alive;
    if (static_cast<int>(alive.size()) < opt.min_hosts) {
      timeline.add({{"event", "gave_up"}, {"attempt", attempt}, {"hosts", alive.size()}},
                   fmt::format("{} host{} answer, --min-hosts is {}: stopping", alive.size(),
                               alive.size() == 1 ? "" : "s", opt.min_hosts));
      if (attempt > 1) timeline.flush();
      timeline.print();
      throw Error(kLauncherComponent, fmt::format("only {} host{} answer (--min-hosts {}); the newest checkpoint in {} resumes "
                                          "with flotilla launch ... -- train ... once enough are back",
                                          alive.size(), alive.size() == 1 ? "" : "s", opt.min_hosts, train.out));
    }
    if (global_rows == 0) {
      // The first attempt fixes the global batch: every slot offered, at the flags' cut.
      int64_t slots = 0;
      const size_t usable = opt.max_hosts > 0 ? std::min(alive.size(), static_cast<size_t>(opt.max_hosts)) : alive.size();
      for (size_t i = 0; i < usable; ++i) slots += alive[i].slots;
      global_rows = train.batch_size * train.grad_accum * slots;
    }
    // The deterministic mode's groups stay whole on every rank (its bytes depend on them).
    const int64_t group = train.deterministic_group;
    std::optional<ElasticShape> shape = plan_elastic_shape(alive, opt.max_hosts, global_rows, train.batch_size, group);
    // A world smaller than the answering hosts must take hosts that hold, between them, the
    // newest checkpoint they can resume (a host left out cannot hand its files over).
    if (per_host && attempt > 1) {
      const auto held_by = [](const std::vector<HostSlots>& hosts, const std::vector<std::vector<std::string>>& holders) {
        return std::all_of(holders.begin(), holders.end(), [&](const std::vector<std::string>& on) {
          return std::any_of(hosts.begin(), hosts.end(), [&](const HostSlots& h) {
            return std::find(on.begin(), on.end(), h.host) != on.end();
          });
        });
      };
      for (auto it = holders_of_step.rbegin(); it != holders_of_step.rend(); ++it) {
        if (!held_by(alive, it->second)) continue;  // a rank's files are lost: an older step
        if (!held_by(shape->hosts, it->second))
          shape = plan_elastic_shape(holders_first(alive, it->second), opt.max_hosts, global_rows, train.batch_size, group);
        break;
      }
    }
    // Resume: the run's newest complete checkpoint, if it has one (the first attempt does
    // what the user asked).
    std::vector<std::string> run_args = args.kept;
    std::string from = "from the start";
    int64_t resume_step = 0;
    if (attempt == 1) {
      run_args.insert(run_args.end(), args.first_only.begin(), args.first_only.end());
      for (const std::string& a : args.first_only)
        if (a.starts_with("--resume")) {
          from = "resuming as asked";
          resumed_as_asked = true;
        }
    } else {
      // The newest complete checkpoint this machine can see. With a folder per host
      // ("{host}", or local disks under one path) it cannot see the others': once an
      // attempt wrote a checkpoint (or the run resumed), train gathers the newest step the
      // hosts hold together. --force only when nothing was ever written: it clears folders.
      std::optional<int64_t> found;
      if (train.checkpoint_dir.find("{host}") == std::string::npos) {
        try {
          found = find_resume_point(train.checkpoint_dir.empty() ? fs::path(train.out)
                                                                 : fs::path(train.checkpoint_dir))
                      .step;
        } catch (const InputError&) {
        }
      }
      if (found) {
        run_args.emplace_back("--resume");
        resume_step = *found;
        from = fmt::format("from checkpoint step {}", *found);
      } else if (checkpointed_step >= 0 || resumed_as_asked) {
        run_args.emplace_back("--resume");
        resume_step = std::max<int64_t>(0, checkpointed_step);
        from = checkpointed_step >= 0
                   ? fmt::format("from the newest checkpoint the hosts hold together (step {} written last)",
                                 checkpointed_step)
                   : std::string("from the newest checkpoint the hosts hold together");
      } else {
        run_args.emplace_back("--force");  // the run's own folder, written by the attempt before
        from = "from the start (no complete checkpoint yet)";
      }
    }
    run_args.insert(run_args.end(), {"--batch-size", std::to_string(shape->batch_size), "--grad-accum",
                                     std::to_string(shape->grad_accum)});
    std::vector<std::string> argv = {opt.mpirun};
    // When mpirun aborts a job (a rank failed or exited non-zero, or SIGINT/SIGTERM before
    // training began) it sends the ranks still running SIGCONT, waits this timeout, sends
    // SIGTERM, waits again, then SIGKILL. Stops go as SIGUSR1 (supervise), so no checkpoint
    // needs this time: it only has to cover a rank finishing its exit after the others
    // (a stop's checkpoint is committed before any rank exits). 1 s by default; 3 here,
    // unless set. Each failure costs about twice this before the relaunch.
    if (std::find(opt.mpirun_args.begin(), opt.mpirun_args.end(), "odls_base_sigkill_timeout") == opt.mpirun_args.end())
      argv.insert(argv.end(), {"--mca", "odls_base_sigkill_timeout", "3"});
    argv.insert(argv.end(), opt.mpirun_args.begin(), opt.mpirun_args.end());
    std::string host_list;
    for (const HostSlots& h : shape->hosts) host_list += fmt::format("{}{}:{}", host_list.empty() ? "" : ",", h.host, h.slots);
    argv.insert(argv.end(), {"-np", std::to_string(shape->world), "--host", host_list, opt.self});
    argv.insert(argv.end(), run_args.begin(), run_args.end());

    nlohmann::json hosts_json = nlohmann::json::array();
    for (const HostSlots& h : shape->hosts) hosts_json.push_back({{"host", h.host}, {"slots", h.slots}});
    timeline.add({{"event", "attempt_start"},
                  {"attempt", attempt},
                  {"world", shape->world},
                  {"hosts", hosts_json},
                  {"batch_size", shape->batch_size},
                  {"grad_accum", shape->grad_accum},
                  {"resume_step", resume_step}},
                 fmt::format("attempt {}: {}, {}", attempt, shape->describe(), from));
    const auto grow = [&] {
      const std::optional<ElasticShape> now =
          plan_elastic_shape(answering_hosts(opt, nullptr, attempt), opt.max_hosts, global_rows, train.batch_size, group);
      if (!now || now->world <= shape->world) return false;
      timeline.add({{"event", "grow"}, {"attempt", attempt}, {"world", now->world}},
                   fmt::format("{} ranks answer now ({} run): stopping at the next step to take them in", now->world,
                               shape->world));
      return true;
    };
    const AttemptEnd end = supervise(argv, opt.grace_s, opt.rescan_s, grow, t0);
    checkpointed_step = std::max(checkpointed_step, end.last_checkpoint_step);
    for (const int64_t step : end.checkpoint_steps)
      holders_of_step[step] = checkpoint_holders(shape->hosts, opt.checkpoint_replicas);
    if (fault_s >= 0 && end.first_step_s) {
      const double recovery = *end.first_step_s - fault_s;
      // The first step's wall-clock time: a fault injected from outside is timed against it.
      const double first_step_unix = unix_now() - (seconds_since(t0) - *end.first_step_s);
      timeline.add({{"event", "training_again"},
                    {"attempt", attempt},
                    {"recovery_s", std::round(recovery * 1000.0) / 1000.0},
                    {"first_step_unix_s", std::round(first_step_unix * 1000.0) / 1000.0},
                    {"steps_repeated", std::max<int64_t>(0, fault_step - resume_step)}},
                   fmt::format("training again {:.1f} s after the fault ({} step{} repeated)", recovery,
                               std::max<int64_t>(0, fault_step - resume_step),
                               std::max<int64_t>(0, fault_step - resume_step) == 1 ? "" : "s"));
      fault_s = -1.0;
    }
    if (end.status == 0) {
      timeline.add({{"event", "complete"}, {"attempt", attempt}}, fmt::format("attempt {}: the job completed", attempt));
      timeline.flush();
      timeline.print();
      return 0;
    }
    if (end.stopped_to_grow && end.status != 0) {
      timeline.add({{"event", "stopped_to_grow"}, {"attempt", attempt}, {"status", end.status}, {"last_step", end.last_step}},
                   fmt::format("attempt {} stopped after step {} to grow", attempt, std::max<int64_t>(0, end.last_step)));
      timeline.flush();
      continue;  // not a failure: no restart is used
    }
    const std::string why = end.first_error.empty() ? fmt::format("exit status {}", end.status) : end.first_error;
    timeline.add({{"event", "attempt_failed"},
                  {"attempt", attempt},
                  {"status", end.status},
                  {"last_step", end.last_step},
                  {"error", end.first_error}},
                 fmt::format("attempt {} ended (status {}) after step {}: {}", attempt, end.status,
                             std::max<int64_t>(0, end.last_step), why));
    timeline.flush();
    if (end.user_signal != 0) {
      timeline.print();
      return end.status == 0 ? 0 : 128 + end.user_signal;  // as the shell reports the user's signal
    }
    // flotilla exits 2 on an input error: the same job would fail the same way again.
    if (end.status == 2) {
      timeline.print();
      throw Error(kLauncherComponent, "the job stopped on an input error (above): not restarting it");
    }
    if (++failures > opt.max_restarts) {
      timeline.print();
      throw Error(kLauncherComponent, fmt::format("the job failed {} time{}; --max-restarts {} reached", failures,
                                          failures == 1 ? "" : "s", opt.max_restarts));
    }
    fault_s = end.fault_s.value_or(seconds_since(t0));
    fault_step = end.last_step;
  }
}


}  // namespace flotilla::train
